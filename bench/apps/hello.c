/* The trivial FastCGI child of the benchmarks: the worst case for a proxy in the data path,
 * since the child itself costs almost nothing. Built from libfcgi like qgis_mapserv.fcgi. */
#include <fcgi_stdio.h>
#include <stdlib.h>

int main(void) {
    while (FCGI_Accept() >= 0) {
        const char *uri = getenv("REQUEST_URI");
        printf("Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nhello %s\n", uri ? uri : "");
    }
    return 0;
}
