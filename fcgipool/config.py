"""Configuration: schema (pydantic), TOML files (tomlkit), environment overrides.

Precedence, lowest first: schema defaults, the TOML file, ``FCGIPOOL_<SECTION>__<KEY>``
environment variables, command-line flags. Every error names the key path and the reason.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import tomlkit
import tomlkit.exceptions
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

ENV_PREFIX = "FCGIPOOL_"


ADDRESS_FORMS = "unix:/path.sock, /path.sock, tcp:HOST:PORT, HOST:PORT, [IPv6]:PORT or :PORT"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+-]*")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address, in the forms operators type.

    Unix: ``unix:/run/p.sock`` or ``/run/p.sock``. TCP: ``tcp:HOST:PORT`` or ``HOST:PORT``,
    where HOST is an IPv4 address, an IPv6 address in brackets (``[::1]:9000``) or a host
    name (resolved when the socket is bound); ``:PORT`` (``tcp::PORT``) is every interface
    and has ``host == ""``. ``str()`` gives the canonical form, which parses back to the
    same address: ``unix:PATH`` or ``tcp:HOST:PORT``.
    """

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        if not text:
            raise ValueError(f"empty address: write {ADDRESS_FORMS}")
        if text.startswith("/"):
            return cls._unix(text)
        scheme, sep, rest = text.partition(":")
        if scheme == "unix":
            return cls._unix(rest)
        if scheme == "tcp":
            return cls._tcp(rest, text)
        if not sep:
            if text.startswith("["):
                return cls._tcp(text, text)
            if "/" in text or text.endswith(".sock"):
                raise ValueError(f"unix socket path {text!r} must be absolute")
            raise ValueError(f"{text!r} is not an address: write {ADDRESS_FORMS}")
        if _SCHEME.fullmatch(scheme) and not rest.isdigit() and rest and ":" not in rest:
            raise ValueError(f"unknown address scheme {scheme!r}: use unix: or tcp:")
        return cls._tcp(text, text)  # :PORT, [IPv6]:PORT, HOST:PORT, too many colons

    @classmethod
    def _unix(cls, path: str) -> Address:
        if not path.startswith("/"):
            raise ValueError(f"unix socket path {path!r} must be absolute")
        if "\0" in path:
            raise ValueError(f"unix socket path {path!r} contains a NUL byte")
        if len(path.encode()) > 107:
            raise ValueError(f"unix socket path {path!r} is longer than 107 bytes")
        return cls("unix", path=path)

    @classmethod
    def _tcp(cls, rest: str, text: str) -> Address:
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise ValueError(f"{text!r}: '[' without ']' around the IPv6 address")
            host, after = _ipv6(rest[1:close], text), rest[close + 1 :]
            if not after.startswith(":"):
                raise ValueError(f"{text!r} needs a port 1-65535: [IPv6]:PORT")
            port = after[1:]
        else:
            if "]" in rest:
                raise ValueError(f"{text!r}: ']' without '['")
            if rest.count(":") > 1:
                raise ValueError(
                    f"{text!r} has too many ':' for HOST:PORT "
                    "(write an IPv6 address in brackets: [::1]:9000)"
                )
            host, sep, port = rest.partition(":")
            if not sep:
                raise ValueError(f"{text!r} needs a port 1-65535: tcp:HOST:PORT")
            host = _host(host, text)
        if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} needs a port 1-65535, not {port!r}")
        return cls("tcp", host=host, port=int(port))

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _ipv6(text: str, address: str) -> str:
    """The canonical text of an IPv6 address (a zone such as ``%eth0`` is kept)."""
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ValueError(f"{address!r}: {text!r} is not an IPv6 address") from None


