#!/usr/bin/env bash
# Installs everything the test suite needs on Debian bookworm (run as root) and runs it.
# Real components only: nginx, Apache, QGIS Server, spawn-fcgi, systemd-socket-activate,
# a systemd booted by systemd-nspawn in a debootstrapped Debian root (tests/test_systemd_boot.py
# builds it once into /var/cache/fcgipool-tests/, from deb.debian.org); hadolint and
# kubernetes-validate come from PyPI with the `test` extra.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nginx-light apache2 libapache2-mod-fcgid multiwatch qgis-server spawn-fcgi libfcgi-bin libfcgi-dev wrk systemd systemd-container debootstrap python3-venv python3-dev gcc util-linux prometheus chromium valgrind)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The nginx and apache2 packages start a default site on port 80; the tests run their own
# instances (tests/test_deploy.py: Apache with mod_proxy_fcgi, in the foreground).
systemctl disable --now nginx >/dev/null 2>&1 || true
systemctl disable --now apache2 >/dev/null 2>&1 || true

# The heavy demo project's 50,000 points are generated, not stored in git.
[ -s demo/project/data/heavy_points.geojson ] || /usr/bin/python3 demo/make_project.py --heavy-only >/dev/null

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"
.venv/bin/ruff check fcgipool tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
