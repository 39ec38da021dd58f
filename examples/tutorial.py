"""The multi-vector tutorial flow against a running `colshard serve` (default
http://127.0.0.1:8080, or $COLSHARD_URL): a collection whose multi-vector comes from the local
ColBERT vectorizer, plain-text import, fetching an object's (n, dim) embedding, then near_text,
hybrid, near_vector with a multi-vector query, and hybrid with a manual multi-vector.

    python examples/tutorial.py
"""

from __future__ import annotations

import os

import numpy as np

from gateway.client import Client, NamedVector, Property

URL = os.environ.get("COLSHARD_URL", "http://127.0.0.1:8080")
NAME = os.environ.get("COLSHARD_TUTORIAL_COLLECTION", "DemoCollection")

texts = [
    "A very nice cat",
    "The quick brown fox jumps over the lazy dog",
    "Late interaction compares every query token with every document token",
    "ColBERT represents a passage with one vector per token",
    "The weather in Lisbon is sunny today",
]

with Client(URL, timeout_s=600) as client:
    if client.collections.exists(NAME):
        client.collections.delete(NAME)
    # Step 1: a collection with a ColBERT (multi-vector) named vector.
    collection = client.collections.create(
        NAME,
        properties=[Property("text", "text")],
        vectors=[NamedVector.text2colbert_local("multi_vector", source_properties=["text"])],
    )
    # Step 2: import plain text; the vectorizer makes the embeddings.
    result = collection.data.insert_many([{"properties": {"text": t}} for t in texts])
    print(f"imported {result.n_ok} objects, {result.n_failed} failed")

    # Confirm the embedding shape.
    for obj in collection.query.fetch_objects(limit=3, include_vector=True):
        embedding = obj.vector["multi_vector"]
        print(f"This embedding's shape is {np.asarray(embedding).shape}")

    # Step 3.1: near_text.
    response = collection.query.near_text("A big fat cat", limit=3, return_metadata=["score"])
    for o in response.objects:
        print("near_text:", o.properties["text"], round(o.metadata["score"], 3))

    # Step 3.2: hybrid (BM25 + vector).
    response = collection.query.hybrid("token vectors", alpha=0.5, limit=3)
    for o in response.objects:
        print("hybrid:", o.properties["text"])

    # Step 3.3: near_vector with a multi-vector query (here: an object's own embedding rows).
    cat = collection.query.bm25("cat", limit=1).objects[0]
    query_vector = np.asarray(
        collection.query.fetch_object_by_id(cat.uuid, include_vector=True).vector["multi_vector"]
    )[:3]
    response = collection.query.near_vector(query_vector, target_vector="multi_vector", limit=2)
    print("near_vector:", [o.properties["text"] for o in response.objects])

    # Step 3.4: hybrid with a manual multi-vector.
    response = collection.query.hybrid("cat", vector=query_vector, alpha=0.75, limit=2)
    print("hybrid (manual vector):", [o.properties["text"] for o in response.objects])
