"""Backups to S3-compatible storage: a real `colshard serve` with ``--backup-dir
s3://bucket/prefix`` against a local S3 server (moto's standalone server, from the test extra,
on 127.0.0.1, stopped by its PID). Each shard uploads its own copy; the restore downloads it
back, with exactly the writes acknowledged before the cut, in the same cluster under a new
name and in another cluster on the same bucket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cluster.embedded_etcd import find_free_ports
from tests.integration.conftest import start_serve, stop_serve
from tests.integration.procs import free_ports, wait_until

pytestmark = pytest.mark.integration
BUCKET = "colshard-backups"
DIM = 8


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    exe = shutil.which("moto_server")
    assert exe is not None, "moto[server] (the test extra) provides moto_server"
    (port,) = free_ports(1)
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    try:
        wait_until("the S3 server", lambda: httpx.get(endpoint, timeout=2).status_code < 500, 60)
        client(env).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def keys(env: dict[str, str], prefix: str) -> list[str]:
    found = client(env).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in found.get("Contents", []))


def test_backup_to_s3_then_restore_here_and_in_another_cluster(
    tmp_path: Path, s3: dict[str, str]
) -> None:
    port, etcd_port = find_free_ports(2)
    ray_tmp = Path(f"/tmp/cs3-{uuid.uuid4().hex[:8]}")

    def serve(data: str) -> subprocess.Popen[bytes]:
        """A cluster of its own in ``tmp_path / data``, backing up to the bucket."""
        return start_serve(
            tmp_path / data,
            port,
            etcd_port,
            tmp_path / f"serve-{data}.log",
            ray_tmp=ray_tmp,
            extra_args=["--backup-dir", f"s3://{BUCKET}/prod"],
            extra_env=s3,
        )

    proc = serve("data")
    rng = np.random.default_rng(4)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            created = http.post(
                "/v1/collections",
                json={
                    "name": "Docs",
                    "properties": [{"name": "n", "data_type": "int"}],
                    "vectors": [{"name": "v", "dim": DIM}],
                    "shard_count": 2,
                },
            )
            assert created.status_code == 201, created.text
            objs = [
                {
                    "id": str(uuid.UUID(int=i + 1)),
                    "properties": {"n": i},
                    "vectors": {"v": rng.normal(size=(3, DIM)).round(4).tolist()},
                }
                for i in range(60)
            ]
            r = http.post("/v1/collections/Docs/objects", json={"objects": objs})
            assert r.json()["n_ok"] == 60
            r = http.post("/v1/backups", json={"id": "b1"})
            assert r.status_code == 201, r.text
            info = r.json()
            assert info["state"] == "done" and info["collections"]["Docs"]["objects"] == 60
            stored = keys(s3, "prod/b1/")
            assert "prod/b1/backup.json" in stored
            assert any(k.startswith("prod/b1/Docs/shard-0/") for k in stored)
            assert any(k.startswith("prod/b1/Docs/shard-1/") for k in stored)
            listed = http.get("/v1/backups").json()["backups"]
            assert [b["id"] for b in listed] == ["b1"]
            assert http.post("/v1/backups", json={"id": "b1"}).status_code == 409

            # Written after the cut: not in the backup.
            late = {"properties": {"n": 99}, "vectors": {"v": [[1.0] * DIM]}}
            assert http.post("/v1/collections/Docs/objects", json={"objects": [late]}).is_success
            r = http.post("/v1/backups/b1/restore", json={"collection": "Docs", "name": "Back"})
            assert r.status_code == 201, r.text
            assert r.json()["objects"] == 60
            page = http.get("/v1/collections/Back/objects", params={"limit": 1000}).json()
            assert sorted(o["id"] for o in page["objects"]) == sorted(o["id"] for o in objs)
            q = {"near_vector": {"vector": objs[7]["vectors"]["v"]}, "limit": 1}
            hit = http.post("/v1/collections/Back/query", json=q).json()["objects"][0]
            assert hit["id"] == objs[7]["id"]

    finally:
        assert stop_serve(proc) == 0
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # Another cluster (its own data dir, etcd and Ray) on the same bucket restores it too.
    proc = serve("other")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            assert http.get("/v1/collections").json()["collections"] == []
            assert [b["id"] for b in http.get("/v1/backups").json()["backups"]] == ["b1"]
            r = http.post("/v1/backups/b1/restore", json={"collection": "Docs"})
            assert r.status_code == 201 and r.json()["objects"] == 60, r.text
            page = http.get("/v1/collections/Docs/objects", params={"limit": 1000}).json()
            assert sorted(o["id"] for o in page["objects"]) == sorted(o["id"] for o in objs)
            assert http.delete("/v1/backups/b1").status_code == 200
            assert keys(s3, "prod/b1/") == []
            assert http.get("/v1/backups/b1").status_code == 404
    finally:
        assert stop_serve(proc) == 0
        shutil.rmtree(ray_tmp, ignore_errors=True)
