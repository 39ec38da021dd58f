"""Server-side token pooling (a named vector's ``pooling``): at import, each object's tokens are
clustered hierarchically and only the cluster means are stored — ``factor`` 2 keeps about half
the tokens, so the vector costs half the storage and half the scoring work.

As in Answer.AI's token pooling for ColBERT / ColPali: Ward linkage over the object's token
vectors (Euclidean; for the unit rows of a cosine vector that orders merges like cosine
distance), cut into ``ceil(n / factor)`` clusters, each replaced by its mean (renormalised for a
cosine vector). Clusters are stored in the order of their first token, so the result depends on
the tokens alone: every replica, and a re-import, stores the same rows.

Pooling happens once, in the coordinator's write path (``pool_batch``), before the batch is
routed: replicas and replication catch-up copy pooled rows and never pool again. Objects with at
most ``min_tokens`` tokens (and single vectors) are stored as they are. Long objects are pooled
in consecutive windows of ``WINDOW`` tokens (Ward needs n² memory; neighbouring tokens — patches
of one page region, words of one passage — are the ones that merge anyway).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from cluster.spec import CollectionSpec, NamedVectorSpec
from cluster.types import F32, ObjectBatch, VectorColumn

WINDOW = 1024


def pool_tokens(tokens: F32, factor: int, *, cosine: bool, min_tokens: int = 0) -> F32:
    """``tokens`` (n, dim) pooled to ``ceil(n / factor)`` rows (see the module docstring)."""
    n = int(tokens.shape[0])
    if factor <= 1 or n <= max(1, min_tokens):
        return tokens
    parts = [_pool_window(tokens[lo : lo + WINDOW], factor, cosine) for lo in range(0, n, WINDOW)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _pool_window(tokens: F32, factor: int, cosine: bool) -> F32:
    n = int(tokens.shape[0])
    k = max(1, math.ceil(n / factor))
    if k >= n:
        return tokens
    x = np.asarray(tokens, dtype=np.float64)
    labels = fcluster(linkage(x, method="ward"), t=k, criterion="maxclust")
    # clusters in the order of their first token (fcluster's numbering is not)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    dense = rank[inverse.reshape(-1)]
    sums = np.zeros((len(first), x.shape[1]), dtype=np.float64)
    np.add.at(sums, dense, x)
    means = sums / np.bincount(dense, minlength=len(first))[:, None]
    if cosine:
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        means = means / norms
    return means.astype(np.float32)


def pooled_vectors(spec: CollectionSpec) -> list[NamedVectorSpec]:
    """The named vectors of ``spec`` that pool their tokens."""
    return [v for v in spec.vectors if v.multi and v.pooling.factor > 1]


def pool_batch(spec: CollectionSpec, batch: ObjectBatch) -> ObjectBatch:
    """``batch`` with every pooled named vector's objects pooled (the others untouched)."""
    pooled = [v for v in pooled_vectors(spec) if v.name in batch.vectors]
    if not pooled:
        return batch
    columns = dict(batch.vectors)
    for vec in pooled:
        col = columns[vec.name]
        mats: list[F32 | None] = []
        for i in range(col.n_objects):
            rows = col.rows(i)
            mats.append(
                None
                if rows.shape[0] == 0
                else pool_tokens(
                    rows,
                    vec.pooling.factor,
                    cosine=vec.metric == "cosine",
                    min_tokens=vec.pooling.min_tokens,
                )
            )
        columns[vec.name] = VectorColumn.from_matrices(mats, col.dim)
    return ObjectBatch(batch.uuids, batch.properties, columns)