def _host(text: str, address: str) -> str:
    """An IPv4 address, a host name (lower-cased) or "" (every interface)."""
    if not text:
        return ""
    labels = text.lower().removesuffix(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{address!r}: {text!r} is not an IPv4 address") from None
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{address!r}: {text!r} is not a host name or IP address")
    return text.lower()


def _check_address(text: str) -> str:
    Address.parse(text)
    return text


def _check_optional_address(text: str) -> str:
    if text:
        Address.parse(text)
    return text


def _check_network(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network (10.0.0.0/8)") from None
    return text


def _check_control_path(text: str) -> str:
    if text:
        Address.parse(f"unix:{text}")
    return text


def _one_or_more(value: Any) -> Any:
    """A single address may be given as a string (a flag, an environment variable)."""
    return [value] if isinstance(value, str) else value


def _check_mode(text: str) -> str:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal file mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is outside 0000-0777")
    return text


AddressText = Annotated[str, AfterValidator(_check_address)]
OptionalAddressText = Annotated[str, AfterValidator(_check_optional_address)]
ControlPath = Annotated[str, AfterValidator(_check_control_path)]
ModeText = Annotated[str, AfterValidator(_check_mode)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class PoolSection(_Section):
    bind: Annotated[list[AddressText], BeforeValidator(_one_or_more)] = Field(
        default=["unix:/run/fcgipool/pool.sock"],
        min_length=1,
        description="Addresses the pool listens on for the web server (one string or a "
        "list): unix:/path.sock or /path.sock; tcp:HOST:PORT or HOST:PORT, HOST an IPv4 "
        "address, [IPv6] or a host name (resolved at start, first address); :PORT is every "
        "interface, IPv6 and IPv4. Ignored when systemd hands sockets over (LISTEN_FDS).",
    )
    allowed_clients: list[Annotated[str, AfterValidator(_check_network)]] = Field(
        default_factory=list,
        description="Addresses or networks (10.0.0.0/8, ::1) allowed to connect to a TCP "
        "bind; any other client is closed at accept, with a connection_refused line. Empty: "
        "only loopback clients on a wildcard bind (0.0.0.0, ::, :PORT), anyone on a bind to "
        "a specific address. Unix sockets are guarded by socket_mode and socket_group.",
    )
    socket_mode: ModeText = Field(
        default="0660", description="File mode of unix pool sockets (octal)."
    )
    socket_owner: str = Field(
        default="", description="User that owns unix pool sockets; empty keeps the pool's."
    )
    socket_group: str = Field(
        default="",
        description="Group of unix pool sockets, e.g. www-data so nginx workers can connect.",
    )
    workers: int = Field(
        default=2,
        ge=1,
        le=4096,
        description="Number of children. With min_workers or max_workers, the number it "
        "starts with: given, it must lie within that range; left at its default, it is moved "
        "into it.",
    )
    min_workers: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Fewest children: above this number, a child that stays idle for "
        "idle_timeout is retired, and so is one the arriving work does not need (more "
        "children than it needs and one spare). Unset: workers.",
    )
    max_workers: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Most children: while requests wait longer than a new child takes to be "
        "ready (its probe and warm-up included, as measured), one more is started, up to "
        "this number. Unset: workers.",
    )
    idle_timeout: Seconds = Field(
        default=60.0,
        description="Seconds a child above min_workers may stay idle before it is retired "
        "(one at a time, the one idle longest). Long enough that the gaps of a map "
        "viewer's session do not retire a warm child that the next pan needs again. Also how "
        "long the number of children must have stayed the same before a child that the "
        "arriving work does not need is retired.",
    )
    max_starting: int = Field(
        default=2,
        ge=1,
        le=4096,
        description="Children the pool adds at once when requests wait: each one in start-up "
        "is counted (QGIS is CPU-bound while it loads; about one per core).",
    )
    max_cpu: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="No child is added while the CPUs the pool may run on were busier than "
        "this (0-1) while work waited (the moments of the last second in which requests "
        "waited for a child): CPU-bound work is served no sooner by one more child, and its "
        "start takes CPU from the children serving. Work that waits on I/O leaves CPUs idle "
        "and still grows the pool. At least half a CPU must also have been free, each child "
        "starting counted as a CPU taken (its start is CPU-bound): on 2 CPUs at most 0.75 "
        "busy, and a second start waits for the first unless the CPUs were nearly idle. "
        "Nor is one added while the serving children take so much CPU that less than half a "
        "CPU is left (each takes the share of its run time it spent on CPU, learned from "
        "log.request_cost): 2 CPU-bound children on 2 CPUs hold a third back however free "
        "the CPUs look between their requests. While either holds a child back, one is "
        "tried now and then, serving and parked in turns: it stays unless the requests "
        "finished a second while work waited were fewer with it, else it goes and the next "
        "trial waits 60 s (doubling). 1 turns the checks and the trials off.",
    )
    max_memory: ByteSize = Field(
        default=ByteSize(0),
        ge=0,
        description="No child is added when the children's resident memory (sampled every "
        "child.rss_interval) plus that of the largest child would exceed this; 0 is no "
        "bound. Replacements of children that die or are recycled are not held back.",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto",
        description="The event loop: auto is uvloop (installed with fcgipool on Linux; it "
        "costs less per request) when it can be imported, else asyncio; or the one named.",
    )
    max_recycling: int = Field(
        default=1,
        ge=1,
        description="Children replaced at once when recycling or reloading. A replacement is "
        "ready before the child it replaces stops, so capacity never drops.",
    )
    max_failure_pressure: float = Field(
        default=2.0,
        gt=0,
        description="Failures (crashes, kills after a timeout, failed starts) within "
        "failure_window, each divided by the number of children (workers) when it happened. "
        "Above it the pool exits with code 3 so that "
        "systemd or Kubernetes can replace it.",
    )
    failure_window: Seconds = Field(
        default=60.0, description="Seconds over which failures count towards the pressure."
    )
    runtime_dir: str = Field(
        default="",
        description="Where the private directory (mode 0700) for the children's sockets is "
        "made; empty means $RUNTIME_DIRECTORY, else /tmp.",
    )
    control: ControlPath = Field(
        default="",
        description="Absolute path of the local control socket (mode 0600) for "
        "`fcgipool status`, "
        "`reload`, `scale`, `stop`; empty puts it next to the first unix pool socket "
        "(NAME.sock → NAME.ctl).",
    )

    @property
    def minimum(self) -> int:
        """pool.min_workers, or workers when it is unset."""
        return self.workers if self.min_workers is None else self.min_workers

    @property
    def maximum(self) -> int:
        """pool.max_workers, or workers when it is unset."""
        return self.workers if self.max_workers is None else self.max_workers


