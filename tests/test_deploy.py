"""The deployment files, checked by the real tools and served through for real.

systemd-analyze verifies the units and a run of their ExecStart under socket activation
keeps the unit's promises (READY/RELOADING/STOPPING/WATCHDOG, the runtime directory, the
control socket); hadolint lints the Dockerfile and its default config serves QGIS with the
image's HEALTHCHECK; kubernetes-validate checks the manifests offline and the ConfigMap's
pool and nginx configs serve QGIS with the Deployment's probes; nginx and Apache serve QGIS
GetCapabilities through the repository's snippets and a real pool of qgis_mapserv.fcgi.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_PROJECT, REPO, free_port, qgis_config, to_toml, wait_for, wsgi_config
from fcgipool import client
from fcgipool.config import Config

BIN = Path(sys.executable).parent  # the virtualenv's bin/: fcgipool, hadolint, kubernetes-validate
SYSTEMD = REPO / "systemd"
NGINX = REPO / "nginx"
K8S = REPO / "deploy" / "k8s"
PROJECTS = DEMO_PROJECT.parent
WMS = "http://www.opengis.net/wms"
CAPABILITIES = "/ows/demo?SERVICE=WMS&REQUEST=GetCapabilities"
DEFAULTS = Config()


def tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed (scripts/test.sh installs it)"
    return found


def adapt(text: str, replacements: dict[str, str]) -> str:
    """Replace deployment paths with the test's; each must be there, so that a changed file
    cannot make the test silently test something else."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the file"
        text = text.replace(old, new)
    return text


def capabilities_ok(body: bytes) -> None:
    root = ET.fromstring(body)
    assert root.tag == f"{{{WMS}}}WMS_Capabilities"
    names = {node.text for node in root.iter(f"{{{WMS}}}Name")}
    assert {"districts", "sites"} <= names


def http_get(port: int, path: str, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """GET from a chosen loopback address: 127.0.0.2 plays a client that is not local."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|min)?", text.strip())
    assert match, text
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def load_k8s() -> dict[str, dict]:
    documents = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[document["kind"]] = document
    return documents


@pytest.fixture
def servers() -> Iterator[Callable[..., subprocess.Popen]]:
    """Web servers started in the foreground; each is stopped at the end."""
    started: list[subprocess.Popen] = []

    def start(command: list[str], port: int, log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        started.append(process)

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{command[0]} exited:\n{log.read_text()}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 20, f"{command[0]} to listen")
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


# ---------------------------------------------------------------------------- systemd


def verify_units(directory: Path, service: Path, socket_unit: Path) -> str:
    """systemd-analyze verify; returns its complaints about our units ('' when clean).

    It exits 0 on unknown keys and bad values (it ignores them, with a message), so the
    messages are what counts."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"./{service.name}", f"./{socket_unit.name}"],
        cwd=directory, capture_output=True, text=True, timeout=60,
    )
    lines = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in lines if "fcgipool" in line]
    if result.returncode != 0:
        complaints.append(f"exit status {result.returncode}")
    return "\n".join(complaints)


def install_units(directory: Path, instance: str = "maps",
                  edit: Callable[[str], str] = lambda text: text) -> tuple[Path, Path]:
    """The units as `systemctl start fcgipool@INSTANCE` loads them, ExecStart pointing at
    this virtualenv's fcgipool (verify checks that the binary exists)."""
    service = directory / f"fcgipool@{instance}.service"
    socket_unit = directory / f"fcgipool@{instance}.socket"
    text = (SYSTEMD / "fcgipool@.service").read_text()
    service.write_text(edit(adapt(text, {"/usr/local/bin/fcgipool": tool("fcgipool")})))
    shutil.copy(SYSTEMD / "fcgipool@.socket", socket_unit)
    return service, socket_unit


