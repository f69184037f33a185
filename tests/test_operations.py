"""What operators touch: the control socket and CLI, the HTTP admin listener, health,
metrics, access logs, sd_notify, the WSGI child mode."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from conftest import APPS, busy_request, fault_config, free_port, wait_for
from fcgipool import client, logs, protocol


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcgipool", *args], capture_output=True,
                          text=True, timeout=timeout)


def http_get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture
def admin_pool(pool_factory, workdir):
    port = free_port()
    config = fault_config(workdir, admin={"http": f"tcp:127.0.0.1:{port}",
                                          "ping_path": "/fcgipool-ping",
                                          "status_path": "/fcgipool-status"})
    pool = pool_factory(config)
    pool.http = f"http://127.0.0.1:{port}"
    pool.control = str(workdir / "pool.ctl")
    return pool


def test_status_json_shows_a_busy_child(admin_pool, workdir):
    sock = busy_request(admin_pool, workdir)
    result = cli("status", "--json", "--control", admin_pool.control)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["version"] == 1
    pool = status["pool"]
    assert pool["pid"] == admin_pool.pid
    assert pool["workers"] == 2 and pool["children"]["busy"] == 1
    assert pool["children"]["idle"] == 1
    assert pool["queue_length"] == 0 and pool["config_file"] == str(admin_pool.config_path)
    assert pool["uptime"] > 0 and pool["generation"] == 0 and pool["failure_pressure"] == 0
    (busy,) = [row for row in status["children"] if row["state"] == "busy"]
    assert busy["request"]["method"] == "GET"
    assert busy["request"]["uri"].startswith("/?sleep=3000&layer=x")
    assert busy["request"]["elapsed"] >= 0
    assert busy["rss"] > 1_000_000 and busy["age"] > 0
    assert set(busy) >= {"pid", "state", "requests", "request", "rss", "cpu_percent", "age"}
    text = cli("status", "-c", str(admin_pool.config_path))
    assert text.returncode == 0
    assert "busy" in text.stdout and "GET /?sleep=3000" in text.stdout
    sock.close()


def test_cli_without_a_pool_says_so_and_exits_1(workdir):
    result = cli("status", "--control", str(workdir / "nothing.ctl"))
    assert result.returncode == 1
    assert "no pool answers on" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_scale_reload_and_stop(admin_pool):
    assert cli("scale", "3", "--control", admin_pool.control).returncode == 0
    wait_for(lambda: len(admin_pool.children()) == 3, 20, "three children")
    old = set(admin_pool.children())
    assert cli("reload", "--control", admin_pool.control).returncode == 0
    wait_for(lambda: not (set(admin_pool.children()) & old)
             and len(admin_pool.children()) == 3, 30, "all children replaced")
    assert cli("stop", "--control", admin_pool.control).returncode == 0
    assert admin_pool.process.wait(30) == 0
    assert not os.path.exists(admin_pool.control)


def test_control_socket_is_private(admin_pool):
    assert os.stat(admin_pool.control).st_mode & 0o777 == 0o600


def test_health_readiness_and_metrics(admin_pool, workdir):
    assert http_get(admin_pool.http + "/healthz")[0] == 200
    status, _, body = http_get(admin_pool.http + "/readyz")
    assert status == 200 and body.startswith(b"ready")
    for i in range(3):
        assert client.request(admin_pool.address, f"/?n={i}").status == 200
    assert client.request(admin_pool.address, "/?status=404").status == 404
    status, content_type, metrics = http_get(admin_pool.http + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    text = metrics.decode()
    assert 'fcgipool_requests_total{class="default",code="200"} 3.0' in text
    assert 'fcgipool_requests_total{class="default",code="404"} 1.0' in text
    assert 'fcgipool_children{state="idle"} 2.0' in text
    assert "fcgipool_queue_length 0.0" in text
    assert "fcgipool_failure_pressure 0.0" in text
    assert "fcgipool_request_duration_seconds_bucket" in text
    assert "fcgipool_queue_wait_seconds_bucket" in text
    assert "fcgipool_children_rss_bytes" in text
    promtool = subprocess.run(["promtool", "check", "metrics"], input=metrics,
                              capture_output=True, timeout=30)
    assert promtool.returncode == 0, promtool.stdout + promtool.stderr
    assert http_get(admin_pool.http + "/nope")[0] == 404


def test_readyz_fails_as_soon_as_a_stop_begins(admin_pool, workdir):
    sock = busy_request(admin_pool, workdir)
    admin_pool.process.send_signal(signal.SIGTERM)
    wait_for(lambda: http_get(admin_pool.http + "/readyz")[0] == 503, 10, "readyz to fail")
    assert http_get(admin_pool.http + "/readyz")[2] == b"stopping\n"
    assert http_get(admin_pool.http + "/healthz")[0] == 200  # the loop still lives
    sock.close()


def test_ping_and_status_paths_answer_while_every_child_is_busy(admin_pool, workdir):
    sockets = []
    for i in range(2):
        marker = workdir / f"busy-{i}"
        sock = client.connect(admin_pool.address)
        sock.sendall(protocol.encode_request(
            1, client.cgi_params(f"/?sleep=5000&touch={marker}")))
        sockets.append(sock)
        wait_for(marker.exists, 20, "a busy child")
    ping = client.request(admin_pool.address, "/fcgipool-ping", timeout=5)
    assert ping.status == 200 and ping.body == b"pong\n"
    status = client.request(admin_pool.address, "/fcgipool-status", timeout=5)
    assert status.status == 200
    assert json.loads(status.body)["pool"]["children"]["busy"] == 2
    for sock in sockets:
        sock.close()


def test_status_page_lists_the_children(admin_pool, workdir):
    sock = busy_request(admin_pool, workdir)
    status, content_type, page = http_get(admin_pool.http + "/status")
    assert status == 200 and content_type.startswith("text/html")
    html = page.decode()
    assert 'http-equiv="refresh"' in html
    assert html.count("<tr>") == 3  # the header and two children
    assert "GET /?sleep=3000" in html
    sock.close()


def test_status_page_in_headless_chromium(admin_pool, workdir):
    sock = busy_request(admin_pool, workdir)
    profile = workdir / "chromium-profile"
    shot = workdir / "status.png"
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,600"]
    dom = subprocess.run([*base, "--dump-dom", admin_pool.http + "/status"],
                         capture_output=True, text=True, timeout=120)
    assert 'id="children"' in dom.stdout and "busy" in dom.stdout
    subprocess.run([*base, f"--screenshot={shot}", admin_pool.http + "/status"],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 600)
    # The table's grid lines and the header row's grey are drawn: not a blank page.
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 20
    header_grey = sum(count for count, rgb in colors or [] if rgb == (238, 238, 238))
    assert colors is None or header_grey > 500, "no table header row in the screenshot"
    sock.close()


def test_access_log_has_one_line_per_request(pool_factory, workdir):
    pool = pool_factory(fault_config(workdir, log={"format": "json"}))
    params = {"QGIS_PROJECT_FILE": "/srv/maps/city.qgs", "REQUEST_ID": "abc123"}
    response = client.request(pool.address, "/ows?SERVICE=WMS", params=params)
    wait_for(lambda: '"event": "access"' in pool.log(), 10, "an access line")
    (line,) = [json.loads(line) for line in pool.log().splitlines()
               if '"event": "access"' in line]
    assert line["id"] == "abc123"
    assert line["method"] == "GET" and line["uri"] == "/ows?SERVICE=WMS"
    assert line["project"] == "/srv/maps/city.qgs"
    assert line["status"] == 200 and line["pid"] == int(response.headers["X-Pid"])
    assert line["client"] == "127.0.0.1" and line["request_class"] == "default"
    assert line["ms"] >= line["wait_ms"] >= 0 and line["bytes"] > 0
    assert "timestamp" in line


def test_sd_notify_ready_reloading_stopping_and_watchdog(pool_factory, workdir):
    address = str(workdir / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    messages: list[str] = []

    def receive() -> None:
        while True:
            try:
                messages.append(listener.recv(4096).decode())
            except OSError:
                return

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    pool = pool_factory(fault_config(workdir), env={"NOTIFY_SOCKET": address,
                                                    "WATCHDOG_USEC": "400000"})
    wait_for(lambda: any(m.startswith("READY=1") for m in messages), 10, "READY=1")
    wait_for(lambda: messages.count("WATCHDOG=1") >= 3, 10, "watchdog pings")
    os.kill(pool.pid, signal.SIGHUP)
    wait_for(lambda: "RELOADING=1" in messages, 10, "RELOADING=1")
    wait_for(lambda: sum(m.startswith("READY=1") for m in messages) >= 2, 30, "READY after")
    pool.process.send_signal(signal.SIGTERM)
    assert pool.process.wait(30) == 0
    wait_for(lambda: "STOPPING=1" in messages, 10, "STOPPING=1")
    listener.close()


def test_wsgi_child_mode(pool_factory, workdir):
    config = {"pool": {"bind": [f"unix:{workdir}/pool.sock"], "workers": 2},
              "child": {"cwd": str(APPS), "allow_root": True}}
    pool = pool_factory(config, args=["--wsgi", "wsgi_app:app"])
    response = client.request(pool.address, "/hello")
    assert response.status == 200 and response.body.startswith(b"hello from ")
    assert int(response.headers["X-Pid"]) in pool.children()
    echoed = client.request(pool.address, "/?echo=1", "POST", b"wsgi body")
    assert echoed.body == b"wsgi body"


def test_wsgi_mode_with_a_bad_target_is_a_failed_start(pool_factory, workdir):
    config = {"pool": {"bind": [f"unix:{workdir}/pool.sock"], "workers": 1,
                       "max_failure_pressure": 1.0},
              "child": {"cwd": str(APPS), "allow_root": True, "respawn_delay": 0.1}}
    pool = pool_factory(config, args=["--wsgi", "no_such_module:app"], ready=False)
    assert pool.process.wait(60) == 3
    assert "No module named 'no_such_module'" in pool.log()


def test_child_output_flood_is_rate_limited(pool_factory, workdir):
    config = fault_config(workdir, pool={"workers": 1}, log={"child_output_rate": 5.0},
                          child={"env": {"FAULT_LOG_EVERY_REQUEST": "1"}})
    pool = pool_factory(config)
    for i in range(120):
        assert client.request(pool.address, f"/?n={i}").status == 200
    # 5 lines a second with a burst of 50: far fewer than 120 lines get through.
    wait_for(lambda: "fault_app pid=" in pool.log(), 10, "some child lines")
    logged = pool.log().count("child_output ")
    assert logged < 100
    os.kill(pool.pid, signal.SIGTERM)
    assert pool.process.wait(30) == 0
    assert "child_output_suppressed" in pool.log()


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_access_line_has_every_field_and_milliseconds_with_two_decimals(tmp_path, fmt):
    path = tmp_path / "pool.log"
    logs.configure(fmt, "info", str(path))
    try:
        logs.access(("7", "10.0.0.1", "GET", "/ows?a='b'", "demo", "light", 1234, 0.123456,
                     12.5, 200, 5120, 40, 212))  # fmt: skip
        logs.flush_access()
    finally:
        logs.configure("console", "info", "")
    (line,) = path.read_text().splitlines()
    if fmt == "json":
        entry = json.loads(line)
        assert entry["event"] == "access"
        assert entry["wait_ms"] == 0.12 and entry["ms"] == 12.5
        assert entry["uri"] == "/ows?a='b'" and entry["pid"] == 1234 and entry["bytes"] == 5120
        assert entry["cpu_ms"] == 40 and entry["rss_mib"] == 212
    else:
        assert "event='access'" in line
        assert " wait_ms=0.12 ms=12.50 status=200 bytes=5120 cpu_ms=40 rss_mib=212" in line
        assert """uri="/ows?a='b'" project='demo' request_class='light' pid=1234""" in line
