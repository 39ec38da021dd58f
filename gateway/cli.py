"""The ``colshard`` command line. ``serve`` is the composition root: it starts (or joins) etcd
and Ray, creates the coordinator actor, and serves the HTTP gateway until Ctrl-C, then stops
everything it started.

    colshard serve    [--data-dir D] [--host H] [--port P] [--etcd HOSTS] [--ray-address A]
    colshard gateway  --etcd HOSTS --ray-address A [--host H] [--port P]
    colshard status   [--url URL]
    colshard import   FILE.parquet --collection NAME [--url URL]
    colshard query    NAME --near-text TEXT | --bm25 TEXT [--limit N] [--url URL]
    colshard bench    [bench options, see `colshard bench --help`]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cluster.ids import COORDINATOR_ACTOR_NAME
from cluster.settings import Settings

log = logging.getLogger("colshard")
DEFAULT_URL = "http://127.0.0.1:8080"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def settings_from_args(args: argparse.Namespace) -> Settings:
    etcd = args.etcd or _env("COLSHARD_ETCD") or ""
    endpoints = tuple(e.strip() for e in etcd.split(",") if e.strip())
    return Settings(
        data_dir=Path(args.data_dir or _env("COLSHARD_DATA_DIR", "./colshard-data") or ".")
        .resolve(),
        cluster_name=args.cluster_name or _env("COLSHARD_CLUSTER_NAME", "default") or "default",
        etcd_endpoints=endpoints,
        ray_address=args.ray_address or _env("COLSHARD_RAY_ADDRESS"),
        host=args.host,
        port=args.port,
        max_body_bytes=args.max_body_mb * 1024 * 1024,
    )


def init_ray(address: str | None, *, local_dashboard: bool = True) -> bool:
    """Join ``address`` or start a local Ray bound to 127.0.0.1. True if we started it."""
    import ray

    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # Keep every Ray socket on loopback (Ray otherwise binds the machine's public address);
    # the local dashboard is then reachable only from this machine, so its token is optional.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=local_dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


def get_or_create_coordinator(settings: Settings) -> Any:
    import ray

    from coordinator.actor import CoordinatorActor, ray_namespace

    actor_cls: Any = ray.remote(CoordinatorActor)
    handle = actor_cls.options(
        name=COORDINATOR_ACTOR_NAME, namespace=ray_namespace(settings.cluster_name),
        get_if_exists=True, lifetime="detached", num_cpus=0, max_restarts=-1,
        max_concurrency=1000,
    ).remote(settings)
    ray.get(handle.start.remote(), timeout=120)
    return handle


def run_gateway(settings: Settings, handle: Any) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.backend import RayBackend

    app = create_app(RayBackend(handle, settings.query_timeout_s), settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=10)


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.embedded_etcd import EmbeddedEtcd

    settings = settings_from_args(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    etcd: EmbeddedEtcd | None = None
    started_ray = False
    try:
        if not settings.etcd_endpoints:
            # "_etcd" cannot collide with a collection directory (names start with a letter).
            etcd = EmbeddedEtcd(settings.data_dir / "_etcd", client_port=args.etcd_port,
                                peer_port=args.etcd_port + 1)
            endpoint = etcd.start()
            log.info("embedded etcd on %s (pid %s)", endpoint, etcd.pid)
            settings = replace(settings, etcd_endpoints=(endpoint,))
        started_ray = init_ray(settings.ray_address)
        handle = get_or_create_coordinator(settings)
        print(f"colshard serving on http://{settings.host}:{settings.port} "
              f"(data {settings.data_dir}, etcd {','.join(settings.etcd_endpoints)})",
              flush=True)
        run_gateway(settings, handle)
    finally:
        if started_ray:
            import ray

            ray.shutdown()  # our local Ray: takes the coordinator and shard actors with it
        if etcd is not None:
            etcd.stop()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if not settings.etcd_endpoints or not settings.ray_address:
        print("colshard gateway needs --etcd and --ray-address", file=sys.stderr)
        return 2
    init_ray(settings.ray_address)
    run_gateway(settings, get_or_create_coordinator(settings))
    return 0


def _client(url: str) -> Any:
    import httpx

    return httpx.Client(base_url=url, timeout=60.0)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args.url) as http:
        response = http.get("/v1/cluster")
        print(json.dumps(response.json(), indent=2))
        return 0 if response.status_code == 200 else 1


def cmd_query(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"limit": args.limit, "return_metadata": ["score"]}
    if args.near_text:
        body["near_text"] = {"query": args.near_text}
    elif args.bm25:
        body["bm25"] = {"query": args.bm25}
    else:
        print("give --near-text or --bm25", file=sys.stderr)
        return 2
    with _client(args.url) as http:
        response = http.post(f"/v1/collections/{args.collection}/query", json=body)
        print(json.dumps(response.json(), indent=2))
        return 0 if response.status_code == 200 else 1


def cmd_import(args: argparse.Namespace) -> int:
    from gateway.client import Client

    with Client(args.url) as client:
        result = client.collections.get(args.collection).data.import_parquet(args.file)
        print(json.dumps({"n_ok": result.n_ok, "n_failed": result.n_failed}))
        return 0 if result.n_failed == 0 else 1


def cmd_bench(argv: Sequence[str]) -> int:
    # The CLI is the composition root: the benchmark drives the shard engine in-process.
    from shard.bench.__main__ import main as bench_main

    return int(bench_main(list(argv)) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def server_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="data directory (env COLSHARD_DATA_DIR)")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8080)
        p.add_argument("--etcd", help="host:port[,host:port...] of an existing etcd "
                                      "(env COLSHARD_ETCD); default: start one")
        p.add_argument("--ray-address", help="join this Ray cluster (env COLSHARD_RAY_ADDRESS)")
        p.add_argument("--cluster-name", help="colshard cluster name (env COLSHARD_CLUSTER_NAME)")
        p.add_argument("--max-body-mb", type=int, default=64)

    serve = sub.add_parser("serve", help="run etcd + Ray + coordinator + gateway")
    server_flags(serve)
    serve.add_argument("--etcd-port", type=int, default=2379, help="embedded etcd client port")
    gw = sub.add_parser("gateway", help="run only the HTTP gateway against a running cluster")
    server_flags(gw)
    for name, helptext in (("status", "show cluster state"), ("query", "run a query"),
                           ("import", "import a Parquet file")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--url", default=_env("COLSHARD_URL", DEFAULT_URL))
        if name == "query":
            p.add_argument("collection")
            p.add_argument("--near-text")
            p.add_argument("--bm25")
            p.add_argument("--limit", type=int, default=10)
        if name == "import":
            p.add_argument("file")
            p.add_argument("--collection", required=True)
    sub.add_parser("bench", help="run the benchmark (colshard bench --help)", add_help=False)
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, Kubernetes) shuts down like Ctrl-C: uvicorn drains, then we clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    commands = {"serve": cmd_serve, "gateway": cmd_gateway, "status": cmd_status,
                "query": cmd_query, "import": cmd_import}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
