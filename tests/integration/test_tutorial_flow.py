"""The multi-vector tutorial flow over real HTTP, real Ray actors and real etcd."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from cluster import vector_wire
from cluster.errors import AlreadyExists, InvalidInput, NotFound
from cluster.etcd_store import EtcdStore
from gateway.client import Client, NamedVector, Property
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
DIM = 128


def maxsim(q: np.ndarray, d: np.ndarray) -> float:
    return float((q @ d.T).max(axis=1).sum())


def unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def make_objects(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.UUID(int=int(rng.integers(1 << 62)) << 64 | i)),
            "properties": {"text": f"object {i}", "rank": i, "score": i / 10, "flag": i % 2 == 0},
            "vectors": {
                "multi_vector": rng.normal(size=(int(rng.integers(8, 30)), DIM)).astype(np.float32)
            },
        }
        for i in range(n)
    ]


def create_demo(client: Client, name: str, shard_count: int = 2) -> Any:
    return client.collections.create(
        name,
        properties=[
            Property("text", "text"),
            Property("rank", "int"),
            Property("score", "number"),
            Property("flag", "boolean"),
        ],
        vectors=[NamedVector("multi_vector", dim=DIM, kind="multi", metric="cosine")],
        shard_count=shard_count,
    )


def etcd_spec(server: Server, name: str) -> Any:
    async def read() -> Any:
        store = await EtcdStore.connect(
            server.settings.etcd_endpoints, server.settings.cluster_name, 5.0
        )
        try:
            return await store.get_collection(name)
        finally:
            await store.close()

    return asyncio.run(read())


def test_tutorial_flow(colshard_server: Server) -> None:
    import ray

    from coordinator.actor import ray_namespace

    rng = np.random.default_rng(0)
    with Client(colshard_server.url) as client:
        col = create_demo(client, "DemoCollection")
        spec = etcd_spec(colshard_server, "DemoCollection")
        assert spec is not None and spec.shard_count == 2 and spec.vectors[0].dim == DIM
        namespace = ray_namespace(colshard_server.settings.cluster_name)
        hosts = sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace and a["name"].startswith("colshard:host:")
        )
        # The node's two shard hosts (Settings.shard_hosts_per_node) hold one shard each.
        held = [
            ray.get(ray.get_actor(h, namespace=namespace).info.remote())["shards"] for h in hosts
        ]
        assert len(hosts) == 2 and held == [
            ["colshard:DemoCollection:0"],
            ["colshard:DemoCollection:1"],
        ]

        cluster = client.cluster()
        assert len(cluster["members"]) == 1  # this node, registered under a lease
        placements = cluster["collections"]["DemoCollection"]["placements"]
        assert [p["actor"] for p in placements] == [
            "colshard:DemoCollection:0",
            "colshard:DemoCollection:1",
        ]
        assert all(p["node_id"] in cluster["members"] for p in placements)
        assert [p["shard_host"] for p in placements] == hosts  # shard s in the node's host s

        objects = make_objects(rng, 300)
        result = col.data.insert_many(objects, batch_size=64)
        assert (result.n_ok, result.n_failed) == (300, 0)

        # Fetch one object and see its (n, dim) multi-vector.
        first = objects[0]
        fetched = col.query.fetch_object_by_id(first["id"], include_vector=True)
        shape = np.asarray(fetched.vector["multi_vector"]).shape
        assert shape == first["vectors"]["multi_vector"].shape
        assert np.allclose(
            fetched.vector["multi_vector"], unit(first["vectors"]["multi_vector"]), atol=1e-6
        )
        assert fetched.properties == first["properties"]

        # near_vector with a multi-vector query equals exact numpy MaxSim.
        query = rng.normal(size=(12, DIM)).astype(np.float32)
        docs = {o["id"]: unit(o["vectors"]["multi_vector"]) for o in objects}
        exact = sorted(
            ((maxsim(unit(query), m), i) for i, m in docs.items()), key=lambda t: (-t[0], t[1])
        )
        res = col.query.near_vector(
            query, target_vector="multi_vector", limit=10, return_metadata=["score", "distance"]
        )
        assert [o.uuid for o in res.objects] == [i for _, i in exact[:10]]
        assert np.allclose(
            [o.metadata["score"] for o in res.objects], [s for s, _ in exact[:10]], atol=1e-4
        )
        assert res.objects[0].metadata["distance"] == pytest.approx(-exact[0][0], abs=1e-4)

        # offset is applied once, globally.
        page = col.query.near_vector(query, target_vector="multi_vector", limit=5, offset=7)
        assert [o.uuid for o in page.objects] == [i for _, i in exact[7:12]]

        # Listing pages through every object exactly once.
        seen: list[str] = []
        after = None
        while True:
            batch = col.query.fetch_objects(limit=70, after=after)
            seen += [o.uuid for o in batch]
            if len(batch) < 70:
                break
            after = batch[-1].uuid
        assert sorted(seen) == sorted(docs) and len(seen) == len(set(seen))

        # PUT replaces the whole object; PATCH merges properties and keeps unnamed vectors.
        target = objects[1]
        new_vec = rng.normal(size=(3, DIM)).astype(np.float32)
        col.data.replace(target["id"], {"text": "replaced"}, {"multi_vector": new_vec})
        got = col.query.fetch_object_by_id(target["id"], include_vector=True)
        assert got.properties == {"text": "replaced"}
        assert np.allclose(got.vector["multi_vector"], unit(new_vec), atol=1e-6)
        col.data.update(target["id"], {"rank": 7})
        got = col.query.fetch_object_by_id(target["id"], include_vector=True)
        assert got.properties == {"text": "replaced", "rank": 7}
        assert np.allclose(got.vector["multi_vector"], unit(new_vec), atol=1e-6)
        with pytest.raises(InvalidInput):
            col.data.update(target["id"], {"rank": "seven"})
        assert col.query.fetch_object_by_id(target["id"]).properties["rank"] == 7
        docs[target["id"]] = unit(new_vec)
        objects[1] = {**target, "properties": {"text": "replaced", "rank": 7}}
        exact = sorted(
            ((maxsim(unit(query), m), i) for i, m in docs.items()), key=lambda t: (-t[0], t[1])
        )

        # Delete one object; it is gone from get and search.
        col.data.delete_by_id(exact[0][1])
        with pytest.raises(NotFound):
            col.query.fetch_object_by_id(exact[0][1])
        res = col.query.near_vector(query, target_vector="multi_vector", limit=3)
        assert res.objects[0].uuid == exact[1][1]

        # Delete by filter: dry run counts, the real run deletes exactly the matches.
        flt = {"path": "rank", "operator": "less_than", "value": 50}
        expected = sum(
            1 for o in objects if o["properties"]["rank"] < 50 and o["id"] != exact[0][1]
        )
        assert col.data.delete_many(flt, dry_run=True)["matched"] == expected
        assert col.data.delete_many(flt)["deleted"] == expected
        assert len(col.query.fetch_objects(limit=1000)) == 299 - expected
        bad = httpx.post(
            f"{colshard_server.url}/v1/collections/DemoCollection/objects/delete",
            json={"filters": {"path": "rank", "operator": "bogus", "value": 1}},
        )
        assert bad.status_code == 422

        client.collections.delete("DemoCollection")
        assert etcd_spec(colshard_server, "DemoCollection") is None
        assert not client.collections.exists("DemoCollection")


def count(client: Client, name: str) -> int:
    return len(client.collections.get(name).query.fetch_objects(limit=10_000))


def test_bad_input_is_rejected_and_changes_nothing(colshard_server: Server) -> None:
    rng = np.random.default_rng(1)
    url = colshard_server.url
    with Client(url) as client, httpx.Client(base_url=url) as http:
        col = create_demo(client, "BadInput")
        col.data.insert_many(make_objects(rng, 20))
        good = rng.normal(size=(4, DIM)).tolist()

        def insert(vec: Any, **props: Any) -> httpx.Response:
            body = {
                "objects": [
                    {"properties": {"text": "ok"}, "vectors": {"multi_vector": good}},
                    {"properties": props, "vectors": {"multi_vector": vec}},
                ]
            }
            return http.post("/v1/collections/BadInput/objects", json=body)

        cases = {
            "wrong dim": insert(rng.normal(size=(3, DIM - 1)).tolist()),
            "ragged": insert([[0.1] * DIM, [0.1] * (DIM - 2)]),
            "empty": insert([]),
            "single for multi": insert([0.1] * DIM),
            "unknown property": insert(good, nope=1),
            "wrong property type": insert(good, rank="x"),
            "strings": insert([["a"] * DIM]),
            # the binary form (cluster.vector_wire), checked like lists
            "binary wrong dim": insert(vector_wire.encode(np.ones((3, DIM - 1)))),
            "binary NaN": insert(vector_wire.encode(np.full((2, DIM), np.nan))),
            "binary short": insert(
                {"base64": vector_wire.encode(good)["base64"], "shape": [5, DIM]}
            ),
            "binary bad base64": insert({"base64": "not base64!", "shape": [1, DIM]}),
            "binary extra key": insert({**vector_wire.encode(good), "dtype": "f4"}),
            "binary empty": insert(vector_wire.encode(np.zeros((0, DIM)))),
        }
        for what, response in cases.items():
            assert response.status_code == 422, (what, response.text)
            assert response.json()["error"]["code"] == "invalid_input", what
        nan_body = (
            '{"objects": [{"vectors": {"multi_vector": [[NaN' + ", 0.1" * (DIM - 1) + "]]}}]}"
        )
        response = http.post(
            "/v1/collections/BadInput/objects",
            content=nan_body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 422 and "NaN" in response.json()["error"]["message"]
        response = http.post(
            "/v1/collections/BadInput/objects",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        response = http.post(
            "/v1/collections/BadInput/objects", json={"objects": [{"vectors": {"other": good}}]}
        )
        assert response.status_code == 422
        too_big = b"x" * (colshard_server.settings.max_body_bytes + 1)
        response = http.post(
            "/v1/collections/BadInput/objects",
            content=too_big,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 413
        assert count(client, "BadInput") == 20

        # Queries
        q = {"near_vector": {"vector": good}, "target_vector": "multi_vector"}
        as_list = http.post("/v1/collections/BadInput/query", json=q)
        assert as_list.status_code == 200
        binary = {**q, "near_vector": {"vector": vector_wire.encode(good)}}
        as_binary = http.post("/v1/collections/BadInput/query", json=binary)
        assert as_binary.status_code == 200
        assert [o["id"] for o in as_binary.json()["objects"]] == [
            o["id"] for o in as_list.json()["objects"]
        ]
        bad_queries = [
            ({**q, "target_vector": "nope"}, 404),
            ({"near_vector": {"vector": [[0.1] * 3]}, "target_vector": "multi_vector"}, 422),
            (
                {
                    "near_vector": {"vector": vector_wire.encode(np.ones((2, 3)))},
                    "target_vector": "multi_vector",
                },
                422,
            ),
            (
                {
                    "near_vector": {"vector": {"base64": "AAAA", "shape": [2, DIM]}},
                    "target_vector": "multi_vector",
                },
                422,
            ),
            (
                {
                    "near_vector": {
                        "vector": vector_wire.encode(
                            np.ones((colshard_server.settings.max_query_tokens + 1, DIM))
                        )
                    },
                    "target_vector": "multi_vector",
                },
                422,
            ),
            ({**q, "limit": 0}, 422),
            ({**q, "near_text": {"query": "x"}}, 422),
            ({}, 422),
            ({**q, "bogus": 1}, 422),
        ]
        for body, status in bad_queries:
            response = http.post("/v1/collections/BadInput/query", json=body)
            assert response.status_code == status, (body, response.text)
        assert http.post("/v1/collections/Nope/query", json=q).status_code == 404

        # Collections
        with pytest.raises(AlreadyExists):
            create_demo(client, "BadInput")
        for name in ["1bad", "bad-name", "../etc", "a" * 65]:
            with pytest.raises(InvalidInput):
                create_demo(client, name)
        response = http.post("/v1/collections", json={"name": "NoVec", "vectors": []})
        assert response.status_code == 422
        response = http.post(
            "/v1/collections", json={"name": "BadDim", "vectors": [{"name": "v", "dim": 0}]}
        )
        assert response.status_code == 422
        assert http.get("/v1/collections/Missing").status_code == 404
        assert http.get(f"/v1/collections/BadInput/objects/{uuid.uuid4()}").status_code == 404
        assert http.get("/v1/collections/BadInput/objects/not-a-uuid").status_code == 422
        names = {c["name"] for c in client.collections.list_all()}
        assert "BadInput" in names and "BadDim" not in names and "NoVec" not in names
        assert count(client, "BadInput") == 20
        client.collections.delete("BadInput")


def test_single_vector_and_dot_metric(colshard_server: Server) -> None:
    rng = np.random.default_rng(2)
    with Client(colshard_server.url) as client:
        col = client.collections.create(
            "Single",
            properties=[],
            shard_count=3,
            vectors=[NamedVector("v", dim=8, kind="single", metric="dot")],
        )
        vecs = rng.normal(size=(50, 8)).astype(np.float32)
        ids = [str(uuid.uuid4()) for _ in range(50)]
        col.data.insert_many(
            [{"id": i, "vectors": {"v": v}} for i, v in zip(ids, vecs, strict=True)]
        )
        q = rng.normal(size=8).astype(np.float32)
        res = col.query.near_vector(q, limit=5, return_metadata=["score"])
        scores = vecs @ q
        order = np.argsort(-scores)[:5]
        assert [o.uuid for o in res.objects] == [ids[i] for i in order]
        got = col.query.fetch_object_by_id(ids[0], include_vector=True)
        assert np.asarray(got.vector["v"]).shape == (8,)  # a single vector comes back flat
        assert np.allclose(got.vector["v"], vecs[0])  # stored as given (dot metric)
        client.collections.delete("Single")
