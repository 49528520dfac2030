"""The job on a real Dask cluster (``distributed.LocalCluster`` worker processes) through
``pipelines.dask_runner``: the same selection as the in-process runners, the Beam constructs
Beam's own DaskRunner loses (tagged outputs, finish_bundle outputs, several sinks, side inputs),
and one-line errors for runners and schedulers that cannot work."""
import json
import os
import time

import apache_beam as beam
import numpy as np
import pandas as pd
import pytest

from tests.conftest import EXAMPLES, load_manifest, run_cli, without_models, write_job

pytest.importorskip("distributed", reason="dask[distributed] is installed by `make test`")


class _Split(beam.DoFn):
    """Main and tagged outputs, and more of both from finish_bundle."""

    def start_bundle(self):
        self.seen = 0

    def process(self, x, offset):
        self.seen += 1
        yield x + offset
        yield beam.pvalue.TaggedOutput("odd", x) if x % 2 else beam.pvalue.TaggedOutput("even", x)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        yield beam.pvalue.TaggedOutput("bundles", GlobalWindows.windowed_value(self.seen))


def _write(pcoll, path, label):
    return (pcoll | f"{label}All" >> beam.combiners.ToList()
            | f"{label}Json" >> beam.Map(lambda xs: json.dumps(sorted(xs)))
            | f"{label}Write" >> beam.io.WriteToText(path, num_shards=1, shard_name_template=""))


@pytest.mark.parametrize("threads", [1, 2], ids=["two_workers", "one_worker_two_threads"])
def test_the_runner_keeps_tagged_and_finish_bundle_outputs_every_sink_and_side_inputs(tmp_path, threads, caplog):
    import logging
    import re

    from apache_beam.options.pipeline_options import PipelineOptions
    from distributed import LocalCluster

    from pipelines.dask_runner import GRAPH_LINE, DaskRunner

    caplog.set_level(logging.INFO, logger="curate")
    values = list(range(40))  # 40 partitions: the runner puts one element of a Create in each
    cluster = None
    if threads == 1:
        flags = ["--dask_workers=2"]  # a cluster the run starts
    else:  # threads share a worker process: each needs its own DoFn instance (per-bundle state)
        cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=True, dashboard_address=":0")
        flags = [f"--dask_client_address={cluster.scheduler_address}"]
    with beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(flags)) as p:
        offset = p | "Offset" >> beam.Create([1000])
        out = (p | beam.Create(values)
               | beam.ParDo(_Split(), beam.pvalue.AsSingleton(offset)).with_outputs("odd", "even", "bundles",
                                                                                   main="main"))
        _write(out.main, str(tmp_path / "main.json"), "Main")
        _write(out.odd, str(tmp_path / "odd.json"), "Odd")
        _write(out.even | beam.Map(lambda x, total: x * 0 + total, beam.pvalue.AsSingleton(
            out.bundles | beam.CombineGlobally(sum))), str(tmp_path / "even.json"), "Even")
    if cluster is not None:
        cluster.close()
    read = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("main", "odd", "even")}
    assert read["main"] == [x + 1000 for x in values]
    assert read["odd"] == [x for x in values if x % 2]
    assert read["even"] == [40] * 20  # every bundle's count arrived, through a side input
    sent = re.search(re.escape(GRAPH_LINE).replace("%d", r"(\d+)"), caplog.text)
    assert sent and int(sent.group(1)) > len(values)  # said before the (at 1M rows, minute-long) send


class _Partials(beam.CombineFn):
    """(inputs, the most inputs one accumulator took before merging): 100 when each of 4
    partitions of 100 combined its own, 134 when one task took all 400 (Beam's CombineValues
    adds them into three accumulators)."""

    def create_accumulator(self):
        return 0, 0

    def add_input(self, acc, x):
        return acc[0] + 1, max(acc[1], acc[0] + 1)

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum(a for a, _ in accs), max(b for _, b in accs)

    def extract_output(self, acc):
        return acc


