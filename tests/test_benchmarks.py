"""Benchmarks measure what they name: their job files switch every other stage off, whatever the
defaults become (a default that turned on embeddings and IFD once made `make bench` run for hours)."""
import dataclasses

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