class ChildSection(_Section):
    command: list[str] = Field(
        default=["/usr/lib/cgi-bin/qgis_mapserv.fcgi"],
        min_length=1,
        description="The FastCGI program and its arguments. It gets its own listening socket "
        "as fd 0 (FCGI_LISTENSOCK_FILENO).",
    )
    cwd: str = Field(default="/", description="Working directory of the children.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment of the children. Nothing is inherited from the pool except "
        "the names in pass_env; PATH, HOME and LANG get safe defaults when not set here.",
    )
    pass_env: list[str] = Field(
        default_factory=list,
        description="Names of the pool's own environment variables passed to the children.",
    )
    keep_conn: bool = Field(
        default=True,
        description="Keep the connection to a child open between requests (FCGI_KEEP_CONN).",
    )
    reconnect_after: Seconds = Field(
        default=1.0,
        description="A kept child connection idle longer than this is replaced before use: "
        "libfcgi drops silent connections after about 2 s.",
    )
    backlog: int = Field(default=8, ge=1, le=4096, description="Listen backlog of a child socket.")
    start_timeout: Seconds = Field(
        default=60.0, description="Seconds a new child has to answer its readiness probe."
    )
    probe_uri: str = Field(
        default="/",
        description="URI of the readiness probe: a real request sent to each new child before "
        "it takes traffic. Any complete answer, even a 500, proves the child is alive.",
    )
    probe_interval: float = Field(
        default=0.0,
        ge=0,
        description="Seconds a child may stay idle before it is probed (probe_uri, out of "
        "rotation, an answer within timeouts.cancel): one that fails is replaced before a "
        "visitor reaches it. 0 is off.",
    )
    respawn_delay: Seconds = Field(
        default=0.5,
        description="First delay before a dead child is started again; doubles "
        "on each failure in a row up to 30 s.",
    )
    warmup: list[str] = Field(
        default_factory=list,
        description="URIs requested in turn on every new child after its probe and before it "
        "takes traffic (e.g. GetCapabilities of pinned projects). An answer of 500 or more "
        "is a failed start.",
    )
    user: str = Field(
        default="",
        description="User the children run as when the pool starts as root.",
    )
    group: str = Field(
        default="", description="Group the children run as; empty means the user's own group."
    )
    allow_root: bool = Field(
        default=False,
        description="Let children run as root when the pool runs as root and no user is set. "
        "Off by default: a pool started as root refuses to run its children as root.",
    )
    max_requests: int = Field(
        default=0, ge=0, description="Recycle a child after this many requests; 0 is never."
    )
    max_requests_jitter: int = Field(
        default=0,
        ge=0,
        description="Add a random 0..N to max_requests per child, so children do not all "
        "recycle at once.",
    )
    max_rss: ByteSize = Field(
        default=ByteSize(0),
        ge=0,
        description="Recycle a child whose resident memory exceeds this; 0 is never. Checked "
        "between requests, every rss_interval seconds.",
    )
    max_memory: ByteSize = Field(
        default=ByteSize(0),
        ge=0,
        description="A hard cap on each child's memory, enforced by the kernel: a cgroup v2 "
        "leaf per child with memory.max where the pool has a delegated cgroup (systemd "
        "Delegate=yes), else the v1 memory cgroup when the pool may write it (root), else "
        "RLIMIT_AS (the address space, far above the RSS for QGIS). A child killed at the "
        "cap is replaced with restart reason max_memory; 0 is no cap. max_rss is the soft "
        "limit.",
    )
    rss_interval: Seconds = Field(
        default=5.0, description="Seconds between memory checks of the children."
    )
    max_lifetime: float = Field(
        default=0.0, ge=0, description="Recycle a child older than this many seconds; 0 is never."
    )


