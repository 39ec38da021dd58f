"""A two-node Ray cluster on one machine, a real etcd and ``colshard serve`` joined to it.

    etcd (session fixture) ── 127.0.0.1
    Ray head    (ray start --head)     {"colshard_shard": 1}                 data dir A
    Ray node B  (ray start --address)  {"colshard_shard": 1, "colshard_node_b": 1}  data dir B
    colshard serve --ray-address ... --etcd ... --shard-resources '{"colshard_shard": 1}'

Each shard actor requests one ``colshard_shard``, so a 2-shard collection has exactly one shard
per node, and a shard of a dead node cannot be restarted on the other one (no unit left): its
state stays ``unavailable``. Then node B's raylet is SIGKILLed, as if the machine died.

Every process this module starts carries a marker in its environment (Ray's workers inherit
it); teardown signals only those processes, by PID, never ``ray stop``. Ray's temp dirs are
private, so nothing here touches the session's own Ray or ``/tmp/ray``.

Multi-node Ray on one host needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` (with ``0`` a second
``ray start`` refuses to join); Ray then advertises the host's primary IP for its nodes and
binds some of its ports on all interfaces, so the cluster runs with Ray's token auth (a client
without the token is refused, which the test checks). colshard's own sockets (gateway, etcd)
stay on 127.0.0.1, which the test checks too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.integration.procs import free_ports, kill_marked, marked_pids, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MEMBER_TTL_S = 10  # Settings.member_ttl_s
DIM = 8


@dataclass
class MultiNode:
    root: Path
    marker: str
    env: dict[str, str]
    url: str = ""
    gcs: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def launch(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        self.started[name] = (argv, env)
        with self.log(name).open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **env},
                cwd=REPO,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def wait_log(self, name: str, text: str, timeout_s: float = 120) -> None:
        def seen() -> bool:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}):\n{self.tail(name)}")
            return text in self.log(name).read_text(errors="replace")

        wait_until(f"{name}: {text!r}", seen, timeout_s)

    def tail(self, name: str, n: int = 40) -> str:
        try:
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """The gateway first (drains), then node B, then the head; SIGKILL what is left."""
        for name in ("serve", "node_b", "head"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (left := marked_pids(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        kill_marked(self.marker)
        deadline = time.monotonic() + 10
        while (left := marked_pids(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes left running: {sorted(left)}"


@pytest.fixture
def multinode(etcd_endpoint: str) -> Iterator[MultiNode]:
    for tool in ("ray",):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    marker = uuid.uuid4().hex[:12]
    root = Path(f"/tmp/csmn-{marker}")  # short: Ray's unix socket paths live under it
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "COLSHARD_"))}
    # With clusters enabled Ray listens beyond loopback: token auth, as the Helm chart and
    # deploy/local-cluster.sh run it (docs/security.md).
    token = root / "ray_auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    token.chmod(0o600)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2",
        COLSHARD_TEST_MARKER=marker,
        PYTHONPATH=str(REPO),
    )
    cluster = MultiNode(root, marker, env)
    (gcs_port, client_port, dash_port, head_agent, b_agent, gw_port) = free_ports(6)
    cluster.gcs = f"127.0.0.1:{gcs_port}"
    cluster.url = f"http://127.0.0.1:{gw_port}"
    ray_bin = shutil.which("ray") or "ray"
    try:
        cluster.launch(
            "head",
            [
                ray_bin,
                "start",
                "--head",
                "--block",
                "--disable-usage-stats",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(gcs_port),
                "--ray-client-server-port",
                str(client_port),
                "--include-dashboard",
                "false",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dash_port),
                "--dashboard-agent-listen-port",
                str(head_agent),
                "--num-cpus",
                "1",
                "--resources",
                json.dumps({"colshard_shard": 1}),
                "--temp-dir",
                str(root / "ray-head"),
            ],
            COLSHARD_DATA_DIR=str(root / "data-a"),
        )
        cluster.wait_log("head", "Ray runtime started")
        cluster.launch(
            "node_b",
            [
                ray_bin,
                "start",
                "--block",
                "--disable-usage-stats",
                "--address",
                cluster.gcs,
                "--node-ip-address",
                "127.0.0.1",
                "--dashboard-agent-listen-port",
                str(b_agent),
                "--num-cpus",
                "0",
                "--resources",
                json.dumps({"colshard_shard": 1, "colshard_node_b": 1}),
                "--temp-dir",
                str(root / "ray-b"),
            ],
            COLSHARD_DATA_DIR=str(root / "data-b"),
        )
        cluster.wait_log("node_b", "Ray runtime started")
        cluster.launch(
            "serve",
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "serve",
                "--ray-address",
                cluster.gcs,
                "--etcd",
                etcd_endpoint,
                "--port",
                str(gw_port),
                "--cluster-name",
                f"mn-{marker}",
                "--data-dir",
                str(root / "data-gw"),
                "--shard-resources",
                json.dumps({"colshard_shard": 1}),
            ],
        )
        cluster.wait_log("serve", "colshard serving on", timeout_s=180)
        wait_until("gateway /healthz", lambda: httpx.get(f"{cluster.url}/healthz").is_success, 60)
        yield cluster
    except BaseException:
        for name in cluster.procs:
            print(f"---- {name} log ----\n{cluster.tail(name)}")
        raise
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def status_cli(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "status", "--url", url, *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def create(http: httpx.Client, name: str, shards: int) -> None:
    created = http.post(
        "/v1/collections",
        json={
            "name": name,
            "properties": [{"name": "n", "data_type": "int"}],
            "vectors": [{"name": "v", "kind": "multi", "dim": DIM}],
            "shard_count": shards,
        },
    )
    assert created.status_code == 201, created.text


def keep_querying(
    url: str,
    name: str,
    probe: dict[str, Any],
    stop: Any,
    failures: list[str],
    n_queries: list[int],
) -> None:
    """Until ``stop`` is set: query ``name`` with ``probe``'s own vectors; an answer that is
    not 200 with ``probe`` first is a failure."""
    q = {"near_vector": {"vector": probe["vectors"]["v"]}, "limit": 3}
    with httpx.Client(base_url=url, timeout=120) as c:
        while not stop.is_set():
            r = c.post(f"/v1/collections/{name}/query", json=q)
            if r.status_code != 200 or r.json()["objects"][0]["id"] != probe["id"]:
                failures.append(f"{r.status_code} {r.text[:200]}")
            n_queries[0] += 1


def raylet_pid(session_leader: int) -> int:
    """The raylet started by the ``ray start`` whose session is ``session_leader``."""
    ps = subprocess.run(
        ["ps", "-A", "-o", "pid=,sid=,comm="], capture_output=True, text=True, check=True
    )
    for line in ps.stdout.splitlines():
        pid, sid, comm = line.split(None, 2)
        if int(sid) == session_leader and comm.strip() == "raylet":
            return int(pid)
    raise AssertionError(f"no raylet in session {session_leader}")


def test_two_nodes_membership_and_node_loss(multinode: MultiNode) -> None:
    # Without the token nobody joins the cluster (and so nobody runs code in it).
    env = {k: v for k, v in multinode.env.items() if not k.startswith("RAY_AUTH")}
    joined = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address={multinode.gcs!r}); print('in')"],
        env={**env, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert joined.returncode != 0 and "in" not in joined.stdout.split(), joined.stdout
    http = httpx.Client(base_url=multinode.url, timeout=60)
    name = "MultiNode"
    create(http, name, shards=2)

    rng = np.random.default_rng(7)
    objects = [
        {
            "id": str(uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i)),
            "properties": {"n": i},
            "vectors": {"v": rng.normal(size=(4, DIM)).tolist()},
        }
        for i in range(200)
    ]
    imported = http.post(f"/v1/collections/{name}/objects", json={"objects": objects})
    assert imported.status_code == 200, imported.text
    query = {
        "near_vector": {"vector": objects[5]["vectors"]["v"]},
        "target_vector": "v",
        "limit": 5,
        "return_metadata": ["score"],
    }
    found = http.post(f"/v1/collections/{name}/query", json=query)
    assert found.status_code == 200, found.text
    assert found.json()["objects"][0]["id"] == objects[5]["id"]

    # Both nodes are members (their node agents hold leases); one shard on each.
    cluster = http.get("/v1/cluster").json()
    members = cluster["members"]
    assert len(members) == 2, members
    node_b = next(n for n, m in members.items() if "colshard_node_b" in m["resources"])
    head = next(n for n in members if n != node_b)
    where = (cluster.get("coordinator"), members)
    assert cluster["coordinator"]["node_id"] == head, where
    assert "head" in members[head]["roles"] and "coordinator" in members[head]["roles"], where
    assert members[node_b]["data_dir"] == str(multinode.root / "data-b")
    placements = cluster["collections"][name]["placements"]
    assert {p["node_id"] for p in placements} == {head, node_b}
    assert all(p["state"] == "ready" for p in placements)
    assert sum(p["objects"] for p in placements) == 200
    assert all(p["objects"] > 0 for p in placements)
    assert cluster["collections"][name]["objects"] == 200
    on_b = next(p for p in placements if p["node_id"] == node_b)
    # Each shard keeps its data in its own node's COLSHARD_DATA_DIR.
    assert (multinode.root / "data-b" / name / str(on_b["shard"])).is_dir()
    assert not (multinode.root / "data-a" / name / str(on_b["shard"])).exists()
    assert http.get("/readyz").status_code == 200

    shown = status_cli(multinode.url)
    assert shown.returncode == 0, shown.stderr
    assert "READY" in shown.stdout and "MEMBERS (2)" in shown.stdout
    assert node_b[:8] in shown.stdout and f"COLLECTION {name}" in shown.stdout
    raw = json.loads(status_cli(multinode.url, "--json").stdout)
    assert raw["readiness"]["ready"] is True and set(raw["cluster"]["members"]) == {head, node_b}

    # colshard's own listeners are on loopback only.
    gw_port = int(multinode.url.rsplit(":", 1)[1])
    host_ip = socket.gethostbyname(socket.gethostname())
    if not host_ip.startswith("127."):
        with pytest.raises(OSError):
            socket.create_connection((host_ip, gw_port), 1).close()

    # Node B dies (its raylet is SIGKILLed; its workers, the agent and the shard, die with it).
    killed_at = time.monotonic()
    os.kill(raylet_pid(multinode.procs["node_b"].pid), signal.SIGKILL)

    def b_gone() -> bool:
        return node_b not in http.get("/v1/cluster").json()["members"]

    wait_until("node B's member key to expire", b_gone, MEMBER_TTL_S + 20)
    gone_after = time.monotonic() - killed_at
    assert gone_after <= MEMBER_TTL_S + 20

    def b_shard_unavailable() -> dict[str, Any] | None:
        info = http.get("/v1/cluster").json()
        p = next(p for p in info["collections"][name]["placements"] if p["shard"] == on_b["shard"])
        return info if p["state"] == "unavailable" else None

    info = wait_until("node B's shard to be unavailable", b_shard_unavailable, 20)
    assert f"{name}:{on_b['shard']}" in info["unavailable_shards"]
    other = next(p for p in info["collections"][name]["placements"] if p["shard"] != on_b["shard"])
    assert other["state"] == "ready" and other["node_id"] == head

    ready = http.get("/readyz", timeout=30)
    assert ready.status_code == 503, ready.text
    assert f"{name}:{on_b['shard']}" in ready.json()["unavailable_shards"]

    shown = status_cli(multinode.url)
    assert shown.returncode == 1
    assert "NOT READY" in shown.stdout and "unavailable" in shown.stdout
    print(f"member gone {gone_after:.1f}s after the raylet was killed\n{shown.stdout}")
    http.close()


def test_restarting_a_node_under_load_with_rf2(multinode: MultiNode) -> None:
    """Node B goes down (its raylet SIGKILLed) and comes back (``ray start`` again, the same
    data dir, a new node id) while a writer (consistency ``one``) and a reader run against an
    RF 2 collection with a replica on each node: 0 failed queries, and afterwards both
    replicas hold exactly the acknowledged writes. (The head runs the GCS and the
    coordinator: restarting it needs Ray's GCS fault tolerance, docs/deploy.md.)"""
    import threading

    http = httpx.Client(base_url=multinode.url, timeout=120)
    name = "Rolling"
    created = http.post(
        "/v1/collections",
        json={
            "name": name,
            "vectors": [{"name": "v", "kind": "multi", "dim": DIM}],
            "shard_count": 1,
            "replication_factor": 2,
        },
    )
    assert created.status_code == 201, created.text
    rng = np.random.default_rng(12)

    def batch(n: int, base: int) -> list[dict[str, Any]]:
        return [
            {
                "id": str(uuid.UUID(int=base + i + 1)),
                "properties": {},
                "vectors": {"v": rng.normal(size=(2, DIM)).round(4).tolist()},
            }
            for i in range(n)
        ]

    first = batch(100, 0)
    assert http.post(f"/v1/collections/{name}/objects", json={"objects": first}).is_success
    members = http.get("/v1/cluster").json()["members"]
    node_b = next(n for n, m in members.items() if "colshard_node_b" in m["resources"])
    placements = http.get("/v1/cluster").json()["collections"][name]["placements"]
    assert {p["node_id"] for p in placements} == set(members)  # one replica per node
    acked = {o["id"] for o in first}
    stop = threading.Event()
    failures: list[str] = []
    n_queries = [0]

    def writer() -> None:
        base = 10_000
        with httpx.Client(base_url=multinode.url, timeout=120) as c:
            while not stop.is_set():
                objs = batch(5, base)
                base += 5
                r = c.post(
                    f"/v1/collections/{name}/objects",
                    params={"consistency_level": "one"},
                    json={"objects": objs},
                )
                if r.status_code == 200:
                    results = zip(objs, r.json()["results"], strict=True)
                    acked.update(o["id"] for o, res in results if res["status"] == "SUCCESS")
                time.sleep(0.05)

    reader = threading.Thread(
        target=keep_querying, args=(multinode.url, name, first[9], stop, failures, n_queries)
    )
    threads = [threading.Thread(target=writer), reader]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        session = multinode.procs["node_b"].pid
        os.kill(raylet_pid(session), signal.SIGKILL)
        multinode.procs["node_b"].wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session, signal.SIGKILL)  # what is left of node B
        argv, env = multinode.started["node_b"]
        log_b = multinode.log("node_b")
        offset = log_b.stat().st_size
        multinode.launch("node_b", argv, **env)
        wait_until(
            "node B to start again",
            lambda: "Ray runtime started" in log_b.read_text(errors="replace")[offset:],
            120,
        )

        def both_ready() -> bool:
            info = http.get("/v1/cluster").json()
            reps = info["collections"][name]["placements"]
            return (
                len(info["members"]) == 2
                and node_b not in info["members"]
                and all(p["state"] == "ready" and p["node_id"] in info["members"] for p in reps)
            )

        wait_until("both replicas ready on the restarted cluster", both_ready, 180)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert n_queries[0] > 10 and not failures, (n_queries[0], failures[:3])
    assert len(acked) > len(first) + 20, len(acked)
    wait_until(
        "both replicas ready",
        lambda: all(
            p["state"] == "ready"
            for p in http.get("/v1/cluster").json()["collections"][name]["placements"]
        ),
        120,
    )
    for replica in (0, 1):
        assert replica_ids(multinode, name, replica) == acked, replica
    print(f"node restart under load: {len(acked)} acked, {n_queries[0]} queries, 0 failed")
    http.close()


