"""Each stage's PTransform alone, under Beam's TestPipeline with assert_that (as Beam tests its own
inference transforms): the graph logic in seconds, model stages with fake handlers (tests/fakes.py).
The real models and whole jobs have their own tests."""
import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from curate.records import RowSpec, convert
from curate.settings import Cluster, Embed, Job, SemanticDedup, build
from curate.stats import merge
from tests.fakes import FakeEmbedHandler, FakeIFDHandler, fake_scores


def pipeline():
    return BeamTestPipeline(runner="FnApiRunner")


def job(**sections) -> Job:
    base = {"output": "o", "inputs": [{"source": "s", "path": "unused"}]}
    return build(Job, {**base, **sections})


def records(rows: list[dict], source: str = "s") -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        kind, rec = convert(row, RowSpec(source=source), "mem.jsonl", i + 1)
        assert kind == "record", rec
        out.append(rec)
    return out


ROWS = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}: " + "detail " * i}
        for i in range(8)]


def stats_of(stats):
    """The summed stats as one (key, value) list, for assert_that."""
    return stats | "GroupStats" >> beam.GroupByKey() | "MergeStats" >> beam.MapTuple(lambda k, v: (k, merge(k, v)))


def has_stat(key, value):
    def check(actual):
        got = dict(actual)
        assert got.get(key) == value, (key, got.get(key), got)
    return check


def test_exact_dedup_keeps_one_of_a_group():
    from pipelines.transforms import ExactDedup

    recs = records(ROWS[:3] + [dict(ROWS[0], instruction="  QUESTION number 0?")])  # same after normalizing
    with pipeline() as p:
        out = p | beam.Create(recs) | ExactDedup(job())
        assert_that(out["records"] | beam.Map(lambda r: r.get("drop_reason")),
                    equal_to([None, None, None, "exact_duplicate"]))
        assert_that(stats_of(out["stats"]), has_stat("exact_dedup.dropped@s", 1), label="Stats")


def test_exact_dedup_after_rewrites_looks_only_at_rows_still_in_play():
    from pipelines.transforms import ExactDedup

    recs = records(ROWS[:3] + [ROWS[0], ROWS[1]])
    recs[3]["drop_reason"], recs[3]["exact_dup_of"] = "exact_duplicate", recs[0]["id"]  # the first pass's
    recs[4].update(drop_reason="near_duplicate", exact_dup_of=None)  # any earlier drop keeps its reason
    recs[2].update(prompt=recs[0]["prompt"], response=recs[0]["response"])  # a rewrite made a copy
    with pipeline() as p:
        out = p | beam.Create(recs) | ExactDedup(job(), after_rewrite=True)
        keep, lose = sorted([recs[0]["id"], recs[2]["id"]])
        assert_that(out["records"] | beam.Map(lambda r: (r["id"], r.get("drop_reason"), r["exact_dup_of"])),
                    equal_to([(keep, None, None), (lose, "exact_duplicate", keep), (recs[1]["id"], None, None),
                              (recs[3]["id"], "exact_duplicate", recs[0]["id"]),
                              (recs[4]["id"], "near_duplicate", None)]))
        assert_that(stats_of(out["stats"]), has_stat("exact_dedup_rewritten.dropped@s", 1), label="Stats")


def test_near_dedup_marks_a_near_copy_and_passes_dropped_rows_around():
    from pipelines.near_dedup import NearDedup

    long = "the quick brown fox jumps over the lazy dog near the river bank in the morning sun " * 3
    rows = [{"instruction": "Tell a story.", "input": "", "output": long},
            {"instruction": "Tell a story.", "input": "", "output": long + " again"},
            {"instruction": "Something else entirely", "input": "", "output": "An unrelated answer here."}]
    recs = records(rows)
    recs[2]["drop_reason"] = "exact_duplicate"  # dropped before: goes around with null columns
    cfg = job(dedup={"near": {"threshold": 0.7, "bands": 16, "rows": 4, "seed": 0}})
    with pipeline() as p:
        out = p | beam.Create(recs) | NearDedup(cfg)
        assert_that(out["records"] | beam.Map(lambda r: (r.get("drop_reason"), r["near_dup_of"] is not None)),
                    equal_to([(None, False), ("near_duplicate", True), ("exact_duplicate", False)]))


def test_a_stage_that_is_off_gives_null_columns_and_no_stats():
    from pipelines.near_dedup import NearDedup

    with pipeline() as p:
        out = p | beam.Create(records(ROWS[:2])) | NearDedup(job(dedup={"near": {"enabled": False}}))
        assert_that(out["records"] | beam.Map(lambda r: (r["near_dup_cluster"], r["near_dup_of"])),
                    equal_to([(None, None), (None, None)]))
        assert_that(out["stats"], equal_to([]), label="NoStats")
        assert_that(out["reports"], equal_to([]), label="NoReports")