class LimitsSection(_Section):
    max_connections: int = Field(
        default=4096,
        ge=1,
        description="Front-end connections at once; more are closed at once (nginx: 502). "
        "Each waiting request holds one, so keep it above max_waiting times the classes.",
    )
    max_params_size: ByteSize = Field(
        default=ByteSize(65536),
        ge=1024,
        description="Largest PARAMS stream of one request; larger closes the connection.",
    )
    max_body_size: ByteSize = Field(
        default=ByteSize(64 * 2**20), ge=0, description="Largest request body; larger gets 413."
    )
    body_buffer: ByteSize = Field(
        default=ByteSize(2**20),
        ge=65536,
        description="Body bytes held per request while it waits for a child; past it the "
        "pool stops reading that connection until a child takes the request.",
    )
    write_buffer: ByteSize = Field(
        default=ByteSize(256 * 1024),
        ge=16384,
        description="Response bytes buffered per front-end connection before the pool stops "
        "reading from the child (flow control).",
    )
    read_timeout: Seconds = Field(
        default=30.0,
        description="A connection that stalls this long in the middle of sending a request "
        "is closed.",
    )
    max_waiting: int = Field(
        default=1024,
        ge=0,
        description="Requests that may wait for a free child, per class: a hard bound on "
        "memory (a waiting GET of a map client holds about 6 KiB in the pool); more get "
        "503. Whether a request may wait is decided first by its predicted wait "
        "(tuning.admission).",
    )
    max_buffered: ByteSize = Field(
        default=ByteSize(64 * 2**20),
        ge=65536,
        description="Request bytes (PARAMS and bodies) held by all waiting requests together; "
        "past it the pool stops reading request bodies until children take requests, so "
        "memory stays bounded however many wait.",
    )
    max_per_client: int = Field(
        default=0,
        ge=0,
        description="Requests of one client served at once (like GeoServer's user rule); "
        "more wait their turn in the queue. 0 is no limit.",
    )
    client_param: str = Field(
        default="REMOTE_ADDR",
        description="The FastCGI param that identifies a client, e.g. HTTP_X_FORWARDED_FOR "
        "behind a proxy.",
    )
    queue_timeout: Seconds = Field(
        default=30.0, description="Seconds a request may wait for a free child before a 503."
    )
    retry_after: int = Field(default=5, ge=0, description="Retry-After header of 503 answers.")


class TimeoutsSection(_Section):
    request: Seconds = Field(
        default=60.0,
        description="Seconds a child may spend on one request. Keep the web server's own "
        "timeout (nginx fastcgi_read_timeout) above it.",
    )
    slow: float = Field(
        default=0.0,
        ge=0,
        description="Seconds after which a running request is reported once (a slow_request "
        "line: the child's state from /proc, and slow_command's output); the same report "
        "is written before a child stuck after a timeout is stopped. 0 is off.",
    )
    slow_command: str = Field(
        default="",
        description="Command run for a slow request's report, {pid} replaced by the child's "
        'pid, e.g. "eu-stack -p {pid}" (package elfutils) or "gdb -batch -p {pid} -ex '
        '\"thread apply all bt\""; its output (64 KiB at most) is logged as '
        "slow_request_command. Needs ptrace rights over the child (docs/troubleshooting.md).",
    )
    slow_command_timeout: Seconds = Field(
        default=10.0, description="Seconds slow_command may run; then it is killed."
    )
    cancel: Seconds = Field(
        default=5.0,
        description="After a request is cancelled (timeout, client gone), seconds the child "
        "has to show it is free by answering a probe; then SIGTERM.",
    )
    kill_grace: Seconds = Field(
        default=3.0, description="Seconds between SIGTERM and SIGKILL for a child that must go."
    )
    shutdown_grace_period: Seconds = Field(
        default=30.0, description="On SIGTERM, seconds given to requests in flight."
    )