def test_systemd_units_verify_clean_and_hardened(tmp_path):
    service, socket_unit = install_units(tmp_path)
    assert verify_units(tmp_path, service, socket_unit) == ""
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=40", f"./{service.name}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert security.returncode == 0, security.stdout[-2000:]


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    """The check above is not vacuous: a bad value or a missing binary is reported."""
    service, socket_unit = install_units(
        tmp_path, edit=lambda text: text.replace("KillMode=mixed", "KillMode=gently"))
    assert "kill mode" in verify_units(tmp_path, service, socket_unit)
    service.write_text(service.read_text().replace(tool("fcgipool"), "/nonexistent/fcgipool"))
    assert "/nonexistent/fcgipool" in verify_units(tmp_path, service, socket_unit)


def test_systemd_units_contract():
    service = parse_unit(SYSTEMD / "fcgipool@.service")
    unit, svc = service["Unit"], service["Service"]
    sock = parse_unit(SYSTEMD / "fcgipool@.socket")["Socket"]
    assert sock["ListenStream"] == ["/run/fcgipool/%i.sock"]
    assert (sock["SocketMode"], sock["SocketGroup"]) == (["0660"], ["www-data"])
    assert unit["Requires"] == unit["After"][:1] == ["fcgipool@%i.socket"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert "-c /etc/fcgipool/%i.toml" in svc["ExecStart"][0]
    # A reload validates the file, then asks the pool on the control socket ExecStart opens
    # (no /bin/kill: procps is not on every system; tests/test_systemd_boot.py).
    control = re.search(r"--control (\S+)", svc["ExecStart"][0]).group(1)
    assert svc["ExecReload"] == ["/usr/local/bin/fcgipool check-config /etc/fcgipool/%i.toml",
                                 f"/usr/local/bin/fcgipool reload --control {control}"]
    assert svc["RestartPreventExitStatus"] == ["2"] and svc["Restart"] == ["on-failure"]
    assert svc["RuntimeDirectory"] == ["fcgipool-%i"]
    assert svc["KillMode"] == ["mixed"]
    timeouts = DEFAULTS.timeouts
    assert seconds(svc["TimeoutStopSec"][0]) > timeouts.shutdown_grace_period + timeouts.kill_grace
    caps = set(svc["CapabilityBoundingSet"][0].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL"} <= caps


def test_unit_exec_start_keeps_the_units_promises(workdir):
    """ExecStart and ExecReload of the unit, run as systemd would: the socket handed over
    (systemd-socket-activate), NOTIFY_SOCKET, WATCHDOG_USEC (1 s here, 30 s in the unit)
    and RUNTIME_DIRECTORY set."""
    service = parse_unit(SYSTEMD / "fcgipool@.service")["Service"]
    etc, run, runtime = workdir / "etc", workdir / "run", workdir / "runtime"
    for path in (etc, run, runtime):
        path.mkdir()

    def expand(line: str) -> list[str]:
        line = line.replace("%i", "test").replace("/usr/local/bin/fcgipool", tool("fcgipool"))
        line = line.replace("/etc/fcgipool", str(etc)).replace("/run/fcgipool", str(run))
        return shlex.split(line)

    sock_path = run / "test.sock"
    (etc / "test.toml").write_text(to_toml(wsgi_config(workdir, pool={
        "bind": [f"unix:{sock_path}"]})))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "1000000",
           "RUNTIME_DIRECTORY": str(runtime)}
    log = open(workdir / "unit.log", "wb")  # noqa: SIM115 - closed below
    # systemd-socket-activate passes on only the variables named with -E.
    passed = [arg for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "RUNTIME_DIRECTORY")
              for arg in ("-E", name)]
    process = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock_path), *passed,
         *expand(service["ExecStart"][0])],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    states: list[str] = []

    def until(state: str) -> None:
        while state not in states:
            try:
                states.extend(notify.recv(4096).decode().splitlines())
            except TimeoutError:
                raise AssertionError(f"no {state}: {states}\n"
                                     f"{(workdir / 'unit.log').read_text()}") from None

    try:
        wait_for(sock_path.exists, 20, "the activated socket")
        # The first connection starts the pool (socket activation); it waits in the backlog.
        assert client.request(f"unix:{sock_path}", "/hello").status == 200
        until("READY=1")
        until("WATCHDOG=1")
        assert "sockets_inherited" in (workdir / "unit.log").read_text()
        assert [p.name[:9] for p in runtime.iterdir()] == ["fcgipool-"]
        assert (run / "test.ctl").exists(), "--control of ExecStart"
        # systemctl reload: ExecReload lines in turn (check-config, then `fcgipool reload`
        # on the control socket of ExecStart's --control).
        states.clear()
        for line in service["ExecReload"]:
            subprocess.run(expand(line), check=True, capture_output=True, timeout=30)
        until("RELOADING=1")
        until("READY=1")
        assert client.request(f"unix:{sock_path}", "/hello").status == 200
        process.send_signal(signal.SIGTERM)  # systemctl stop (KillMode=mixed: the pool only)
        until("STOPPING=1")
        assert process.wait(seconds(service["TimeoutStopSec"][0])) == 0
        assert sock_path.exists(), "the pool must leave systemd's socket file alone"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        notify.close()


