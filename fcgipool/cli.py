"""The `fcgipool` command line. Its names and flags are a public contract."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import click

from . import config as config_module
from . import logs
from .client import request as fcgi_request

EXIT_START = 1  # could not start: a socket in use, a directory it may not write...
EXIT_CONFIG = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fcgipool")
def main() -> None:
    """fcgipool: a FastCGI process manager for QGIS Server and any FastCGI program."""


def _overrides(
    bind: tuple[str, ...],
    workers: int | None,
    timeout: float | None,
    control: str | None,
    env: tuple[str, ...],
    command: tuple[str, ...],
    http: str | None = None,
    wsgi: str | None = None,
    log_format: str | None = None,
    min_workers: int | None = None,
    max_workers: int | None = None,
) -> dict[str, Any]:
    pool: dict[str, Any] = {}
    child: dict[str, Any] = {}
    result: dict[str, Any] = {}
    if http is not None:
        result["admin"] = {"http": http}
    if log_format is not None:
        result["log"] = {"format": log_format}
    if wsgi is not None:
        if command:
            raise click.BadParameter("give either --wsgi or a COMMAND", param_hint="--wsgi")
        command = (sys.executable, "-m", "fcgipool.wsgi", wsgi)
    if bind:
        pool["bind"] = list(bind)
    if workers is not None:
        pool["workers"] = workers
    if min_workers is not None:
        pool["min_workers"] = min_workers
    if max_workers is not None:
        pool["max_workers"] = max_workers
    if control is not None:
        pool["control"] = control
    if command:
        child["command"] = list(command)
    if env:
        pairs = {}
        for item in env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
            pairs[name] = value
        child["env"] = pairs
    if timeout is not None:
        result["timeouts"] = {"request": timeout}
    if pool:
        result["pool"] = pool
    if child:
        result["child"] = child
    return result


def _load(path: str | None, overrides: dict[str, Any], euid: int | None) -> config_module.Config:
    """The validated config, or exit 2 listing every problem as `key.path: reason`."""
    try:
        cfg = config_module.build(path, overrides)
        problems = config_module.runtime_problems(cfg, euid)
    except config_module.ConfigError as error:
        problems = error.problems
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(EXIT_CONFIG)
    return cfg


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="TOML file.")
@click.option(
    "--bind", multiple=True, metavar="ADDR",
    help="Pool socket: unix:/path.sock, /path.sock, tcp:HOST:PORT, HOST:PORT, [::1]:PORT or "
    ":PORT (every interface). Repeat for more.",
)  # fmt: skip
@click.option("-w", "--workers", type=int, help="Number of children (to start with).")
@click.option("--min-workers", type=int, help="Fewest children (pool.min_workers).")
@click.option("--max-workers", type=int, help="Most children (pool.max_workers).")
@click.option("--timeout", type=float, help="Per-request timeout in seconds.")
@click.option("--control", metavar="PATH", help="Path of the control socket.")
@click.option(
    "--env", multiple=True, metavar="KEY=VALUE", help="Add to the children's environment."
)
@click.option(
    "--http", metavar="ADDR",
    help="Admin HTTP listener, in the forms of --bind, e.g. 127.0.0.1:9090.",
)  # fmt: skip
@click.option("--wsgi", metavar="MODULE:APP", help="Serve a WSGI app as the children (flup).")
@click.option("--log-format", type=click.Choice(["console", "json"]), help="Log format.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str | None,
    bind: tuple[str, ...],
    workers: int | None,
    min_workers: int | None,
    max_workers: int | None,
    timeout: float | None,
    control: str | None,
    env: tuple[str, ...],
    http: str | None,
    wsgi: str | None,
    log_format: str | None,
    command: tuple[str, ...],
) -> None:
    """Run a pool: fcgipool serve [OPTIONS] [-- COMMAND ARGS...]"""
    overrides = _overrides(bind, workers, timeout, control, env, command, http, wsgi, log_format,
                           min_workers, max_workers)  # fmt: skip
    cfg = _load(config_path, overrides, os.geteuid())
    try:
        logs.configure(cfg.log.format, cfg.log.level, cfg.log.file)
    except OSError as error:
        click.echo(f"log.file: cannot open {cfg.log.file}: {error.strerror or error}", err=True)
        sys.exit(EXIT_START)
    loop_name, runner = _event_loop_runner(cfg.pool.event_loop)
    log = logs.get("fcgipool")
    log.info("event_loop", loop=loop_name)
    try:
        code = runner(_run_pool(cfg, config_path, overrides))
    except OSError as error:  # a socket or directory the pool needs: one line, no traceback
        log.error("startup_failed", error=str(error))
        if cfg.log.file:  # say it where the operator looks too
            click.echo(f"fcgipool: could not start: {error}", err=True)
        sys.exit(EXIT_START)
    sys.exit(code)


async def _run_pool(
    cfg: config_module.Config, config_path: str | None, overrides: dict[str, Any]
) -> int:
    from .supervisor import Pool

    return await Pool(cfg, config_path, overrides, loop=asyncio.get_running_loop()).run()


Runner = Callable[[Coroutine[Any, Any, int]], int]


def _event_loop_runner(choice: str) -> tuple[str, Runner]:
    """("asyncio", asyncio.run), or ("uvloop", uvloop.run) when chosen, or with "auto" when
    uvloop can be imported (it is a dependency on Linux)."""
    if choice == "asyncio":
        return "asyncio", asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            click.echo("pool.event_loop: uvloop is not installed", err=True)
            sys.exit(EXIT_CONFIG)
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def _control_path(config_path: str | None, control: str | None) -> str:
    if control:
        return control
    cfg = _load(config_path, {}, euid=None) if config_path else config_module.Config()
    return cfg.control_path()


def _ask(path: str, command: dict[str, Any]) -> dict[str, Any]:
    """One command over the control socket; exit 1 with a clear message when no pool
    answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(json.dumps(command).encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError as error:
        click.echo(f"fcgipool: no pool answers on {path}: {error.strerror or error}", err=True)
        sys.exit(1)
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        click.echo(f"fcgipool: {path} did not answer in JSON", err=True)
        sys.exit(1)
    if not answer.get("ok"):
        click.echo(f"fcgipool: {answer.get('error', 'refused')}", err=True)
        sys.exit(2 if answer.get("exit") == 2 else 1)
    return answer


control_option = click.option("--control", metavar="PATH", help="The pool's control socket.")
config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False),
    help="The pool's config file (to find its control socket).",
)  # fmt: skip