class AdminSection(_Section):
    http: OptionalAddressText = Field(
        default="",
        description="Address of the HTTP admin listener (/metrics, /healthz, /readyz, /status), "
        "in the forms of pool.bind, e.g. 127.0.0.1:9090 or unix:/run/fcgipool/admin.sock; "
        "empty is off. Keep it on loopback or a private network.",
    )
    ping_path: str = Field(
        default="",
        description="A path answered by the pool itself through the pool socket (like "
        "php-fpm's ping.path), even when every child is busy; e.g. /fcgipool-ping.",
    )
    status_path: str = Field(
        default="",
        description="A path answered through the pool socket with the pool's status as JSON "
        "(like php-fpm's pm.status_path); e.g. /fcgipool-status.",
    )
    min_ready: int = Field(
        default=1,
        ge=0,
        description="/readyz fails while fewer children than this are ready.",
    )


LIGHT_REQUESTS = (
    "GetCapabilities|GetLegendGraphic|GetFeatureInfo|DescribeFeatureType|DescribeLayer|"
    "GetStyles|GetProjectSettings|GetSchemaExtension|DescribeCoverage|DescribeProcess"
)
HEAVY_REQUESTS = "GetMap|GetPrint|GetFeature|GetFeatureWithLock|GetCoverage|GetTile|Execute"


def _check_regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise ValueError(f"{text!r} is not a valid regular expression: {error}") from None
    return text


def _check_match_key(text: str) -> str:
    if text.upper() in ("SERVICE", "REQUEST") or (text.startswith("param:") and len(text) > 6):
        return text
    raise ValueError(f"{text!r}: match on SERVICE, REQUEST or param:NAME (a FastCGI param)")


def _check_file_type(text: str) -> str:
    if text.startswith(".") and len(text) > 1 and "/" not in text:
        return text
    raise ValueError(f"{text!r}: a file ending such as \".qgs\"")


def _check_scheme(text: str) -> str:
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", text):
        return text
    raise ValueError(f"{text!r}: a URI scheme such as \"postgresql\", without the colon")


