"""Local mode as fusionrec.store tunes it: commits a run (batched_commits), read back from its
SQLite files by a second connection, which sees only what was committed; scoring in float32."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient, models

from fusionrec import store
from fusionrec.settings import Settings

DOT = models.Distance.DOT


def on_disk(root: Path, collection: str) -> int:
    with sqlite3.connect(root / "collection" / collection / "storage.sqlite") as c:
        return c.execute("SELECT count(*) FROM points").fetchone()[0]


def point(i: int) -> models.PointStruct:
    return models.PointStruct(id=i, vector={}, payload={"i": i})


def test_a_run_is_committed_before_the_next_collection_is_written(tmp_path: Path) -> None:
    client = QdrantClient(path=str(tmp_path))
    for name in ("a", "b"):
        client.create_collection(name, vectors_config={})
    store.fast_local_commits(client)
    with store.batched_commits(client):
        client.upsert("a", [point(1), point(2)])
        assert on_disk(tmp_path, "a") == 0  # held
        with store.batched_commits(client):  # nested: still one batch
            client.upsert("b", [point(1)])
        # The run on "a" was committed before "b" was written; "b" waits for the end.
        assert (on_disk(tmp_path, "a"), on_disk(tmp_path, "b")) == (2, 0)
        client.upsert("a", [point(3)])
        assert (on_disk(tmp_path, "a"), on_disk(tmp_path, "b")) == (2, 1)
    assert on_disk(tmp_path, "a") == 3
    client.upsert("a", [point(4)])  # outside a batch: a commit a point, as local mode does
    assert on_disk(tmp_path, "a") == 4
    client.close()


def test_what_a_failed_batch_wrote_is_committed_too(tmp_path: Path) -> None:
    """Memory and disk agree after a failure: local mode has applied the writes in memory."""
    client = QdrantClient(path=str(tmp_path))
    client.create_collection("a", vectors_config={})
    store.fast_local_commits(client)
    with pytest.raises(RuntimeError), store.batched_commits(client):
        client.upsert("a", [point(1)])
        raise RuntimeError("the batch failed after a write")
    assert on_disk(tmp_path, "a") == 1
    client.close()
    reopened = QdrantClient(path=str(tmp_path))
    assert [p.id for p in reopened.scroll("a")[0]] == [1]
    reopened.close()


def test_local_mode_scores_in_float32_and_answers_the_same(tmp_path: Path) -> None:
    """store.connect casts what local mode reloads as float64, and its query vectors, to float32:
    the same answers and stored values, without casting a whole matrix per query."""
    from qdrant_client.local.local_collection import LocalCollection

    settings = Settings(data_dir=tmp_path)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((50, 8)).astype(np.float32)
    client = store.connect(settings)
    client.create_collection("v", vectors_config={"x": models.VectorParams(size=8, distance=DOT)})
    client.upsert("v", models.Batch(ids=list(range(50)), vectors={"x": matrix.tolist()}))
    client.close()
    client = store.connect(settings)  # reloaded from disk
    assert client._client.collections["v"].vectors["x"].dtype == np.float32
    _, query = LocalCollection._resolve_query_vector_name(("x", [0.5, 0.25]))
    assert query.dtype == np.float32
    q = rng.standard_normal(8).astype(np.float32)
    found = client.query_points("v", query=q.tolist(), using="x", limit=10).points
    assert [p.id for p in found] == list(np.argsort(-(matrix @ q))[:10])
    stored = client.retrieve("v", [7], with_vectors=True)[0].vector
    assert np.array_equal(np.asarray(stored["x"], dtype=np.float32), matrix[7])
    client.close()
