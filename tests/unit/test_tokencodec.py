"""Lossy token codecs (shard.tokencodec): round trips, the scoring kernels against the float
reference, merges that copy codes, persistence, recall floors in the engine, and the spec."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import InvalidInput
from cluster.spec import CodecSpec, NamedVectorSpec
from cluster.types import StoredObject, VectorSearch
from coordinator.replication import object_digest
from shard import tokencodec
from shard.maxsim import maxsim_reference
from shard.tokencodec import Int8Tokens, ResidualTokens, encode, gather
from tests.unit.test_shard_support import (
    batch,
    clustered_docs,
    drain,
    exact_top,
    make_spec,
    noisy_query,
    open_engine,
    uid,
)

CODECS = [("int8", 0), ("residual", 2), ("residual", 4)]


def _corpus(rng: np.random.Generator, n_docs: int = 400, dim: int = 48) -> tuple[Any, Any]:
    lengths = rng.integers(4, 40, n_docs)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    x = centres[rng.integers(0, 40, int(offsets[-1]))]
    x += 0.5 * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), offsets


def _reference_decode(c: Any) -> np.ndarray:
    """Decoding written out in numpy, independent of the kernels."""
    if isinstance(c, Int8Tokens):
        return c.codes.astype(np.float32) * c.scale[None, :]
    per = 8 // c.bits
    buckets = np.zeros((len(c), c.packed.shape[1] * per), dtype=np.int64)
    for i in range(per):
        buckets[:, i::per] = (c.packed >> (i * c.bits)) & ((1 << c.bits) - 1)
    buckets = buckets[:, : c.dim]
    residual = c.weights[np.arange(c.dim)[None, :], buckets]
    return c.centroids[c.cids] + residual


@pytest.mark.parametrize(("kind", "bits"), CODECS)
def test_round_trip_and_error_bound(kind: str, bits: int) -> None:
    rng = np.random.default_rng(1)
    x, _ = _corpus(rng)
    c = encode(x, kind, bits)
    decoded = c[0 : len(c)]
    np.testing.assert_allclose(decoded, _reference_decode(c), rtol=0, atol=1e-6)
    idx = rng.integers(0, len(c), 50)
    np.testing.assert_array_equal(c.take(idx), decoded[idx])
    err = np.linalg.norm(decoded - x, axis=1).mean()
    if kind == "int8":
        assert np.all(np.abs(decoded - x) <= c.scale[None, :] / 2 + 1e-7)
    # relative to unit vectors: int8 ~0.5 %, 4-bit residual a few %, 2-bit ~20 %
    assert err < {("int8", 0): 0.01, ("residual", 4): 0.1, ("residual", 2): 0.3}[(kind, bits)]
    assert c.code_bytes < x.nbytes / (3 if kind == "int8" else 6)


@pytest.mark.parametrize(("kind", "bits"), CODECS)
def test_scoring_kernel_matches_maxsim_on_the_decoded_rows(kind: str, bits: int) -> None:
    rng = np.random.default_rng(2)
    x, offsets = _corpus(rng)
    c = encode(x, kind, bits)
    decoded = c[0 : len(c)]
    docs = rng.choice(len(offsets) - 1, 60, replace=False)
    q = rng.standard_normal((9, x.shape[1])).astype(np.float32)
    got = c.score(q, offsets[docs], offsets[docs + 1])
    want = maxsim_reference(q, [decoded[offsets[d] : offsets[d + 1]] for d in docs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    empty = c.score(q, np.array([3]), np.array([3]))  # no rows: no score
    assert empty[0] == -np.inf


def test_four_bit_residual_ranks_like_float() -> None:
    rng = np.random.default_rng(3)
    x, offsets = _corpus(rng, n_docs=600)
    c = encode(x, "residual", 4)
    docs = np.arange(len(offsets) - 1)
    recalls = []
    for _ in range(20):
        d = int(rng.integers(len(docs)))
        q = x[offsets[d] : offsets[d + 1]][:8] + 0.1 * rng.standard_normal((1, x.shape[1]))
        q = q.astype(np.float32)
        exact = maxsim_reference(q, [x[offsets[i] : offsets[i + 1]] for i in docs])
        coded = c.score(q, offsets[:-1], offsets[1:])
        recalls.append(len(set(np.argsort(-exact)[:10]) & set(np.argsort(-coded)[:10])) / 10)
    assert np.mean(recalls) >= 0.9


@pytest.mark.parametrize(("kind", "bits"), CODECS)
def test_gather_copies_codes_without_requantising(kind: str, bits: int) -> None:
    rng = np.random.default_rng(4)
    x, offsets = _corpus(rng)
    half = int(offsets[200])
    a = encode(x[:half], kind, bits)
    b = encode(x[half:], kind, bits, reference=a)
    off_a, off_b = offsets[:201], offsets[200:] - half
    keep_a, keep_b = np.arange(0, 200, 3), np.arange(1, 200, 2)
    merged = gather([(a, off_a, keep_a), (b, off_b, keep_b)])
    want = np.concatenate(
        [a[int(off_a[d]) : int(off_a[d + 1])] for d in keep_a]
        + [b[int(off_b[d]) : int(off_b[d + 1])] for d in keep_b]
    )
    got = merged[0 : len(merged)]
    if kind == "int8" or (isinstance(merged, ResidualTokens) and merged.bits == bits):
        if kind == "int8":  # two segments, two scales: re-quantised against one
            assert np.abs(got - want).max() <= np.maximum(a.scale, merged.scale).max()
        else:  # shared buckets: the very same values
            np.testing.assert_array_equal(got, want)
            assert isinstance(a, ResidualTokens) and isinstance(merged, ResidualTokens)
            assert len(merged.centroids) <= len(a.centroids) + len(b.centroids)
    same = gather([(a, off_a, keep_a)])
    np.testing.assert_array_equal(
        same[0 : len(same)],
        np.concatenate([a[int(off_a[d]) : int(off_a[d + 1])] for d in keep_a]),
    )


@pytest.mark.parametrize(("kind", "bits"), CODECS)
def test_gather_encodes_from_the_originals_when_codes_cannot_be_copied(
    kind: str, bits: int
) -> None:
    rng = np.random.default_rng(9)
    x, offsets = _corpus(rng)
    half = int(offsets[200])
    a = encode(x[:half], kind, bits)
    b = encode(2.0 * x[half:], kind, bits)  # its own scale / buckets: nothing to share
    off_a, off_b = offsets[:201], offsets[200:] - half
    keep = np.arange(200)
    written = np.concatenate([x[:half], 2.0 * x[half:]])
    merged = gather([(a, off_a, keep), (b, off_b, keep)], written)
    once = encode(written, kind, bits, reference=a)  # one quantisation of the values written
    np.testing.assert_allclose(merged[0 : len(merged)], once[0 : len(once)], atol=1e-6)


@pytest.mark.parametrize(("kind", "bits"), CODECS)
def test_a_part_without_rows_neither_sets_nor_breaks_the_shared_codebook(
    kind: str, bits: int
) -> None:
    """A segment with no rows for the vector (or none live) has a codebook trained on nothing;
    gathered first, it must not become the reference the others are re-encoded against."""
    rng = np.random.default_rng(11)
    x, offsets = _corpus(rng)
    empty = encode(x[:0], kind, bits)
    a = encode(x, kind, bits)
    keep = np.arange(0, 400, 2)
    merged = gather(
        [(empty, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)), (a, offsets, keep)]
    )
    want = np.concatenate([a[int(offsets[d]) : int(offsets[d + 1])] for d in keep])
    np.testing.assert_array_equal(merged[0 : len(merged)], want)  # copied, not re-encoded
    nothing = gather([(empty, np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64))])
    assert len(nothing) == 0


def test_int8_segments_of_a_shard_share_a_scale() -> None:
    rng = np.random.default_rng(10)
    x, _ = _corpus(rng)
    a = encode(x, "int8")
    assert isinstance(a, Int8Tokens)
    inside = encode(0.5 * x, "int8", reference=a)
    assert isinstance(inside, Int8Tokens) and np.array_equal(inside.scale, a.scale)
    beyond = encode(2.0 * x, "int8", reference=a)  # does not fit: a larger scale
    assert isinstance(beyond, Int8Tokens) and np.all(beyond.scale >= a.scale)
    assert np.all(np.abs(beyond[0 : len(beyond)] - 2.0 * x) <= beyond.scale / 2 + 1e-6)


def test_centroid_count_follows_the_segment_size() -> None:
    assert tokencodec.centroid_count(100) == 1
    assert tokencodec.centroid_count(65_536) == 256
    assert tokencodec.centroid_count(10**9) == tokencodec.MAX_CENTROIDS


# --------------------------------------------------------------------------- the engine


def _codec_spec(kind: str, bits: int, dim: int, **extra: Any) -> Any:
    codec: dict[str, Any] = {"kind": kind, **extra}
    if bits:
        codec["bits"] = bits
    return make_spec(
        [{"name": "v", "kind": "multi", "dim": dim, "metric": "cosine", "codec": codec}]
    )


@pytest.mark.parametrize(("kind", "bits"), [("int8", 0), ("residual", 4)])
def test_engine_recall_persistence_and_merges(tmp_path: Path, kind: str, bits: int) -> None:
    rng = np.random.default_rng(5)
    dim, n = 32, 1200
    docs = clustered_docs(rng, n, dim, min_len=8)
    truth = {uid(i): d for i, d in enumerate(docs)}
    spec = _codec_spec(kind, bits, dim)
    knobs = {
        "seal_threshold_tokens": 4_000,
        "brute_force_max_tokens": 2_000,
        "candidates_per_token": 64,
    }
    engine = open_engine(tmp_path, spec, **knobs)
    for s in range(0, n, 200):
        engine.upsert(batch(range(s, s + 200), {"v": docs[s : s + 200]}))
        drain(engine)
    seg_dirs = list((tmp_path / "segments").glob("seg-*")) or list(tmp_path.rglob("seg-*"))
    assert any((d / "codec-v.npz").exists() for d in seg_dirs)
    queries = [noisy_query(rng, docs[int(rng.integers(n))]) for _ in range(25)]
    recalls, before = [], []
    for q in queries:
        hits = engine.search(VectorSearch("v", q, 10)).hits
        before.append([(h.uuid, h.score) for h in hits])
        want = {u for u, _ in exact_top(q, truth, 10)}
        recalls.append(len(want & {h.uuid for h in hits}) / 10)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)
    # the best documents were re-ranked on the kept originals: their scores are exact MaxSim
    q = queries[0]
    for uuid, score in before[0]:
        want_score = maxsim_reference(q, [truth[uuid]])[0]
        assert score == pytest.approx(want_score, rel=1e-5, abs=1e-5)
    # an exact search scores the originals, not the codes: the float ranking itself
    got = [(h.uuid, h.score) for h in engine.search(VectorSearch("v", q, 10, exact=True)).hits]
    want = exact_top(q, truth, 10)
    assert [u for u, _ in got] == [u for u, _ in want]
    # fetch reads the kept originals: the values as written, not the decoded codes
    obj = engine.get(uid(7), include_vectors=True)
    assert obj is not None and obj.vectors is not None and obj.lossy == ()
    np.testing.assert_array_equal(obj.vectors["v"], docs[7])
    engine.close()
    with contextlib.closing(open_engine(tmp_path, spec, **knobs)) as again:
        for q, want_hits in zip(queries, before, strict=True):
            got = [(h.uuid, h.score) for h in again.search(VectorSearch("v", q, 10)).hits]
            assert [u for u, _ in got] == [u for u, _ in want_hits]
            np.testing.assert_allclose([s for _, s in got], [s for _, s in want_hits], rtol=1e-6)


def test_without_originals_fetch_says_lossy_and_catch_up_agrees(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    dim = 16
    docs = clustered_docs(rng, 300, dim, min_len=8)
    spec = _codec_spec("residual", 2, dim, originals=False)
    engine = open_engine(tmp_path, spec, seal_threshold_tokens=1_000)
    engine.upsert(batch(range(300), {"v": docs}))
    drain(engine)
    assert not list(tmp_path.rglob("orig-v.*"))
    obj = engine.get(uid(3), include_vectors=True)
    assert obj is not None and obj.vectors is not None and obj.lossy == ("v",)
    assert obj.vectors["v"].shape == docs[3].shape
    assert not np.array_equal(obj.vectors["v"], docs[3])
    exact = StoredObject(obj.uuid, obj.properties, {"v": docs[3]})
    # a replica holding the written values agrees with one holding the decoded codes …
    assert object_digest(obj).same(object_digest(exact))
    # … but not with a different vector or different properties
    other = StoredObject(obj.uuid, obj.properties, {"v": docs[3][:-1]})
    assert not object_digest(obj).same(object_digest(other))
    assert not object_digest(obj).same(
        object_digest(StoredObject(obj.uuid, {"x": 1}, {"v": docs[3]}))
    )
    engine.close()


def test_coded_segments_are_smaller_on_what_queries_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    dim = 64
    docs = clustered_docs(rng, 400, dim, min_len=16)
    sizes = {}
    for kind in ("float32", "residual"):
        root = tmp_path / kind
        spec = make_spec([{"name": "v", "kind": "multi", "dim": dim, "codec": kind}])
        engine = open_engine(root, spec, seal_threshold_tokens=1_000)
        engine.upsert(batch(range(400), {"v": docs}))
        drain(engine)
        engine.close()
        sizes[kind] = sum(p.stat().st_size for p in root.rglob("vec-v.arrow"))
    assert sizes["residual"] < sizes["float32"] / 5


# --------------------------------------------------------------------------- the spec


def _vec(**kw: Any) -> NamedVectorSpec:
    return NamedVectorSpec.from_dict({"name": "v", "dim": 8, **kw})


def test_codec_spec_forms_and_defaults() -> None:
    assert _vec().codec == CodecSpec("float32")
    assert _vec(dtype="float16").codec == CodecSpec("float16")
    f16 = _vec(codec="float16")
    assert f16.dtype == "float16" and f16.codec.kind == "float16"
    assert _vec(codec="residual").codec == CodecSpec("residual", 4, True)
    assert _vec(codec={"kind": "residual", "bits": 2, "originals": False}).codec == CodecSpec(
        "residual", 2, False
    )
    int8 = _vec(codec="int8", dtype="float16")
    assert int8.dtype == "float16" and int8.codec.lossy
    for v in (int8, _vec(codec={"kind": "residual", "bits": 2}), f16):
        assert NamedVectorSpec.from_dict(v.to_dict()) == v


@pytest.mark.parametrize(
    ("codec", "dtype", "needle"),
    [
        ("zstd", None, "codec kind"),
        ({"kind": "residual", "bits": 3}, None, "bits"),
        ({"kind": "int8", "bits": 4}, None, "residual codec only"),
        ({"kind": "residual", "originals": "yes"}, None, "originals"),
        ({"kind": "residual", "level": 1}, None, "level"),
        ("float16", "float32", "conflicts"),
        (7, None, "codec must be"),
    ],
)
def test_bad_codecs_are_rejected(codec: Any, dtype: str | None, needle: str) -> None:
    raw: dict[str, Any] = {"name": "v", "dim": 8, "codec": codec}
    if dtype:
        raw["dtype"] = dtype
    with pytest.raises(InvalidInput, match=needle):
        NamedVectorSpec.from_dict(raw)
