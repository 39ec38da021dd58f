"""The ``colshard`` command line. ``serve`` is the composition root: it starts (or joins) etcd
and Ray, creates the coordinator actor, and serves the HTTP gateway until Ctrl-C, then stops
everything it started. The gateway runs inside the coordinator actor when that actor is on this
node (no Ray call per request), else (or with ``--separate-gateway``) in this process.

    colshard serve    [--data-dir D] [--host H] [--port P] [--etcd HOSTS] [--ray-address A]
                      [--api-keys-file F] [--ssl-certfile C --ssl-keyfile K] [limit flags]
                      [--separate-gateway]
    colshard gateway  --etcd HOSTS --ray-address A [--host H] [--port P] [same flags as serve]
    colshard load     [--url URL] [--duration-s S] [--clients N] [--json]
    colshard status   [--url URL] [--json]
    colshard import   FILE.parquet --collection NAME [--url URL]
    colshard query    NAME --near-text TEXT | --bm25 TEXT | --hybrid TEXT [--alpha A] |
                      --near-vector JSON [--target-vector V] [--filter JSON] [--limit N]
                      [--url URL] [--api-key KEY]
    colshard bench    [bench options, see `colshard bench --help`]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.ids import COORDINATOR_ACTOR_NAME
from cluster.settings import Settings, ShardSettings, settings_from
from cluster.settings import parse_resources as settings_parse_resources

log = logging.getLogger("colshard")
DEFAULT_URL = "http://127.0.0.1:8080"
# From Ctrl-C / SIGTERM to exit: drain the gateway (gateway.server.GRACEFUL_SHUTDOWN_S), stop
# the local Ray and etcd; whatever serve started that is still alive then is killed.
EXIT_BUDGET_S = 10.0


# Request limits, deadlines and HTTP connection bounds of serve and gateway: one flag per
# Settings field (``--max-batch-objects`` sets ``max_batch_objects``), default from Settings.
LIMIT_FLAGS: tuple[tuple[str, type, str | None], ...] = (
    ("max_batch_objects", int, None),
    ("max_limit", int, "largest query/list limit and offset"),
    ("max_tokens_per_object", int, "rows of one object's multi-vector (0: no limit)"),
    ("max_query_tokens", int, None),
    ("max_dim", int, "largest vector dimension of objects, queries, new collections"),
    ("max_filter_depth", int, None),
    ("max_filter_nodes", int, None),
    ("max_shards", int, "most shards a new collection may have"),
    ("max_collections", int, "most collections the cluster may hold"),
    ("max_properties", int, "most properties a collection may have"),
    ("max_vectors", int, "most named vectors a collection may have"),
    (
        "max_vectorize_objects",
        int,
        "most objects a vectorizer encodes for one write request (0: no limit)",
    ),
    ("query_timeout_s", float, "504 when the coordinator does not answer a read in time"),
    ("write_timeout_s", float, None),
    ("http_header_timeout_s", float, "close a connection whose request headers take longer"),
    (
        "http_body_timeout_s",
        float,
        "close a connection whose request body takes longer after its headers",
    ),
    ("http_idle_timeout_s", float, "close an idle keep-alive connection after this long"),
    ("max_connections", int, "connections and requests at once; 503 beyond (0: no cap)"),
)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The server's settings from the flags and the environment, read once
    (``cluster.settings.settings_from``); a bad value ends the CLI with its message."""
    try:
        return settings_from(vars(args), os.environ, tuple(f for f, _, _ in LIMIT_FLAGS))
    except ValueError as exc:
        raise SystemExit(f"colshard: {exc}") from exc


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_resources(text: str) -> dict[str, float]:
    """``cluster.settings.parse_resources``, ending the CLI on a bad value."""
    try:
        return settings_parse_resources(text)
    except ValueError as exc:
        raise SystemExit(f"colshard: {exc}") from exc


