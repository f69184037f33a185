"""Addresses in the forms operators type, for the pool socket (--bind, pool.bind) and the
admin HTTP listener (--http, admin.http); the listeners module; start-up failures that
must be one clear line, never a traceback; the event loop choice (uvloop, else asyncio)."""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, to_toml, wait_for, wsgi_config
from fcgipool import cli, client, config, listeners
from fcgipool.config import Address


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()  # a fact of the machine: tested either way, never skipped


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcgipool", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def http_get(address: str, path: str = "/healthz") -> tuple[int, bytes]:
    """GET over a connection to ``address`` in any form (unix sockets too)."""
    with client.connect(address, 10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# --------------------------------------------------------------------- the parser


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("unix:/run/p.sock", Address("unix", path="/run/p.sock"), "unix:/run/p.sock"),
        ("/run/p.sock", Address("unix", path="/run/p.sock"), "unix:/run/p.sock"),
        ("tcp:127.0.0.1:9000", Address("tcp", host="127.0.0.1", port=9000),
         "tcp:127.0.0.1:9000"),
        ("127.0.0.1:9000", Address("tcp", host="127.0.0.1", port=9000), "tcp:127.0.0.1:9000"),
        ("[::1]:9000", Address("tcp", host="::1", port=9000), "tcp:[::1]:9000"),
        ("tcp:[::1]:9000", Address("tcp", host="::1", port=9000), "tcp:[::1]:9000"),
        ("[0:0::1]:9000", Address("tcp", host="::1", port=9000), "tcp:[::1]:9000"),
        (":9000", Address("tcp", host="", port=9000), "tcp::9000"),
        ("tcp::9000", Address("tcp", host="", port=9000), "tcp::9000"),
        ("localhost:9000", Address("tcp", host="localhost", port=9000), "tcp:localhost:9000"),
        ("tcp:Maps.Example.org:80", Address("tcp", host="maps.example.org", port=80),
         "tcp:maps.example.org:80"),
        ("0.0.0.0:09000", Address("tcp", host="0.0.0.0", port=9000), "tcp:0.0.0.0:9000"),
    ],
)
def test_every_form_parses_to_one_canonical_text(text, expected, canonical):
    address = Address.parse(text)
    assert address == expected
    assert str(address) == canonical
    assert Address.parse(canonical) == address


LONG_PATH = "/" + "p" * 107  # 108 bytes: sun_path holds 107 and the NUL

BAD = [  # (text, part of the reason)
    ("ftp:x", "unknown address scheme 'ftp'"),
    ("http://x", "unknown address scheme 'http'"),
    ("tcp:host", "'tcp:host' needs a port 1-65535"),
    ("127.0.0.1:0", "needs a port 1-65535, not '0'"),
    ("127.0.0.1:70000", "needs a port 1-65535, not '70000'"),
    ("unix:pool.sock", "unix socket path 'pool.sock' must be absolute"),
    ("./pool.sock", "unix socket path './pool.sock' must be absolute"),
    (LONG_PATH, "is longer than 107 bytes"),
    ("[::1", "'[' without ']'"),
    ("tcp:[::1]", "needs a port 1-65535"),
    ("[nonsense]:80", "'nonsense' is not an IPv6 address"),
    ("host:port:extra", "too many ':' for HOST:PORT"),
    ("::1:9000", "write an IPv6 address in brackets"),
    ("999.0.0.1:80", "'999.0.0.1' is not an IPv4 address"),
    ("bad_host:80", "'bad_host' is not a host name or IP address"),
    ("", "empty address"),
]


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_bad_forms_are_refused_with_the_reason(text, reason):
    with pytest.raises(ValueError) as error:
        Address.parse(text)
    assert reason in str(error.value)


def test_both_keys_are_validated_when_the_config_is_read():
    with pytest.raises(config.ConfigError) as error:
        config.build(None, {"pool": {"bind": ["/ok.sock", "ftp:x"]},
                            "admin": {"http": "127.0.0.1:0"}}, {})
    assert error.value.problems == [
        "pool.bind.1: unknown address scheme 'ftp': use unix: or tcp:",
        "admin.http: '127.0.0.1:0' needs a port 1-65535, not '0'",
    ]
    cfg = config.build(None, {"admin": {"http": ""}}, {})
    assert cfg.admin_address is None  # empty is off
    cfg = config.build(None, None, {"FCGIPOOL_POOL__BIND": "/run/a.sock",
                                    "FCGIPOOL_ADMIN__HTTP": "[::1]:9090"})
    assert cfg.addresses == [Address("unix", path="/run/a.sock")]  # one string is a list of one
    assert cfg.admin_address == Address("tcp", host="::1", port=9090)


