"""Benchmarks measure what they name: their job files switch every other stage off, whatever the
defaults become (a default that turned on embeddings and IFD once made `make bench` run for hours)."""
import dataclasses

import numpy as np
import pytest

from benchmarks.common import pinned_job, switches
from curate import config
from curate.settings import Job


def _enabled_flags(settings, prefix=""):
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name == "enabled":
            out[prefix.rstrip(".")] = value
        elif dataclasses.is_dataclass(value):
            out.update(_enabled_flags(value, f"{prefix}{f.name}."))
    return out


def test_a_pinned_job_switches_on_only_what_it_names(tmp_path):
    job = pinned_job(("dedup.near",), output=str(tmp_path / "out"), dedup={"near": {"threshold": 0.7}},
                     inputs=[{"source": "s", "path": str(tmp_path / "x.jsonl")}])
    (tmp_path / "x.jsonl").write_text("")
    cfg = config.validate(job)
    flags = _enabled_flags(cfg)
    assert set(flags) == set(switches()) and len(flags) >= 7  # every stage switch of the job is named
    assert {k for k, v in flags.items() if v} == {"dedup.near"}
    assert cfg.dedup.near.threshold == 0.7


def test_an_unknown_switch_is_refused():
    with pytest.raises(ValueError, match="no such stage switch: dedup.fuzzy"):
        pinned_job(("dedup.fuzzy",))


def test_switches_follow_the_settings():
    assert set(switches()) == set(_enabled_flags(Job()))


def test_the_scale_benchmark_reads_the_task_count_the_dask_runner_logs():
    pytest.importorskip("distributed")
    from benchmarks.scale import _graph_tasks
    from pipelines.dask_runner import GRAPH_LINE

    assert _graph_tasks("x\n2026 INFO " + GRAPH_LINE % 67643 + "\ny") == 67643
    assert _graph_tasks("no dask here") is None


def test_the_plain_script_keeps_the_longest_of_near_copies_and_the_first_of_exact_ones():
    from benchmarks.plain_pipeline import exact_keep, near_keep

    assert exact_keep(["Say  HI", "say hi", "other"], ["Yes.", "yes.", "yes."]).tolist() == [True, False, True]
    base = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat all day long"
    texts = [base, base + " indeed", "a completely different sentence about numbers and sums of many terms"]
    assert near_keep(texts, np.array([10, 30, 5]), threshold=0.7).tolist() == [False, True, True]
    assert near_keep(texts[2:], np.array([5])).tolist() == [True]


def test_the_plain_script_agrees_with_curate_run_on_a_scale_pool(job_dir):
    """The throughput benchmark's baseline does the same work: the same counts as `curate run`
    (near duplicates may differ by the odd row whose tie the two break differently)."""
    import json

    import yaml

    from benchmarks.plain_pipeline import main
    from benchmarks.scale import SOURCES, make_pool
    from tests.conftest import load_manifest, run_cli

    make_pool(600, str(job_dir))
    plain = main(str(job_dir), str(job_dir / "plain.parquet"))
    job = pinned_job(("dedup.exact", "dedup.near"), name="t", output="out",
                     inputs=[{"source": s, "path": f"{s}.jsonl"} for s in SOURCES],
                     select={"policy": "random", "budget": {"fraction": 0.25}})
    (job_dir / "job.yaml").write_text(yaml.safe_dump(job))
    assert run_cli("run", "job.yaml") == 0
    counts = load_manifest("out")["counts"]
    assert plain["rows_in"] == counts["rows_in"] == 600
    assert plain["exact_duplicate"] == counts["dropped"]["exact_duplicate"] > 30
    assert abs(plain["near_duplicate"] - counts["dropped"]["near_duplicate"]) <= 2
    assert abs(plain["selected"] - counts["selected"]) <= 1, json.dumps([plain, counts])
