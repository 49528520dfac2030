"""Stat keys are valid by construction: every metric any stage declares builds a key the manifest
reads back, and a stage cannot count a metric it does not declare (issue 12: a digit in
``ifd_ge_1`` crashed the manifest after the whole scoring stage)."""
import importlib
import pkgutil

import pytest

import pipelines
from curate.manifest import summarize
from curate.stats import Progress, parse_stat_key, stat_key
from pipelines.stage import StageFn


def all_stage_fns() -> list[type]:
    for mod in pkgutil.iter_modules(pipelines.__path__):
        importlib.import_module(f"pipelines.{mod.name}")
    found, todo = [], [StageFn]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def test_every_declared_metric_makes_a_key_the_manifest_reads():
    fns = all_stage_fns()
    assert len(fns) >= 15
    stats = {}
    for cls in fns:
        assert cls.metrics, f"{cls.__name__} declares no metrics"
        for metric in cls.declared_metrics():
            for reason, source in ((None, None), ("a:b@c%d", None), ("x", "src@host:1"), (None, "s")):
                key = stat_key(cls.stage, metric, reason, source)
                k = parse_stat_key(key)
                assert (k["stage"], k["metric"], k["reason"], k["source"]) == (cls.stage, metric, reason, source)
                stats[key] = 1
    assert summarize(stats)["stages"]["score"]["ifd_ge_1"] == 2  # the keys with no reason
    assert summarize({"score.ifd_ge_1": 3})["stages"]["score"]["ifd_ge_1"] == 3


def test_near_dedup_histogram_keys_parse():
    from curate.dedup.near import size_histogram
    from pipelines.near_dedup import size_stat

    keys = dict(size_stat(size, n) for size, n in size_histogram({"a": "a", "b": "a", "c": "c"}).items())
    assert keys and all(parse_stat_key(k)["metric"] == "clusters" for k in keys)


@pytest.mark.parametrize("stage,metric", [("Score", "rows"), ("score", "ge-1"), ("score", "1st"), ("", "rows")])
def test_invalid_names_fail_when_the_key_is_built(stage, metric):
    with pytest.raises(ValueError, match="not valid in a stat key"):
        stat_key(stage, metric)


def test_an_undeclared_metric_fails_in_the_stage():
    class Fn(StageFn):
        stage = "demo"
        metrics = ("rows",)

    fn = Fn()
    fn.setup()
    fn.start_bundle()
    fn.count("rows")
    with pytest.raises(ValueError, match="does not declare"):
        fn.count("rows_ge_1")


def test_progress_line_with_total_and_eta():
    p = Progress("score", total=100)
    p.n, p.start = 25, 0.0
    line = p.line(now=50.0)
    assert line == "score: 25 of 100 rows (0.50 rows/s, ETA 2 min 30 s)"
