"""S3-compatible object storage for backups (``--backup-dir s3://bucket/prefix``).

The one module that talks to S3 (boto3, from the ``s3`` extra). Credentials, region and an
S3-compatible endpoint come from the standard AWS environment of each process that reads or
writes a backup — the coordinator and every Ray node's shard hosts (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph,
or the test's local server): shards upload and download their own copies from their nodes,
so no shared filesystem is needed.

A tree (a shard's backup directory) is stored as one object per file under a key prefix;
``download_tree`` recreates it. Errors are colshard errors naming the bucket and key:
``Unavailable`` (the endpoint does not answer, or refuses), ``NotFound``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import InvalidInput, NotFound, Unavailable

SCHEME = "s3://"


def is_s3(url: str | os.PathLike[str] | None) -> bool:
    return isinstance(url, str) and url.startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # no leading or trailing "/"

    @classmethod
    def parse(cls, url: str) -> S3Url:
        if not is_s3(url):
            raise InvalidInput(f"not an s3:// URL: {url!r}", {"url": url})
        bucket, _, key = url[len(SCHEME) :].partition("/")
        if not bucket:
            raise InvalidInput(f"an s3:// URL needs a bucket: {url!r}", {"url": url})
        return cls(bucket, key.strip("/"))

    def join(self, *parts: str) -> S3Url:
        return S3Url(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


def _client() -> Any:
    try:
        import boto3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise Unavailable(
            "S3 backups need boto3: pip install 'colshard[s3]'", {"missing": "boto3"}
        ) from exc
    return boto3.client("s3")


def _failed(url: S3Url, exc: Exception) -> Unavailable | NotFound:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("NoSuchKey", "404", "NoSuchBucket"):
        return NotFound(f"{url}: not found ({code})", {"url": str(url)})
    return Unavailable(f"{url}: {type(exc).__name__}: {exc}", {"url": str(url)})


class ObjectStore:
    """Reads and writes objects under s3:// URLs (see the module docstring)."""

    def __init__(self, client: Any = None) -> None:
        self._s3 = client if client is not None else _client()

    def put_bytes(self, url: S3Url, data: bytes) -> None:
        try:
            self._s3.put_object(Bucket=url.bucket, Key=url.key, Body=data)
        except Exception as exc:
            raise _failed(url, exc) from exc

    def get_bytes(self, url: S3Url) -> bytes:
        try:
            body: bytes = self._s3.get_object(Bucket=url.bucket, Key=url.key)["Body"].read()
        except Exception as exc:
            raise _failed(url, exc) from exc
        return body

    def keys(self, url: S3Url) -> Iterator[str]:
        """Every key under ``url``'s prefix (as a directory)."""
        prefix = f"{url.key}/" if url.key else ""
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=url.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield str(item["Key"])
        except Exception as exc:
            raise _failed(url, exc) from exc

    def children(self, url: S3Url) -> list[str]:
        """The names one level below ``url`` (its "subdirectories")."""
        prefix = f"{url.key}/" if url.key else ""
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=url.bucket, Prefix=prefix, Delimiter="/"
            )
            return sorted(
                str(p["Prefix"])[len(prefix) :].rstrip("/")
                for page in pages
                for p in page.get("CommonPrefixes", [])
            )
        except Exception as exc:
            raise _failed(url, exc) from exc

    def exists(self, url: S3Url) -> bool:
        """Whether any object is under ``url`` (as a directory) or at it."""
        try:
            found = self._s3.list_objects_v2(Bucket=url.bucket, Prefix=url.key, MaxKeys=1)
        except Exception as exc:
            raise _failed(url, exc) from exc
        return bool(found.get("KeyCount", 0))

    def upload_tree(self, local: Path, url: S3Url) -> int:
        """Every file under ``local`` to ``url/<relative path>``; returns the bytes sent."""
        sent = 0
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            target = url.join(path.relative_to(local).as_posix())
            try:
                self._s3.upload_file(str(path), target.bucket, target.key)
            except Exception as exc:
                raise _failed(target, exc) from exc
            sent += path.stat().st_size
        return sent

    def download_tree(self, url: S3Url, local: Path) -> int:
        """Every object under ``url`` into ``local`` (created); returns how many."""
        n = 0
        prefix = f"{url.key}/"
        for key in self.keys(url):
            path = Path(local) / key[len(prefix) :]
            if ".." in Path(key[len(prefix) :]).parts:
                raise InvalidInput(f"unsafe key in a backup: {key!r}", {"key": key})
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._s3.download_file(url.bucket, key, str(path))
            except Exception as exc:
                raise _failed(S3Url(url.bucket, key), exc) from exc
            n += 1
        if n == 0:
            raise NotFound(f"nothing stored under {url}", {"url": str(url)})
        return n

    def delete_tree(self, url: S3Url) -> int:
        keys = list(self.keys(url))
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                self._s3.delete_objects(Bucket=url.bucket, Delete={"Objects": chunk})
            except Exception as exc:
                raise _failed(url, exc) from exc
        return len(keys)
