"""The job on a Dask cluster: Beam's ``DaskRunner`` with the gaps closed that a real job falls into.

Beam's runner (``apache_beam/runners/dask/``, Beam 2.77) translates Create, ParDo, GroupByKey and
Flatten into Dask bags, which is the right shape, but four things in its translation lose or mix
data in any pipeline with more than one output, and ours has many:

1. ``transform_evaluator.py`` ``ParDo.apply`` / ``apply_dofn_to_bundle`` put every output of a
   multi-output ParDo (``with_outputs``) into one bag, and a consumer of one tag reads them all:
   our stage stats arrive at the next stage's GroupByKey as records (the ``too many values to
   unpack`` a user sees first).
2. The same function takes the bundle's outputs *before* ``finish_bundle``, so what a DoFn emits
   there is lost: our stats, Beam's own ``BatchElements`` (RunInference's last partial batch of
   every partition) and the file sinks' write results.
3. ``dask_runner.py`` ``run_pipeline`` computes only the bag of the last transform visited, so a
   branch that does not lead to it (another output folder) never runs.
4. Side inputs are iterators that compute their bag inside every task that reads them
   (``DaskBagWindowedIterator``), so a side input's producers run again per partition.

They cannot be worked around in the graph without giving up multi-output ParDos, finish_bundle,
more than one sink and side inputs, so this module translates ParDo, side inputs and the sinks
itself and leaves the rest to Beam's runner. A DoFn is set up once per worker thread (Beam's
sets it up and tears it down per partition, a model load each time), and a side input is
computed once and made ready (wrapped, its dict or list built) once per worker for all the
step's tasks (``_side_once``). A GroupByKey's values cross
the shuffle pickled once, as bytes (``_pack``). Beam's translation has no combiner lifting, so
every CombinePerKey runs as Beam's ``LiftedCombinePerKey`` (``_LiftCombines``): a partition
combines its own values before the shuffle, as the FnApiRunner does; a group of one key (a
CombineGlobally's, a sink's written files) is one task, not a shuffle (``_one_key``).

Without ``--dask_client_address`` the job starts a ``distributed.LocalCluster`` of
``--dask_workers`` worker processes (default: the CPU count, at least 2), one thread each, and
closes it when the run ends.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import pickle
import threading
import uuid

from apache_beam import DoFn
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pipeline import PTransformOverride
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.common import Receiver
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.overrides import dask_overrides
from apache_beam.transforms.combiners import LiftedCombinePerKey
from apache_beam.transforms.core import CombinePerKey
from distributed.diagnostics.plugin import WorkerPlugin

log = logging.getLogger("curate")

DEFAULT_MEMORY_TARGET = 0.4
PAUSE_AT = 0.8  # Dask's default pause mark, kept
GRAPH_LINE = "dask: sending the job's graph (%d tasks) to the scheduler"  # benchmarks.scale reads it
PROGRESS_EVERY = 10.0  # seconds between the driver's "dask: N of M tasks" lines


class CurateDaskOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dask_workers", type=int, default=None,
                            help="worker processes of the LocalCluster the job starts when no "
                                 "--dask_client_address is given (default: CPU count, at least 2)")
        parser.add_argument("--dask_memory_limit", default=None,
                            help="memory per worker of that LocalCluster, e.g. 2GB (default: the machine's "
                                 "memory shared by the workers); a worker spills to disk above "
                                 "--dask_memory_target of it")
        parser.add_argument("--dask_shuffle", choices=("tasks", "p2p"), default="tasks",
                            help="how a GroupByKey crosses between workers: Dask's task shuffle or its "
                                 "peer-to-peer one, which keeps the pieces on disk (default %(default)s)")
        parser.add_argument("--dask_memory_target", type=float, default=DEFAULT_MEMORY_TARGET,
                            help="share of a worker's memory limit above which that LocalCluster's workers "
                                 "spill results to disk (default %(default)s; Dask's own is 0.6): the room "
                                 "above it, up to the pause mark (0.8), is for the running task")


class _Collect(Receiver):
    """A receiver that keeps (tag, value): main outputs bare, tagged ones as ``TaggedOutput``."""

    def __init__(self, tag, out: list):
        self.tag, self.out = tag, out

    def receive(self, windowed_value):
        value = windowed_value.value
        self.out.append(value if self.tag is None else TaggedOutput(self.tag, value))


class _Receivers(dict):
    def __init__(self):
        super().__init__()
        self.out: list = []

    def __missing__(self, tag):
        self[tag] = receiver = _Collect(tag, self.out)
        return receiver


_SET_UP: dict[tuple[str, int], DoFn] = {}  # per worker process: DoFns set up, by (translation key, thread)
_LOCK = threading.Lock()


def _fn_once(key: str, fn: DoFn):
    """One set-up instance per worker thread, as Beam gives each bundle-processing thread its own
    (a DoFn keeps per-bundle state); RunInference shares the model between them. Returns it with
    its ``DoFnSignature``, made once too (it inspects every method's arguments: 4% of the workers'
    time when made per bundle, 2 cores of an AMD EPYC with AVX-512)."""
    from apache_beam.internal import pickler
    from apache_beam.runners.common import DoFnSignature

    slot = (key, threading.get_ident())
    with _LOCK:
        if slot not in _SET_UP:
            own = pickler.loads(pickler.dumps(fn))  # never an instance another thread also holds
            own.setup()
            _SET_UP[slot] = (own, DoFnSignature(own))
        return _SET_UP[slot]


_SIDES: dict[tuple[str, int, int], tuple[list, object]] = {}  # per worker: side inputs made ready
_SIDES_KEPT = 4  # per worker thread, the most recently used


def _side_once(key: str, k: int, view, options, mapping, values: list):
    """The ``k``th side input of a step as Beam reads it, made once per worker thread for the list
    Dask hands every task of the step on this worker (the same object): each value wrapped and the
    view (a dict, a list) built. Made per task it cost each of the 86 tasks of a step at 1M rows
    again (44,000 renumbered ids, 200,000 locators gone), and the DoFns' own caches of a side
    input, kept by its identity, missed every time."""
    from apache_beam.transforms.sideinputs import SideInputMap

    slot = (key, k, threading.get_ident())
    with _LOCK:
        got = _SIDES.pop(slot, None)
        if got is None or got[0] is not values:
            got = (values, SideInputMap(view, options, [te.get_windowed_value(v, mapping) for v in values]))
        _SIDES[slot] = got  # the newest last; the oldest go, so a worker holds a few, not a run's all
        for old in [s for s in _SIDES if s[2] == slot[2]][:-_SIDES_KEPT]:
            del _SIDES[old]
        return got[1]


def _forget(run: str) -> int:
    """Tear down and drop this run's DoFns in a worker (a long-lived cluster serves many runs)."""
    with _LOCK:
        for k in [k for k in _SIDES if k[0].startswith(run + ":")]:
            del _SIDES[k]
        keys = [k for k in _SET_UP if k[0].startswith(run + ":")]
        for k in keys:
            try:
                _SET_UP.pop(k)[0].teardown()
            except Exception as exc:  # noqa: BLE001 - a teardown failure costs nothing but a log line
                log.warning("dask: teardown of %s failed: %s", k, exc)
    return len(keys)