def _bad_value_cases():
    for text, reason in BAD:
        yield pytest.param("pool.bind.0", text, reason, id=f"bind-{text[:20]}")
        if text:  # an empty admin.http is off, not an error: blank is the bad one
            yield pytest.param("admin.http", text, reason, id=f"http-{text[:20]}")
    yield pytest.param("admin.http", " ", "' ' is not an address", id="http-blank")


@pytest.mark.parametrize(("key", "text", "reason"), list(_bad_value_cases()))
def test_bad_forms_exit_2_naming_the_key_from_file_environment_and_flag(
        tmp_path, key, text, reason):
    good = {"child": {"command": ["/bin/true"], "allow_root": True}}
    section, name = ("pool", "bind") if key.startswith("pool") else ("admin", "http")
    value = [text] if name == "bind" else text
    expected = f"{key}: "
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text(to_toml({**good, section: {name: value}}))
    good_file = tmp_path / "good.toml"
    good_file.write_text(to_toml(good))
    flag = "--bind" if name == "bind" else "--http"
    env_name = f"FCGIPOOL_{section.upper()}__{name.upper()}"
    runs = {
        "check-config FILE": run_cli("check-config", str(bad_file)),
        "serve -c FILE": run_cli("serve", "-c", str(bad_file)),
        "check-config + env": run_cli("check-config", str(good_file), env={env_name: text}),
        "serve + env": run_cli("serve", "-c", str(good_file), env={env_name: text}),
        "serve + flag": run_cli("serve", "-c", str(good_file), flag, text),
    }
    for how, result in runs.items():
        lines = [line for line in result.stderr.splitlines() if line.startswith(expected)]
        assert result.returncode == 2, (how, result.stderr)
        assert len(lines) == 1 and reason in lines[0], (how, result.stderr)
        assert "Traceback" not in result.stderr, how


# --------------------------------------------------------------------- served


def _pool_forms(workdir: Path):
    """(what to bind, addresses a client reaches it by) for each form."""
    port = free_port()
    v6 = [f"[::1]:{port}"] if HAS_IPV6 else []
    return {
        "unix:PATH": (f"unix:{workdir}/pool.sock", [f"unix:{workdir}/pool.sock"]),
        "PATH": (f"{workdir}/pool.sock", [f"{workdir}/pool.sock"]),
        "tcp:HOST:PORT": (f"tcp:127.0.0.1:{port}", [f"127.0.0.1:{port}"]),
        "HOST:PORT": (f"127.0.0.1:{port}", [f"tcp:127.0.0.1:{port}"]),
        "[::1]:PORT": (f"[::1]:{port}", [f"[::1]:{port}"]),
        "tcp:[::1]:PORT": (f"tcp:[::1]:{port}", [f"tcp:[::1]:{port}"]),
        ":PORT": (f":{port}", [f"127.0.0.1:{port}", *v6]),  # every interface, both families
        "tcp::PORT": (f"tcp::{port}", [f"127.0.0.1:{port}", *v6, f":{port}"]),
        "NAME:PORT": (f"localhost:{port}", [f"localhost:{port}"]),
    }


FORMS = list(_pool_forms(Path("/x")))


