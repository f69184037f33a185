"""A WSGI test app served as a single-threaded FastCGI child by flup 1.0.3.

The query string chooses the behaviour: ``sleep=SECONDS`` waits first, ``size=N`` answers
with N bytes (streamed in 64 KiB pieces), ``echo=1`` answers with the request body,
``status=N`` sets the status, ``touch=PATH`` creates PATH when the request starts (so a test
knows a child has it), ``stderr=TEXT`` writes a line to fd 2, ``env=1`` answers with the
environment as JSON. Every answer carries X-Pid so tests can tell children apart.
"""

import json
import os
import sys
import time
from urllib.parse import parse_qs

CHUNK = b"x" * 65536


def app(environ, start_response):
    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if "touch" in query:
        with open(query["touch"], "w") as marker:
            marker.write(str(os.getpid()))
    if "stderr" in query:
        print(query["stderr"], file=sys.stderr, flush=True)
    if query.get("env"):
        body = json.dumps(dict(os.environ)).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if "sleep" in query:
        time.sleep(float(query["sleep"]))
    status = query.get("status", "200")
    headers = [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))]
    if query.get("echo"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        start_response(f"{status} X", [*headers, ("Content-Length", str(len(body)))])
        return [body]
    if "size" in query:
        size = int(query["size"])
        start_response(f"{status} X", [*headers, ("Content-Length", str(size))])
        return _stream(size)
    body = f"hello from {os.getpid()} {environ.get('REQUEST_URI', '')}\n".encode()
    start_response(f"{status} X", headers)
    return [body]


def _stream(size):
    while size > 0:
        piece = CHUNK[: min(size, len(CHUNK))]
        size -= len(piece)
        yield piece


if __name__ == "__main__":
    from flup.server.fcgi_single import WSGIServer

    sys.exit(0 if WSGIServer(app).run() is not True else 1)