@main.command()
@config_option
@control_option
@click.option("--json", "as_json", is_flag=True, help="The status document as JSON.")
@click.option("--watch", is_flag=True, help="Refresh every 2 s until Ctrl-C.")
def status(config_path: str | None, control: str | None, as_json: bool, watch: bool) -> None:
    """Show the pool and its children."""
    path = _control_path(config_path, control)
    while True:
        document = _ask(path, {"command": "status"})["status"]
        if as_json:
            click.echo(json.dumps(document, indent=2))
        else:
            if watch:
                click.clear()
            click.echo(format_status(document))
        if not watch:
            return
        time.sleep(2)


@main.command()
@config_option
@control_option
def reload(config_path: str | None, control: str | None) -> None:
    """Re-read the config and replace every child (like SIGHUP)."""
    _ask(_control_path(config_path, control), {"command": "reload"})
    click.echo("reloading")


@main.command()
@config_option
@control_option
@click.argument("workers", type=click.IntRange(min=1))
def scale(config_path: str | None, control: str | None, workers: int) -> None:
    """Run WORKERS children from now on."""
    _ask(_control_path(config_path, control), {"command": "scale", "workers": workers})
    click.echo(f"scaling to {workers} children")


@main.command()
@config_option
@control_option
@click.option("--fast", is_flag=True, help="Do not wait for requests in flight (like SIGQUIT).")
def stop(config_path: str | None, control: str | None, fast: bool) -> None:
    """Stop the pool, gracefully unless --fast."""
    _ask(_control_path(config_path, control), {"command": "stop", "fast": fast})
    click.echo("stopping")


@main.group("projects", invoke_without_command=True)
@config_option
@control_option
@click.option("--json", "as_json", is_flag=True, help="The projects as JSON.")
@click.pass_context
def projects(ctx: click.Context, config_path: str | None, control: str | None,
             as_json: bool) -> None:  # fmt: skip
    """Every project the pool has seen: version, requests, cost, who holds it, pinned."""
    ctx.obj = _control_path(config_path, control)
    if ctx.invoked_subcommand is not None:
        return
    rows = _ask(ctx.obj, {"command": "projects"})["projects"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'REQUESTS':>8} {'MEAN_MS':>8} {'P90_MS':>8} {'LOADS':>5} {'LOAD_S':>7} "
               f"{'CHILDREN':<16} PROJECT")  # fmt: skip
    for row in rows:
        held = ",".join(map(str, row["children"])) or "-"
        flags = "".join((" (pinned)" * row["pinned"], " (dropped)" * row["dropped"],
                         " (missing)" * row["missing"]))  # fmt: skip
        click.echo(f"{row['requests']:>8} {row['mean_ms']:>8.1f} {row['p90_ms']:>8.1f} "
                   f"{row['loads']:>5} {row['load_seconds']:>7.2f} {held:<16} "
                   f"{row['path']}{flags}")  # fmt: skip


