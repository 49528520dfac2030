"""The cached-inference block alone (TestPipeline + assert_that, a fake handler): misses go to the
model, hits come from the cache with the same values, new results are in the cache as soon as they
are computed, and a run stopped half way keeps what it scored."""
import glob
import math
import os
import pickle

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from curate import cache_store
from curate.scoring.ifd import COLUMNS as IFD_COLUMNS
from pipelines.cached import CachedInference
from pipelines.score import score_text_hash
from tests.fakes import FakeIFDHandler, fake_scores

SCORE_FIELDS = IFD_COLUMNS.fields()
COLUMNS = list(IFD_COLUMNS.names)


def records(n: int, empty_every: int = 5) -> list[dict]:
    rows = []
    for i in range(n):
        response = "" if i % empty_every == 4 else f"answer {i} " + "word " * (i % 7)
        rows.append({"id": f"r{i}", "source": "t", "_instruction": f"question {i}?", "_input": "",
                     "response": response})
    return rows


def _keep(path):
    """An assert_that matcher that saves what it got (the matcher runs inside the pipeline)."""
    def match(actual):
        with open(path, "wb") as fh:
            pickle.dump(list(actual), fh)
    return match


def _load(path):
    with open(path, "rb") as fh:
        return pickle.load(fh)


def run_block(rows, cache, handler, run_id="run1"):
    """The output records and the summed stats of one pipeline over ``rows``."""
    where = os.path.join(os.path.dirname(cache), f"seen-{run_id}")
    with BeamTestPipeline(runner="FnApiRunner") as p:
        res = (p | beam.Create(rows)
               | CachedInference("score", handler, score_text_hash, SCORE_FIELDS, cache, cache_store.files(cache),
                                 run_id))
        assert_that(res["records"], _keep(where + ".records"), label="Records")
        assert_that(res["stats"] | beam.CombinePerKey(sum), _keep(where + ".stats"), label="Stats")
    return _load(where + ".records"), dict(_load(where + ".stats"))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


def test_every_row_scored_once_then_read_back_identical(tmp_path):
    rows, cache = records(12), str(tmp_path / "cache")
    first, stats = run_block(rows, cache, FakeIFDHandler())
    assert len(first) == 12 and stats["score.model_rows"] == 12 and "score.cached" not in stats
    assert len(cache_store.files(cache)) >= 1  # written while the stage ran, no driver step needed
    again, stats2 = run_block(rows, cache, FakeIFDHandler(fail_after=0), "run2")  # a model call would raise
    assert stats2["score.cached"] == 12 and stats2.get("score.model_rows", 0) == 0
    by_id = {r["id"]: r for r in again}
    for r in first:
        expected = fake_scores(r)
        for c in COLUMNS:
            assert same(r[c], expected[c]) and same(by_id[r["id"]][c], r[c]), (r["id"], c)
    assert any(r["ifd_status"] == "empty_response" and math.isnan(r["ifd_loss"]) for r in again)


def test_graph_with_assert_that(tmp_path):
    rows = records(6)
    expected = [(r["id"], fake_scores(r)["ifd_status"]) for r in rows]
    with BeamTestPipeline(runner="FnApiRunner") as p:
        res = p | beam.Create(rows) | CachedInference("score", FakeIFDHandler(), score_text_hash, SCORE_FIELDS)
        assert_that(res["records"] | beam.Map(lambda r: (r["id"], r["ifd_status"])), equal_to(expected))


def test_stopped_half_way_keeps_its_shards_and_the_rerun_scores_only_the_rest(tmp_path):
    rows, cache = records(20, empty_every=1000), str(tmp_path / "cache")
    handler = FakeIFDHandler(batch=4, fail_after=8)
    block = CachedInference("score", handler, score_text_hash, SCORE_FIELDS, cache, [], "killed")
    block_flush = 4
    import pipelines.cached as cached

    orig = cached.cache_store.ShardWriter.__init__

    def small_shards(self, folder, schema, run_id, rows=64, seconds=30.0):
        orig(self, folder, schema, run_id, rows=block_flush, seconds=seconds)

    cached.cache_store.ShardWriter.__init__ = small_shards
    try:
        with pytest.raises(Exception, match="stopped on purpose"):
            with BeamTestPipeline(runner="FnApiRunner") as p:
                p | beam.Create(rows) | block
    finally:
        cached.cache_store.ShardWriter.__init__ = orig
    kept = sum(pq.read_metadata(f).num_rows for f in cache_store.files(cache))
    assert kept == 8  # the two batches finished before the failure
    assert not glob.glob(os.path.join(cache, ".*"))  # no half-written file left visible
    out, stats = run_block(rows, cache, FakeIFDHandler(batch=4), "rerun")
    assert stats["score.cached"] == 8 and stats["score.model_rows"] == 12
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    assert cache_store.compact(cache, "rerun") == 12
    assert sum(pq.read_metadata(f).num_rows for f in cache_store.files(cache)) == 20
