"""Partitioning projects over pools: the shipped nginx site (deploy/partition/
nginx-partition.conf) in front of three real pools, and the Kubernetes variant
(deploy/partition/k8s/).

Each pool runs tests/apps/wsgi_app.py with its own name in the child's environment, so an
answer (``env=1``) says which pool served it. What consistent hashing promises, and what the
tests check: one project, one pool; a removed pool's projects, and only those, move; a
stopped pool's projects fail over to where a removal would send them; the replica variant
puts a project on two pools at most.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from test_deploy import bundled_kubernetes_versions, nginx_main

from conftest import REPO, PoolProcess, free_port, wait_for, wsgi_config

PARTITION = REPO / "deploy" / "partition"
SNIPPET = PARTITION / "nginx-partition.conf"
K8S = PARTITION / "k8s"
PARAMS = REPO / "nginx" / "fcgipool-params.conf"
BIN = Path(sys.executable).parent
POOLS = ("a", "b", "c")
PROJECTS = [f"proj-{i:02d}" for i in range(40)]
PROJECT_DIR = "/srv/qgis/projects"  # the snippet's; the test app opens no file
HASH = "hash $fcgipool_partition_key consistent;"


def adapt(text: str, replacements: dict[str, str]) -> str:
    """Replace the deployment's addresses and paths with the test's; each must be there, so
    that a changed file cannot make the test silently test something else."""
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the file"
        text = text.replace(old, new)
    return text


def without_server(site: str, address: str) -> str:
    """The site with one `server` line of the upstream removed (comments left alone)."""
    site, count = re.subn(rf"^\s*server {re.escape(address)}\b[^;]*;\n", "", site, flags=re.M)
    assert count == 1, f"server {address} is not in the upstream"
    return site


class Router:
    """nginx in the foreground with a Debian-like layout (snippets/, fastcgi_params) and one
    site file included in http{}; reloads wait until every old worker is gone."""

    def __init__(self, directory: Path, port: int, params: str):
        self.dir, self.port = directory, port
        for name in ("snippets", "logs"):
            (directory / name).mkdir(parents=True)
        (directory / "snippets" / "fcgipool-params.conf").write_text(params)
        self.site_path = directory / "site.conf"
        self.conf = nginx_main(directory, f"include {self.site_path};\n")
        self.process: subprocess.Popen | None = None
        self.site = ""

    def logs(self) -> Path:
        return self.dir / "logs"

    def write(self, site: str) -> None:
        """Install ``site`` and check it with nginx -t: no error, no warning."""
        self.site = site
        self.site_path.write_text(site)
        result = subprocess.run(["nginx", "-t", "-p", str(self.dir), "-c", str(self.conf)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr

    def start(self, site: str) -> None:
        self.write(site)
        with open(self.dir / "out.log", "ab") as out:
            self.process = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.conf)],
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_for(lambda: self._check_alive() and self.workers(), 20, "nginx to start")
        wait_for(self._listening, 20, "nginx to listen")

    def reload(self, site: str) -> None:
        """Reload with ``site``; done once the workers that ran the old one have exited."""
        self.write(site)
        old = self.workers()
        assert self.process and old
        self.process.send_signal(signal.SIGHUP)

        def replaced() -> bool:
            self._check_alive()
            workers = self.workers()
            return bool(workers) and not workers & old
        wait_for(replaced, 20, f"nginx to replace its workers:\n{self.error_log()}")

    def workers(self) -> set[int]:
        assert self.process
        try:
            return {child.pid for child in psutil.Process(self.process.pid).children()
                    if child.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            return set()

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _check_alive(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise AssertionError(f"nginx exited:\n{(self.dir / 'out.log').read_text()}")
        return True

    def _listening(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def pools(workdir: Path) -> Iterator[dict[str, PoolProcess]]:
    """Three pools of the WSGI test app, started together; each child knows its pool's name."""
    started: dict[str, PoolProcess] = {}
    try:
        for name in POOLS:
            directory = workdir / name
            directory.mkdir()
            directory.chmod(0o755)
            config = wsgi_config(directory, child={"env": {"FCGIPOOL_TEST_POOL": name}})
            started[name] = PoolProcess(directory, config)
        for pool in started.values():
            pool.wait_ready()
        yield started
    finally:
        for pool in started.values():
            pool.stop(signal.SIGKILL if pool.process.poll() is None else signal.SIGTERM)


