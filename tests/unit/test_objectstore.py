"""S3 backup storage (``cluster.objectstore``, ``coordinator.backups.S3Root``) against moto's
in-process S3 (a fake behind boto3's own interface; the real server runs in
``tests/integration/test_backup_s3.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.errors import AlreadyExists, InvalidInput, NotFound
from cluster.objectstore import ObjectStore, S3Url, is_s3
from cluster.settings import settings_from
from coordinator.backups import DirRoot, S3Root, list_infos, read_info, root_of

BUCKET = "colshard-test"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    moto = pytest.importorskip("moto")
    import boto3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with moto.mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_urls() -> None:
    url = S3Url.parse("s3://bucket/a/b/")
    assert (url.bucket, url.key) == ("bucket", "a/b")
    assert str(url.join("c", "d/")) == "s3://bucket/a/b/c/d"
    assert str(S3Url.parse("s3://bucket")) == "s3://bucket"
    assert is_s3("s3://x") and not is_s3("/data") and not is_s3(None)
    with pytest.raises(InvalidInput):
        S3Url.parse("s3:///key")
    with pytest.raises(InvalidInput):
        S3Url.parse("/not/s3")


def test_trees_round_trip_and_delete(s3: Any, tmp_path: Path) -> None:
    store = ObjectStore(s3)
    src = tmp_path / "src"
    (src / "segments" / "0").mkdir(parents=True)
    (src / "MANIFEST").write_text("m")
    (src / "segments" / "0" / "tokens.bin").write_bytes(b"\x00" * 1000)
    url = S3Url.parse(f"s3://{BUCKET}/prod/b1/Docs/shard-0")
    assert not store.exists(url)
    assert store.upload_tree(src, url) == 1001
    assert store.exists(url)
    assert store.children(S3Url.parse(f"s3://{BUCKET}/prod/b1")) == ["Docs"]
    out = tmp_path / "out"
    assert store.download_tree(url, out) == 2
    assert (out / "MANIFEST").read_text() == "m"
    assert (out / "segments" / "0" / "tokens.bin").read_bytes() == b"\x00" * 1000
    assert store.delete_tree(url) == 2 and not store.exists(url)
    with pytest.raises(NotFound):
        store.download_tree(url, tmp_path / "none")
    with pytest.raises(NotFound):
        store.get_bytes(url.join("MANIFEST"))


def test_s3_root_keeps_backup_infos(s3: Any) -> None:
    root = S3Root(f"s3://{BUCKET}/prod", ObjectStore(s3))
    root.create("b1")
    root.write_info("b1", {"id": "b1", "created": 2.0, "state": "done", "collections": {}})
    root.create("b0")
    root.write_info("b0", {"id": "b0", "created": 1.0, "state": "running", "collections": {}})
    with pytest.raises(AlreadyExists):
        root.create("b1")
    assert read_info(root, "b1")["state"] == "done"
    assert [i["id"] for i in list_infos(root)] == ["b0", "b1"]  # oldest first
    assert root.shard("b1", "Docs", 3) == f"s3://{BUCKET}/prod/b1/Docs/shard-3"
    root.remove("b1")
    with pytest.raises(NotFound, match="b1"):
        read_info(root, "b1")
    assert [i["id"] for i in list_infos(root)] == ["b0"]


def test_backup_dir_setting_takes_a_directory_or_an_s3_url(tmp_path: Path) -> None:
    s = settings_from({"backup_dir": "s3://bucket/prefix"}, {})
    assert s.backup_url == "s3://bucket/prefix" and s.backup_target == "s3://bucket/prefix"
    assert isinstance(root_of(s.backup_target), S3Root)
    d = settings_from({"backup_dir": str(tmp_path)}, {})
    assert d.backup_url is None and d.backup_target == tmp_path
    assert isinstance(root_of(d.backup_target), DirRoot)
