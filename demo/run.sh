#!/usr/bin/env bash
# The fcgipool demo: QGIS Server behind nginx and fcgipool, on Debian 12 (bookworm).
#
#   sudo demo/run.sh            # then open http://127.0.0.1:8080/ ; Ctrl-C stops everything
#
# As root, from anywhere in the repository.  Idempotent: the first run installs
# (apt: qgis-server, nginx, python3-venv; ~1.2 GB and a few minutes), later runs only
# refresh the demo.  What it sets up:
#
#   /opt/fcgipool/venv          a virtualenv with fcgipool installed from this repository
#   /opt/fcgipool/demo          a copy of demo/ (projects, static page, nginx + pool configs)
#   /var/lib/fcgipool/qgis      HOME of the QGIS children, who run as www-data
#   /run/fcgipool               sockets, nginx pid and temp files, Qt runtime folder
#
# then starts nginx (127.0.0.1:8080, demo/nginx.conf) as a daemon and runs the pool
# (demo/fcgipool.toml) in the foreground.  When the pool ends, nginx is stopped too.
set -euo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/fcgipool
VENV=$PREFIX/venv
DEMO=$PREFIX/demo
RUNDIR=/run/fcgipool
QGIS_HOME=/var/lib/fcgipool/qgis          # = HOME in demo/fcgipool.toml
QGIS_RUNTIME=$RUNDIR/qgis-runtime          # = XDG_RUNTIME_DIR in demo/fcgipool.toml
QGIS_TMP=$RUNDIR/qgis-tmp                  # = TMPDIR in demo/fcgipool.toml
NGINX=(nginx -c "$DEMO/nginx.conf")

say() { printf '==> %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run me as root: sudo $0"
[[ -f $REPO/pyproject.toml && -f $REPO/demo/fcgipool.toml ]] || die "$REPO is not the fcgipool repository"
command -v dpkg-query >/dev/null || die "this demo needs Debian 12 (bookworm) or a close relative"

# --- 1. system packages (skipped when present) ----------------------------------------------
wanted=(qgis-server python3-venv python3-pip fonts-dejavu-core)
command -v nginx >/dev/null || wanted+=(nginx-light)   # any nginx package will do
missing=()
for pkg in "${wanted[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
[[ -x /usr/lib/cgi-bin/qgis_mapserv.fcgi ]] || die "/usr/lib/cgi-bin/qgis_mapserv.fcgi is missing"

# --- 2. fcgipool in its own virtualenv -------------------------------------------------------
# Debian's python3 (PEP 668 forbids pip into it).  Never put $VENV/bin on the PATH of the
# QGIS children: their embedded Python would adopt this venv (see demo/fcgipool.toml).
if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV"
    install -d -m 0755 "$PREFIX"
    /usr/bin/python3 -m venv "$VENV"
fi
say "installing fcgipool from $REPO into $VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$REPO"

# --- 3. the demo files -----------------------------------------------------------------------
say "installing the demo in $DEMO"
install -d -m 0755 "$PREFIX"
rm -rf "$PREFIX"/.demo.*                    # left over by an interrupted run
stage=$(mktemp -d "$PREFIX/.demo.XXXXXX")
cp -R "$REPO/demo/." "$stage/"
# heavy.qgs's 50,000 points (5.8 MB) are not in git: generate them (~1 s, same bytes each
# time) unless a local `make_project.py` run left them in the repository.
if [[ ! -s $stage/project/data/heavy_points.geojson ]]; then
    /usr/bin/python3 "$stage/make_project.py" --heavy-only --out "$stage/project" >/dev/null
fi
chmod -R u=rwX,go=rX "$stage"
chown -R root:root "$stage"
rm -rf "$DEMO"
mv "$stage" "$DEMO"

# --- 4. state and runtime folders ------------------------------------------------------------
install -d -m 0755 "$RUNDIR" "$RUNDIR/nginx"   # nginx workers (www-data) must reach demo.sock
# The QGIS children run as www-data (child.user): their HOME and Qt runtime folder are theirs.
rm -rf "$QGIS_TMP"                          # QGIS leaves a QGIS3-XXXXXX folder per process
install -d -m 0700 -o www-data -g www-data "$QGIS_RUNTIME" "$QGIS_TMP" "$QGIS_HOME"
chown -R www-data:www-data "$QGIS_HOME"

# --- 5. nginx --------------------------------------------------------------------------------
nginx_running() { kill -0 "$(cat "$RUNDIR/nginx.pid" 2>/dev/null)" 2>/dev/null; }
stop_nginx() {
    if nginx_running; then
        "${NGINX[@]}" -s quit 2>/dev/null || true
        for _ in $(seq 50); do nginx_running || return 0; sleep 0.1; done
        "${NGINX[@]}" -s stop 2>/dev/null || true
    fi
}
stop_nginx                                  # one left over from an earlier run
"${NGINX[@]}" -t -q
"${NGINX[@]}"
trap stop_nginx EXIT
say "nginx is listening on 127.0.0.1:8080 (logs: /var/log/nginx/fcgipool-demo.*.log)"

# --- 6. the pool, in the foreground ----------------------------------------------------------
echo
echo "open http://127.0.0.1:8080/"
echo "   (on a remote machine: ssh -L 8080:127.0.0.1:8080 THAT-MACHINE, then the same URL)"
echo "   Ctrl-C stops the pool and nginx."
echo
"$VENV/bin/fcgipool" serve -c "$DEMO/fcgipool.toml" &
pool=$!
# Ctrl-C or a TERM (docker stop, systemd) asks the pool for its graceful stop; HUP reloads.
trap 'kill -TERM "$pool" 2>/dev/null || true' INT TERM
trap 'kill -HUP "$pool" 2>/dev/null || true' HUP
status=0
while :; do
    wait "$pool" && status=0 || status=$?
    kill -0 "$pool" 2>/dev/null || break     # wait was cut short by a signal: wait again
done
exit "$status"