def _project_verb(action: str, help_text: str, done: str) -> None:
    @projects.command(action, help=help_text)
    @click.argument("path")
    @click.option("--children", "count", type=click.IntRange(min=0), default=0,
                  help="How many children (warm; 0 is all).", hidden=action != "warm")
    @click.pass_obj
    def verb(control_path: str, path: str, count: int) -> None:
        answer = _ask(control_path, {"command": "projects", "action": action, "path": path,
                                     "count": count})  # fmt: skip
        click.echo(done.format(path=answer["path"], children=answer["children"]))


_project_verb("warm", "Load PATH on N children (all by default) and keep it pinned: every "
              "new child loads it too, until unpin or a restart.",
              "{path}: loading on {children} children; pinned")
_project_verb("unpin", "New children no longer load PATH first.", "{path}: unpinned")
_project_verb("refresh", "Reload PATH on every child that holds it, as if it had changed.",
              "{path}: reloading on {children} children")
_project_verb("drop", "No child holds PATH any more: the children holding it are replaced.",
              "{path}: replacing {children} children")


def format_status(document: dict[str, Any]) -> str:
    pool = document["pool"]
    states = ", ".join(f"{n} {state}" for state, n in pool["children"].items() if n) or "none"
    low, high = pool.get("min_workers"), pool.get("max_workers")
    span = f" of {low}..{high}" if low is not None and low != high else ""
    last = (pool.get("scaling") or {}).get("last")
    scaled = (
        f"  last scaling: {last['action']} ({last['reason']}) at {last['at']:.0f} s" if last else ""
    )
    lines = [
        f"pool {pool['pid']}  up {pool['uptime']:.0f} s  generation {pool['generation']}  "
        f"config {pool['config_file'] or '-'}" + scaled,
        f"children {pool['workers']}{span} ({states})  queue {pool['queue_length']}/"
        f"{pool['max_waiting']}  served {pool['requests_served']}  "
        f"failure pressure {pool['failure_pressure']}/{pool['max_failure_pressure']}"
        + ("  STOPPING" if pool["stopping"] else ""),
        "",
        f"{'PID':>8} {'STATE':<10} {'REQS':>6} {'RSS MiB':>8} {'CPU%':>5} {'AGE s':>7} "
        f"{'ELAPSED':>8}  REQUEST",
    ]
    for row in document["children"]:
        request = row["request"]
        current = f"{request['method']} {request['uri']}" if request else ""
        elapsed = f"{request['elapsed']:.2f}" if request else ""
        lines.append(
            f"{row['pid']:>8} {row['state']:<10} {row['requests']:>6} {row['rss'] / 2**20:>8.1f} "
            f"{row['cpu_percent']:>5.1f} {row['age']:>7.0f} {elapsed:>8}  {current}"
        )
    return "\n".join(lines)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file: exit 0 when valid, else 2 with `key.path: reason` lines."""
    cfg = _load(path, {}, euid=None)  # who will run it is unknown: checked again at start
    for warning in config_module.warnings(cfg):
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{path}: ok")


@main.group("config")
def config_group() -> None:
    """Show configuration."""


@config_group.command("default")
def config_default() -> None:
    """Print the full default configuration as commented TOML."""
    click.echo(config_module.default_toml(), nl=False)


@config_group.command("reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), as in docs/configuration.md."""
    click.echo(config_module.reference_markdown())


@main.command("request")
@click.argument("address")
@click.argument("uri")
@click.option("-X", "--method", default="GET", show_default=True)
@click.option("-d", "--data", "body", default=None, help="Request body; @FILE reads a file.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="Extra param.")
@click.option("-o", "--output", type=click.File("wb"), help="Write the body here.")
@click.option("--timeout", type=float, default=30.0, show_default=True)
def request_command(
    address: str,
    uri: str,
    method: str,
    body: str | None,
    params: tuple[str, ...],
    output: Any,
    timeout: float,
) -> None:
    """Send one FastCGI request to ADDR (unix:/path.sock, /path.sock, HOST:PORT, [::1]:PORT,
    :PORT for this machine) and print the answer."""
    if body is not None and body.startswith("@"):
        with open(body[1:], "rb") as handle:
            data = handle.read()
    else:
        data = (body or "").encode()
    extra = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="-p")
        extra[name] = value
    if body is not None and method == "GET":
        method = "POST"
    try:
        response = fcgi_request(address, uri, method, data, extra, timeout, output)
    except (OSError, ValueError) as error:
        click.echo(f"fcgipool request: {address}: {error}", err=True)
        sys.exit(1)
    click.echo(f"Status: {response.status}")
    for name, value in response.headers.items():
        click.echo(f"{name}: {value}")
    click.echo()
    if output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(response.body)
        sys.stdout.buffer.flush()
    if response.stderr:
        sys.stderr.buffer.write(response.stderr)
