"""The `fcgipool` command line. Its names and flags are a public contract."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import click

from . import config as config_module
from . import logs
from .client import request as fcgi_request

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
) -> dict[str, Any]:
    pool: dict[str, Any] = {}
    child: dict[str, Any] = {}
    result: dict[str, Any] = {}
    if bind:
        pool["bind"] = list(bind)
    if workers is not None:
        pool["workers"] = workers
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
@click.option("--bind", multiple=True, metavar="ADDR", help="unix:/path.sock or tcp:HOST:PORT.")
@click.option("-w", "--workers", type=int, help="Number of children.")
@click.option("--timeout", type=float, help="Per-request timeout in seconds.")
@click.option("--control", metavar="PATH", help="Path of the control socket.")
@click.option(
    "--env", multiple=True, metavar="KEY=VALUE", help="Add to the children's environment."
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def serve(
    config_path: str | None,
    bind: tuple[str, ...],
    workers: int | None,
    timeout: float | None,
    control: str | None,
    env: tuple[str, ...],
    command: tuple[str, ...],
) -> None:
    """Run a pool: fcgipool serve [OPTIONS] [-- COMMAND ARGS...]"""
    overrides = _overrides(bind, workers, timeout, control, env, command)
    cfg = _load(config_path, overrides, os.geteuid())
    logs.configure(cfg.log.format, cfg.log.level, cfg.log.file)
    from .supervisor import Pool

    try:
        import uvloop  # optional speed-up

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        code = runner(Pool(cfg, config_path, overrides).run())
    except OSError as error:
        logs.get("fcgipool").error("startup_failed", error=str(error))
        sys.exit(1)
    sys.exit(code)


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file: exit 0 when valid, else 2 with `key.path: reason` lines."""
    _load(path, {}, euid=None)  # who will run it is unknown: the root rule is checked at start
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
    """Send one FastCGI request to ADDR (unix:/path or tcp:HOST:PORT) and print the answer."""
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