@pytest.mark.parametrize("via", ["flags", "file"])
@pytest.mark.parametrize("form", FORMS)
def test_each_form_binds_and_serves_the_pool_and_admin(pool_factory, workdir, form, via):
    """The same form for the pool socket (a FastCGI request) and the admin listener (GET
    /healthz); given as --bind/--http, or as pool.bind/admin.http in the file."""
    pool_bind, pool_reach = _pool_forms(workdir)[form]
    admin_dir = workdir / "admin"
    admin_dir.mkdir()
    admin_bind, admin_reach = _pool_forms(admin_dir)[form]
    cfg = wsgi_config(workdir, pool={"control": str(workdir / "pool.ctl")})
    del cfg["pool"]["bind"]
    args: list[str] = []
    if via == "flags":
        args = ["--bind", pool_bind, "--http", admin_bind]
    else:
        cfg["pool"]["bind"] = [pool_bind]
        cfg["admin"] = {"http": admin_bind}
    ipv6_only = "::1" in pool_bind
    if ipv6_only and not HAS_IPV6:  # no IPv6 here: the clear error is what must be seen
        pool = pool_factory(cfg, ready=False, args=args)
        assert pool.process.wait(60) == 1
        assert "pool.bind.0: cannot listen on tcp:[::1]" in pool.log()
        assert "Traceback" not in pool.log()
        return
    pool = pool_factory(cfg, args=args)
    for address in pool_reach:
        response = client.request(address, "/hello", timeout=20)
        assert response.status == 200 and response.body.startswith(b"hello from"), address
    for address in admin_reach:
        assert http_get(address) == (200, b"ok\n"), address
    listening = [line for line in pool.log().splitlines() if "listening" in line]
    assert len(listening) == 1 and "admin_http" in pool.log()
    if form in (":PORT", "tcp::PORT"):
        # one socket for every interface: IPv6 taking IPv4 too, or IPv4 alone without IPv6
        assert ("address=tcp:[::]:" if HAS_IPV6 else "address=tcp:0.0.0.0:") in listening[0]
    assert pool.stop() == 0
    for address in (pool_bind, admin_bind):
        parsed = Address.parse(address)
        if parsed.kind == "unix":  # the files the pool made are gone with it
            assert not os.path.exists(parsed.path), address


def test_bug_admin_http_as_host_port_is_served_not_a_traceback(pool_factory, workdir):
    """`admin.http = "127.0.0.1:9090"` passed check-config and then crashed `serve` (exit 1,
    a traceback): now it is a form like any other."""
    port = free_port()
    cfg = wsgi_config(workdir, admin={"http": f"127.0.0.1:{port}"})
    path = workdir / "check.toml"
    path.write_text(to_toml(cfg))
    assert run_cli("check-config", str(path)).returncode == 0
    pool = pool_factory(cfg)
    assert http_get(f"127.0.0.1:{port}", "/readyz")[0] == 200
    assert "Traceback" not in pool.log()


def test_empty_admin_http_is_off(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir, admin={"http": ""}))
    assert client.request(pool.address, "/hello").status == 200
    assert "admin_http" not in pool.log() and "control_socket" in pool.log()


def test_inherited_sockets_are_served_and_their_files_left_alone(pool_factory, workdir):
    """systemd's sockets (LISTEN_FDS, here from systemd-socket-activate) are taken as they
    are, pool.bind ignored; the file is systemd's, so the pool does not remove it."""
    path = workdir / "activated.sock"
    cfg = wsgi_config(workdir, pool={"bind": [f"unix:{workdir}/unused.sock"],
                                     "control": str(workdir / "pool.ctl")})
    pool = pool_factory(cfg, ready=False, wrap=["systemd-socket-activate", "-l", str(path)])
    wait_for(path.exists, 20, "the activated socket")
    assert client.request(f"unix:{path}", "/hello").status == 200  # this connect starts it
    pool.wait_ready()
    assert "sockets_inherited" in pool.log() and not (workdir / "unused.sock").exists()
    assert pool.stop() == 0
    assert path.exists()


# --------------------------------------------------------------------- listeners.py


def test_claim_unix_path_removes_a_stale_socket_refuses_a_live_one_and_other_files(tmp_path):
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(stale)  # closed without unlink: what a killed pool leaves behind
    listeners.claim_unix_path(stale)
    assert not os.path.exists(stale)
    listeners.claim_unix_path(stale)  # nothing there: nothing to do
    live = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(live)
        sock.listen()
        with pytest.raises(OSError) as error:
            listeners.claim_unix_path(live)
        assert error.value.errno == errno.EADDRINUSE and error.value.filename == live
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(OSError) as error:
        listeners.claim_unix_path(str(regular))
    assert error.value.errno == errno.ENOTSOCK and regular.read_text() == "keep me"


def test_bind_unix_sets_the_mode_and_names_the_key_when_it_fails(tmp_path):
    path = tmp_path / "sub" / "p.sock"
    sock = listeners.bind(Address("unix", path=str(path)), 0o640)
    try:
        assert path.stat().st_mode & 0o777 == 0o640
        assert listeners.describe(sock) == f"unix:{path}"
        assert not sock.getblocking()
        with pytest.raises(listeners.ListenError) as error:
            listeners.bind(Address("unix", path=str(path)), key="pool.bind.3")
        assert str(error.value) == (
            f"pool.bind.3: cannot listen on unix:{path}: in use by a running process")
    finally:
        sock.close()