def replica_ids(multinode: MultiNode, name: str, replica: int) -> set[str]:
    """Every object id one replica holds, read from its shard host directly (a driver on the
    cluster, not through the coordinator's failover)."""
    code = (
        "import ray, json\n"
        f"ray.init(address={multinode.gcs!r}, namespace='colshard-mn-{multinode.marker}')\n"
        "ids, after = [], None\n"
        "hosts = [n for n in ray.util.list_named_actors() if n.startswith('colshard:host:')]\n"
        f"key = 'colshard:{name}:0:{replica}'\n"
        "host = next(h for h in map(ray.get_actor, hosts) if key in ray.get(h.info.remote())"
        "['shards'])\n"
        "while True:\n"
        "    page = ray.get(host.call.remote(key, 'list_objects', (after, 1000, False)))\n"
        "    ids += [o.uuid for o in page]\n"
        "    if len(page) < 1000: break\n"
        "    after = page[-1].uuid\n"
        "print(json.dumps(ids))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=multinode.env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_move_and_drain_under_load(multinode: MultiNode) -> None:
    """A replica moves to the other node while writes and queries run (0 failed queries, 0
    lost acknowledged writes, its data directory moves with it), then a drain of that node
    moves it back."""
    import threading

    http = httpx.Client(base_url=multinode.url, timeout=120)
    name = "Moving"
    create(http, name, shards=1)
    rng = np.random.default_rng(11)

    def objects(n: int, base: int) -> list[dict[str, Any]]:
        return [
            {
                "id": str(uuid.UUID(int=base + i + 1)),
                "properties": {"n": base + i},
                "vectors": {"v": rng.normal(size=(3, DIM)).round(4).tolist()},
            }
            for i in range(n)
        ]

    first = objects(300, 0)
    assert http.post(f"/v1/collections/{name}/objects", json={"objects": first}).is_success
    acked = {o["id"] for o in first}
    stop = threading.Event()
    failures: list[str] = []
    refused: list[str] = []
    n_queries = [0]

    def writer() -> None:
        with httpx.Client(base_url=multinode.url, timeout=120) as c:
            base = 10_000
            while not stop.is_set():
                batch = objects(10, base)
                base += 10
                r = c.post(f"/v1/collections/{name}/objects", json={"objects": batch})
                if r.status_code == 200:
                    results = zip(batch, r.json()["results"], strict=True)
                    acked.update(o["id"] for o, res in results if res["status"] == "SUCCESS")
                else:
                    refused.append(f"{r.status_code} {r.text[:300]}")

    def where() -> dict[str, Any]:
        (p,) = http.get("/v1/cluster").json()["collections"][name]["placements"]
        return dict(p)

    members = http.get("/v1/cluster").json()["members"]
    start = where()
    other = next(n for n in members if n != start["node_id"])
    data_of = {n: Path(m["data_dir"]) for n, m in members.items()}
    querier = threading.Thread(
        target=keep_querying, args=(multinode.url, name, first[3], stop, failures, n_queries)
    )
    threads = [threading.Thread(target=writer), querier]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        r = http.post(f"/v1/collections/{name}/shards/0/move", json={"to_node": other})
        assert r.status_code == 200, r.text
        moved = r.json()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert moved["from_node"] == start["node_id"] and moved["to_node"] == other, moved
    assert moved["old_copy_dropped"] is True
    assert n_queries[0] > 10 and not failures, (n_queries, failures[:3])
    now = where()
    assert now["node_id"] == other and now["state"] == "ready"
    assert (data_of[other] / name / "0").is_dir()
    assert not (data_of[start["node_id"]] / name / "0").exists()

    def stored() -> set[str]:
        ids: set[str] = set()
        params: dict[str, Any] = {"limit": 1000}
        while True:
            page = http.get(f"/v1/collections/{name}/objects", params=params).json()
            ids |= {o["id"] for o in page["objects"]}
            if page["next_after"] is None:
                return ids
            params["after"] = page["next_after"]

    assert not refused, refused[:3]
    assert len(acked) > len(first) + 50, len(acked)  # the writer kept writing meanwhile
    print(f"move under load: {moved}; {len(acked)} acked objects, {n_queries[0]} queries")
    assert stored() == acked  # nothing acknowledged was lost, nothing extra

    # A node that is not a shard node: the move answers 422 and changes nothing.
    refused = http.post(f"/v1/collections/{name}/shards/0/move", json={"to_node": "nope"})
    assert refused.status_code == 422, refused.text

    # Drain the node it is on now: it moves back; the node is cordoned until undrained.
    drained = http.post(f"/v1/cluster/nodes/{other}/drain")
    assert drained.status_code == 200, drained.text
    report = drained.json()
    assert report["replicas_left"] == 0 and not report["failed"], report
    assert where()["node_id"] == start["node_id"]
    assert stored() == acked
    undone = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "drain", other, "--undo", "--url", multinode.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert undone.returncode == 0 and '"cordoned": false' in undone.stdout, undone.stderr
    http.close()