def security_from_args(args: argparse.Namespace, host: str) -> tuple[Any, ...] | None:
    """API keys (empty: auth off) and TLS sanity; None (after printing why) to refuse to
    start: a keys file that cannot be read, or a non-loopback ``host`` without keys and without
    ``--allow-insecure``."""
    from gateway.auth import KeyFileError, is_loopback, load_api_keys

    try:
        keys = load_api_keys(args.api_keys_file)
    except KeyFileError as exc:
        print(f"colshard: {exc}", file=sys.stderr)
        return None
    if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
        print("colshard: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return None
    if not keys and not is_loopback(host) and not args.allow_insecure:
        print(
            f"colshard: refusing to serve on {host} without API keys: give --api-keys-file "
            f"(or COLSHARD_API_KEYS_FILE / COLSHARD_API_KEYS), bind 127.0.0.1, or pass "
            f"--allow-insecure",
            file=sys.stderr,
        )
        return None
    if keys:
        log.info(
            "API-key auth on: %d key(s) (%s)",
            len(keys),
            ", ".join(sorted({k.role.name for k in keys})),
        )
    else:
        log.warning("API-key auth off: every client reaching %s may read and write", host)
    return keys


# Ray reads this when ``ray`` is first imported: off, it takes 127.0.0.1 as the node's address,
# and its gRPC servers (GCS, raylet, every worker), agents and dashboard bind loopback only. On,
# ``_node_ip_address="127.0.0.1"`` is silently "resolved" to the machine's address and most of
# them listen on every interface (docs/security.md).
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(
    address: str | None, *, local_dashboard: bool = True, num_cpus: int | None = None
) -> bool:
    """Join ``address`` or start a local Ray with every socket on 127.0.0.1. True if we
    started it. A local Ray that would not be on loopback is stopped again and refused."""
    if address:
        import ray

        ray.init(address=address, log_to_driver=False)
        return False
    os.environ.update(LOOPBACK_RAY_ENV)
    # Nothing but this machine reaches a loopback-only Ray, so its token is optional (kept if
    # asked for with RAY_AUTH_MODE=token).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts workers at nice 15: the shard and coordinator actors would then yield the
    # CPU to any other process (and to this gateway) on a busy machine.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray._private import ray_constants

    # Already imported before the environment was set (a test session, an embedding program):
    # the constant was read then.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        include_dashboard=local_dashboard,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        num_cpus=num_cpus,
    )
    node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    if node_ip not in ("127.0.0.1", "::1"):
        ray.shutdown()
        raise SystemExit(
            f"colshard: the local Ray took node address {node_ip}, not loopback: "
            f"refusing to run it (it would listen beyond this machine)"
        )
    return True


def get_or_create_coordinator(settings: Settings) -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from coordinator.actor import CoordinatorActor, ray_namespace

    # The head node: it holds Ray's GCS, so the cluster lives exactly as long as it does.
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    node_id = next(
        (
            n["NodeID"]
            for n in nodes
            if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})
        ),
        None,
    )
    actor_cls: Any = ray.remote(CoordinatorActor)
    handle = actor_cls.options(
        name=COORDINATOR_ACTOR_NAME,
        namespace=ray_namespace(settings.cluster_name),
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_restarts=-1,
        max_concurrency=1000,
        # On the head (hard affinity): the head holds Ray's GCS, so it lives as long as the
        # cluster; a soft affinity let Ray spill the actor to a busy worker node that may leave.
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        if node_id
        else "DEFAULT",
    ).remote(settings)
    ray.get(handle.start.remote(), timeout=120)
    return handle


def gateway_config(
    settings: Settings,
    handle: Any,
    *,
    api_keys: Sequence[Any] = (),
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "info",
) -> Any:
    """The uvicorn config of a gateway process that reaches the coordinator over Ray (TLS when
    both ssl files are given)."""
    from gateway.backend import Backend
    from gateway.ray_backend import RayTransport
    from gateway.server import uvicorn_config

    return uvicorn_config(
        Backend(RayTransport(handle, settings.query_timeout_s)),
        settings,
        api_keys=api_keys,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level=log_level,
    )