def _run_bundle(items, spec: dict, *side_values):
    """One Dask partition as one Beam bundle; ``side_values`` are the side inputs' whole contents."""
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, _OutputHandler

    fn, signature = _fn_once(spec["key"], spec["fn"])
    receivers = _Receivers()
    handler = _OutputHandler(window_fn=spec["window_fn"], main_receivers=receivers[None], tagged_receivers=receivers,
                             per_element_output_counter=None, output_batch_converter=None,
                             process_yields_batches=False, process_batch_yields_elements=False)
    sides = [_side_once(spec["key"], k, view, options, mapping, values)
             for k, ((view, options, mapping), values) in enumerate(zip(spec["sides"], side_values))]
    invoker = DoFnInvoker.create_invoker(  # no invoke_setup: _fn_once set it up for this thread
        signature, handler, context=DoFnContext(spec["label"], state=None), side_inputs=sides,
        input_args=spec["args"], input_kwargs=spec["kwargs"], user_state_context=None,
        bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_start_bundle()
    for item in items:  # a record dict is shared by every reader of a partition: each gets its own copy
        item = dict(item) if type(item) is dict else item
        invoker.invoke_process(te.get_windowed_value(item, spec["window_fn"]))
    invoker.invoke_finish_bundle()
    return receivers.out


def _register_sizes() -> None:
    """Tell Dask the size of Beam's wrappers. Dask decides what to keep in memory and what to
    spill by ``dask.sizeof``, which falls back to ``sys.getsizeof`` for a class it does not know:
    a ``WindowedValue`` (every value in a GroupByKey's shuffle, after Beam's ReifyWindows) counted
    about 100 bytes whatever record it holds, so a shuffle piece of 1,000 records counted 0.4 MB
    for 2.8 MB, and at 1M rows a worker held 200,000 records Dask thought were 0.3 GB, spilled
    too late and were restarted at their memory limit. Registered where the workers import this
    module (the tasks and the memory plugin come from it)."""
    import sys

    from apache_beam.utils.windowed_value import WindowedValue
    from dask.sizeof import sizeof

    @sizeof.register(WindowedValue)
    def _windowed(wv) -> int:
        return sys.getsizeof(wv) + sizeof(wv.value)

    @sizeof.register(TaggedOutput)
    def _tagged(item) -> int:
        return sys.getsizeof(item) + sizeof(item.value)


_register_sizes()


def _key(item):
    return item[0]


def _pack(items):
    """A shuffle's input as (key, the value pickled once). Dask pickles a piece each time it moves
    it between workers or spills it, and a task shuffle moves each piece a few times: a list of
    bytes pickles at memory speed and ``dask.sizeof`` counts it exactly, where nested record
    dicts cost a full traversal every time (a quarter of a worker's time at 1M rows). 100k rows on
    2 cores of an AMD EPYC with AVX2 only, workers capped at 1.2 GB: 158 s packed, 200 s as dicts; at 2 GB, no spilling, even."""
    return [(key, pickle.dumps(te.defenestrate(value), pickle.HIGHEST_PROTOCOL)) for key, value in items]


def _values(group):
    key, items = group
    return key, [pickle.loads(item[1]) for item in items]


def _stable_hash(key) -> int:
    """The same 63-bit number for equal keys in every process (Python's ``hash`` of a str differs
    between processes unless PYTHONHASHSEED is set alike)."""
    digest = hashlib.blake2b(pickle.dumps(key, pickle.HIGHEST_PROTOCOL), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _frame(items):
    """A shuffle's input partition as a DataFrame for Dask's P2P shuffle: the key's hash, and the
    (key, value) pair pickled once (a column of bytes crosses as Arrow binary, no per-row objects)."""
    import pandas as pd

    rows = [(_stable_hash(key), pickle.dumps((key, te.defenestrate(value)), pickle.HIGHEST_PROTOCOL))
            for key, value in items]
    return pd.DataFrame({"h": pd.array([h for h, _ in rows], dtype="int64"),
                         "kv": pd.array([kv for _, kv in rows], dtype=object)})


def _groups(frame):
    """A P2P shuffle's output partition back as Beam's (key, [values]) groups, in first-seen order."""
    groups: dict = {}
    for kv in frame["kv"]:
        key, value = pickle.loads(kv)
        groups.setdefault(key, []).append(value)
    return list(groups.items())


def _one_key(node) -> bool:
    """Whether a GroupByKey groups values that all share the key None: a CombineGlobally's (its
    ``KeyWithVoid`` step keys each value with None before the CombinePerKey) or a file sink's last
    step (``WriteImpl`` pairs each bundle's written file with None in ``Pair``). Told by Beam's
    step names, since the graph the runner walks has lost the composites' classes; each partition
    has combined its own values first, so the group is a few values a partition."""
    gbk = node.parent  # the _GroupByKey composite around this primitive
    outer = gbk.parent if gbk is not None else None
    if outer is not None and isinstance(outer.transform, LiftedCombinePerKey):
        outer, first = outer.parent, "KeyWithVoid"
    elif outer is not None and outer.full_label.endswith("/WriteImpl"):
        first = "Pair"
    else:
        return False
    return outer is not None and any(part.full_label == f"{outer.full_label}/{first}" for part in outer.parts)


def _group_all(*parts):
    """Every partition's (key, value) pairs as Beam's (key, [values]) groups, in first-seen order."""
    groups: dict = {}
    for part in parts:
        for key, value in part:
            groups.setdefault(key, []).append(te.defenestrate(value))
    return list(groups.items())


def _select(items, tag):
    """The part of a multi-output ParDo's bag that belongs to ``tag`` (None: the main output)."""
    out = []
    for item in items:
        if isinstance(item, TaggedOutput):
            if item.tag == tag:
                out.append(item.value)
        elif tag is None:
            out.append(item)
    return out


def _concat(*parts):
    return list(itertools.chain.from_iterable(parts))


def _discard(items):
    for _ in items:
        pass
    return []


class _LiftCombines(PTransformOverride):
    """Every CombinePerKey (CombineGlobally, Count, Top, ToList and Distinct are made of it) as
    Beam's ``LiftedCombinePerKey``: each partition combines its own values first, so the
    GroupByKey gets one accumulator per partition and key. Beam's Dask translation has no combiner
    lifting, so a CombineGlobally sent every element to one task: every row's (rank, id, vector)
    for the k-means sample, every verified edge for the union-find, a 1 per row for a count."""

    def matches(self, applied_ptransform) -> bool:
        return type(applied_ptransform.transform) is CombinePerKey

    def get_replacement_transform_for_applied_ptransform(self, applied_ptransform):
        t = applied_ptransform.transform
        return LiftedCombinePerKey(t.fn, t.args, t.kwargs)


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner with multi-output ParDos, finish_bundle outputs, every sink and side
    inputs computed once (see the module docstring)."""

    @staticmethod
    def to_dask_bag_visitor(bag_kwargs=None, min_partitions: int = 1, shuffle: str = "tasks"):
        import dask
        import dask.bag as db
        from apache_beam import pvalue
        from apache_beam.pipeline import PipelineVisitor
        from apache_beam.runners.dask.overrides import _Flatten, _GroupByKeyOnly
        from apache_beam.transforms.core import ParDo
        from dask.base import tokenize
        from dask.highlevelgraph import HighLevelGraph

        bag_kwargs = bag_kwargs or {}
        run = uuid.uuid4().hex

        class Visitor(PipelineVisitor):
            def __init__(self):
                self.run = run
                self.bags, self.consumed = {}, set()
                self._tagged: dict = {}
                self.widest = min_partitions  # the most partitions a bag keeps (see _bounded)

            def _bounded(self, bag):
                """At most ``widest`` partitions: the widest Create visited so far (the read units
                come first), at least ``min_partitions``. Beam's translation lets a Flatten add its inputs' partitions
                up and shuffles each GroupByKey at its input's width, so a job's partitions grow
                stage by stage, and a task-based shuffle costs about partitions x sqrt(partitions)
                tasks: 19,000 tasks for a 434-row job. Merging neighbours is cheap (no shuffle);
                the bags bounded here are a shuffle's output (up to 1.3 x its input's partitions, of
                even size, so a merged one holds at most two) or a shuffle's balanced input."""
                return bag.repartition(self.widest) if bag.npartitions > self.widest else bag

            def _flatten(self, bags):
                """The union of ``bags``, each bounded first. When their partitions add up past
                ``widest``, partition j of the union is partition j of each input, not neighbours
                merged: a Flatten's inputs mostly come from the same partitions (a stage's live
                and dropped rows, a join's two sides), so aligned they add up to one partition's
                rows, while merging neighbours put the live rows of two partitions into one at
                every Flatten, so they piled up stage after stage (a test shows 2 and 18 rows where
                every partition had 10)."""
                bags = [self._bounded(b) for b in bags]
                if sum(b.npartitions for b in bags) <= self.widest:
                    return db.concat(bags)
                name = f"curate-flatten-{tokenize(*bags)}"
                n = max(b.npartitions for b in bags)
                dsk = {(name, j): (_concat, *[(b.name, j) for b in bags if j < b.npartitions]) for j in range(n)}
                return db.Bag(HighLevelGraph.from_collections(name, dsk, dependencies=bags), name, n)

            def bag_of(self, pcoll):
                producer = pcoll.producer
                self.consumed.add(producer)
                bag = self.bags[producer]
                if len(producer.outputs) == 1:
                    return bag
                key = (producer, pcoll.tag)
                if key not in self._tagged:
                    self._tagged[key] = bag.map_partitions(_select, pcoll.tag)
                return self._tagged[key]

            def visit_transform(self, node) -> None:
                transform = node.transform
                inputs = [self.bag_of(i) for i in node.inputs if not isinstance(i, pvalue.PBegin)]
                if type(transform) is ParDo:  # as Beam: _GroupAlsoByWindow (a subclass) is a no-op here
                    self.bags[node] = self.par_do(node, inputs[0])
                    return
                if isinstance(transform, _GroupByKeyOnly):
                    bag = inputs[0]
                    self.bags[node] = self.group_in_one(bag) if _one_key(node) else self.group_by_key(self._bounded(bag))
                    return
                if isinstance(transform, _Flatten):
                    self.bags[node] = self._flatten(inputs)
                    return
                op = te.TRANSLATIONS.get(transform.__class__, te.NoOp)(node, bag_kwargs=bag_kwargs)
                if not inputs:
                    bag_in = None
                elif len(inputs) == 1 and op.__class__ is not te.Flatten:
                    bag_in = inputs[0]
                else:
                    bag_in = inputs
                self.bags[node] = bag = op.apply(input_bag=bag_in, side_inputs=None)
                if not inputs and isinstance(bag, db.Bag):
                    self.widest = max(self.widest, bag.npartitions)

            def group_by_key(self, bag):
                """Beam's GroupByKey as a Dask shuffle. ``tasks``: the bag's task shuffle (named, not
                Dask's default, a partd folder on local disk that workers on other machines cannot
                share), about partitions x stages x (branching + 2) tasks. ``p2p``: the bag crosses
                as DataFrames through Dask's peer-to-peer shuffle, 6 tasks a partition, whose
                pieces wait on the workers' disks, not in their memory."""
                if shuffle != "p2p":
                    return bag.map_partitions(_pack).groupby(_key, shuffle="tasks").map(_values)
                import dask.dataframe as dd

                with dask.config.set({"dataframe.convert-string": False}):  # bytes stay bytes
                    frames = dd.from_delayed([dask.delayed(_frame)(p) for p in bag.to_delayed(optimize_graph=False)],
                                             meta=_frame([]), verify_meta=False)
                    shuffled = frames.shuffle(on="h", npartitions=bag.npartitions, shuffle_method="p2p")
                    parts = shuffled.to_delayed()
                return db.from_delayed([dask.delayed(_groups)(part) for part in parts])

            def group_in_one(self, bag):
                """A GroupByKey of a global combine or a sink's last step, whose values all share
                one key (or a few, for a sink's file names): one task over all partitions, not a
                shuffle of ``partitions`` x ``partitions`` pieces (a 100k-row job sent 6,301 tasks,
                4,036 of them shuffle pieces, mostly for such steps)."""
                return db.from_delayed([dask.delayed(_group_all)(*bag.to_delayed(optimize_graph=False))])

            def par_do(self, node, bag):
                transform = node.transform
                args, kwargs = transform.raw_side_inputs
                main = next(iter(node.main_inputs.values()))
                sides, values = [], []
                for si in node.side_inputs:
                    sides.append((type(si), si._view_options(), si._window_mapping_fn))
                    parts = self.bag_of(si.pvalue).to_delayed(optimize_graph=False)
                    values.append(dask.delayed(_concat)(*parts))
                spec = {"key": f"{run}:{node.full_label}", "fn": transform.fn, "label": transform.label,
                        "window_fn": getattr(getattr(main, "windowing", None), "windowfn", None),
                        "args": list(args), "kwargs": kwargs, "sides": sides}
                return bag.map_partitions(_run_bundle, spec, *values)

            def leaves(self):
                return [bag for node, bag in self.bags.items() if node not in self.consumed]

        return Visitor()

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist

        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(drop_default=True, current_only=True)
        # one element of a Create per partition unless told otherwise: our Creates are read units
        # (a file or an 8 MB piece), so a partition's memory is bounded by one unit's rows
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options) or {"partition_size": 1}
        ours = options.view_as(CurateDaskOptions)
        workers = ours.dask_workers
        cluster = None
        logging.getLogger("distributed").setLevel(logging.WARNING)
        if not dask_options.get("address") and not dask_options.get("scheduler_file"):
            n = workers or max(2, os.cpu_count() or 2)
            cluster = _local_cluster(n, ours.dask_memory_limit, ours.dask_memory_target)
            dask_options["address"] = cluster.scheduler_address
            log.info("dask: started a LocalCluster of %d worker processes at %s (dashboard %s)", n,
                     cluster.scheduler_address, cluster.dashboard_link)
        try:
            client = ddist.Client(**dask_options)
        except (OSError, TimeoutError) as exc:
            if cluster is not None:
                cluster.close()
            from curate.errors import CurateError

            where = dask_options.get("address") or dask_options.get("scheduler_file")
            raise CurateError(f"dask: no scheduler at {where} ({type(exc).__name__}: {exc})") from None
        threads = _share_cores(client)
        client.register_plugin(TrimMemory())
        pipeline.replace_all([_LiftCombines()] + list(dask_overrides()))  # lifted first: its GroupByKey is Beam's
        visitor = self.to_dask_bag_visitor(bag_kwargs, min_partitions=max(2, threads), shuffle=ours.dask_shuffle)
        pipeline.visit(visitor)
        sinks = [bag.map_partitions(_discard) for bag in visitor.leaves()]
        # a bag's optimization fuses chains of tasks under new keys; a P2P shuffle's tasks must keep
        # theirs (fused, its output was "lost dependencies"), so that graph goes as built
        fuse = ours.dask_shuffle != "p2p"
        if fuse:
            # one collection, optimized once: ``dask.optimize(*sinks)`` fused a task that several
            # sinks start from into each of them, so it ran once per sink (each read unit's Apply,
            # its second reading, conversion and Parquet writes, ran three times)
            import dask.bag as db

            sinks = list(dask.optimize(db.concat(sinks)))
        # at 1M rows the graph is ~68,000 tasks and takes about a minute to build and send: say so
        keys = list(set().union(*(s.__dask_graph__().keys() for s in sinks)))
        log.info(GRAPH_LINE, len(keys))
        futures = client.compute(sinks, optimize_graph=False)
        return Result(client, futures, cluster, visitor.run, ours.dask_memory_limit if cluster is not None else None,
                      keys)