class RequestClass(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Class name.")
    match: dict[
        Annotated[str, AfterValidator(_check_match_key)],
        Annotated[str, AfterValidator(_check_regex)],
    ] = Field(
        default_factory=dict,
        description="All must match (regular expressions, whole value, case-insensitive): "
        "SERVICE and REQUEST are the OGC parameters, read from the query string or a small "
        "POST body; param:NAME is any FastCGI param (SCRIPT_NAME, REQUEST_METHOD...).",
    )
    priority: int = Field(default=0, description="Waiting requests of higher priority go first.")
    max_children: int = Field(
        default=0, ge=0, description="Children this class may use at once; 0 is all."
    )
    reserved: int = Field(
        default=0,
        ge=0,
        description="Children kept free for this class: other classes never take the last "
        "ones while this class is not using them.",
    )
    max_waiting: int | None = Field(
        default=None, ge=0, description="Queue bound of this class; default limits.max_waiting."
    )
    queue_timeout: float | None = Field(
        default=None, gt=0, description="Default limits.queue_timeout."
    )
    request_timeout: float | None = Field(
        default=None, gt=0, description="Default timeouts.request."
    )


def default_classes() -> list[RequestClass]:
    return [
        RequestClass(name="light", match={"REQUEST": LIGHT_REQUESTS}, priority=10),
        RequestClass(name="heavy", match={"REQUEST": HEAVY_REQUESTS}, priority=0),
    ]


class ProjectsSection(_Section):
    parameter: str = Field(
        default="MAP",
        description="Query parameter naming the project (QGIS: MAP). The FastCGI param "
        "QGIS_PROJECT_FILE, when nginx sets one, names it too.",
    )
    memory: int = Field(
        default=100,
        ge=0,
        description="Projects remembered per child: a request goes to an idle child that "
        "served its project recently (its project cache is warm); 0 turns affinity off. "
        "Match the children's own cache: QGIS Server keeps up to 100 projects a process.",
    )
    pinned: list[str] = Field(
        default_factory=list,
        description="Projects loaded on every child (new, respawned, recycled) before it "
        "takes traffic, with pinned_uri.",
    )
    pinned_uri: str = Field(
        default="/?MAP={project}&SERVICE=WMS&REQUEST=GetCapabilities",
        description="Warm-up request for a pinned project; {project} is replaced (URL-quoted).",
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="When set, a project outside these directories (after resolving .. and "
        "symlinks) gets 403 from the pool and never reaches a child.",
    )
    search_paths: dict[str, str] = Field(
        default_factory=dict,
        description="Aliases: a project named /ALIAS/rest is the file DIRECTORY/rest "
        '(e.g. {"/cadastre" = "/srv/qgis/cadastre"}); the child sees the real path.',
    )
    check_interval: float = Field(
        default=1.0,
        ge=0,
        description="Seconds between checks of the project files children hold (mtime, size "
        "and inode: works on NFS). A changed project is reloaded on each child holding it, "
        "one child at a time, out of rotation; 0 turns the checks off.",
    )
    warm_budget: float = Field(
        default=30.0,
        ge=0,
        description="Seconds of learned load time a new child spends, before it takes "
        "traffic, loading the projects its predecessor held (most requested first, at most "
        "`memory` of them); 0 loads none but the pinned.",
    )
    allow_map_override: bool = Field(
        default=False,
        description="When the web server names the project (fastcgi_param "
        "QGIS_PROJECT_FILE), a request naming another with the project parameter (MAP) "
        "gets 403 from the pool: QGIS would serve the other project. True lets it.",
    )
    file_types: list[Annotated[str, AfterValidator(_check_file_type)]] = Field(
        default=[".qgs", ".qgz"],
        description="Endings a project named by a request (MAP) must have, case-insensitive; "
        "anything else (MAP=/etc/passwd) gets 403 from the pool.",
    )
    storage_schemes: list[Annotated[str, AfterValidator(_check_scheme)]] = Field(
        default_factory=list,
        description="Project storage URIs a request may name besides files, by scheme "
        '(e.g. ["postgresql"] for MAP=postgresql:?service=...). None by default: such a '
        "URI makes the child connect where the client says.",
    )


class TuningSection(_Section):
    kinds: int = Field(
        default=4096,
        ge=16,
        le=1_000_000,
        description="Request kinds whose cost is learned, least recently seen forgotten "
        "first. A kind is (project, REQUEST, size bucket of size_params, kind_params).",
    )
    kind_params: list[str] = Field(
        default=["LAYERS"],
        description="Query parameters that, with the project and REQUEST, make a kind "
        "(QGIS/WMS: LAYERS).",
    )
    size_params: list[str] = Field(
        default=["WIDTH", "HEIGHT"],
        description="Query parameters multiplied into the size of an answer (WMS: WIDTH and "
        "HEIGHT); sizes are bucketed by powers of two of the side (256², 512², ...).",
    )
    decay: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Weight of the newest measurement in a kind's mean cost, so the model "
        "follows change (0.1: about the last 10-20 requests of that kind count).",
    )
    admission: Literal["predicted", "count"] = Field(
        default="predicted",
        description="predicted: a request is refused (503) at once when its predicted wait "
        "(the learned cost of the work queued ahead of it, divided by the children that may "
        "serve it) is above its queue_timeout, and otherwise waits; count: only max_waiting "
        "bounds the queue.",
    )
    order_by_cost: bool = Field(
        default=True,
        description="Within a class, a request predicted cheaper goes first, unless the "
        "oldest waiting request has waited max_reorder_wait: then the oldest goes first.",
    )
    max_reorder_wait: Seconds = Field(
        default=2.0,
        description="Seconds a request may be passed over by cheaper ones (order_by_cost).",
    )
    protect_short: bool = Field(
        default=True,
        description="Keep children for short requests: a long request (predicted at least "
        "long_request) never takes the last free children that short requests have needed "
        "lately. Off when any class sets `reserved` (that reservation is used instead).",
    )
    hold_for_holder: bool = Field(
        default=True,
        description="A request whose project no idle child holds waits for a busy child "
        "that holds it, when that child will be free (after the requests held for it "
        "already) within half the project's learned load time, instead of loading the "
        "project on an idle child. Needs projects.memory.",
    )
    long_request: Seconds = Field(
        default=0.5,
        description="Predicted seconds from which a request is long (protect_short).",
    )


class LogSection(_Section):
    format: Literal["console", "json"] = Field(default="console", description="Log format.")
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )
    child_output: bool = Field(
        default=True, description="Log the children's stdout and stderr lines."
    )
    file: str = Field(
        default="", description="Log to this file instead of stderr; SIGUSR1 reopens it."
    )
    access: bool = Field(default=True, description="One access-log line per request.")
    request_cost: bool = Field(
        default=True,
        description="Read the child's CPU time and resident memory at the start and end of "
        "each request (/proc/PID/stat, one pread each): cpu_ms and rss_mib in the access "
        "log, the last request of each child in status, a CPU histogram per class.",
    )
    child_output_rate: float = Field(
        default=50.0,
        gt=0,
        description="Lines per second logged from one child's output (a burst of 10 s worth "
        "passes); the rest is dropped and counted in a child_output_suppressed line.",
    )


