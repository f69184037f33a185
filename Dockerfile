# fcgipool + QGIS Server (Debian bookworm: QGIS 3.22), for a pod or a docker host where a web
# server (nginx, Apache) talks FastCGI to port 9000.
#
#   docker build -t fcgipool-qgis .
#   docker run --rm -p 127.0.0.1:9000:9000 -p 127.0.0.1:9090:9090 \
#       -v /srv/qgis/projects:/srv/qgis/projects:ro --stop-timeout 45 fcgipool-qgis
#
# The pool is PID 1: it handles every signal itself (TERM drains, HUP reloads, QUIT stops
# fast) and reaps every process, orphans included, so no init wrapper is needed.  It runs as
# the unprivileged user fcgipool (uid 10001), and so do its QGIS children.  Give `docker stop`
# more time than the pool's shutdown grace period (30 s): --stop-timeout 45, or
# stop_grace_period: 45s in compose.  See docs/deployment.md.

# --- build: fcgipool and its dependencies in a virtualenv ---------------------------------
FROM debian:bookworm-slim AS build

# Versions are not pinned: bookworm's point releases replace them, and the image is meant
# to be rebuilt with the security updates of the day.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY fcgipool /src/fcgipool
RUN python3 -m venv /opt/fcgipool \
    && /opt/fcgipool/bin/pip install --no-cache-dir --disable-pip-version-check /src

# --- run: QGIS Server and the virtualenv -----------------------------------------------
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="fcgipool-qgis" \
      org.opencontainers.image.description="QGIS Server behind the fcgipool FastCGI process manager"

# qgis-server brings python3 (python3-qgis), which the virtualenv's interpreter links to.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends qgis-server ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The user of the pool and of its children; HOME is where QGIS keeps its profile, auth db
# and network cache.  A numeric USER lets Kubernetes check runAsNonRoot.
RUN groupadd --system --gid 10001 fcgipool \
    && useradd --system --uid 10001 --gid fcgipool --home-dir /var/lib/fcgipool \
       --create-home --shell /usr/sbin/nologin fcgipool \
    && mkdir -p /srv/qgis/projects /etc/fcgipool

COPY --from=build /opt/fcgipool /opt/fcgipool
COPY deploy/docker/pool.toml /etc/fcgipool/pool.toml

# The children do not inherit this PATH (their environment is [child.env] in pool.toml), so
# the virtualenv first on it cannot confuse QGIS's embedded Python.
ENV PATH=/opt/fcgipool/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /var/lib/fcgipool

# 9000: FastCGI (the web server's upstream).  9090: admin HTTP (/metrics, /healthz, /readyz).
EXPOSE 9000 9090

# /healthz answers 200 while the pool's loop lives.  The slim image has no curl: Python's
# urllib raises (exit 1) on anything but a 2xx.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["fcgipool", "serve"]
CMD ["-c", "/etc/fcgipool/pool.toml"]