def memory_marks(target: float) -> dict:
    """Dask config for workers that spill their results above ``target`` of their limit (by Dask's
    count of them) or ``target`` + 0.1 (by the process's memory), and pause at 0.8 as by default.
    Dask's default target, 0.6, leaves a worker that always has results to keep (a 1M-row job)
    only the room between 0.8 and the restart mark, 0.95, for the task it runs; a shuffle step
    needed more (README, "Scale")."""
    from curate.errors import CurateError

    if not 0.0 < target < PAUSE_AT - 0.1:
        raise CurateError(f"--dask_memory_target={target}: give a share of the worker's memory "
                          f"between 0 and {PAUSE_AT - 0.1:.1f} (Dask pauses a worker at {PAUSE_AT})")
    return {"distributed.worker.memory.target": target,
            "distributed.worker.memory.spill": round(target + 0.1, 6),
            "distributed.worker.memory.pause": PAUSE_AT}


def _local_cluster(n: int, memory_limit: str | None = None, memory_target: float = DEFAULT_MEMORY_TARGET):
    """``n`` worker processes of one thread, each with an equal share of the cores for torch and
    BLAS (unless the caller set the thread variables), and the workers' logs at warning level.
    ``memory_limit`` per worker (Dask's default: the machine's memory / n) sets where a worker
    spills to disk (``memory_marks``), pauses (80%) and is restarted (95%)."""
    import dask
    import dask.distributed as ddist

    threads = str(max(1, (os.cpu_count() or 1) // n))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "DASK_LOGGING__DISTRIBUTED": "warning"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if saved[k] is None})
    try:
        # a Nanny hands the config it was made under to its worker process
        with dask.config.set(memory_marks(memory_target)):
            return ddist.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      memory_limit=memory_limit or "auto")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def _share_cores(client) -> int:
    """Give each worker its share of its host's cores for torch and BLAS: a worker process left at
    their default takes every core, so two workers on a 2-core host run four threads on two cores.
    A worker whose environment sets OMP_NUM_THREADS is left alone. Returns the cluster's threads."""
    workers = client.scheduler_info().get("workers", {})
    per_host: dict = {}
    for info in workers.values():
        per_host[info.get("host")] = per_host.get(info.get("host"), 0) + int(info.get("nthreads") or 1)
    client.run(_set_threads, {addr: per_host[info.get("host")] for addr, info in workers.items()})
    return sum(per_host.values())


def _set_threads(threads_on_host: dict, dask_worker=None) -> None:
    import sys

    if os.environ.get("OMP_NUM_THREADS") or dask_worker is None:
        return
    from curate.device import usable_cores

    n = max(1, usable_cores() // max(1, threads_on_host.get(dask_worker.address, 1)))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # read by torch when it loads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _libc(name: str):
    """A glibc function (``malloc_trim``, ``mallopt``), or None where there is none (musl, macOS,
    Windows)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, name)
    except (OSError, AttributeError):
        return None


def _libc_trim():
    return _libc("malloc_trim")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_BLOCKS = 32 * 2**20  # blocks up to this size come from the heap, not a fresh mmap
HEAP_SLACK = 64 * 2**20  # free memory at the heap's top kept for the next task


def keep_heap_blocks(mallopt) -> bool:
    """Let a worker reuse freed blocks of up to 32 MB instead of mapping fresh pages for each.

    Why: a Dask Nanny starts its worker with ``MALLOC_TRIM_THRESHOLD_=65536``, and setting any
    malloc threshold turns off glibc's adaptive one for mmap, which stays at 128 KB: every numpy
    array above it (the MinHash blocks are 4 MB) is a new mapping, zeroed page by page by the
    kernel and unmapped when freed. 10,000 signatures took 1.37 s under that setting against 0.24 s
    with these two thresholds (2 cores of an AMD EPYC with AVX-512; 0.37 s at glibc's defaults);
    a 100k-row Dask run spent 13.8 s in the kernel against 1.7 s in-process. What the heap keeps
    is given back by ``trim_if_over`` once a worker passes half its limit."""
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_SLACK))


def trim_if_over(rss: int, limit: int | None, trim, share: float = 0.5) -> bool:
    """Hand freed heap back to the system once a worker's resident memory passes ``share`` of its
    limit. Why: the heap Python frees between tasks (shuffles, bundles) stays in glibc's arenas, and
    Dask counts it as the worker's "unmanaged" memory; at 1M rows with workers capped at 2 GB one
    worker sat paused at its 80% mark holding 1.6 GB Dask counted as unmanaged (``malloc_trim(0)`` gave back
    0.7 GB), and the run went on with one worker. Dask sets ``MALLOC_TRIM_THRESHOLD_``, which trims
    only the top of the main arena."""
    if trim is None or not limit or rss <= share * limit:
        return False
    trim(0)
    return True


class TrimMemory(WorkerPlugin):
    """A Dask worker plugin: glibc's heap thresholds set once (``keep_heap_blocks``), then every
    second ``trim_if_over`` on the worker's own memory limit."""

    name = "curate-trim-memory"

    def setup(self, worker):
        import psutil
        from tornado.ioloop import PeriodicCallback

        proc, trim, limit = psutil.Process(), _libc_trim(), worker.memory_manager.memory_limit
        self.trims = 0
        self.heap_blocks = keep_heap_blocks(_libc("mallopt"))

        def check():
            self.trims += trim_if_over(proc.memory_info().rss, limit, trim)

        self._callback = PeriodicCallback(check, 1000)
        self._callback.start()

    def teardown(self, worker):
        self._callback.stop()


def killed_worker_message(exc, memory_limit: str | None) -> str:
    """One line for a task that every worker running it died on: on a cluster that is nearly
    always memory (a worker is restarted past 95% of its limit), so say that and what to change."""
    task = exc.task[0] if isinstance(exc.task, tuple) else exc.task
    limit = f"--dask_memory_limit={memory_limit}" if memory_limit else "their memory limit"
    deaths = exc.allowed_failures + 1
    return (f"dask: one task ({task}) killed its worker {deaths} time{'s' if deaths > 1 else ''}; a worker "
            f"is restarted when it passes 95% of {limit}: give the workers more memory")


def _pending(dask_scheduler, keys) -> tuple[int, int]:
    """(known, not yet run) among ``keys`` on the scheduler: a task that ran is in memory, erred,
    released or already forgotten (its result consumed); one not yet sent is unknown."""
    waiting = {"waiting", "queued", "processing", "no-worker"}
    known = pending = 0
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        if task is not None:
            known += 1
            pending += task.state in waiting
    return known, pending


class Result(beam_dask.DaskRunnerResult):
    def __init__(self, client, futures, cluster=None, run: str = "", memory_limit: str | None = None,
                 keys: list | None = None):
        self.cluster, self.run, self.memory_limit = cluster, run, memory_limit
        self.keys = keys or []  # the graph's tasks, for the progress lines
        super().__init__(client, futures)

    def _wait_with_progress(self) -> None:
        """Wait for the run, logging every ``PROGRESS_EVERY`` seconds how many of its tasks have
        run: the workers' own progress lines stay in the workers, and a 1M-row job runs minutes.
        No rate or ETA: a read unit's task takes seconds, a shuffle's thousands take milliseconds
        (at 100k rows a third of the time had run a tenth of the tasks)."""
        import time

        from distributed import wait

        from curate.stats import duration

        start, done = time.monotonic(), 0
        while True:
            try:
                wait(self.futures, timeout=PROGRESS_EVERY)  # an erred task counts as done: raised below
                return
            except TimeoutError:
                pass
            try:
                known, pending = self.client.run_on_scheduler(_pending, keys=self.keys)
            except Exception as exc:  # noqa: BLE001 - a progress line is not worth failing the run
                log.debug("dask: no progress from the scheduler: %s", exc)
                continue
            if known:
                done = max(done, len(self.keys) - pending)  # a task lost with its worker runs again
                log.info("dask: %s of %s tasks run (%s)", f"{done:,}", f"{len(self.keys):,}",
                         duration(time.monotonic() - start))

    def wait_until_finish(self, duration=None):
        from distributed import KilledWorker

        try:
            if duration is None and self.keys:
                self._wait_with_progress()
            return super().wait_until_finish(duration)
        except KilledWorker as exc:
            from curate.errors import CurateError

            raise CurateError(killed_worker_message(exc, self.memory_limit)) from None
        finally:
            if self.cluster is None:  # a cluster that outlives the run: free what the run set up
                try:
                    self.client.run(_forget, self.run)
                    self.client.unregister_worker_plugin(TrimMemory.name)
                except Exception as exc:  # noqa: BLE001
                    log.warning("dask: the run's DoFns and memory trim were not removed from the workers: %s", exc)
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()

    def metrics(self):
        raise NotImplementedError("the Dask runner keeps no Beam metrics; curate's stage stats travel as data")