class Config(_Section):
    pool: PoolSection = Field(default_factory=PoolSection, description="The pool itself.")
    child: ChildSection = Field(default_factory=ChildSection, description="The children.")
    limits: LimitsSection = Field(
        default_factory=LimitsSection, description="Limits on what clients may send or queue."
    )
    timeouts: TimeoutsSection = Field(default_factory=TimeoutsSection, description="Timeouts.")
    admin: AdminSection = Field(
        default_factory=AdminSection, description="Status, metrics and health endpoints."
    )
    projects: ProjectsSection = Field(
        default_factory=ProjectsSection,
        description="Projects (QGIS): affinity, pinned projects, allowed roots.",
    )
    tuning: TuningSection = Field(
        default_factory=TuningSection,
        description="The self-tuning pool: learned request costs, admission by predicted "
        "wait, cost order, protection of short requests.",
    )
    classes: list[RequestClass] = Field(
        default_factory=default_classes,
        description="Request classes, first match wins; a request that matches none is in "
        "class `default` (priority 5, no limits) unless a class of that name is listed.",
    )

    @model_validator(mode="after")
    def _check_workers(self) -> Config:
        """min_workers <= workers <= max_workers; a default workers is moved into the range."""
        pool = self.pool
        low, high = pool.min_workers, pool.max_workers
        if low is not None and high is not None and low > high:
            raise ValueError(f"pool.min_workers: {low} is above pool.max_workers ({high})")
        if "workers" not in pool.model_fields_set:
            pool.workers = max(low or 1, min(high or 4096, pool.workers))
        elif low is not None and pool.workers < low:
            raise ValueError(f"pool.workers: {pool.workers} is below pool.min_workers ({low})")
        elif high is not None and pool.workers > high:
            raise ValueError(f"pool.workers: {pool.workers} is above pool.max_workers ({high})")
        return self

    @model_validator(mode="after")
    def _check_classes(self) -> Config:
        names = [rule.name for rule in self.classes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"classes: duplicate class names {duplicates}")
        reserved = sum(rule.reserved for rule in self.classes)
        if reserved and reserved >= self.pool.minimum:
            key = "pool.min_workers" if self.pool.min_workers is not None else "pool.workers"
            raise ValueError(
                f"classes: {reserved} reserved children leave none for the others "
                f"({key} = {self.pool.minimum})"
            )
        return self

    log: LogSection = Field(default_factory=LogSection, description="Logging.")

    @property
    def addresses(self) -> list[Address]:
        return [Address.parse(text) for text in self.pool.bind]

    @property
    def admin_address(self) -> Address | None:
        """The admin HTTP listener's address; None when admin.http is empty (off)."""
        return Address.parse(self.admin.http) if self.admin.http else None

    def socket_mode(self) -> int:
        return int(self.pool.socket_mode, 8)

    def control_path(self) -> str:
        """pool.control, else next to the first unix pool socket (NAME.sock → NAME.ctl)."""
        if self.pool.control:
            return self.pool.control
        for address in self.addresses:
            if address.kind == "unix":
                return address.path.removesuffix(".sock") + ".ctl"
        return "/run/fcgipool/fcgipool.ctl"