@pytest.fixture
def router_factory(workdir: Path) -> Iterator[Callable[..., Router]]:
    started: list[Router] = []

    def start(params: str | None = None) -> Router:
        router = Router(workdir / f"nginx-{len(started)}", free_port(),
                        PARAMS.read_text() if params is None else params)
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


def render_snippet(router: Router, pools: dict[str, PoolProcess], text: str | None = None) -> str:
    """deploy/partition/nginx-partition.conf with the test's sockets, port and log directory."""
    return adapt(SNIPPET.read_text() if text is None else text, {
        **{f"unix:/run/fcgipool/{name}.sock": pool.address for name, pool in pools.items()},
        "listen 80;": f"listen 127.0.0.1:{router.port};",
        "listen [::]:80;": "",
        "/var/log/nginx/": f"{router.logs()}/",
    })


@pytest.fixture
def router(pools: dict[str, PoolProcess], router_factory: Callable[..., Router]) -> Router:
    """nginx serving the shipped snippet in front of the three pools."""
    router = router_factory()
    router.start(render_snippet(router, pools))
    return router


def served_by(port: int, path: str) -> str:
    """The name of the pool whose child answered ``path``; the answer must be a 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 200, (path, response.status, body[:300])
    return json.loads(body)["FCGIPOOL_TEST_POOL"]


def routes(project: str) -> tuple[str, str]:
    """The two ways the snippet names a project: the pinned route and MAP."""
    return f"/ows/{project}?env=1", f"/ows?MAP={PROJECT_DIR}/{project}.qgs&env=1"


def pools_per_project(port: int, rounds: int) -> dict[str, set[str]]:
    """Every project asked ``rounds`` times by each route, round after round (so that the
    requests of one project are not back to back); the pools that answered each."""
    seen: dict[str, set[str]] = {project: set() for project in PROJECTS}
    for _ in range(rounds):
        for project in PROJECTS:
            for path in routes(project):
                seen[project].add(served_by(port, path))
    return seen


def placement(port: int, rounds: int = 3) -> dict[str, str]:
    """Which pool serves each project; fails when any project is served by two."""
    seen = pools_per_project(port, rounds)
    split = {project: sorted(names) for project, names in seen.items() if len(names) > 1}
    assert not split, f"projects served by more than one pool: {split}"
    return {project: names.pop() for project, names in seen.items()}


def on(mapping: dict[str, str], name: str) -> list[str]:
    return [project for project, pool in mapping.items() if pool == name]


def moved(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [project for project in PROJECTS if after[project] != before[project]]


# ---------------------------------------------------------------------------- nginx


def test_each_project_stays_on_one_pool(pools, router):
    mapping = placement(router.port)
    counts = Counter(mapping.values())
    assert set(counts) == set(POOLS), counts
    print(f"40 projects over 3 pools: {dict(sorted(counts.items()))}")
    # The ring comes from the servers' addresses, not from the order of their lines.
    lines = re.findall(r"^ *server unix:.*\n", router.site, re.M)
    assert len(lines) == len(POOLS) and "".join(lines) in router.site
    router.reload(router.site.replace("".join(lines), "".join(reversed(lines))))
    assert placement(router.port) == mapping
    # Where a project lives, seen from each pool: `fcgipool projects` lists what it served.
    for name, pool in pools.items():
        result = subprocess.run([str(BIN / "fcgipool"), "projects", "-c", str(pool.config_path),
                                 "--json"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        served = {row["path"] for row in json.loads(result.stdout) if row["requests"]}
        assert served == {f"{PROJECT_DIR}/{project}.qgs" for project in on(mapping, name)}
    # And from nginx: the access log names the key and the pool.
    log = (router.logs() / "maps.access.log").read_text()
    project = PROJECTS[0]
    assert f'key="{PROJECT_DIR}/{project}.qgs" upstream="{pools[mapping[project]].address}"' in log


def test_removing_a_pool_moves_only_its_projects(pools, router):
    before = placement(router.port)
    gone = on(before, "c")
    assert gone
    full = router.site
    router.reload(without_server(full, pools["c"].address))
    after = placement(router.port)
    # Exactly the removed pool's projects moved: nothing moved between a and b.
    assert moved(before, after) == gone
    went = dict(Counter(after[project] for project in gone))
    print(f"pool c removed: {len(gone)} of {len(PROJECTS)} projects moved ({went}), "
          f"the other {len(PROJECTS) - len(gone)} stayed")
    # Marked `down` instead (maintenance), it sends them to the same places.
    line = f"server {pools['c'].address} "
    router.reload(adapt(full, {line: f"{line}down "}))
    assert placement(router.port) == after
    # Adding it back (the same address, so the same points) brings back exactly those.
    router.reload(full)
    assert placement(router.port) == before


def test_without_consistent_a_removal_moves_projects_between_the_others(pools, router_factory):
    """The check above can fail: with a plain hash (modulo the number of servers) removing
    one pool also moves projects between the pools that stay."""
    router = router_factory()
    router.start(adapt(render_snippet(router, pools), {HASH: "hash $fcgipool_partition_key;"}))
    before = placement(router.port)
    router.reload(without_server(router.site, pools["c"].address))
    after = placement(router.port)
    between = [project for project in moved(before, after) if before[project] != "c"]
    assert between, "a plain hash moved no project between the remaining pools"
    print(f"plain hash, pool c removed: {len(moved(before, after))} of {len(PROJECTS)} moved, "
          f"{len(between)} of them between a and b")


def test_a_stopped_pool_fails_over_to_its_ring_neighbours(pools, router):
    before = placement(router.port)
    assert on(before, "c")
    assert pools["c"].stop() == 0
    # Every request is answered (nginx tries the next pool on the ring), and only pool c's
    # projects moved.
    failover = placement(router.port)
    assert moved(before, failover) == on(before, "c")
    socket_path = pools["c"].address.removeprefix("unix:")
    errors = (router.logs() / "maps.error.log").read_text()
    assert f"connect() to unix:{socket_path} failed" in errors, errors
    # They went where removing pool c from the upstream sends them.
    router.reload(without_server(router.site, pools["c"].address))
    assert placement(router.port) == failover


def test_replica_variant_puts_each_project_on_at_most_two_pools(pools, router_factory):
    text = SNIPPET.read_text()
    split = re.search(r"^#\s+(split_clients .*)$", text, re.M)
    replica_hash = re.search(
        r"^#\s+(hash \$fcgipool_partition_key\$fcgipool_replica consistent;)$", text, re.M)
    assert split and replica_hash, "the replica variant is no longer in the snippet"
    variant = adapt(text, {
        HASH: replica_hash.group(1),
        "upstream qgis_partitions {": f"{split.group(1)}\n\nupstream qgis_partitions {{",
    })
    router = router_factory()
    router.start(render_snippet(router, pools, variant))
    seen = pools_per_project(router.port, rounds=6)
    assert all(len(names) <= 2 for names in seen.values()), seen
    on_two = sum(len(names) == 2 for names in seen.values())
    # Two points on a ring of three pools fall on two pools for about 2/3 of the projects.
    assert on_two >= len(PROJECTS) // 3, seen
    print(f"replica variant: {on_two} of {len(PROJECTS)} projects on two pools, "
          f"{len(PROJECTS) - on_two} on one")


# ---------------------------------------------------------------------------- Kubernetes


def test_partition_manifests_pass_kubernetes_validate():
    manifests = sorted(str(path) for path in K8S.glob("*.yaml"))
    documents = sum(len([d for d in yaml.safe_load_all(Path(m).read_text()) if d])
                    for m in manifests)
    versions = bundled_kubernetes_versions()
    assert versions, "kubernetes-validate has no bundled schemas"
    # Strict: unknown fields are errors.  The newest schemas bundled, and the oldest.
    for version in ([], ["-k", versions[0]]):
        result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--no-warn",
                                 *version, *manifests], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("passed") == documents, result.stdout


def manifests() -> dict[tuple[str, str], dict]:
    """Every document under deploy/partition/k8s by (kind, name)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"], document["metadata"]["name"]] = document
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def map_block(conf: str) -> str:
    found = re.search(r"^ *map \$fcgipool_project_file .*?^ *}", conf, re.M | re.S)
    assert found, "no map of the partition key"
    return textwrap.dedent(found.group(0))