def run_gateway(
    settings: Settings,
    handle: Any,
    *,
    api_keys: Sequence[Any] = (),
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    import uvicorn

    # ray.init() installed its own SIGTERM handler (sys.exit(15)); uvicorn restores whatever it
    # finds here once it has drained, so put ours back: SIGTERM then ends like Ctrl-C, exit 0.
    signal.signal(signal.SIGTERM, _interrupt)
    uvicorn.Server(
        gateway_config(
            settings, handle, api_keys=api_keys, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile
        )
    ).run()


def coordinator_is_local(handle: Any) -> bool:
    """Whether the coordinator actor runs on this process's Ray node (it can then serve the
    HTTP port this process was asked to serve)."""
    import ray

    from cluster.raynode import ray_node_id

    where = ray.get(handle.whereabouts.remote(), timeout=60)
    return bool(where["node_id"] == ray_node_id())


def serve_in_coordinator(
    handle: Any, gateway: Any, *, poll_s: float = 1.0, stopping: _StopClock | None = None
) -> None:
    """Have the coordinator actor serve ``gateway`` in its event loop until Ctrl-C / SIGTERM,
    then drain it. Keeps it hosted: Ray restarts a crashed coordinator, and its server with it
    is gone, so it is hosted again (``keep_hosted``)."""
    import ray

    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    try:
        where = ray.get(handle.host.remote(gateway, owner), timeout=120)
    except ray.exceptions.RayTaskError as exc:  # e.g. the port is taken: say so, exit 1
        raise SystemExit(f"colshard: {exc.cause}") from None
    log.info("gateway %s runs inside the coordinator actor (pid %s)", gateway.address, where["pid"])
    # ray.init() installed its own SIGTERM handler (sys.exit(15)): SIGTERM ends like Ctrl-C.
    # Either one also arms a hard exit past the exit budget: a Ray call that does not return
    # (a coordinator that stopped answering) cannot keep serve running.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt_and_arm)
    try:
        keep_hosted(handle, gateway, owner, poll_s)
    finally:
        if stopping is not None:
            stopping.start()
        drain_s = 60.0 if stopping is None else max(1.0, stopping.left() - 3.0)
        try:  # drain: requests in flight finish (up to 5 s), new connections are refused
            ray.get(handle.unhost.remote(owner), timeout=drain_s)
        except Exception as exc:  # the coordinator is gone already: nothing left to drain
            log.warning("could not stop the gateway in the coordinator: %r", exc)


def keep_hosted(
    handle: Any, gateway: Any, owner: str, poll_s: float, stop: threading.Event | None = None
) -> None:
    """Every ``poll_s`` until ``stop`` (or Ctrl-C): host ``gateway`` again if the coordinator
    no longer runs it (the actor was restarted). Returns if another owner took the coordinator's
    server over (a second ``colshard serve`` against the same cluster)."""
    import ray

    stop = stop or threading.Event()
    while not stop.wait(poll_s):
        try:
            current = ray.get(handle.hosting.remote(), timeout=30)
            if current is None:
                log.warning(
                    "the coordinator runs no gateway (it was restarted): hosting %s again",
                    gateway.address,
                )
                ray.get(handle.host.remote(gateway, owner), timeout=120)
            elif current != owner:
                log.warning(
                    "another colshard serve (%s) now runs the coordinator's gateway", current
                )
                return
        except Exception as exc:  # the actor is restarting, or the port is not free yet
            log.warning("gateway check failed, retrying: %r", exc)


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.embedded_etcd import EmbeddedEtcd

    settings = settings_from_args(args)
    api_keys = security_from_args(args, settings.host)
    if api_keys is None:
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    etcd: EmbeddedEtcd | None = None
    started_ray = False
    stopping = _StopClock()
    try:
        if not settings.etcd_endpoints:
            # "_etcd" cannot collide with a collection directory (names start with a letter).
            etcd = EmbeddedEtcd(
                settings.data_dir / "_etcd",
                client_port=args.etcd_port,
                peer_port=args.etcd_port + 1,
            )
            endpoint = etcd.start()
            log.info("embedded etcd on %s (pid %s)", endpoint, etcd.pid)
            settings = replace(settings, etcd_endpoints=(endpoint,))
        if not settings.ray_address:
            # Our local Ray's workers (the shard actors) inherit this: data under --data-dir.
            os.environ["COLSHARD_DATA_DIR"] = str(settings.data_dir)
        started_ray = init_ray(settings.ray_address)
        handle = get_or_create_coordinator(settings)
        embedded = not args.separate_gateway and coordinator_is_local(handle)
        scheme = "https" if args.ssl_certfile else "http"
        print(
            f"colshard serving on {scheme}://{settings.host}:{settings.port} "
            f"(data {settings.data_dir}, etcd {','.join(settings.etcd_endpoints)}, gateway "
            f"{'inside the coordinator actor' if embedded else 'in this process'})",
            flush=True,
        )
        if embedded:
            from gateway.server import EmbeddedGateway

            serve_in_coordinator(
                handle,
                EmbeddedGateway(
                    settings,
                    api_keys=api_keys,
                    ssl_certfile=args.ssl_certfile,
                    ssl_keyfile=args.ssl_keyfile,
                ),
                stopping=stopping,
            )
        else:
            run_gateway(
                settings,
                handle,
                api_keys=api_keys,
                ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile,
            )
    finally:
        stopping.start()
        started = descendants(os.getpid())  # Ray's GCS, raylet, agents, workers; etcd
        if started_ray:
            import ray

            # Our local Ray: takes the coordinator and shard actors with it. Bounded: what is
            # left of it when the budget runs out is killed below.
            stopper = threading.Thread(target=ray.shutdown, daemon=True)
            stopper.start()
            stopper.join(max(0.5, stopping.left() - 1.5))
        if etcd is not None:
            etcd.stop(timeout_s=max(0.2, min(5.0, stopping.left() - 0.5)))
        kill_leftovers(started)
        # Ray's own exit hook (atexit: ray.shutdown) may wait on the processes just killed, or
        # on a shutdown still running in the thread above: past the budget, exit regardless.
        exit_after(max(0.5, stopping.left()), _exit_code(sys.exc_info()[1]))
    return 0


def _exit_code(pending: BaseException | None) -> int:
    """The status serve exits with when ``pending`` is propagating (None: normal return)."""
    if pending is None or isinstance(pending, KeyboardInterrupt):
        return 0
    if isinstance(pending, SystemExit):
        return pending.code if isinstance(pending.code, int) else 1
    return 1


def exit_after(seconds: float, code: int) -> None:
    """End the process with ``code`` in ``seconds`` unless it has exited by then (a daemon
    thread: it keeps running while the interpreter's exit hooks do)."""

    def hard_exit() -> None:
        time.sleep(seconds)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=hard_exit, name="colshard-exit", daemon=True).start()