def test_every_interface_is_one_dual_stack_socket_and_ipv6_literals_are_ipv6_only():
    port = free_port()
    sock = listeners.bind(Address.parse(f":{port}"))
    try:
        if HAS_IPV6:
            assert sock.family == socket.AF_INET6
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            assert listeners.describe(sock) == f"tcp:[::]:{port}"
        else:
            assert listeners.describe(sock) == f"tcp:0.0.0.0:{port}"
        for host in ["127.0.0.1", *(["::1"] if HAS_IPV6 else [])]:
            with socket.create_connection((host, port), 5):
                pass
    finally:
        sock.close()
    if HAS_IPV6:  # [::]:P is IPv6 only, so 0.0.0.0:P can be listed next to it
        v6 = listeners.bind(Address.parse(f"[::]:{port}"))
        v4 = listeners.bind(Address.parse(f"0.0.0.0:{port}"))
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert listeners.describe(v4) == f"tcp:0.0.0.0:{port}"
        v6.close()
        v4.close()


def test_every_interface_falls_back_to_ipv4_where_the_kernel_has_no_ipv6(monkeypatch):
    real = socket.socket

    class NoIPv6(real):
        def __init__(self, family: int = -1, *args: object, **kwargs: object) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", NoIPv6)
    port = free_port()
    sock = listeners.bind(Address.parse(f":{port}"))
    try:
        assert sock.family == socket.AF_INET
        assert listeners.describe(sock) == f"tcp:0.0.0.0:{port}"
    finally:
        sock.close()
    with pytest.raises(listeners.ListenError, match=r"admin.http: cannot listen on tcp:\[::1\]"):
        listeners.bind(Address.parse(f"[::1]:{port}"), key="admin.http")


