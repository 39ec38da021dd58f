"""Backup and restore (issue #21, part) over HTTP on real Ray: a backup taken while a client
keeps writing restores, under a new name, to exactly a prefix of the acknowledged writes
(at least every write acknowledged before the backup began), byte-for-byte and searchable;
bad requests are clear 4xx and change nothing."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.errors import AlreadyExists, NotFound
from gateway.client import Client
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
DIM = 8


def _oid(i: int) -> str:
    return str(uuid.UUID(int=i + 1))


def _obj(i: int, rng: np.random.Generator) -> dict[str, Any]:
    n = int(rng.integers(1, 6))
    return {
        "id": _oid(i),
        "properties": {"text": f"doc {i}", "n": i},
        "vectors": {"v": rng.standard_normal((n, DIM)).round(4).tolist()},
    }


def _all(http: httpx.Client, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    after = None
    while True:
        params: dict[str, Any] = {"limit": 500, "include_vector": True}
        if after:
            params["after"] = after
        page = http.get(f"/v1/collections/{name}/objects", params=params).json()
        out.update({o["id"]: o for o in page["objects"]})
        after = page.get("next_after")
        if not after:
            return out


def test_backup_during_writes_restores_a_prefix_of_the_acknowledged_writes(
    colshard_server: Server,
) -> None:
    rng = np.random.default_rng(21)
    name = f"Bk{uuid.uuid4().hex[:8]}"
    spec = {
        "name": name,
        "shard_count": 2,
        "properties": [{"name": "text", "data_type": "text"}, {"name": "n", "data_type": "int"}],
        "vectors": [{"name": "v", "dim": DIM}],
    }
    objects = [_obj(i, rng) for i in range(400)]
    backup_id = f"b-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        assert http.post("/v1/collections", json=spec).status_code == 201
        first = http.post(f"/v1/collections/{name}/objects", json={"objects": objects[:150]})
        assert first.status_code == 200 and first.json()["n_ok"] == 150
        done: list[int] = list(range(150))
        stop = threading.Event()

        def writer() -> None:
            with httpx.Client(base_url=colshard_server.url, timeout=120) as w:
                for i in range(150, 400):
                    if stop.is_set():
                        return
                    r = w.put(f"/v1/collections/{name}/objects/{_oid(i)}", json=objects[i])
                    assert r.status_code == 200, r.text
                    done.append(i)

        thread = threading.Thread(target=writer)
        thread.start()
        while len(done) < 200:
            time.sleep(0.005)
        acked_before = len(done)
        r = http.post("/v1/backups", json={"id": backup_id, "collections": [name]})
        assert r.status_code == 201, r.text
        info = r.json()
        thread.join()
        assert info["state"] == "done" and len(info["collections"][name]["shards"]) == 2
        assert info["collections"][name]["state"] == "done"
        # each shard's copy was moved out of its staging directory into the backup
        assert all(
            s["bytes"] > 0 and s["segments"] >= 0 for s in info["collections"][name]["shards"]
        )
        live = _all(http, name)
        assert len(live) == 400

        # The backup is listed and shown; taking it again is 409; bad ids and names are 4xx.
        assert backup_id in [b["id"] for b in http.get("/v1/backups").json()["backups"]]
        assert http.get(f"/v1/backups/{backup_id}").json()["state"] == "done"
        assert http.post("/v1/backups", json={"id": backup_id}).status_code == 409
        assert http.post("/v1/backups", json={"id": "../x"}).status_code == 422
        assert (
            http.post("/v1/backups", json={"id": "x", "collections": ["Nope"]}).status_code == 404
        )
        assert http.get("/v1/backups/nope").status_code == 404
        bad = http.post(f"/v1/backups/{backup_id}/restore", json={"collection": "Nope"})
        assert bad.status_code == 404
        taken = http.post(f"/v1/backups/{backup_id}/restore", json={"collection": name})
        assert taken.status_code == 409  # the original still exists

        restored_name = f"{name}R"
        r = http.post(
            f"/v1/backups/{backup_id}/restore", json={"collection": name, "name": restored_name}
        )
        assert r.status_code == 201, r.text
        got = _all(http, restored_name)
        n = len(got)
        assert acked_before <= n <= 400
        assert set(got) == {_oid(i) for i in done[:n]}  # a prefix of the write order
        for oid, obj in got.items():
            assert (
                obj["vectors"] == live[oid]["vectors"]
                and obj["properties"] == live[oid]["properties"]
            )
        # Searchable: vector and keyword search answer from the restored data.
        q = objects[5]["vectors"]["v"]
        hits = http.post(
            f"/v1/collections/{restored_name}/query",
            json={"near_vector": {"vector": q}, "limit": 3},
        ).json()["objects"]
        assert hits[0]["id"] == _oid(5)
        kw = http.post(
            f"/v1/collections/{restored_name}/query",
            json={"bm25": {"query": "doc 7"}, "limit": 50},
        ).json()["objects"]
        assert _oid(7) in [h["id"] for h in kw]
        # The restored collection takes writes like any other.
        r = http.put(f"/v1/collections/{restored_name}/objects/{_oid(999)}", json=_obj(999, rng))
        assert r.status_code == 200
        assert http.delete(f"/v1/backups/{backup_id}").status_code == 200
        assert http.get(f"/v1/backups/{backup_id}").status_code == 404
        for c in (name, restored_name):
            http.delete(f"/v1/collections/{c}")


def test_cli_backup_and_restore(
    colshard_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from gateway.cli import main

    rng = np.random.default_rng(5)
    name = f"Cli{uuid.uuid4().hex[:8]}"
    url = ["--url", colshard_server.url]
    with httpx.Client(base_url=colshard_server.url, timeout=120) as http:
        spec = {"name": name, "vectors": [{"name": "v", "dim": DIM}]}
        assert http.post("/v1/collections", json=spec).status_code == 201
        objs = [{**_obj(i, rng), "properties": {}} for i in range(20)]
        assert (
            http.post(f"/v1/collections/{name}/objects", json={"objects": objs}).status_code == 200
        )
        bid = f"cli-{uuid.uuid4().hex[:6]}"
        assert main(["backup", "create", bid, "--collection", name, *url]) == 0
        assert json.loads(capsys.readouterr().out)["collections"][name]["objects"] == 20
        assert main(["backup", "list", *url]) == 0
        assert bid in capsys.readouterr().out
        assert main(["backup", "show", *url]) == 2  # no id
        capsys.readouterr()
        assert main(["restore", bid, name, "--as", f"{name}B", *url]) == 0
        assert json.loads(capsys.readouterr().out)["objects"] == 20
        assert main(["restore", bid, name, *url]) == 1  # the name is taken: 409
        assert "exists" in capsys.readouterr().err
        # The SDK speaks the same routes.
        with Client(colshard_server.url) as sdk:
            assert sdk.get_backup(bid)["state"] == "done"
            assert bid in [b["id"] for b in sdk.backups()]
            with pytest.raises(AlreadyExists):
                sdk.restore(bid, name)
            assert sdk.restore(bid, name, f"{name}C")["objects"] == 20
            again = sdk.backup(f"{bid}-2", [f"{name}C"])
            assert again["collections"][f"{name}C"]["objects"] == 20
            sdk.delete_backup(f"{bid}-2")
            with pytest.raises(NotFound):
                sdk.get_backup(f"{bid}-2")
            # Without waiting: 202 once it has started, then GET follows it to the end; bad
            # names are still refused up front, and nothing is left of them.
            started = sdk.backup(f"{bid}-3", [name], wait=False)
            assert started["state"] == "running" and started["collections"] == {}
            deadline = time.monotonic() + 60
            while (shown := sdk.get_backup(f"{bid}-3"))["state"] == "running":
                assert time.monotonic() < deadline, shown
                time.sleep(0.05)
            assert shown["state"] == "done" and shown["collections"][name]["objects"] == 20
            assert sdk.restore(f"{bid}-3", name, f"{name}D")["objects"] == 20
            with pytest.raises(NotFound):
                sdk.backup(f"{bid}-4", ["NoSuchCollection"], wait=False)
            with pytest.raises(NotFound):
                sdk.get_backup(f"{bid}-4")
            sdk.delete_backup(f"{bid}-3")
        r = http.post("/v1/backups", json={"id": f"{bid}-5", "collections": [name], "wait": False})
        assert r.status_code == 202 and r.json()["state"] == "running", r.text
        deadline = time.monotonic() + 60
        for b in (f"{bid}-5", f"{bid}-6"):
            if b.endswith("-6"):
                no_wait = ["backup", "create", b, "--collection", name, "--no-wait", *url]
                assert main(no_wait) == 0
                assert json.loads(capsys.readouterr().out)["state"] == "running"
            while http.get(f"/v1/backups/{b}").json()["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert http.get(f"/v1/backups/{b}").json()["state"] == "done"
        http.delete(f"/v1/collections/{name}D")
        http.delete(f"/v1/collections/{name}C")
        assert main(["backup", "delete", bid, *url]) == 0
        for c in (name, f"{name}B"):
            http.delete(f"/v1/collections/{c}")