class _StopClock:
    """When serve began to stop (the first call of ``start``) and the budget left."""

    def __init__(self, budget_s: float = EXIT_BUDGET_S) -> None:
        self.budget_s = budget_s
        self.at: float | None = None

    def start(self) -> None:
        if self.at is None:
            self.at = time.monotonic()

    def left(self) -> float:
        return self.budget_s if self.at is None else self.budget_s - (time.monotonic() - self.at)


def _proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...); None
    once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(entry.name)) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_leftovers(pids: Sequence[int]) -> None:
    """SIGKILL whichever of ``pids`` (processes serve started) are still alive."""
    alive = []
    for pid in pids:
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z":
            continue  # gone, or exited and not yet reaped by its parent
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            alive.append(pid)
    if alive:
        log.warning("killed %d process(es) still running at exit: %s", len(alive), alive)


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.etcd_endpoints or not settings.ray_address:
        print("colshard gateway needs --etcd and --ray-address", file=sys.stderr)
        return 2
    api_keys = security_from_args(args, settings.host)
    if api_keys is None:
        return 2
    init_ray(settings.ray_address)
    run_gateway(
        settings,
        get_or_create_coordinator(settings),
        api_keys=api_keys,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Members, collections and shard placements with health; exit 0 only when ready."""
    import httpx

    from gateway.status import format_status

    try:
        with httpx.Client(base_url=args.url, timeout=60.0, headers=_api_headers(args)) as http:
            response = http.get("/v1/cluster")
            ready = http.get("/readyz")
    except httpx.HTTPError as exc:
        print(f"colshard: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(json.dumps(response.json(), indent=2), file=sys.stderr)
        return 1
    readiness = (
        ready.json()
        if ready.headers.get("content-type", "").startswith("application/json")
        else None
    )
    if args.json:
        print(json.dumps({"cluster": response.json(), "readiness": readiness}, indent=2))
    else:
        print(format_status(response.json(), readiness, args.url))
    return 0 if readiness is not None and readiness.get("ready") else 1


def _api_headers(args: argparse.Namespace) -> dict[str, str]:
    key = args.api_key or _env("COLSHARD_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def query_body(args: argparse.Namespace) -> dict[str, Any]:
    """The /query body of ``colshard query``'s flags; SystemExit(2) with one line when they
    name no query kind, or more than one."""
    kinds = [
        name
        for name, value in (
            ("--near-text", args.near_text),
            ("--bm25", args.bm25),
            ("--hybrid", args.hybrid),
            ("--near-vector", args.near_vector),
        )
        if value is not None
    ]
    if len(kinds) != 1:
        raise SystemExit(
            "colshard query: give exactly one of --near-text, --bm25, --hybrid, "
            f"--near-vector (got {', '.join(kinds) or 'none'})"
        )
    body: dict[str, Any] = {"limit": args.limit, "return_metadata": ["score"]}
    if args.near_text is not None:
        body["near_text"] = {"query": args.near_text}
    elif args.bm25 is not None:
        body["bm25"] = {"query": args.bm25}
    elif args.hybrid is not None:
        body["hybrid"] = {"query": args.hybrid, "alpha": args.alpha}
    else:
        try:
            body["near_vector"] = {"vector": json.loads(args.near_vector)}
        except json.JSONDecodeError as exc:
            raise SystemExit(f"colshard query: --near-vector is not JSON ({exc})") from None
    if args.target_vector:
        body["target_vector"] = args.target_vector
    if args.filter:
        try:
            body["filters"] = json.loads(args.filter)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"colshard query: --filter is not JSON ({exc})") from None
    return body


def _request(
    args: argparse.Namespace, method: str, path: str, timeout_s: float, **kwargs: Any
) -> Any:
    """One request to ``--url`` with ``--api-key``; None (after saying why) when the gateway
    cannot be reached."""
    import httpx

    try:
        with httpx.Client(base_url=args.url, timeout=timeout_s, headers=_api_headers(args)) as http:
            return http.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        print(f"colshard: cannot reach {args.url}: {exc}", file=sys.stderr)
        return None


def cmd_query(args: argparse.Namespace) -> int:
    body = query_body(args)
    return _answer(
        _request(args, "POST", f"/v1/collections/{args.collection}/query", 120.0, json=body)
    )


def _answer(response: Any) -> int:
    """Print a JSON answer (errors to stderr); 0 for a 2xx, 1 otherwise, 2 when unreachable."""
    if response is None:
        return 2
    ok = 200 <= response.status_code < 300
    print(json.dumps(response.json(), indent=2), file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_backup(args: argparse.Namespace) -> int:
    """``colshard backup create|list|show|delete``: /v1/backups."""
    if args.action != "list" and not args.id:
        print(f"colshard backup {args.action}: give the backup's id", file=sys.stderr)
        return 2
    if args.action == "create":
        body = {"id": args.id, "collections": args.collection, "wait": not args.no_wait}
        return _answer(_request(args, "POST", "/v1/backups", 3600.0, json=body))
    if args.action == "list":
        return _answer(_request(args, "GET", "/v1/backups", 60.0))
    method = "GET" if args.action == "show" else "DELETE"
    return _answer(_request(args, method, f"/v1/backups/{args.id}", 60.0))


def cmd_restore(args: argparse.Namespace) -> int:
    """``colshard restore ID COLLECTION [--as NAME]``."""
    body = {"collection": args.collection, "name": args.new_name}
    return _answer(_request(args, "POST", f"/v1/backups/{args.id}/restore", 3600.0, json=body))


def cmd_move(args: argparse.Namespace) -> int:
    """``colshard move COLLECTION SHARD --to NODE [--replica R]``."""
    body = {"to_node": args.to_node, "replica": args.replica}
    path = f"/v1/collections/{args.collection}/shards/{args.shard}/move"
    return _answer(_request(args, "POST", path, 3600.0, json=body))


def cmd_drain(args: argparse.Namespace) -> int:
    """``colshard drain NODE [--undo]``."""
    method = "DELETE" if args.undo else "POST"
    return _answer(_request(args, method, f"/v1/cluster/nodes/{args.node}/drain", 3600.0))


def cmd_quality(args: argparse.Namespace) -> int:
    """The recall report of a collection: measured recall@k, collection-wide and per shard."""
    params: dict[str, Any] = {"queries": args.queries}
    for key in ("vector", "k", "seed"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    response = _request(
        args, "GET", f"/v1/collections/{args.collection}/quality", 600.0, params=params
    )
    if response is None:
        return 2
    if response.status_code != 200:
        print(json.dumps(response.json(), indent=2), file=sys.stderr)
        return 1
    report = response.json()
    print(json.dumps(report, indent=2) if args.json else format_quality(report))
    return 0


def format_quality(report: Mapping[str, Any]) -> str:
    """The recall report as a few lines of text."""

    def pct(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = (
        f"{report['collection']}.{report['vector']}: recall@{report['k']} "
        f"{pct(report['recall'])} (95 % bounds {pct(report['ci_low'])}.."
        f"{pct(report['ci_high'])}, {report['queries']} queries); target "
        f"{report['target']:.3f} at k={report['target_k']}"
    )
    if report.get("meets_target") is not None:
        head += ", met" if report["meets_target"] else ", NOT met"
    lines = [head, "shard  objects  recall  bounds        calibration"]
    for s in report["shards"]:
        cal = s.get("calibration") or {}
        measured = cal.get("measured") or {}
        note = cal.get("state", "-")
        if measured:
            note += (
                f": depth {cal.get('depth')}, measured {pct(measured.get('recall'))} "
                f"on {measured.get('queries')} queries ({measured.get('real_queries')} "
                f"real)"
            )
        lines.append(
            f"{s['shard']:>5}  {s['objects'] if s['objects'] is not None else '-':>7}"
            f"  {pct(s['recall']):>6}  {pct(s['ci_low'])}..{pct(s['ci_high'])}"
            f"  {note}"
        )
    if report.get("failed_shards"):
        lines.append(f"failed shards: {report['failed_shards']}")
    return "\n".join(lines)


def cmd_import(args: argparse.Namespace) -> int:
    import httpx

    from cluster.errors import ColshardError
    from gateway.client import Client

    if not Path(args.file).is_file():
        print(f"colshard import: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, api_key=args.api_key) as client:
            collection = client.collections.get(args.collection)
            collection.config()  # a missing collection: one line, before any progress bar
            result = collection.data.import_parquet(args.file)
    except ColshardError as exc:
        print(f"colshard import: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"colshard import: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # not Parquet, unreadable, wrong columns
        print(f"colshard import: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"n_ok": result.n_ok, "n_failed": result.n_failed}))
    return 0 if result.n_failed == 0 else 1


def cmd_load(args: argparse.Namespace) -> int:
    import asyncio

    from bench.loadtest import LoadConfig, run_load

    cfg = LoadConfig(
        url=args.url,
        api_key=args.api_key or _env("COLSHARD_API_KEY"),
        duration_s=args.duration_s,
        warmup_s=min(args.warmup_s, args.duration_s),
        clients=args.clients,
        write_fraction=args.write_fraction,
        dim=args.dim,
        batch_size=args.batch_size,
        shard_count=args.shard_count,
        gateway_pids=tuple(args.pid or ()),
    )
    report = asyncio.run(run_load(cfg))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.errors == 0 else 1


def cmd_bench(argv: Sequence[str]) -> int:
    # The CLI is the composition root: the benchmark (its own package) drives the shard
    # engine in-process.
    from bench import main as bench_main

    return int(bench_main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colshard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def server_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="data directory (env COLSHARD_DATA_DIR)")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8080)
        p.add_argument(
            "--etcd",
            help="host:port[,host:port...] of an existing etcd "
            "(env COLSHARD_ETCD); default: start one",
        )
        p.add_argument("--ray-address", help="join this Ray cluster (env COLSHARD_RAY_ADDRESS)")
        p.add_argument("--cluster-name", help="colshard cluster name (env COLSHARD_CLUSTER_NAME)")
        p.add_argument("--max-body-mb", type=int, default=64, help="413 above this")
        p.add_argument(
            "--api-keys-file",
            help="API keys, one per line: KEY[:ROLE[:COLL,...]] "
            "(env COLSHARD_API_KEYS_FILE; also "
            "COLSHARD_API_KEYS); none: auth off",
        )
        p.add_argument(
            "--allow-insecure",
            action="store_true",
            help="serve a non-loopback --host without API keys",
        )
        p.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (chain)")
        p.add_argument("--ssl-keyfile", help="the certificate's PEM private key")
        d = Settings()
        for field_name, kind, helptext in LIMIT_FLAGS:
            p.add_argument(
                "--" + field_name.replace("_", "-"),
                type=kind,
                default=getattr(d, field_name),
                help=helptext,
            )
        p.add_argument(
            "--shard-resources",
            help="Ray resources every shard actor requests, JSON, e.g. "
            "'{\"colshard_shard\": 1}' (env COLSHARD_SHARD_RESOURCES)",
        )
        p.add_argument(
            "--seal-threshold-tokens",
            type=_positive_int,
            default=None,
            help="tokens a shard's growing segment holds before it is sealed to an "
            "immutable, indexed segment (default "
            f"{ShardSettings().seal_threshold_tokens}; env "
            "COLSHARD_SEAL_THRESHOLD_TOKENS)",
        )
        p.add_argument(
            "--index-defer-tokens",
            type=_non_negative_int,
            default=None,
            help="while writes keep arriving and nobody searches a shard, its "
            "sealed segments wait unindexed (scored exactly) until together "
            "they hold this many tokens, then are merged and indexed once; 0 = "
            "index each segment when sealed "
            f"(default {ShardSettings().index_defer_tokens}; env "
            "COLSHARD_INDEX_DEFER_TOKENS)",
        )
        p.add_argument(
            "--calibration-queries",
            type=_non_negative_int,
            default=None,
            help="sample queries per recall calibration of a shard; 0 turns "
            "calibration off (search depth 1) (default "
            f"{ShardSettings().calibration_queries}; env "
            "COLSHARD_CALIBRATION_QUERIES)",
        )
        p.add_argument(
            "--backup-dir",
            help="where backups are written and restored from: a directory (on several "
            "nodes, storage every node mounts at this path) or s3://BUCKET/PREFIX (credentials "
            "and endpoint from the AWS environment of every node; default <data dir>/backups; "
            "env COLSHARD_BACKUP_DIR)",
        )
        p.add_argument(
            "--backup-timeout-s",
            type=float,
            default=None,
            help="how long one shard may take to copy its backup into the backup directory, "
            "or a restore to copy it back (default "
            f"{Settings().backup_timeout_s:g}; env COLSHARD_BACKUP_TIMEOUT_S)",
        )
        p.add_argument(
            "--shard-hosts-per-node",
            type=_positive_int,
            default=None,
            help="shard host processes per node (and replica index); shard s of a "
            "collection runs in host s %% N (default 2; env COLSHARD_SHARD_HOSTS_PER_NODE; "
            "fixed for a cluster's data, docs/deploy.md)",
        )
        p.add_argument(
            "--rebalance-interval-s",
            type=float,
            default=None,
            help="seconds between rebalancing moves (one replica from the fullest shard node "
            "to the emptiest when they differ by two or more; default "
            f"{Settings().rebalance_interval_s:g}; 0: off; env COLSHARD_REBALANCE_INTERVAL_S)",
        )
        p.add_argument(
            "--vectorizer-replicas",
            type=_positive_int,
            default=None,
            help="encoder actors per vectorizer config; import batches run on them "
            "in parallel (default 1; env COLSHARD_VECTORIZER_REPLICAS)",
        )

    serve = sub.add_parser("serve", help="run etcd + Ray + coordinator + gateway")
    server_flags(serve)
    serve.add_argument("--etcd-port", type=int, default=2379, help="embedded etcd client port")
    serve.add_argument(
        "--separate-gateway",
        action="store_true",
        default=_env("COLSHARD_SEPARATE_GATEWAY", "") not in ("", "0"),
        help="serve HTTP from this process, one Ray call to the coordinator "
        "per request, instead of inside the coordinator actor (the "
        "default when the coordinator runs on this node; env "
        "COLSHARD_SEPARATE_GATEWAY=1)",
    )
    gw = sub.add_parser("gateway", help="run only the HTTP gateway against a running cluster")
    server_flags(gw)
    for name, helptext in (
        ("status", "show cluster state"),
        ("query", "run a query"),
        ("import", "import a Parquet file"),
        ("quality", "measure a collection's recall@k against exact MaxSim"),
        ("backup", "back up collections, or list / show / delete backups"),
        ("restore", "restore a collection from a backup"),
        ("move", "move a shard replica to another node, online"),
        ("drain", "move every shard replica off a node (or --undo: place on it again)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--url", default=_env("COLSHARD_URL", DEFAULT_URL))
        p.add_argument("--api-key", help="Bearer key (env COLSHARD_API_KEY)")
        if name == "query":
            p.add_argument("collection")
            p.add_argument("--near-text", help="text, vectorized by the collection")
            p.add_argument("--bm25", help="keyword query")
            p.add_argument("--hybrid", help="text for hybrid (BM25 + vector) search")
            p.add_argument(
                "--alpha",
                type=float,
                default=0.75,
                help="hybrid weight of the vector part (0: BM25 only, 1: vector)",
            )
            p.add_argument(
                "--near-vector",
                help="a vector or multi-vector as JSON, e.g. '[[0.1, 0.2], [0.3, 0.4]]'",
            )
            p.add_argument("--target-vector", help="named vector to search")
            p.add_argument(
                "--filter",
                help="filter as JSON, e.g. "
                '\'{"path": "year", "operator": "equal", '
                '"value": 2020}\'',
            )
            p.add_argument("--limit", type=int, default=10)
        if name == "import":
            p.add_argument("file")
            p.add_argument("--collection", required=True)
        if name == "status":
            p.add_argument("--json", action="store_true", help="the raw /v1/cluster and /readyz")
        if name == "quality":
            p.add_argument("collection")
            p.add_argument("--vector", help="named vector (needed when there are several)")
            p.add_argument("--k", type=int, help="recall@k (default: the vector's recall_k)")
            p.add_argument("--queries", type=int, default=50, help="sample queries (1..500)")
            p.add_argument("--seed", type=int, help="sample seed (default: the time)")
            p.add_argument("--json", action="store_true", help="the raw report")
        if name == "backup":
            p.add_argument("action", choices=("create", "list", "show", "delete"))
            p.add_argument("id", nargs="?", help="the backup's id (create, show, delete)")
            p.add_argument(
                "--collection", action="append", help="collection to back up (default: all)"
            )
            p.add_argument(
                "--no-wait",
                action="store_true",
                help="create: return once the backup has started (show follows it)",
            )
        if name == "restore":
            p.add_argument("id")
            p.add_argument("collection", help="the backed-up collection")
            p.add_argument("--as", dest="new_name", help="restore under this name")
        if name == "move":
            p.add_argument("collection")
            p.add_argument("shard", type=int)
            p.add_argument("--to", required=True, dest="to_node", help="the target node's id")
            p.add_argument("--replica", type=int, default=0, help="which replica (default 0)")
        if name == "drain":
            p.add_argument("node", help="the node's id (colshard status lists them)")
            p.add_argument("--undo", action="store_true", help="lift the drain's cordon")
    load = sub.add_parser("load", help="drive a running gateway with concurrent clients")
    load.add_argument("--url", default=_env("COLSHARD_URL", DEFAULT_URL))
    load.add_argument("--api-key", help="Bearer key (env COLSHARD_API_KEY)")
    load.add_argument("--duration-s", type=float, default=60.0)
    load.add_argument(
        "--warmup-s",
        type=float,
        default=10.0,
        help="RSS growth is measured from the end of the warm-up",
    )
    load.add_argument("--clients", type=int, default=8)
    load.add_argument("--write-fraction", type=float, default=0.3)
    load.add_argument("--dim", type=int, default=32)
    load.add_argument("--batch-size", type=int, default=16)
    load.add_argument("--shard-count", type=int, default=2)
    load.add_argument(
        "--pid",
        type=int,
        action="append",
        help="also sample this process's RSS (e.g. the gateway's)",
    )
    load.add_argument("--json", action="store_true")
    sub.add_parser("bench", help="run the benchmark (colshard bench --help)", add_help=False)
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


_armed = threading.Event()


def _interrupt_and_arm(signum: int, frame: Any) -> None:
    """Ctrl-C / SIGTERM for serve: stop like Ctrl-C, and exit (status 0) regardless once the
    exit budget and a grace second have passed since the first signal."""
    if not _armed.is_set():
        _armed.set()
        exit_after(EXIT_BUDGET_S + 1.0, 0)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One INFO line per HTTP request from the SDK's client is noise for status/query/import/load.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, Kubernetes) shuts down like Ctrl-C: uvicorn drains, then we clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    commands = {
        "serve": cmd_serve,
        "gateway": cmd_gateway,
        "status": cmd_status,
        "query": cmd_query,
        "import": cmd_import,
        "load": cmd_load,
        "quality": cmd_quality,
        "backup": cmd_backup,
        "restore": cmd_restore,
        "move": cmd_move,
        "drain": cmd_drain,
    }
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