class ConfigError(Exception):
    """Invalid configuration; ``problems`` holds one ``key.path: reason`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _parse_value(text: str) -> Any:
    """An environment value is read as a TOML value when it is one, else as a string."""
    try:
        value = tomlkit.parse(f"v = {text}")["v"]
    except tomlkit.exceptions.TOMLKitError:
        return text
    return value.unwrap() if hasattr(value, "unwrap") else value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FCGIPOOL_LIMITS__MAX_WAITING=10`` → ``{"limits": {"max_waiting": 10}}``."""
    tree: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = name[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = _parse_value(text)
    return tree


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    try:
        return tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as error:
        raise ConfigError([f"{path}: TOML syntax error: {error}"]) from None


def build(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Defaults ← file ← environment ← overrides, validated as one document."""
    data = read_toml(path) if path else {}
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    data = _merge(data, overrides or {})
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError([_describe(item) for item in error.errors()]) from None


def warnings(cfg: Config) -> list[str]:
    """What is valid but unsafe: check-config prints it, the pool logs it at start."""
    found = []
    if not cfg.projects.allowed_roots:
        endings = "/".join(cfg.projects.file_types) or "any"
        found.append(
            f"projects.allowed_roots: empty, so any client may name any {endings} file the "
            f"children can read with {cfg.projects.parameter}=... on a route where the web "
            "server does not set QGIS_PROJECT_FILE; set allowed_roots (docs/deployment.md)"
        )
    if cfg.projects.allow_map_override:
        found.append(
            "projects.allow_map_override: true, so a client may name another project than the "
            "one the web server set"
        )
    return found


def runtime_problems(cfg: Config, euid: int | None) -> list[str]:
    """Checks that depend on the machine: users and groups exist; with ``euid`` (the user
    the pool runs as), root needs a child user and a child user needs root."""
    import grp
    import pwd

    problems = []
    for key, name, lookup in (
        ("child.user", cfg.child.user, pwd.getpwnam),
        ("child.group", cfg.child.group, grp.getgrnam),
        ("pool.socket_owner", cfg.pool.socket_owner, pwd.getpwnam),
        ("pool.socket_group", cfg.pool.socket_group, grp.getgrnam),
    ):
        if name:
            try:
                lookup(name)
            except KeyError:
                problems.append(f"{key}: no such user or group {name!r}")
    if euid is None:
        return problems
    if euid == 0 and not cfg.child.user and not cfg.child.allow_root:
        problems.append(
            "child.user: the pool runs as root; name a user for the children "
            "(or set child.allow_root = true to run them as root)"
        )
    if euid != 0 and (cfg.child.user or cfg.child.group):
        problems.append("child.user: switching user needs the pool to start as root")
    return problems


def _describe(item: Mapping[str, Any]) -> str:
    path = ".".join(str(part) for part in item["loc"])
    message = item["msg"].removeprefix("Value error, ")
    return f"{path}: {message}" if path else message


def default_toml() -> str:
    """The whole default configuration as TOML, each key commented from the schema."""
    document = tomlkit.document()
    document.add(tomlkit.comment("fcgipool configuration. Every key is shown with its default."))
    defaults = Config().model_dump(mode="json")
    for section, field in Config.model_fields.items():
        if section == "classes":
            continue
        table = tomlkit.table()
        table.comment(field.description or "")
        for key, subfield in field.annotation.model_fields.items():  # type: ignore[union-attr]
            for line in _wrap(subfield.description or ""):
                table.add(tomlkit.comment(line))
            if defaults[section][key] is None:  # unset by default: TOML has no null
                table.add(tomlkit.comment(f"{key} = (unset)"))
                continue
            table.add(key, _toml_item(defaults[section][key]))
        document.add(tomlkit.nl())
        document.add(section, table)
    document.add(tomlkit.nl())
    for line in _wrap(Config.model_fields["classes"].description or ""):
        document.add(tomlkit.comment(line))
    for key, subfield in RequestClass.model_fields.items():
        document.add(tomlkit.comment(f"  {key}: {subfield.description}"))
    classes = tomlkit.aot()
    for rule in defaults["classes"]:
        classes.append(tomlkit.item({k: v for k, v in rule.items() if v is not None}))
    document.add("classes", classes)
    return tomlkit.dumps(document)


def _toml_item(value: Any) -> Any:
    if isinstance(value, dict):
        inline = tomlkit.inline_table()
        inline.update(value)
        return inline
    return value


def _wrap(text: str, width: int = 92) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def reference_markdown() -> str:
    """The configuration reference for docs/configuration.md, made from the schema."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `fcgipool config reference`; a test fails when this file drifts. -->",
        "",
        "fcgipool reads one TOML file (`fcgipool serve -c FILE`, `fcgipool check-config FILE`).",
        "Every key can also be set from the environment as `FCGIPOOL_<SECTION>__<KEY>`",
        "(for example `FCGIPOOL_LIMITS__MAX_WAITING=10`; the value is read as TOML when it is",
        "valid TOML, else as a string), and some from command-line flags. Precedence, lowest",
        "first: defaults, file, environment, flags. Sizes accept units (`64MiB`, `512KiB`).",
        "",
    ]
    defaults = Config().model_dump(mode="json")
    for section, field in Config.model_fields.items():
        if section == "classes":
            continue
        lines += [f"## [{section}]", "", field.description or "", ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        model = field.annotation
        for key, subfield in model.model_fields.items():  # type: ignore[union-attr]
            value = defaults[section][key]
            default = "unset" if value is None else f"`{tomlkit.item(value).as_string()}`"
            text = (subfield.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {default} | {text} |")
        lines.append("")
    lines += ["## [[classes]]", "", Config.model_fields["classes"].description or "", ""]
    lines += ["| key | meaning |", "|---|---|"]
    for key, subfield in RequestClass.model_fields.items():
        text = (subfield.description or "").replace("|", "\\|")
        lines.append(f"| `{key}` | {text} |")
    lines += ["", "The default classes:", "", "```toml"]
    for rule in defaults["classes"]:
        item = {k: v for k, v in rule.items() if v is not None}
        lines.append(tomlkit.dumps({"classes": [item]}).strip())
        lines.append("")
    lines += ["```", ""]
    return "\n".join(lines)