def test_partition_manifests_agree_with_each_other_and_the_snippet():
    documents = manifests()
    data = documents["ConfigMap", "fcgipool-partitions"]["data"]
    router_conf = data["default.conf"]
    # The router routes as the shipped snippet does, with the repo's FastCGI settings.
    assert map_block(router_conf) == map_block(SNIPPET.read_text())
    assert HASH in router_conf
    assert data["fcgipool-params.conf"] == PARAMS.read_text(), "keep the copy equal"
    # The partitions differ only in their names.
    first = (K8S / "partition-a.yaml").read_text()
    assert (K8S / "partition-b.yaml").read_text() == first.replace("fcgipool-a", "fcgipool-b")
    pool = tomllib.loads(data["pool.toml"])
    pool_port = int(pool["pool"]["bind"][0].rsplit(":", 1)[1])
    admin_port = int(pool["admin"]["http"].rsplit(":", 1)[1])
    services = {name: doc for (kind, name), doc in documents.items() if kind == "Service"
                and doc["metadata"]["labels"]["app.kubernetes.io/component"] == "partition"}
    assert sorted(services) == ["fcgipool-a", "fcgipool-b"]
    # The upstream has one server per partition's Service, and nothing else.
    upstream = re.findall(r"^\s*server (\S+) ", router_conf, re.M)
    assert sorted(upstream) == sorted(f"{name}:{service['spec']['ports'][0]['port']}"
                                      for name, service in services.items())
    read_timeout = int(re.search(r"fastcgi_read_timeout (\d+)s;", PARAMS.read_text()).group(1))
    timeouts = pool["timeouts"]
    assert read_timeout > pool["limits"]["queue_timeout"] + timeouts["request"]
    policy = documents["NetworkPolicy", "fcgipool-partitions"]["spec"]
    for name, service in services.items():
        template = documents["Deployment", name]["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert selects(service["spec"]["selector"], labels)
        assert selects(documents["Deployment", name]["spec"]["selector"]["matchLabels"], labels)
        assert selects(policy["podSelector"]["matchLabels"], labels)
        container = template["spec"]["containers"][0]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports[service["spec"]["ports"][0]["targetPort"]] == pool_port
        assert ports[container["readinessProbe"]["httpGet"]["port"]] == admin_port
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert template["spec"]["terminationGracePeriodSeconds"] > (
            pre_stop + timeouts["shutdown_grace_period"] + timeouts["kill_grace"])
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        assert mounts["projects"] in pool["projects"]["allowed_roots"]
        assert f"{mounts['projects']}/$fcgipool_project.qgs" in router_conf
    router = documents["Deployment", "fcgipool-router"]["spec"]["template"]
    router_labels = router["metadata"]["labels"]
    assert selects(documents["Service", "fcgipool-router"]["spec"]["selector"], router_labels)
    assert selects(policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"], router_labels)
    assert policy["ingress"][0]["ports"][0]["port"] == "fastcgi"
    nginx = router["spec"]["containers"][0]
    pre_stop = int(nginx["lifecycle"]["preStop"]["exec"]["command"][1])
    assert router["spec"]["terminationGracePeriodSeconds"] > pre_stop + read_timeout


def test_partition_pool_config_is_valid(tmp_path):
    path = tmp_path / "pool.toml"
    path.write_text(manifests()["ConfigMap", "fcgipool-partitions"]["data"]["pool.toml"])
    result = subprocess.run([str(BIN / "fcgipool"), "check-config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_router_config_sends_each_project_to_one_partition(pools, router_factory):
    """The ConfigMap's default.conf, run here: the Services' names replaced by pools a and b."""
    data = manifests()["ConfigMap", "fcgipool-partitions"]["data"]
    router = router_factory(params=data["fcgipool-params.conf"])
    router.start(adapt(data["default.conf"], {
        "listen 8080;": f"listen 127.0.0.1:{router.port};",
        "server fcgipool-a:9000 ": f"server {pools['a'].address} ",
        "server fcgipool-b:9000 ": f"server {pools['b'].address} ",
        "/var/log/nginx/": f"{router.logs()}/",
    }))
    mapping = placement(router.port, rounds=2)
    assert set(mapping.values()) == {"a", "b"}, Counter(mapping.values())
    connection = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    connection.request("GET", "/nginx-healthz")
    assert connection.getresponse().status == 200
    connection.close()


def test_a_pinned_route_refuses_map(pools, router):
    """MAP next to a pinned project would let the client pick another file (and key)."""
    connection = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    connection.request("GET", f"/ows/{PROJECTS[0]}?MAP=/etc/passwd&env=1")
    assert connection.getresponse().status == 403
    connection.close()