def test_embed_with_a_fake_handler_and_its_cache(tmp_path):
    from pipelines.embed_cluster import Embed as EmbedStage

    recs = records(ROWS)
    rt = {"device": "cpu", "dtype": "float32", "linear": "torch", "dim": 8, "cache": str(tmp_path / "c"),
          "cache_files": []}
    with pipeline() as p:
        out = p | beam.Create(recs) | EmbedStage(Embed(), rt, "r1", FakeEmbedHandler())
        assert_that(out["records"] | beam.Map(lambda r: (r["id"], round(float(np.linalg.norm(r["_vector"])), 5))),
                    equal_to([(r["id"], 1.0) for r in recs]))
        assert_that(stats_of(out["stats"]), has_stat("embed.model_rows", 8), label="Stats")
    from curate import cache_store

    rt["cache_files"] = cache_store.files(rt["cache"])
    assert rt["cache_files"]
    with pipeline() as p:
        out = p | beam.Create(recs) | EmbedStage(Embed(), rt, "r2", FakeEmbedHandler())
        assert_that(stats_of(out["stats"]), has_stat("embed.cached", 8), label="Stats")


def test_cluster_then_semantic_dedup_on_fake_vectors():
    from pipelines.embed_cluster import Cluster as ClusterStage
    from pipelines.embed_cluster import SemanticDedup as SemanticStage
    from tests.fakes import fake_vector

    recs = records(ROWS + [dict(ROWS[3], input="x")])  # same words but one: the same fake vector family
    for r in recs:
        r["_vector"] = fake_vector(r["response"])
    with pipeline() as p:
        clu = p | beam.Create(recs) | ClusterStage(Cluster(k=2, seed=0), False)
        sem = clu["records"] | SemanticStage(SemanticDedup(eps=0.01))
        assert_that(clu["records"] | beam.Map(lambda r: r["cluster_id"] in (0, 1)), equal_to([True] * 9))
        assert_that(sem["records"] | beam.Filter(lambda r: r["semantic_dup_of"] is not None) | beam.Map(
            lambda r: r["drop_reason"]), equal_to(["semantic_duplicate"]), label="OneDup")


def test_score_with_a_fake_handler_counts_ifd_ge_1_and_leaves_dropped_rows_null():
    from pipelines.score import Score

    recs = records(ROWS)
    recs[0]["drop_reason"] = "exact_duplicate"
    expected_ge_1 = sum(1 for r in recs[1:] if fake_scores(r)["ifd_loss"] >= 1)
    with pipeline() as p:
        out = p | beam.Create(recs) | Score(job(), {}, "r", FakeIFDHandler())
        assert_that(out["records"] | beam.Map(lambda r: (r["id"], r["ifd_status"])),
                    equal_to([(recs[0]["id"], None)] + [(r["id"], "ok") for r in recs[1:]]))
        assert_that(stats_of(out["stats"]), has_stat("score.ifd_ge_1", expected_ge_1), label="Stats")
    assert 0 < expected_ge_1 < 7


def test_select_applies_the_policy_to_live_rows_only():
    from pipelines.select import Select

    recs = records(ROWS)
    for r in recs:
        r.update(fake_scores(r))
        r.update(cluster_id=None, cluster_sim=None)
    recs[0]["drop_reason"] = "exact_duplicate"
    cfg = job(select={"policy": "superfiltering", "budget": {"rows": 3}}, embed={"enabled": False},
              cluster={"enabled": False}, dedup={"semantic": {"enabled": False}})
    live = sorted((r for r in recs[1:] if fake_scores(r)["ifd_loss"] < 1), key=lambda r: -r["ifd_loss"])
    with pipeline() as p:
        out = p | beam.Create(recs) | Select(cfg)
        assert_that(out["records"] | beam.Filter(lambda r: r["selected"]) | beam.Map(lambda r: (r["id"], r["rank"])),
                    equal_to([(r["id"], i + 1) for i, r in enumerate(live[:3])]))


def test_write_outputs_counts_every_row(tmp_path):
    import pyarrow.parquet as pq

    from pipelines.transforms import WriteOutputs

    recs = records(ROWS[:4])
    for i, r in enumerate(recs):
        r.update(selected=i < 2, rank=i + 1 if i < 2 else None, drop_reason=None if i < 2 else "x:y")
    with pipeline() as p:
        out = {"annotated": p | "A" >> beam.Create(recs), "rejects": p | "R" >> beam.Create([])} | WriteOutputs(
            str(tmp_path))
        assert_that(stats_of(out["stats"]), has_stat("write.dropped:x:y@s", 2))
    assert pq.read_table(tmp_path / "annotated").num_rows == 4
    assert pq.read_table(tmp_path / "selected").num_rows == 2


@pytest.mark.parametrize("values,key,expected", [([3, 1, 2], "x.model_start_t", 1), ([3, 1, 2], "x.model_end_t", 3),
                                                 ([3, 1, 2], "x.rows@s", 6)])
def test_stats_merge_times_by_min_and_max(values, key, expected):
    assert merge(key, values) == expected and not math.isnan(expected)
