"""Configuration: file, environment and flags; errors name the key and the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomlkit

from fcgipool import config
from fcgipool.cli import _overrides


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fcgipool", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_defaults_are_valid_and_printed_as_commented_toml(tmp_path):
    result = run_cli("config", "default")
    assert result.returncode == 0
    document = tomlkit.parse(result.stdout)
    assert document["pool"]["workers"] == 2
    assert "# Number of children." in result.stdout
    path = tmp_path / "default.toml"
    path.write_text(result.stdout)
    assert config.build(path, environ={}) == config.Config()
    check = run_cli("check-config", str(path))
    assert check.returncode == 0 and "ok" in check.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[pool]\nworkers = 0\n", "pool.workers: Input should be greater than or equal to 1"),
        ("[pool]\nwrokers = 3\n", "pool.wrokers: Extra inputs are not permitted"),
        ('[pool]\nbind = ["http://x"]\n', "pool.bind.0: unknown address scheme 'http'"),
        ('[pool]\nbind = ["tcp:localhost"]\n', "pool.bind.0: 'tcp:localhost' needs a port"),
        ('[pool]\nsocket_mode = "rw"\n', "pool.socket_mode: 'rw' is not an octal file mode"),
        ('[limits]\nmax_body_size = "lots"\n', "limits.max_body_size:"),
        ("[child]\ncommand = []\n", "child.command: List should have at least 1 item"),
        ("[timeouts]\nrequest = -1\n", "timeouts.request: Input should be greater than 0"),
        ("[pool\n", "TOML syntax error"),
        ('[pool]\nallowed_clients = ["10.0.0.0/33"]\n',
         "pool.allowed_clients.0: '10.0.0.0/33' is not an IP address or network"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    served = run_cli("serve", "-c", str(path))
    assert served.returncode == 2 and expected in served.stderr


def test_check_config_warns_when_any_client_may_name_any_project(tmp_path):
    open_path = tmp_path / "open.toml"
    open_path.write_text("[pool]\nworkers = 1\n")
    closed_path = tmp_path / "closed.toml"
    closed_path.write_text(f'[projects]\nallowed_roots = ["{tmp_path}"]\n')
    opened = run_cli("check-config", str(open_path))
    closed = run_cli("check-config", str(closed_path))
    assert opened.returncode == closed.returncode == 0
    assert "warning: projects.allowed_roots: empty, so any client may name any .qgs/.qgz" in (
        opened.stderr)
    assert "warning" not in closed.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[projects]\nfile_types = ["qgs"]\n', "projects.file_types.0: 'qgs': a file ending"),
        ('[projects]\nstorage_schemes = ["postgresql:"]\n', "projects.storage_schemes.0:"),
    ],
)
def test_bad_project_access_settings_exit_2(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and expected in result.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    result = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_precedence_defaults_file_environment_flags(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text('[pool]\nworkers = 3\n[limits]\nmax_waiting = 5\n[child]\nenv = {A = "1"}\n')
    environ = {"FCGIPOOL_LIMITS__MAX_WAITING": "7", "FCGIPOOL_LOG__FORMAT": "json",
               "FCGIPOOL_CHILD__ALLOW_ROOT": "true", "FCGIPOOL_TIMEOUTS__CANCEL": "2.5",
               "FCGIPOOL_POOL__BIND": '["tcp:127.0.0.1:9001"]', "UNRELATED": "x"}
    flags = _overrides(("unix:/tmp/a.sock",), 4, 12.5, None, ("B=2",), ("/bin/app", "-v"))
    cfg = config.build(path, flags, environ)
    assert cfg.pool.workers == 4  # flag over file
    assert cfg.limits.max_waiting == 7  # environment over file
    assert cfg.log.format == "json"
    assert cfg.child.allow_root is True
    assert cfg.timeouts.cancel == 2.5
    assert cfg.pool.bind == ["unix:/tmp/a.sock"]  # flag over environment
    assert cfg.timeouts.request == 12.5
    assert cfg.child.command == ["/bin/app", "-v"]
    assert cfg.child.env == {"A": "1", "B": "2"}


def test_environment_override_errors_name_the_key():
    with pytest.raises(config.ConfigError) as error:
        config.build(None, None, {"FCGIPOOL_POOL__WORKERS": "many"})
    assert error.value.problems == [
        "pool.workers: Input should be a valid integer, unable to parse string as an integer"
    ]


def test_sizes_accept_units():
    cfg = config.build(None, {"limits": {"max_body_size": "2MiB", "body_buffer": "128KiB"}}, {})
    assert cfg.limits.max_body_size == 2 * 2**20
    assert cfg.limits.body_buffer == 128 * 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/p.sock", config.Address("unix", path="/run/p.sock")),
        ("tcp:127.0.0.1:9000", config.Address("tcp", host="127.0.0.1", port=9000)),
        ("tcp:[::1]:9000", config.Address("tcp", host="::1", port=9000)),
        # every interface (it meant 127.0.0.1 before ":PORT" was a form of its own)
        ("tcp::9000", config.Address("tcp", host="", port=9000)),
    ],
)
def test_addresses_parse_and_print(text, expected):
    address = config.Address.parse(text)
    assert address == expected
    assert config.Address.parse(str(address)) == address


def test_bad_flag_values_are_reported_without_traceback():
    result = run_cli("serve", "--bind", "ftp:x", "--", "/bin/true")
    assert result.returncode == 2
    assert "pool.bind.0: unknown address scheme 'ftp'" in result.stderr
    result = run_cli("serve", "--env", "NOEQUALS", "--", "/bin/true")
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


def test_configuration_reference_in_docs_matches_the_schema():
    from pathlib import Path
    docs = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert docs.read_text() == config.reference_markdown() + "\n", (
        "docs/configuration.md drifted: run `fcgipool config reference > docs/configuration.md`"
    )


# ---------------------------------------------------------------- the number of children


def test_min_and_max_workers_default_to_workers_and_a_default_workers_moves_into_the_range():
    cfg = config.build(None, {}, {})
    assert (cfg.pool.min_workers, cfg.pool.max_workers) == (None, None)
    assert (cfg.pool.minimum, cfg.pool.workers, cfg.pool.maximum) == (2, 2, 2)
    cfg = config.build(None, {"pool": {"max_workers": 8}}, {})
    assert (cfg.pool.minimum, cfg.pool.workers, cfg.pool.maximum) == (2, 2, 8)
    cfg = config.build(None, {"pool": {"min_workers": 1}}, {})
    assert (cfg.pool.minimum, cfg.pool.workers, cfg.pool.maximum) == (1, 2, 2)
    cfg = config.build(None, {"pool": {"min_workers": 4, "max_workers": 8}}, {})
    assert (cfg.pool.minimum, cfg.pool.workers, cfg.pool.maximum) == (4, 4, 8)
    cfg = config.build(None, {"pool": {"max_workers": 1}}, {})
    assert (cfg.pool.minimum, cfg.pool.workers, cfg.pool.maximum) == (1, 1, 1)


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"min_workers": 4, "max_workers": 2}, "pool.min_workers: 4 is above pool.max_workers (2)"),
        ({"workers": 5, "max_workers": 4}, "pool.workers: 5 is above pool.max_workers (4)"),
        ({"workers": 1, "min_workers": 2}, "pool.workers: 1 is below pool.min_workers (2)"),
        ({"min_workers": 0}, "pool.min_workers: Input should be greater than or equal to 1"),
        ({"max_starting": 0}, "pool.max_starting: Input should be greater than or equal to 1"),
        ({"idle_timeout": 0}, "pool.idle_timeout: Input should be greater than 0"),
        ({"max_memory": "lots"}, "pool.max_memory:"),
    ],
)
def test_a_bad_range_of_workers_names_the_key(pool, expected):
    with pytest.raises(config.ConfigError) as caught:
        config.build(None, {"pool": pool}, {})
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value


def test_reserved_children_must_leave_one_at_the_minimum():
    classes = [{"name": "light", "reserved": 1}]
    config.build(None, {"pool": {"workers": 2}, "classes": classes}, {})
    with pytest.raises(config.ConfigError) as caught:
        config.build(None, {"pool": {"min_workers": 1, "max_workers": 4}, "classes": classes}, {})
    assert caught.value.problems == [
        "classes: 1 reserved children leave none for the others (pool.min_workers = 1)"
    ]


def test_min_and_max_workers_flags(tmp_path):
    flags = _overrides((), None, None, None, (), (), min_workers=1, max_workers=6)
    assert flags == {"pool": {"min_workers": 1, "max_workers": 6}}
    cfg = config.build(None, flags, {})
    assert (cfg.pool.minimum, cfg.pool.workers, cfg.pool.maximum) == (1, 2, 6)
    result = run_cli("serve", "--min-workers", "3", "--max-workers", "2", "--", "/bin/true")
    assert result.returncode == 2
    assert "pool.min_workers: 3 is above pool.max_workers (2)" in result.stderr
    result = run_cli("serve", "-w", "9", "--max-workers", "4", "--", "/bin/true")
    assert result.returncode == 2 and "pool.workers: 9 is above pool.max_workers" in result.stderr
    result = run_cli("serve", "--max-workers", "0", "--", "/bin/true")
    assert result.returncode == 2 and "pool.max_workers: Input should be greater" in result.stderr
