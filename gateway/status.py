"""``colshard status``: the cluster as text, from the gateway's ``/v1/cluster`` and ``/readyz``.

Plain functions over the two JSON documents (no HTTP here, so the layout is unit-tested)::

    cluster default: NOT READY  (etcd ok; unavailable shards: Demo:1)
    coordinator on node 462ed670 (host-a, pid 4242)

    MEMBERS (2)
    NODE      HOST    ADDRESS    ROLES               SHARDS  RESOURCES
    462ed670  host-a  10.0.0.1   coordinator,head    1       CPU=1 colshard_shard=1
    ...

    COLLECTION Demo  shards=2  replication=1  objects=300
    SHARD  REPLICA  ACTOR            NODE      HOST    STATE        OBJECTS  TOKENS
    0      0        colshard:Demo:0  462ed670  host-a  ready        150      2400
    1      0        colshard:Demo:1  cbcb3b79  host-b  unavailable  -        -
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _short(node_id: Any) -> str:
    return str(node_id or "-")[:8]


def _resources(resources: Mapping[str, Any]) -> str:
    skip = ("memory", "object_store_memory")  # bytes: long and rarely what one looks for
    return (
        " ".join(f"{k}={float(v):g}" for k, v in sorted(resources.items()) if k not in skip) or "-"
    )


def _count(value: Any) -> str:
    return "-" if value is None else str(value)


def health_line(cluster_name: str, readiness: Mapping[str, Any] | None) -> str:
    if readiness is None:
        return f"cluster {cluster_name}: readiness unknown (/readyz did not answer)"
    ready = bool(readiness.get("ready"))
    parts = [f"etcd {'ok' if readiness.get('etcd') else 'UNREACHABLE'}"]
    if "error" in readiness:
        parts.append(f"error: {readiness['error'].get('message', readiness['error'])}")
    down = readiness.get("unavailable_shards") or []
    if down:
        parts.append(f"unavailable shards: {', '.join(map(str, down))}")
    return f"cluster {cluster_name}: {'READY' if ready else 'NOT READY'}  ({'; '.join(parts)})"


def format_status(
    cluster: Mapping[str, Any], readiness: Mapping[str, Any] | None, cluster_name: str = ""
) -> str:
    """The whole report (see the module docstring)."""
    lines = [health_line(cluster_name or "at this gateway", readiness)]
    coord = cluster.get("coordinator")
    if coord:
        lines.append(
            f"coordinator on node {_short(coord.get('node_id'))} "
            f"({coord.get('host', '?')}, pid {coord.get('pid', '?')})"
        )
    members: Mapping[str, Mapping[str, Any]] = cluster.get("members") or {}
    collections: Mapping[str, Mapping[str, Any]] = cluster.get("collections") or {}
    per_node = Counter(
        str(p.get("node_id", ""))
        for col in collections.values()
        for p in col.get("placements", [])
        if p.get("state") != "unavailable"
    )
    lines += ["", f"MEMBERS ({len(members)})"]
    if members:
        lines += _table(
            ["NODE", "HOST", "ADDRESS", "ROLES", "SHARDS", "RESOURCES"],
            [
                [
                    _short(node),
                    m.get("host", "-"),
                    m.get("address") or "-",
                    ",".join(m.get("roles", [])) or "-",
                    per_node.get(node, 0),
                    _resources(m.get("resources") or {}),
                ]
                for node, m in sorted(members.items())
            ],
        )
    if not collections:
        lines += ["", "no collections"]
    for name, col in sorted(collections.items()):
        lines += [
            "",
            f"COLLECTION {name}  shards={col.get('shard_count', '?')}  "
            f"replication={col.get('replication_factor', '?')}  "
            f"objects={_count(col.get('objects'))}",
        ]
        rows = []
        for p in col.get("placements", []):
            node = str(p.get("node_id", ""))
            host = p.get("host") or "-"
            if node and node not in members:
                host = f"{host} (gone)"
            rows.append(
                [
                    p.get("shard", "?"),
                    p.get("replica", "?"),
                    p.get("actor", "-"),
                    p.get("shard_host") or "-",
                    _short(node),
                    host,
                    p.get("state", "?"),
                    _count(p.get("objects")),
                    _count(p.get("tokens")),
                ]
            )
        lines += _table(
            [
                "SHARD",
                "REPLICA",
                "NAME",
                "SHARD HOST",
                "NODE",
                "HOST",
                "STATE",
                "OBJECTS",
                "TOKENS",
            ],
            rows,
        )
    return "\n".join(lines)