# ---------------------------------------------------------------------------- nginx


def nginx_main(directory: Path, servers_block: str) -> Path:
    """A main nginx.conf in ``directory`` laid out like Debian's /etc/nginx: snippets/,
    conf.d/ (included in http{}), fastcgi_params."""
    (directory / "fastcgi_params").symlink_to("/etc/nginx/fastcgi_params")
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        {user}
        worker_processes 1;
        daemon off;
        pid {directory}/nginx.pid;
        error_log {directory}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            client_body_temp_path {directory}/body;
            fastcgi_temp_path {directory}/fastcgi;
            proxy_temp_path {directory}/proxy;
            uwsgi_temp_path {directory}/uwsgi;
            scgi_temp_path {directory}/scgi;
            include conf.d/*.conf;
        """) + textwrap.indent(servers_block, "    ") + "}\n")
    return conf


def test_nginx_snippets_and_example_pass_nginx_t(tmp_path):
    for name in ("snippets", "conf.d", "sites", "logs"):
        (tmp_path / name).mkdir()
    shutil.copy(NGINX / "fcgipool-params.conf", tmp_path / "snippets")
    shutil.copy(NGINX / "fcgipool-locations.conf", tmp_path / "snippets")
    shutil.copy(NGINX / "fcgipool-upstream.conf", tmp_path / "conf.d")
    example = (NGINX / "example-site.conf").read_text()
    (tmp_path / "sites" / "example.conf").write_text(
        adapt(example, {"/var/log/nginx/": f"{tmp_path}/logs/"}))
    conf = nginx_main(tmp_path, textwrap.dedent("""\
        server {
            listen 127.0.0.1:8080;
            include snippets/fcgipool-locations.conf;
        }
        include sites/*.conf;
        """))
    result = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def qgis_pool_with_admin(pool_factory, workdir):
    """A QGIS pool with the HTTP admin listener and the ping/status paths the repo's web
    server snippets route to; (pool, admin port)."""
    admin_port = free_port()
    pool = pool_factory(qgis_config(workdir, admin={
        "http": f"tcp:127.0.0.1:{admin_port}", "ping_path": "/fcgipool-ping",
        "status_path": "/fcgipool-status"}))
    return pool, admin_port


def test_qgis_through_nginx_with_the_repo_snippets(pool_factory, workdir, servers):
    pool, admin_port = qgis_pool_with_admin(pool_factory, workdir)
    port = free_port()
    directory = workdir / "nginx"
    for name in ("snippets", "conf.d"):
        (directory / name).mkdir(parents=True)
    shutil.copy(NGINX / "fcgipool-params.conf", directory / "snippets")
    (directory / "snippets" / "fcgipool-locations.conf").write_text(adapt(
        (NGINX / "fcgipool-locations.conf").read_text(),
        {"/srv/qgis/projects": str(PROJECTS), "127.0.0.1:9090": f"127.0.0.1:{admin_port}"}))
    (directory / "conf.d" / "fcgipool-upstream.conf").write_text(adapt(
        (NGINX / "fcgipool-upstream.conf").read_text(),
        {"unix:/run/fcgipool/maps.sock": pool.address}))
    conf = nginx_main(directory, textwrap.dedent(f"""\
        server {{
            listen 127.0.0.1:{port};
            include snippets/fcgipool-locations.conf;
        }}
        """))
    servers(["nginx", "-p", str(directory), "-c", str(conf)], port, directory / "out.log")
    web_server_serves_qgis_and_guards_admin(port, admin_port)


def web_server_serves_qgis_and_guards_admin(port: int, admin_port: int) -> None:
    for _ in range(3):
        status, headers, body = http_get(port, CAPABILITIES)
        assert status == 200, body[:500]
        assert "xml" in headers["Content-Type"]
        capabilities_ok(body)
    # The service URL QGIS writes is the one the client used, port included.
    assert f'href="http://127.0.0.1:{port}/ows/demo'.encode() in body
    # MAP would let a client open any project: refused, whatever its case.
    assert http_get(port, CAPABILITIES + "&Map=/etc/passwd")[0] == 403
    assert http_get(port, "/ows/../../etc/passwd")[0] in (400, 404)
    # Answered by the pool itself (admin.ping_path, admin.status_path) and the admin
    # listener; from local clients only.
    assert http_get(port, "/fcgipool-ping")[2] == b"pong\n"
    status, _, body = http_get(port, "/fcgipool-status")
    assert status == 200 and json.loads(body)["pool"]["workers"] == 2
    status, _, body = http_get(port, "/fcgipool-metrics")
    assert status == 200
    metrics = body.decode()
    assert metric(metrics, 'fcgipool_children{state="idle"}') + metric(
        metrics, 'fcgipool_children{state="busy"}') == 2
    # The web server kept its FastCGI connections to the pool open (keepalive/enablereuse).
    assert metric(metrics, "fcgipool_connections") >= 1
    for path in ("/fcgipool-ping", "/fcgipool-status", "/fcgipool-metrics"):
        assert http_get(port, path, source="127.0.0.2")[0] == 403, path
    assert http_get(admin_port, "/healthz")[0] == 200


# ---------------------------------------------------------------------------- Apache

APACHE_MODULES = ("mpm_event", "authz_core", "authz_host", "setenvif", "headers", "proxy",
                  "proxy_fcgi", "proxy_http")


def test_qgis_through_apache_with_the_repo_config(pool_factory, workdir, servers):
    pool, admin_port = qgis_pool_with_admin(pool_factory, workdir)
    port = free_port()
    directory = workdir / "apache"
    directory.mkdir()
    snippet = directory / "fcgipool.conf"
    snippet.write_text(adapt((REPO / "apache" / "fcgipool.conf").read_text(), {
        "/run/fcgipool/maps.sock": pool.address.removeprefix("unix:"),
        "/srv/qgis/projects": str(PROJECTS),
        "127.0.0.1:9090": f"127.0.0.1:{admin_port}",
    }))
    modules = "\n".join(f"LoadModule {name}_module /usr/lib/apache2/modules/mod_{name}.so"
                        for name in APACHE_MODULES)
    conf = directory / "httpd.conf"
    # Apache refuses to run its workers as root: www-data reaches the pool's socket (0666
    # in qgis_config) through the test's world-traversable workdir.
    conf.write_text(textwrap.dedent(f"""\
        ServerRoot {directory}
        ServerName localhost
        Listen 127.0.0.1:{port}
        PidFile {directory}/httpd.pid
        DefaultRuntimeDir {directory}
        Mutex file:{directory} default
        ErrorLog {directory}/error.log
        LogLevel warn
        User www-data
        Group www-data
        """) + modules + f"\nInclude {snippet}\n")
    check = subprocess.run(["apache2", "-t", "-f", str(conf)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0 and "Syntax OK" in check.stderr, check.stderr
    servers(["apache2", "-f", str(conf), "-DFOREGROUND"], port, directory / "out.log")
    web_server_serves_qgis_and_guards_admin(port, admin_port)


# ---------------------------------------------------------------------------- Docker


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "style", "Dockerfile"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    # What the inline `hadolint ignore` pragmas hide is only the apt version pinning.
    result = subprocess.run([tool("hadolint"), "--disable-ignore-pragma", "--no-fail", "-f",
                             "json", "Dockerfile"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert {finding["code"] for finding in json.loads(result.stdout)} == {"DL3008"}


def test_dockerignore_keeps_what_the_dockerfile_copies():
    kept = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for source in sources:
        assert any(source == item or source.startswith(item + "/") for item in kept), source
        assert (REPO / source).exists(), source


def healthcheck_command(admin_port: int) -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", text, re.M)
    assert match, "no HEALTHCHECK CMD [...] in the Dockerfile"
    return [adapt(part, {"127.0.0.1:9090": f"127.0.0.1:{admin_port}"}) if "9090" in part
            else part for part in json.loads(match.group(1))]


def run_as_in_a_container(path: Path, workdir: Path, port: int, admin_port: int) -> dict:
    """A config meant for the image, with the test's ports and a writable home; children
    run as root here (the image runs everything as uid 10001)."""
    config = tomllib.loads(path.read_text())
    config["pool"].update(bind=[f"tcp:127.0.0.1:{port}"], runtime_dir=str(workdir))
    config["child"].update(cwd=str(workdir), allow_root=os.geteuid() == 0)
    home = workdir / "home"
    home.mkdir()
    config["child"]["env"].update(HOME=str(home), TMPDIR=str(workdir),
                                  XDG_RUNTIME_DIR=str(workdir / "runtime"))
    config["admin"]["http"] = f"tcp:127.0.0.1:{admin_port}"
    return config


def test_docker_default_config_serves_and_healthcheck_follows(pool_factory, workdir):
    assert subprocess.run([tool("fcgipool"), "check-config", "deploy/docker/pool.toml"],
                          cwd=REPO, capture_output=True, timeout=30).returncode == 0
    port, admin_port = free_port(), free_port()
    config = run_as_in_a_container(REPO / "deploy" / "docker" / "pool.toml", workdir, port,
                                   admin_port)
    pool = pool_factory(config)
    response = client.request(f"tcp:127.0.0.1:{port}", CAPABILITIES,
                              params={"QGIS_PROJECT_FILE": str(DEMO_PROJECT)})
    assert response.status == 200
    capabilities_ok(response.body)
    # The HEALTHCHECK as the image runs it: `python3` is the virtualenv's, first on PATH.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    command = healthcheck_command(admin_port)
    assert subprocess.run(command, env=env, timeout=10).returncode == 0
    pool.stop()
    assert subprocess.run(command, env=env, capture_output=True, timeout=10).returncode != 0


# ---------------------------------------------------------------------------- Kubernetes


def bundled_kubernetes_versions() -> list[str]:
    """The Kubernetes versions whose schemas kubernetes-validate carries (it needs no network)."""
    import kubernetes_validate

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = [m.group(1) for path in schemas.iterdir()
             if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", path.name))]
    return sorted(found, key=lambda version: tuple(map(int, version.split("."))))


def test_manifests_pass_kubernetes_validate():
    manifests = sorted(str(path) for path in K8S.glob("*.yaml"))
    assert len(manifests) >= 5
    versions = bundled_kubernetes_versions()
    assert versions, "kubernetes-validate has no bundled schemas"
    # Strict: unknown fields are errors.  The newest schemas bundled, and the oldest.
    for version in ([], ["-k", versions[0]]):
        result = subprocess.run([tool("kubernetes-validate"), "--strict", "--no-warn",
                                 *version, *manifests], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("passed") == len(manifests), result.stdout


def test_kubernetes_validate_rejects_a_bad_manifest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "deployment.yaml").read_text().replace("  replicas: 2", "  replica: 2"))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "replica" in result.stdout + result.stderr


def test_manifests_agree_with_the_pool_and_each_other():
    documents = load_k8s()
    config_map, deployment = documents["ConfigMap"], documents["Deployment"]
    pool_toml = tomllib.loads(config_map["data"]["pool.toml"])
    admin_port = int(pool_toml["admin"]["http"].rsplit(":", 1)[1])
    spec = deployment["spec"]["template"]["spec"]
    containers = {container["name"]: container for container in spec["containers"]}
    pool = containers["pool"]
    ports = {port["name"]: port["containerPort"] for port in pool["ports"]}
    assert ports[pool["readinessProbe"]["httpGet"]["port"]] == admin_port
    assert pool["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pool["livenessProbe"]["httpGet"]["path"] == "/healthz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(admin_port)
    # Timeout ordering: the kubelet waits for preStop + the pool's drain + its kill grace.
    pre_stop = int(pool["lifecycle"]["preStop"]["exec"]["command"][1])
    timeouts = pool_toml["timeouts"]
    assert spec["terminationGracePeriodSeconds"] > (
        pre_stop + timeouts["shutdown_grace_period"] + timeouts["kill_grace"])
    # nginx waits longer than the pool may take to answer (queue wait + request).
    params = config_map["data"]["fcgipool-params.conf"]
    assert params == (NGINX / "fcgipool-params.conf").read_text(), "keep the copy equal"
    read_timeout = seconds(re.search(r"fastcgi_read_timeout (\S+);", params).group(1))
    assert read_timeout > pool_toml["limits"]["queue_timeout"] + timeouts["request"]
    # The sidecar reaches the pool where it listens.
    assert pool_toml["pool"]["bind"] == ["tcp:127.0.0.1:9000"]
    assert "server 127.0.0.1:9000;" in config_map["data"]["default.conf"]
    hpa = documents["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_timeout_ordering_of_the_web_server_snippets():
    """fastcgi_read_timeout / the Apache worker timeout > queue_timeout + request, for the
    pool's defaults (the docs' rule)."""
    longest = DEFAULTS.limits.queue_timeout + DEFAULTS.timeouts.request
    nginx = (NGINX / "fcgipool-params.conf").read_text()
    for directive in ("fastcgi_read_timeout", "fastcgi_send_timeout"):
        assert seconds(re.search(rf"{directive} (\S+);", nginx).group(1)) > longest
    apache = (REPO / "apache" / "fcgipool.conf").read_text()
    assert seconds(re.search(r"ProxySet .*\btimeout=(\d+)", apache).group(1)) > longest


def test_pod_configs_serve_qgis_with_the_deployments_probes(pool_factory, workdir, servers):
    """The ConfigMap's pool.toml and nginx default.conf, run here: nginx in front of the
    pool as in the pod, the probes and the HPA's metrics as the Deployment names them."""
    documents = load_k8s()
    data = documents["ConfigMap"]["data"]
    source = workdir / "pool-from-configmap.toml"
    source.write_text(data["pool.toml"])
    assert subprocess.run([tool("fcgipool"), "check-config", str(source)],
                          capture_output=True, timeout=30).returncode == 0
    pool_port, admin_port, port = free_port(), free_port(), free_port()
    pool_factory(run_as_in_a_container(source, workdir, pool_port, admin_port))
    directory = workdir / "nginx"
    for name in ("snippets", "conf.d"):
        (directory / name).mkdir(parents=True)
    (directory / "snippets" / "fcgipool-params.conf").write_text(data["fcgipool-params.conf"])
    (directory / "conf.d" / "default.conf").write_text(adapt(data["default.conf"], {
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "server 127.0.0.1:9000;": f"server 127.0.0.1:{pool_port};",
        "/srv/qgis/projects": str(PROJECTS),
    }))
    conf = nginx_main(directory, "")
    servers(["nginx", "-p", str(directory), "-c", str(conf)], port, directory / "out.log")
    status, _, body = http_get(port, CAPABILITIES)
    assert status == 200
    capabilities_ok(body)
    assert http_get(port, "/fcgipool-ping")[2] == b"pong\n"
    containers = {c["name"]: c for c in documents["Deployment"]["spec"]["template"]["spec"]
                  ["containers"]}
    for probe in ("readinessProbe", "livenessProbe"):
        path = containers["pool"][probe]["httpGet"]["path"]
        assert http_get(admin_port, path)[0] == 200, probe
        nginx_path = containers["nginx"][probe]["httpGet"]["path"]
        assert http_get(port, nginx_path)[0] == 200, probe
    metrics = http_get(admin_port, documents["Deployment"]["spec"]["template"]["metadata"]
                       ["annotations"]["prometheus.io/path"])[2].decode()
    for entry in documents["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        name = entry["pods"]["metric"]["name"]
        assert re.search(rf"^{name} ", metrics, re.M), f"the HPA scales on {name}: not exported"