def test_combines_are_lifted_so_one_task_gets_one_accumulator_per_partition(tmp_path):
    """A CombineGlobally on Beam's own Dask translation sends every element to one task; here each
    partition combines its own first: 400 inputs reach the end as a few accumulators."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.dask_runner import DaskRunner

    with beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(["--dask_workers=2"])) as p:
        rows = p | beam.Create(range(4)) | beam.FlatMap(lambda i: range(100 * i, 100 * i + 100))  # 4 partitions
        _write(rows | beam.CombineGlobally(_Partials()) | "G" >> beam.Map(list), str(tmp_path / "global.json"), "Global")
        _write(rows | "K" >> beam.Map(lambda x: (x % 3, x)) | beam.CombinePerKey(sum) | "P" >> beam.Map(list),
               str(tmp_path / "per_key.json"), "PerKey")
        _write(rows | "M" >> beam.Map(lambda x: x % 7) | beam.Distinct(), str(tmp_path / "distinct.json"), "Distinct")
    [(inputs, most)] = json.loads((tmp_path / "global.json").read_text())
    assert (inputs, most) == (400, 100)  # each partition combined its own before the shuffle
    assert json.loads((tmp_path / "per_key.json").read_text()) == [
        [k, sum(x for x in range(400) if x % 3 == k)] for k in range(3)]
    assert json.loads((tmp_path / "distinct.json").read_text()) == list(range(7))


def _job(job_dir, name, models: bool, extra=None, select=None):
    cfg = {"output": name, "seed": 0, "sample": {"mode": "random", "n": 5},
           "inputs": [{"source": "alpaca", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
                      {"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"},
                      {"source": "nq", "path": f"{EXAMPLES}/nq_sharegpt_sample.json", "form": "sharegpt",
                       "id_field": "id", "fields": {"conversations": "items"}}],
           "dedup": {"exact": {"scope": "global"}},
           "select": {"policy": "superfiltering_diverse", "params": {"ifd_fraction": 0.5},
                      "budget": {"fraction": 0.5}},
           **(extra or {})}
    if models:
        cfg.setdefault("score", {"ifd": {"max_length": 128}})
    else:  # selection per cluster, the clusters given by the rows (the sample sources carry none)
        grouped = job_dir / "grouped.jsonl"
        rng = np.random.default_rng(0)  # words at random: no two rows are near duplicates
        words = [f"w{n}" for n in range(500)]
        grouped.write_text("".join(json.dumps({"instruction": " ".join(rng.choice(words, 12)),
                                               "output": " ".join(rng.choice(words, 20)),
                                               "group": i % 4 if i % 5 else str(i % 4)}) + "\n" for i in range(24)))
        cfg = without_models({**cfg, "sample": {"mode": "none"}, "inputs": cfg["inputs"] + [
            {"source": "grouped", "path": str(grouped)}], "cluster": {"column": "group"},
            "select": select or {"policy": "random", "budget": {"fraction": 0.5}, "scope": "cluster"}})
    return write_job(job_dir, cfg, f"{name}.yaml")


def _outcome(out):
    ann = pd.read_parquet(f"{out}/annotated").sort_values("id").reset_index(drop=True)
    man = load_manifest(out)
    return ann, man["counts"], sorted(pd.read_parquet(f"{out}/selected").id)


def test_a_job_without_models_on_a_cluster_the_job_starts_matches_both_fnapi_modes(job_dir, monkeypatch):
    from curate.select import scope

    monkeypatch.setattr(scope, "RANK_BUCKET_ROWS", 3)  # the global order in ranges of 3 selected rows
    runs = {"fnapi": [], "multi": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
            "dask": ["--runner=DaskRunner", "--dask_workers=2"],
            "p2p": ["--runner=DaskRunner", "--dask_workers=2", "--dask_shuffle=p2p"]}
    for name, flags in runs.items():
        assert run_cli("run", _job(job_dir, name, models=False), *flags) == 0
    base_ann, base_counts, base_sel = _outcome("fnapi")
    assert base_counts["dropped"]["exact_duplicate"] > 0 and base_counts["dropped"]["near_duplicate"] > 0
    grouped = base_ann[base_ann.source == "grouped"]
    assert len(grouped) == 24 and grouped.drop_reason.fillna("").str.endswith("duplicate").sum() == 0
    assert [int(json.loads(o)["group"]) for o in grouped.original] == grouped.cluster_id.tolist()
    assert base_ann.cluster_id.isna().sum() > 0  # the other sources carry no group
    by_cluster = load_manifest("fnapi")["select"]["by_cluster"]
    assert set(by_cluster) == {"none", "0", "1", "2", "3"} and all(  # half of each cluster, give or take one
        abs(v["selected"] - v["pool"] / 2) <= 1 for v in by_cluster.values())
    for name in ("multi", "dask", "p2p"):
        ann, counts, sel = _outcome(name)
        assert sel == base_sel and counts == base_counts
        cols = ["id", "selected", "rank", "drop_reason", "exact_dup_of", "near_dup_of", "cluster_id"]
        pd.testing.assert_frame_equal(ann[cols], base_ann[cols])
    assert load_manifest("dask")["beam_options"]["runner"] == "DaskRunner"


def test_a_global_selection_decided_range_by_range_on_dask_matches_fnapi(job_dir, monkeypatch):
    """cluster_balanced over the whole pool (keyed: per-group ranges of 3 rows, the global order in
    ranges of 3) on Dask decides, counts and reports what the in-process runner does."""
    from curate.select import scope

    monkeypatch.setattr(scope, "RANK_BUCKET_ROWS", 3)
    select = {"policy": "cluster_balanced", "params": {"quota": "sqrt"}, "budget": {"fraction": 0.5}}
    assert run_cli("run", _job(job_dir, "kfn", models=False, select=select)) == 0
    assert run_cli("run", _job(job_dir, "kdask", models=False, select=select), "--runner=DaskRunner",
                   "--dask_workers=2") == 0
    (base_ann, base_counts, base_sel), (ann, counts, sel) = _outcome("kfn"), _outcome("kdask")
    assert sel == base_sel and counts == base_counts and len(sel) > 10
    cols = ["id", "selected", "rank", "drop_reason", "cluster_id"]
    pd.testing.assert_frame_equal(ann[cols], base_ann[cols])
    assert load_manifest("kdask")["select"] == load_manifest("kfn")["select"]
    assert base_ann.drop_reason.fillna("").str.startswith("cluster_balanced:over_quota").any()


def test_the_models_run_on_a_given_scheduler_and_select_the_same_rows(job_dir, tmp_path_factory):
    """Embeddings, clusters and IFD computed on two Dask worker processes (empty caches), against
    FnApiRunner: the same selection and counts; scores agree to 1e-5 (batches hold other rows
    on each runner, and fp32 sums in another order differ in the last bits)."""
    from distributed import Client, LocalCluster

    fn_cache, dask_cache = tmp_path_factory.mktemp("fn"), tmp_path_factory.mktemp("dask")

    def caches(root):  # 3 rows a source, 64 tokens: the test is about where the models run
        return {"sample": {"mode": "random", "n": 3}, "embed": {"cache_dir": str(root / "embed")},
                "score": {"ifd": {"max_length": 64, "cache_dir": str(root / "ifd")}}}

    assert run_cli("run", _job(job_dir, "fn", True, caches(fn_cache))) == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        assert run_cli("run", _job(job_dir, "dask", True, caches(dask_cache)), "--runner=DaskRunner",
                       f"--dask_client_address={cluster.scheduler_address}") == 0
        with Client(cluster.scheduler_address) as client:  # the two workers shared the cores, not 2x all
            threads = client.run(lambda: __import__("torch").get_num_threads())
        assert sorted(threads.values()) == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2
    fn, dk = _outcome("fn"), _outcome("dask")
    assert dk[2] == fn[2] and dk[1] == fn[1] and len(fn[2]) > 0
    stages = load_manifest("dask")["stages"]  # computed by the workers, not read from a cache
    assert stages["score"]["model_rows"] > 0 and stages["embed"]["model_rows"] > 0
    for col in ("ifd_loss", "rifd_loss", "rifd", "cluster_sim"):
        np.testing.assert_allclose(dk[0][col].astype(float), fn[0][col].astype(float), atol=1e-5, rtol=0)
    assert (dk[0].cluster_id == fn[0].cluster_id).all() and (dk[0].ifd_status == fn[0].ifd_status).all()


def test_runners_and_schedulers_that_cannot_work_are_one_line(job_dir, capsys):
    job = _job(job_dir, "x", models=False)
    assert run_cli("run", job, "--runner=NoSuchRunner") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--runner=NoSuchRunner" in err[0] and "DaskRunner" in err[0]
    assert run_cli("run", job, "--runner=DaskRunner", "--dask_client_address=127.0.0.1:9",
                   "--dask_connection_timeout=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no scheduler at 127.0.0.1:9" in err[0]
    assert run_cli("run", job, "--runner=DaskRunner", "--dask_memory_target=0.75") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dask_memory_target=0.75: give a share" in err[0]
    assert not any(n.startswith("x") for n in os.listdir(job_dir) if n != "x.yaml")


def test_a_worker_gets_its_share_of_the_cores_unless_its_environment_says(monkeypatch):
    """``_set_threads`` in a worker where torch is already loaded (it sets torch's pool at once),
    and in one whose environment sets OMP_NUM_THREADS (left alone)."""
    import types

    import torch

    from pipelines.dask_runner import _set_threads

    before = torch.get_num_threads()
    worker = types.SimpleNamespace(address="tcp://10.0.0.1:1")
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        _set_threads({worker.address: cores}, dask_worker=worker)  # as many worker threads as cores: 1 each
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "7")
        torch.set_num_threads(before)
        _set_threads({worker.address: cores}, dask_worker=worker)
        assert torch.get_num_threads() == before and os.environ["OMP_NUM_THREADS"] == "7"
    finally:
        torch.set_num_threads(before)


def test_a_worker_hands_freed_heap_back_once_past_half_its_limit():
    """``trim_if_over`` trims only past the share of a set limit; the plugin does it every second
    on a real worker (in-process, so its memory is this process's, far over a 200 MB limit) and
    stops when unregistered, as a run on a cluster that outlives it does."""
    from distributed import Client, LocalCluster

    from pipelines.dask_runner import TrimMemory, _libc_trim, trim_if_over

    calls = []
    assert not trim_if_over(900, 2000, calls.append) and not trim_if_over(5000, None, calls.append)
    assert not trim_if_over(5000, 2000, None) and calls == []
    assert trim_if_over(1001, 2000, calls.append) and calls == [0]
    assert _libc_trim() is not None  # glibc here; elsewhere the plugin does nothing
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      memory_limit="200MB") as cluster, Client(cluster) as client:
        client.register_plugin(TrimMemory())
        plugin = next(iter(cluster.workers.values())).plugins[TrimMemory.name]
        assert plugin.heap_blocks  # glibc's thresholds were set on the worker
        deadline = time.monotonic() + 10
        while plugin.trims < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert plugin.trims >= 2
        client.unregister_worker_plugin(TrimMemory.name)
        assert not plugin._callback.is_running()


def test_a_worker_keeps_freed_blocks_rather_than_mapping_fresh_pages():
    """Dask's Nanny sets ``MALLOC_TRIM_THRESHOLD_``, which fixes glibc's mmap threshold at 128 KB;
    the plugin raises both thresholds (the mmap one first) and says whether glibc took them."""
    from pipelines.dask_runner import HEAP_BLOCKS, HEAP_SLACK, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, _libc, keep_heap_blocks

    calls = []
    assert keep_heap_blocks(lambda param, value: calls.append((param, value)) or 1)
    assert calls == [(M_MMAP_THRESHOLD, HEAP_BLOCKS), (M_TRIM_THRESHOLD, HEAP_SLACK)]
    assert not keep_heap_blocks(lambda param, value: 0)  # glibc refused: said, not assumed
    assert not keep_heap_blocks(None)  # no glibc (macOS, musl): nothing to set
    assert _libc("mallopt") is not None and _libc("no_such_function") is None


def test_a_task_that_kills_every_worker_is_one_line_on_memory():
    """Dask's KilledWorker (seen at 1M rows, workers capped at 2 GB: one bundle killed its worker 4 times)
    becomes one line naming the task and the limit, not an "unexpected error"."""
    from distributed import KilledWorker

    from pipelines.dask_runner import killed_worker_message

    exc = KilledWorker(("run_bundle-select-shuffle-984c", 29), "tcp://127.0.0.1:1", 3)
    msg = killed_worker_message(exc, "2GB")
    assert "\n" not in msg and "killed its worker 4 times" in msg and "run_bundle-select-shuffle-984c" in msg
    assert "--dask_memory_limit=2GB" in msg
    assert "their memory limit" in killed_worker_message(KilledWorker("x", None, 0), None)


def test_a_run_whose_task_kills_its_worker_ends_with_that_line_and_closes_its_cluster():
    """The real path: a task that ends its worker process on a LocalCluster of the runner's own
    making (no retries allowed) ends ``Result.wait_until_finish`` with the one line, and the
    cluster the run started is closed."""
    import dask
    from distributed import Client

    from curate.errors import CurateError
    from pipelines.dask_runner import Result, _local_cluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = _local_cluster(1, "1GB")
        client = Client(cluster.scheduler_address)
        future = client.submit(os._exit, 1, pure=False)
        result = Result(client, [future], cluster, "r", "1GB", keys=[future.key])  # waits via the progress loop
        with pytest.raises(CurateError, match=r"^dask: one task \(_exit-.*\) killed its worker 1 time; .*"
                                              r"--dask_memory_limit=1GB"):
            result.wait_until_finish()
    assert client.status == "closed" and cluster.status.name == "closed"


def test_the_cluster_the_job_starts_spills_at_its_memory_target():
    """``--dask_memory_target`` reaches the worker processes (a Nanny passes its config on): they spill
    above it, by process memory 0.1 higher, and pause at 0.8; a share that leaves no room below the
    pause mark is one line."""
    import dask
    from distributed import Client

    from curate.errors import CurateError
    from pipelines.dask_runner import _local_cluster, memory_marks

    with pytest.raises(CurateError, match=r"^--dask_memory_target=0.75: give a share .* between 0 and 0.7"):
        memory_marks(0.75)
    with pytest.raises(CurateError):
        memory_marks(0.0)
    cluster = _local_cluster(1, "1GB", 0.3)
    try:
        with Client(cluster.scheduler_address) as client:
            marks = client.run(lambda dask_worker: (dask_worker.memory_manager.memory_target_fraction,
                                                    dask_worker.memory_manager.memory_spill_fraction,
                                                    dask_worker.memory_manager.memory_pause_fraction))
    finally:
        cluster.close()
    assert list(marks.values()) == [(0.3, 0.4, 0.8)]
    assert dask.config.get("distributed.worker.memory.target") == 0.6  # the driver's own config untouched


class _LiveOrDropped(beam.DoFn):
    def process(self, x, every):
        yield beam.pvalue.TaggedOutput("dropped", x) if x % every == 0 else x


def test_a_flatten_of_one_partitions_two_parts_keeps_partitions_even():
    """A stage's live and dropped rows come back together in a Flatten: partition j of the union
    holds partition j of each, so stage after stage every partition stays one read unit's rows
    (merging neighbours gave partitions of 2 and 18 rows at the first Flatten). An input with
    fewer partitions (a one-element Create) joins the first ones."""
    import dask
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dask.overrides import dask_overrides

    from pipelines.dask_runner import DaskRunner

    p = beam.Pipeline(runner=DaskRunner(), options=PipelineOptions([]))
    rows = p | beam.Create(range(40)) | beam.FlatMap(lambda u: range(u * 10, u * 10 + 10))
    for stage in range(3):
        split = rows | f"Split{stage}" >> beam.ParDo(_LiveOrDropped(), 10 - stage).with_outputs("dropped", main="live")
        rows = (split.dropped, split.live | f"Work{stage}" >> beam.Map(lambda x: x)) | f"Merge{stage}" >> beam.Flatten()
    rows | beam.Map(lambda x: (x % 7, x)) | beam.GroupByKey()
    (rows, p | "Extra" >> beam.Create([-1])) | "MergeExtra" >> beam.Flatten()
    p.replace_all(dask_overrides())
    visitor = DaskRunner.to_dask_bag_visitor({"partition_size": 1}, min_partitions=2)
    p.visit(visitor)
    merged = {node.full_label: bag for node, bag in visitor.bags.items() if node.full_label.startswith("Merge")}
    extra = merged.pop("MergeExtra")
    assert sorted(merged) == ["Merge0", "Merge1", "Merge2"]
    with dask.config.set(scheduler="sync"):
        for label, bag in merged.items():
            sizes = dask.compute(*[dask.delayed(len)(part) for part in bag.to_delayed(optimize_graph=False)])
            assert len(sizes) == 40 and set(sizes) == {10}, (label, sizes)
            assert sorted(dask.compute(bag)[0]) == list(range(400))
        sizes = dask.compute(*[dask.delayed(len)(part) for part in extra.to_delayed(optimize_graph=False)])
        assert sizes == (11,) + (10,) * 39 and sorted(dask.compute(extra)[0]) == list(range(-1, 400))


def test_a_p2p_partition_crosses_as_hashed_pickled_pairs_and_groups_back():
    """The P2P shuffle's two ends without Dask: an empty partition and keys of several kinds survive
    the frame, equal keys get one hash in every process (a child with another PYTHONHASHSEED
    computes the same), and groups come back in first-seen order with every value."""
    import subprocess
    import sys

    from apache_beam.transforms.window import GlobalWindows

    from pipelines.dask_runner import _frame, _groups, _stable_hash

    empty = _frame([])
    assert list(empty.columns) == ["h", "kv"] and len(empty) == 0 and _groups(empty) == []
    keys = ["id-1", ("c", 3), 7, "id-1", ("c", 3)]
    frame = _frame([(k, GlobalWindows.windowed_value({"n": i})) for i, k in enumerate(keys)])
    assert str(frame.h.dtype) == "int64" and (frame.h >= 0).all()
    assert frame.h[0] == frame.h[3] and frame.h[1] == frame.h[4] and frame.h.nunique() == 3
    assert _groups(frame) == [("id-1", [{"n": 0}, {"n": 3}]), (("c", 3), [{"n": 1}, {"n": 4}]), (7, [{"n": 2}])]
    code = "from pipelines.dask_runner import _stable_hash; print(_stable_hash(('c', 3)), _stable_hash('id-1'))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert child.stdout.split() == [str(_stable_hash(("c", 3))), str(_stable_hash("id-1"))]


def test_dask_counts_the_records_inside_beams_wrappers():
    """A shuffle piece is (hash, (key, WindowedValue(record))); Dask spills by these sizes."""
    from apache_beam.transforms.window import GlobalWindows
    from dask.sizeof import sizeof

    import pipelines.dask_runner  # noqa: F401 - registers the sizes

    record = {"id": "a" * 16, "prompt": "p" * 800, "response": "r" * 1200, "source": "s0"}
    bare = sizeof(record)
    assert bare > 2000
    assert sizeof(GlobalWindows.windowed_value(record)) >= bare
    assert sizeof(beam.pvalue.TaggedOutput("stats", record)) >= bare
    piece = [(7, (("s0", str(i)), GlobalWindows.windowed_value(dict(record)))) for i in range(1000)]
    assert sizeof(piece) >= 1000 * bare


def test_a_shuffle_moves_each_record_pickled_once_and_gives_it_back_whole():
    """What a GroupByKey hands Dask is (key, bytes): cheap to move or spill again and sized
    exactly (at a 1.2 GB worker cap, 100k rows ran 158 s packed, 200 s as record dicts, on 2 cores of an
    AMD EPYC with AVX2 only)."""
    import pickle

    from apache_beam.transforms.window import GlobalWindows
    from dask.sizeof import sizeof

    from pipelines.dask_runner import _pack, _values

    records = [{"id": str(i), "prompt": "p" * 500, "vector": [0.5] * 8, "score": float("nan")} for i in range(50)]
    packed = _pack([(("s0", r["id"]), GlobalWindows.windowed_value(r)) for r in records])
    assert all(type(value) is bytes for _, value in packed)
    assert sizeof(packed) >= sum(len(value) for _, value in packed) >= 50 * 500
    assert len(pickle.dumps(packed)) < 1.1 * sum(len(value) for _, value in packed) + 50 * 64
    key, back = _values(("k", packed))
    assert key == "k" and [b["id"] for b in back] == [r["id"] for r in records]
    assert back[3]["vector"] == records[3]["vector"] and back[3]["score"] != back[3]["score"]  # NaN kept


def test_the_progress_lines_count_tasks_run_and_survive_a_scheduler_that_does_not_answer(monkeypatch, caplog):
    """``Result``'s wait: no line while the scheduler does not know the keys yet or does not answer
    (the run goes on), then "N of M tasks run" with N never going back (a task whose worker was
    lost runs again)."""
    import logging
    from types import SimpleNamespace

    import distributed

    from pipelines.dask_runner import Result, _pending

    tasks = {"a": SimpleNamespace(state="memory"), "b": SimpleNamespace(state="processing"),
             "c": SimpleNamespace(state="released")}
    assert _pending(SimpleNamespace(tasks=tasks), ["a", "b", "c", "d"]) == (3, 1)  # d: forgotten or not sent

    answers = iter([RuntimeError("scheduler gone"), (0, 0), (4, 3), (4, 4), (4, 1)])

    def run_on_scheduler(fn, keys):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    waits = iter([TimeoutError()] * 5 + [None])

    def wait(futures, timeout):
        outcome = next(waits)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(distributed, "wait", wait)
    result = Result.__new__(Result)
    result.keys, result.futures = ["k1", "k2", "k3", "k4"], []
    result.client = SimpleNamespace(run_on_scheduler=run_on_scheduler)
    with caplog.at_level(logging.INFO, logger="curate"):
        result._wait_with_progress()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dask: ")]
    assert [line.split(" (")[0] for line in lines] == ["dask: 1 of 4 tasks run", "dask: 1 of 4 tasks run",
                                                      "dask: 3 of 4 tasks run"]


class _Mark(beam.DoFn):
    """Writes each element it processes to a file (worker processes share the machine's disk)."""

    def __init__(self, path: str):
        self.path = path

    def process(self, x):
        with open(self.path, "a") as fh:
            fh.write(f"{x}\n")
        yield x
        yield beam.pvalue.TaggedOutput("twice", 2 * x)


def test_a_step_whose_outputs_go_three_ways_runs_once_per_element(tmp_path):
    """Optimizing each sink's graph on its own fused a shared step into every sink that starts
    from it: the batch path's Apply (a second reading of each unit) ran three times."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.dask_runner import DaskRunner

    marks = tmp_path / "marks.txt"
    with beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(["--dask_workers=2"])) as p:
        out = p | beam.Create(list(range(12))) | beam.ParDo(_Mark(str(marks))).with_outputs("twice", main="main")
        _write(out.main, str(tmp_path / "main.json"), "Main")
        _write(out.twice, str(tmp_path / "twice.json"), "Twice")
        _write(out.main | beam.Map(lambda x: x + 1), str(tmp_path / "plus.json"), "Plus")
    assert sorted(int(x) for x in marks.read_text().split()) == list(range(12))
    assert json.loads((tmp_path / "twice.json").read_text()) == [2 * x for x in range(12)]
    assert json.loads((tmp_path / "plus.json").read_text()) == [x + 1 for x in range(12)]


def _gbk_labels(build) -> dict:
    """{GroupByKey label: whether the runner groups it in one task}, on the graph the runner walks
    (after Beam's round trip through its runner API, which drops the composites' classes)."""
    from apache_beam.pipeline import Pipeline, PipelineVisitor
    from apache_beam.runners.dask.overrides import _GroupByKeyOnly, dask_overrides

    from pipelines.dask_runner import DaskRunner, _LiftCombines, _one_key

    p = beam.Pipeline(runner=DaskRunner())
    build(p)
    walked = Pipeline.from_runner_api(p.to_runner_api(), p.runner, p._options)
    walked.replace_all([_LiftCombines()] + list(dask_overrides()))
    found = {}

    class Visit(PipelineVisitor):
        def visit_transform(self, node):
            if isinstance(node.transform, _GroupByKeyOnly):
                found[node.full_label] = _one_key(node)

    walked.visit(Visit())
    return found


def test_global_combines_and_sink_results_are_grouped_in_one_task_and_keyed_data_is_shuffled(tmp_path):
    """A 100k-row job sent 6,301 tasks, 4,036 of them shuffle pieces, mostly for groups of one key
    (CombineGlobally, ToList, a sink's written files); those are now one task over every partition.
    A CombinePerKey, a GroupByKey, a Distinct and a sink with a fixed shard count (its rows grouped
    by shard) still shuffle: their keys can be as many as the rows (the row path's label rounds)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.dask_runner import DaskRunner

    def build(p):
        rows = p | "Rows" >> beam.Create(range(8)) | "Spread" >> beam.FlatMap(lambda i: range(50 * i, 50 * i + 50))
        total = rows | "Total" >> beam.CombineGlobally(sum)
        keyed = rows | "Key" >> beam.Map(lambda x: (x % 5, x))
        per_key = keyed | "PerKey" >> beam.CombinePerKey(sum)
        grouped = keyed | "Group" >> beam.GroupByKey() | "Sizes" >> beam.MapTuple(lambda k, vs: (k, len(list(vs))))
        distinct = rows | "Mod" >> beam.Map(lambda x: x % 7) | "Distinct" >> beam.Distinct()
        listed = (per_key, grouped) | "Both" >> beam.Flatten() | "AllPairs" >> beam.combiners.ToList()
        (total | "T" >> beam.Map(str) | "WriteTotal" >> beam.io.WriteToText(str(tmp_path / "total")))
        (listed | "L" >> beam.Map(lambda xs: json.dumps(sorted(xs)))
         | "WriteListed" >> beam.io.WriteToText(str(tmp_path / "listed"), num_shards=1, shard_name_template=""))
        (distinct | "D" >> beam.Map(str) | "WriteDistinct" >> beam.io.WriteToText(str(tmp_path / "distinct")))

    labels = _gbk_labels(build)
    one = sorted(k.split("/")[0] for k, v in labels.items() if v)
    shuffled = sorted(k.split("/")[0] for k, v in labels.items() if not v)
    assert one == ["AllPairs", "Total", "WriteDistinct", "WriteTotal"]
    assert shuffled == ["Distinct", "Group", "PerKey", "WriteListed"]

    with beam.Pipeline(runner=DaskRunner(), options=PipelineOptions(["--dask_workers=2"])) as p:
        build(p)

    def lines(prefix):
        return [x for f in sorted(tmp_path.glob(prefix + "*")) for x in f.read_text().split()]

    assert lines("total") == [str(sum(range(400)))]
    assert json.loads((tmp_path / "listed").read_text()) == sorted(
        [[k, sum(x for x in range(400) if x % 5 == k)] for k in range(5)] + [[k, 80] for k in range(5)])
    assert sorted(int(x) for x in lines("distinct")) == list(range(7))


def test_a_side_input_is_made_ready_once_per_worker_for_the_list_dask_hands_every_task():
    """Each task of a step gets the same list from Dask on a worker; its view (wrapped values, the
    dict or list) is made once for it and again only for another list; a worker keeps a few (the
    most recently used), and the end of the run drops its own."""
    from apache_beam.transforms.window import GlobalWindow

    from pipelines import dask_runner as dr

    p = beam.Pipeline()
    pairs = beam.pvalue.AsDict(p | "Pairs" >> beam.Create([(1, "a")]))
    items = beam.pvalue.AsList(p | "Items" >> beam.Create([1]))
    spec = lambda si: (type(si), si._view_options(), si._window_mapping_fn)  # noqa: E731 - as par_do keeps it
    values = [(1, "a"), (2, "b")]
    first = dr._side_once("r1:Step", 0, *spec(pairs), values)
    assert first[GlobalWindow()] == {1: "a", 2: "b"}
    assert dr._side_once("r1:Step", 0, *spec(pairs), values) is first  # the next task of the step
    again = dr._side_once("r1:Step", 0, *spec(pairs), list(values))  # another list: made again
    assert again is not first and again[GlobalWindow()] == {1: "a", 2: "b"}
    other = [np.arange(3)]
    listed = dr._side_once("r1:Other", 1, *spec(items), other)
    assert [list(a) for a in listed[GlobalWindow()]] == [[0, 1, 2]]
    for k in range(dr._SIDES_KEPT):  # newer steps push the oldest out
        dr._side_once(f"r1:More{k}", 0, *spec(items), [k])
    assert dr._side_once("r1:Step", 0, *spec(pairs), values) is not again
    assert any(key[0] == "r1:Step" for key in dr._SIDES)
    dr._forget("r1")
    assert not any(key[0].startswith("r1:") for key in dr._SIDES)