def test_a_failed_listener_closes_and_unlinks_those_bound_before_it(tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        keyed = [("pool.bind.0", Address("unix", path=str(tmp_path / "a.sock"))),
                 ("pool.bind.1", Address("tcp", host="127.0.0.1", port=port))]
        with pytest.raises(listeners.ListenError) as error:
            listeners.Listeners.bind(keyed, 0o660, "", "")
    assert str(error.value) == (
        f"pool.bind.1: cannot listen on tcp:127.0.0.1:{port}: Address already in use")
    assert not (tmp_path / "a.sock").exists()
    made = listeners.Listeners.bind(keyed[:1], 0o660, "", "")
    assert (tmp_path / "a.sock").exists()
    made.unlink()
    made.unlink()  # once is enough; the socket stays open for the backlog
    assert not (tmp_path / "a.sock").exists() and made.sockets[0].fileno() >= 0
    made.close()
    assert made.sockets == []


# --------------------------------------------------------------------- start-up failures


def start_fails(workdir: Path, cfg: dict, args: tuple[str, ...] = (),
                wrap: tuple[str, ...] = ()) -> str:
    """Run `fcgipool serve` expecting it not to start: exit 1, no traceback; returns the one
    line that says why."""
    path = workdir / "fails.toml"
    path.write_text(to_toml(cfg))
    path.chmod(0o644)
    result = subprocess.run(
        [*wrap, sys.executable, "-m", "fcgipool", "serve", "-c", str(path), *args],
        capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "startup_failed" in line
             or line.startswith(("fcgipool:", "log.file:"))]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture
def running(pool_factory, workdir):
    """A live pool on workdir/pool.sock with its control socket workdir/pool.ctl."""
    return pool_factory(wsgi_config(workdir, pool={"control": str(workdir / "pool.ctl")}))


def test_pool_socket_in_use_by_a_live_pool(running, workdir):
    cfg = wsgi_config(workdir, pool={"control": str(workdir / "other.ctl")})
    line = start_fails(workdir, cfg)
    assert f"pool.bind.0: cannot listen on unix:{workdir}/pool.sock: in use by a running " \
           "process" in line
    assert client.request(running.address, "/hello").status == 200  # untouched
    assert not (workdir / "other.ctl").exists()


def test_control_socket_in_use_by_a_live_pool(running, workdir):
    cfg = wsgi_config(workdir, pool={"bind": [f"{workdir}/second.sock"],
                                     "control": str(workdir / "pool.ctl")})
    line = start_fails(workdir, cfg)
    assert f"pool.control: cannot listen on unix:{workdir}/pool.ctl: in use by a running " \
           "process" in line
    # the live pool's control socket is still there and answers (it used to be unlinked)
    assert run_cli("status", "--control", str(workdir / "pool.ctl")).returncode == 0
    assert not (workdir / "second.sock").exists()  # what the failed pool made, it removed


def test_admin_http_port_in_use(workdir):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cfg = wsgi_config(workdir, pool={"control": str(workdir / "pool.ctl")})
        line = start_fails(workdir, cfg, ("--http", f"127.0.0.1:{port}"))
    assert f"admin.http: cannot listen on tcp:127.0.0.1:{port}: Address already in use" in line
    assert not (workdir / "pool.sock").exists() and not (workdir / "pool.ctl").exists()


def test_a_unix_path_that_is_not_a_socket(workdir):
    regular = workdir / "data.txt"
    regular.write_text("keep me")
    cfg = wsgi_config(workdir, pool={"bind": [str(regular)], "control": str(workdir / "c")})
    line = start_fails(workdir, cfg)
    assert f"pool.bind.0: cannot listen on unix:{regular}: exists and is not a socket" in line
    cfg = wsgi_config(workdir, admin={"http": f"unix:{regular}"})
    line = start_fails(workdir, cfg)
    assert f"admin.http: cannot listen on unix:{regular}: exists and is not a socket" in line
    assert regular.read_text() == "keep me"


def test_an_unresolvable_host(workdir):
    cfg = wsgi_config(workdir, pool={"bind": ["no-such-host.invalid:9000"],
                                     "control": str(workdir / "pool.ctl")})
    line = start_fails(workdir, cfg)
    assert "pool.bind.0: cannot listen on tcp:no-such-host.invalid:9000: cannot resolve " \
           "'no-such-host.invalid'" in line
    cfg = wsgi_config(workdir, admin={"http": "no-such-host.invalid:9090"})
    line = start_fails(workdir, cfg)
    assert "admin.http: cannot listen on tcp:no-such-host.invalid:9090: cannot resolve" in line


def test_permission_denied_on_a_socket_directory(workdir):
    """A pool that is not root, asked for sockets in a directory it may not write (as for
    /run/fcgipool without the unit's RuntimeDirectory)."""
    locked = workdir / "locked"
    locked.mkdir(mode=0o755)  # root's
    as_nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    cfg = wsgi_config(workdir, pool={"bind": [f"unix:{locked}/pool.sock"],
                                     "control": str(workdir / "pool.ctl")})
    cfg["child"].pop("allow_root")
    line = start_fails(workdir, cfg, wrap=as_nobody)
    assert f"pool.bind.0: cannot listen on unix:{locked}/pool.sock: Permission denied" in line
    workdir.chmod(0o777)  # nobody may make the pool socket and control socket here
    cfg["pool"]["bind"] = [f"{workdir}/pool.sock"]
    cfg["admin"] = {"http": f"{locked}/admin/http.sock"}
    line = start_fails(workdir, cfg, wrap=as_nobody)
    assert f"admin.http: cannot listen on unix:{locked}/admin/http.sock: cannot create " \
           f"{locked}/admin: Permission denied" in line
    assert not (workdir / "pool.sock").exists()


def test_runtime_dir_and_log_file_that_cannot_be_made(workdir):
    missing = workdir / "missing"
    cfg = wsgi_config(workdir, pool={"runtime_dir": str(missing)})
    line = start_fails(workdir, cfg)
    assert f"pool.runtime_dir: cannot create a directory in {missing}: No such file" in line
    cfg = wsgi_config(workdir, log={"file": str(missing / "pool.log")})
    line = start_fails(workdir, cfg)
    assert line == f"log.file: cannot open {missing}/pool.log: No such file or directory"


def test_with_a_log_file_the_reason_is_also_on_stderr(workdir):
    regular = workdir / "data.txt"
    regular.write_text("")
    cfg = wsgi_config(workdir, pool={"bind": [str(regular)]},
                      log={"file": str(workdir / "pool.log")})
    line = start_fails(workdir, cfg)
    assert line == (f"fcgipool: could not start: pool.bind.0: cannot listen on "
                    f"unix:{regular}: exists and is not a socket")
    assert "startup_failed" in (workdir / "pool.log").read_text()


# --------------------------------------------------------------------- event loop


def test_uvloop_is_a_dependency_on_linux():
    requires = importlib.metadata.requires("fcgipool") or []
    assert any(r.startswith("uvloop") and 'sys_platform == "linux"' in r for r in requires)
    assert any(r.startswith("uvloop") and 'extra == "speed"' in r for r in requires)


def test_the_loop_choice(monkeypatch):
    import uvloop

    assert cli._event_loop_runner("auto") == ("uvloop", uvloop.run)
    assert cli._event_loop_runner("uvloop") == ("uvloop", uvloop.run)
    assert cli._event_loop_runner("asyncio") == ("asyncio", asyncio.run)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert cli._event_loop_runner("auto") == ("asyncio", asyncio.run)
    with pytest.raises(SystemExit) as exit_:
        cli._event_loop_runner("uvloop")
    assert exit_.value.code == 2


@pytest.fixture
def no_uvloop(tmp_path) -> dict[str, str]:
    """An environment in which `import uvloop` fails, as where it is not installed."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('uvloop blocked for the test')\n")
    return {"PYTHONPATH": str(blocker)}


def test_without_uvloop_auto_serves_on_asyncio(pool_factory, workdir, no_uvloop):
    pool = pool_factory(wsgi_config(workdir), env=no_uvloop)
    assert client.request(pool.address, "/hello").status == 200
    assert "loop=asyncio" in pool.log() and "method=pidfd" not in pool.log()
    assert pool.stop(signal.SIGTERM) == 0


def test_by_default_the_pool_runs_on_uvloop(pool_factory, workdir):
    pool = pool_factory(wsgi_config(workdir))
    assert client.request(pool.address, "/hello").status == 200
    assert "loop=uvloop" in pool.log()


def test_uvloop_asked_for_but_not_importable_is_a_config_error(workdir, no_uvloop):
    path = workdir / "uvloop.toml"
    path.write_text(to_toml(wsgi_config(workdir, pool={"event_loop": "uvloop"})))
    result = run_cli("serve", "-c", str(path), env=no_uvloop)
    assert result.returncode == 2
    assert "pool.event_loop: uvloop is not installed" in result.stderr


# ---------------------------------------------------------------------------- allowed clients


def ask_from(source: str, port: int) -> bytes:
    """A FastCGI GET from ``source`` (a loopback address of this machine); what came back
    before the pool closed the connection."""
    from fcgipool.client import cgi_params
    from fcgipool.protocol import encode_request

    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:  # fmt: skip
        try:
            sock.sendall(encode_request(1, cgi_params("/?n=1"), keep_conn=False))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            return b""
        return data


def test_allowed_clients_closes_others_at_accept_and_logs_them(pool_factory, workdir):
    port = free_port()
    pool = pool_factory(wsgi_config(workdir, pool={"bind": [f"tcp:0.0.0.0:{port}"],
                                                    "allowed_clients": ["127.0.0.2/32"]}))
    answer = ask_from("127.0.0.2", port)
    assert b"Content-Type" in answer and b"X-Pid" in answer, answer[:200]
    assert ask_from("127.0.0.1", port) == b""
    wait_for(lambda: "reason=allowed_clients" in pool.log(), 10, "the refusal logged")
    line = next(line for line in pool.log().splitlines() if "reason=allowed_clients" in line)
    assert "peer=127.0.0.1:" in line


def test_by_default_a_wildcard_bind_admits_loopback_only_and_a_specific_one_anyone():
    from types import SimpleNamespace

    from fcgipool.frontend import Frontend

    def frontend(allowed: list[str]) -> Frontend:
        cfg = config.build(None, {"pool": {"allowed_clients": allowed}}, environ={})
        context = SimpleNamespace(loop=asyncio.new_event_loop())
        return Frontend(cfg, context, dict)  # type: ignore[arg-type]

    default = frontend([])
    assert default.admits("127.0.0.1", wildcard=True) and default.admits("::1", True)
    assert default.admits("::ffff:127.0.0.1", True)
    assert not default.admits("192.0.2.7", wildcard=True)
    assert default.admits("192.0.2.7", wildcard=False)
    listed = frontend(["10.0.0.0/8", "fd00::/8"])
    assert listed.admits("10.1.2.3", False) and listed.admits("fd00::5", True)
    assert not listed.admits("127.0.0.1", True) and not listed.admits("192.0.2.7", False)
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        connection = default.factory(sock)()
        assert connection.wildcard is True
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert default.factory(sock)().wildcard is False
    with socket.socket(socket.AF_UNIX) as sock:
        assert default.factory(sock)().wildcard is None
    for loop in (default.context.loop, listed.context.loop):
        loop.close()
