"""``curate`` command line: run, validate, inspect, select, policies, export, report, and the
recovery loop: compress, recover, evaluate.

Exit codes: 0 success; 2 a problem the user can fix (a ``CurateError``: the job
file, an input, a model, the output folder; one line on stderr, no traceback);
1 an unexpected failure (a bug): one line on stderr naming the error and a log
file that holds the traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings

from curate import __version__, storage
from curate.config import ConfigError
from curate.errors import CurateError
from curate.recover import OBJECTIVES
from curate.settings import Job, Select

USAGE_ERROR = 2
JOB_KEYS = frozenset(f.name for f in dataclasses.fields(Job))  # written "--set key=value", never "--key"
BUG = 1


class _QuietBeamImports(logging.Filter):
    """Beam warns at import about optional GCP clients we do not use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietBeamImports())
    if not verbose:
        for name in ("apache_beam", "absl", "faiss", "faiss.loader", "sentence_transformers", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        quiet_libraries()


def quiet_libraries() -> None:
    """Hide library output that tells a user nothing (``-v`` shows it): transformers' "Loading
    weights" bar at every model load (two per recovery) and peft's probe of a deprecated
    transformers property (a FutureWarning at every LoRA wrap). Set before transformers loads:
    it reads the progress-bar switch once; inherited by the processes a run starts."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _fail(message: str) -> int:
    print(f"curate: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _table(rows: list[tuple], header: tuple, text_last: bool = False) -> str:
    """Numbers right-aligned, the first column (and with ``text_last`` the last, free text that
    can be long) left-aligned, without trailing blanks."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    left = {0, len(header) - 1} if text_last else {0}
    line = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def summary(man: dict) -> str:
    """A readable table of a manifest's counts."""
    c = man["counts"]
    acc = man["accounting"]
    parts = [f"job {man['job']['name']!r}: {acc['rows_in']:,} rows in -> {acc['selected']:,} selected, "
             f"{acc['dropped']:,} dropped, {acc['rejected']:,} rejected "
             f"({'accounting holds' if acc['holds'] else 'ACCOUNTING BROKEN'}); "
             f"wall {man['timing']['wall_s']:.1f} s"]
    rows = [("dropped", r, n) for r, n in c["dropped"].items()] + \
           [("rejected", r, n) for r, n in c["rejected"].items()]
    if rows:
        parts.append(_table(rows, ("outcome", "reason", "rows")))
    src = [(s, v["rows_in"], v["selected"], sum(v["dropped"].values()), sum(v["rejected"].values()))
           for s, v in c["by_source"].items()]
    parts.append(_table(src, ("source", "rows in", "selected", "dropped", "rejected")))
    st = []
    for name, m in man["stages"].items():
        main = {k: v for k, v in m.items() if k not in ("busy_s", "rows_per_busy_s")}
        desc = ", ".join(f"{k}={v:,}" for k, v in main.items())
        st.append((name, m.get("busy_s", ""), m.get("rows_per_busy_s", ""), desc))
    parts.append(_table(st, ("stage", "busy s", "rows/busy s", "counts"), text_last=True))
    return "\n\n".join(parts)


def cmd_run(args, beam_args: list[str]) -> int:
    from curate import config
    from pipelines import job

    try:
        cfg = config.load(args.job, args.set)
    except ConfigError as err:
        return _fail(str(err))
    flags: list[str] = []
    for token in beam_args:  # accept "--name value" as well as "--name=value"
        if token.startswith("--"):
            flags.append(token)
        elif flags and "=" not in flags[-1]:
            flags[-1] = f"{flags[-1]}={token}"
        else:
            return _fail(f"unexpected argument {token!r} (Beam options look like --name=value)")
    for flag in flags:  # Beam keeps unknown options for the runner, so "--output x" would be ignored
        key = flag[2:].split("=", 1)[0]
        if key in JOB_KEYS:
            return _fail(f"--{key} is a job setting, not a Beam option: use --set {key}=VALUE")
    beam_args = flags
    args.output_dir = cfg.output  # where a crash log goes (beside the output)
    man = job.run(cfg, beam_args, overwrite=args.overwrite)
    print(summary(man))
    out = os.path.dirname(man["outputs"]["manifest"])
    print(f"\noutputs in {out}/")
    for name in ("selected", "annotated", "rejects"):
        print(f"  {name + '/':<11} {man['outputs'][name]}")
    print(f"  {'manifest':<11} {man['outputs']['manifest']}")
    print(f"  {'report':<11} {man['outputs']['report']}")
    return 0


def cmd_validate(args) -> int:
    from curate import config
    from curate.settings import to_dict

    try:
        cfg = config.load(args.job, args.set)
    except ConfigError as err:
        return _fail(str(err))
    n_files = sum(len(s.files) for s in cfg.inputs)
    print(f"{args.job}: valid; {len(cfg.inputs)} source(s), {n_files} file(s), output {cfg.output}")
    if args.show:
        print(json.dumps(to_dict(cfg), indent=2))
    return 0


def cmd_inspect(args) -> int:
    from curate import runs

    path = runs.finished(args.output)
    try:
        with storage.open_file(path, "r", encoding="utf-8") as fh:
            man = json.load(fh)
        print(summary(man))
    except (ValueError, KeyError) as err:
        return _fail(f"{path}: unreadable manifest ({err})")
    return 0


def _param_text(spec) -> str:
    types = "/".join(t.__name__ for t in getattr(spec, "types", (dict,)))
    bits = [types]
    if getattr(spec, "required", False):
        bits.append("required")
    elif getattr(spec, "default", None) is not None:
        bits.append(f"default {spec.default}")
    if getattr(spec, "choices", None):
        bits.append("one of " + "|".join(map(str, spec.choices)))
    return f"{'; '.join(bits)}: {spec.doc}"


def cmd_policies(args) -> int:
    from curate.select import BUILTINS, available

    for name, cls in sorted(available().items()):
        origin = "built-in" if name in BUILTINS else f"plugin ({cls.__module__}.{cls.__qualname__})"
        needs = []
        if cls.needs_budget:
            needs.append("a budget")
        if cls.needs_embeddings:
            needs.append("embeddings")
        print(f"{name}  [{origin}]{'  needs ' + ' and '.join(needs) if needs else ''}")
        print(f"    {cls.summary}")
        print(f"    scope: {' or '.join(cls.scopes)}; on a large pool (scope global): {cls.at_scale}")
        for key, spec in cls.params.items():
            print(f"    - {key}: {_param_text(spec)}")
    return 0


def _policy_args(args):
    import yaml

    from curate.select import Budget, make

    params = {}
    for item in args.param:
        if "=" not in item:
            raise ValueError(f"--param {item!r}: expected key=value")
        key, text = item.split("=", 1)
        params[key] = yaml.safe_load(text) if text else None
    budget = {k: v for k, v in (("rows", args.rows), ("fraction", args.fraction), ("tokens", args.tokens))
              if v is not None}
    return make(args.policy, params), Budget.parse(budget)


def _counts_table(title: str, counts: dict) -> str:
    rows = [(k, v["pool"], v["selected"]) for k, v in counts.items()]
    return _table(rows, (title, "pool", "selected"))


def cmd_select(args) -> int:
    from curate import runs
    from curate.reselect import select_run
    from curate.select import PolicyError

    try:
        policy, budget = _policy_args(args)
        man = runs.manifest(args.output)
        seed = man.get("seed", 0) if args.seed is None else args.seed
        rep = select_run(args.output, policy, budget, seed, args.out, args.scope, args.max_candidates or None)
    except (PolicyError, runs.RunError, ValueError) as err:
        return _fail(str(err))
    print(f"policy {rep['policy']} ({json.dumps(rep.get('params', rep.get('steps')))}), budget "
          f"{rep['budget'] or 'none'}, seed {rep['seed']}: {rep['selected']:,} of {rep['pool']:,} candidate rows "
          f"selected")
    if rep["dropped"]:
        print(_table(sorted(rep["dropped"].items()), ("dropped because", "rows")))
    print(_counts_table("source", rep["by_source"]))
    print(_counts_table("cluster", rep["by_cluster"]))
    print(f"\nselection in {rep['output']}/ (selected/, decisions.parquet, selection.json)")
    return 0


def cmd_export(args) -> int:
    from curate import runs
    from curate.export import export

    try:
        path, n = export(args.output, args.format, args.out)
    except runs.RunError as err:
        return _fail(str(err))
    print(f"{n:,} selected rows written as {args.format} to {path}")
    return 0


def cmd_report(args) -> int:
    from curate import runs
    from curate.report import write_report

    try:
        path = write_report(args.output, args.out)
    except runs.RunError as err:
        return _fail(str(err))
    print(f"report written to {path}")
    return 0


def read_rows(path: str) -> list[dict]:
    from curate.runs import read_rows as rows_at

    return rows_at(path)


def _selected_rows(folder: str) -> list[dict]:
    from curate import runs

    return runs.selected(folder).select(["id", "source", "prompt", "response", "messages"]).to_pylist()


def _bar(label: str):
    """A progress line on stderr, rewritten in place (curate's long loops report through it)."""
    start = time.monotonic()

    def show(done: int, total: int, extra: str = "") -> None:
        rate = done / max(time.monotonic() - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total} ({rate:.2f}/s, ETA {eta:.0f} s){extra}   ", end=end, file=sys.stderr,
              flush=True)
    return show


def cmd_compress(args) -> int:
    from curate.compress import CompressSettings, compress

    rows = read_rows(args.calibration)
    nm = tuple(int(x) for x in args.nm.split(":")) if args.nm else None
    s = CompressSettings(method=args.method, sparsity=args.sparsity, nm=nm, layers=args.layers,
                         calibration_rows=args.calibration_rows, cutoff=args.cutoff, seed=args.seed)
    bar = _bar(f"compress ({s.method})")
    card = compress(args.model, rows, args.out, s, n_heldout=args.heldout, progress=bar)
    h = card.heldout
    what = (f"dropped layers {card.dropped_layers}" if card.dropped_layers
            else f"sparsity {card.achieved_sparsity:.4f}")
    print(f"\n{card.method}: {what}; held-out NLL on {h['rows']} rows {h['nll_dense']:.4f} dense -> "
          f"{h['nll_compressed']:.4f} compressed")
    print(f"model written to {os.path.abspath(args.out)}/ (card.json, README.md)")
    return 0


def cmd_recover(args) -> int:
    from curate.recover import RecoverSettings, recover

    rows = _selected_rows(args.output)
    s = RecoverSettings(r=args.r, alpha=args.alpha, lr=args.lr, epochs=args.epochs, steps=args.steps,
                        batch_size=args.batch_size, cutoff=args.cutoff, seed=args.seed, objective=args.objective,
                        kd_weight=args.kd_weight)
    bar = _bar(f"recover ({s.objective})")
    out = args.out or os.path.join(args.output, "recovered")
    _, _, rep = recover(args.model, rows, out, s, progress=lambda step, total, loss: bar(step, total,
                                                                                        f" loss {loss:.4f}"),
                        dense=args.dense)
    print(f"trained LoRA ({s.objective}) on {rep['rows']} rows, {rep['steps']} steps in {rep['seconds']:.0f} s "
          f"({rep['seconds_per_step']:.1f} s/step): loss {rep['loss'][0]:.4f} -> {rep['loss'][-1]:.4f}")
    print(f"adapter (unmerged) written to {os.path.abspath(out)}/")
    return 0


def cmd_evaluate(args) -> int:
    import yaml

    from curate.evaluate import EvaluateSettings, evaluate, table_text

    params: dict = {}
    for item in args.param:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            return _fail(f"--param {item!r}: expected policy.key=value")
        key, text = item.split("=", 1)
        policy, name = key.split(".", 1)
        params.setdefault(policy, {})[name] = yaml.safe_load(text)
    evals = []
    for item in args.eval:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            return _fail(f"--eval {item!r}: expected NAME=PATH")
        if not os.path.exists(path):
            return _fail(f"--eval {item!r}: no file or folder {path!r}")
        evals.append((name, path))
    recover = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                                 ("cutoff", args.cutoff), ("objective", args.objective),
                                 ("kd_weight", args.kd_weight)) if v is not None}
    matched = None if args.length_matched == "all" else tuple(
        p for p in args.length_matched.split(",") if p and p != "none")
    s = EvaluateSettings(compressed=args.model, budget=args.rows, policies=tuple(args.policies.split(",")),
                         params=params, seeds=tuple(int(x) for x in args.seeds.split(",")), heldout=args.heldout,
                         dense=args.dense, recover=recover, evals=tuple(evals), length_matched=matched,
                         whole_pool=not args.no_whole_pool)
    bar = _bar(f"evaluate ({s.recover.get('objective', 'sft')}: model x seed recoveries)")
    summary = evaluate(args.output, s, args.out,
                       progress=lambda done, total, r: bar(done, total, f" {r['policy']} seed {r['seed']}: "
                                                                        f"{r['set']} NLL {r['nll']:.4f}"))
    print(table_text(summary))
    print(f"\nresults in {summary['output']}/ (results.parquet, heldout.parquet, summary.json)")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="curate", description="Curate instruction-tuning data.")
    ap.add_argument("--version", action="version", version=f"curate {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="show Beam's own log lines")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file; extra --options go to Beam",
                         description="Run a job. Any other --option=value is a Beam pipeline option, "
                                     "e.g. --direct_running_mode=multi_processing --direct_num_workers=2.")
    run.add_argument("job")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a job-file key, e.g. --set sample.n=100 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    val = sub.add_parser("validate", help="check a job file without running it")
    val.add_argument("job")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.add_argument("--show", action="store_true", help="print the resolved config")
    ins = sub.add_parser("inspect", help="print the counts of a finished run")
    ins.add_argument("output")
    sel = sub.add_parser("select", help="apply a selection policy to a finished run (no score is recomputed)",
                         description="Apply a policy to a finished run's annotated/ rows that no dedup stage "
                                     "dropped. The run is not changed; the selection goes to --out.")
    sel.add_argument("output", help="a finished run's output folder")
    sel.add_argument("--policy", required=True, help="policy name (see: curate policies)")
    sel.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="policy parameter, value parsed as YAML, e.g. --param column=ifd_ppl (repeatable)")
    budget = sel.add_mutually_exclusive_group()
    budget.add_argument("--rows", type=int, help="keep at most this many rows")
    budget.add_argument("--fraction", type=float, help="keep this fraction of the candidate rows")
    budget.add_argument("--tokens", type=int, help="keep at most this many tokens (estimated: characters / 4)")
    sel.add_argument("--seed", type=int, help="default: the run's seed")
    sel.add_argument("--scope", choices=("global", "cluster"), default="global",
                     help="cluster: the policy runs on each cluster alone with its share of the budget")
    default_max = Select.max_candidates
    sel.add_argument("--max-candidates", type=int, default=default_max, metavar="N",
                     help="with --scope global, the most candidates a policy that compares rows sees at once: its "
                          "shortlist (e.g. DEITA's top N by score) cuts a larger pool first, as the job's "
                          f"select.max_candidates does (default {default_max:,}; 0: every candidate)")
    sel.add_argument("--out", help="where to write the selection (default OUTPUT/selections/POLICY)")
    sub.add_parser("policies", help="list the installed selection policies and their parameters")
    exp = sub.add_parser("export", help="write selected/ as alpaca-json, sharegpt-json or messages-jsonl")
    exp.add_argument("output", help="a finished run (or a curate select output) folder")
    exp.add_argument("--format", required=True, choices=("alpaca-json", "sharegpt-json", "messages-jsonl"))
    exp.add_argument("--out", help="file to write (default OUTPUT/export/<format file>)")
    com = sub.add_parser("compress", help="prune a causal LM (Wanda, magnitude, N:M, layer drop) into a model folder")
    com.add_argument("--model", default=None, help="model name or folder (default: the packaged SmolLM2-135M-Instruct)")
    com.add_argument("--calibration", required=True, help="a finished run's folder or a json/jsonl/parquet file of rows")
    com.add_argument("--out", required=True, help="folder to write the compressed model to")
    com.add_argument("--method", default="wanda", choices=("wanda", "magnitude", "layer_drop"))
    com.add_argument("--sparsity", type=float, default=0.5, help="share of weights set to zero (default 0.5)")
    com.add_argument("--nm", help="N:M semi-structured pruning instead of a share, e.g. 2:4")
    com.add_argument("--layers", type=int, default=0, help="layer_drop: decoder layers to remove")
    com.add_argument("--calibration-rows", type=int, default=32)
    com.add_argument("--heldout", type=int, default=40, help="held-out rows for the card's loss (default 40)")
    com.add_argument("--cutoff", type=int, default=256, help="tokens per row (default 256)")
    com.add_argument("--seed", type=int, default=0)
    rec = sub.add_parser("recover", help="LoRA-train a compressed model on a selection (adapter saved unmerged)")
    rec.add_argument("output", help="a finished run or a curate select folder: trains on its selected/")
    rec.add_argument("--model", required=True, help="the compressed model folder (curate compress --out)")
    rec.add_argument("--out", help="adapter folder (default OUTPUT/recovered)")
    rec.add_argument("--r", type=int, default=8)
    rec.add_argument("--alpha", type=int, default=16)
    rec.add_argument("--lr", type=float, default=3e-4)
    rec.add_argument("--epochs", type=int, default=1)
    rec.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    rec.add_argument("--batch-size", type=int, default=8)
    rec.add_argument("--cutoff", type=int, default=256)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--objective", choices=OBJECTIVES, default="sft",
                     help="sft: loss on the response tokens; kd: forward KL from the dense model (run beside the "
                          "student) on the response tokens; sft+kd: their sum (default sft)")
    rec.add_argument("--kd-weight", type=float, default=1.0, help="sft+kd: the weight of the KD term (default 1)")
    rec.add_argument("--dense", help="the dense model for kd (default: the compressed model card's base model)")
    ev = sub.add_parser("evaluate", help="recover the same compressed model on several policies' selections and "
                                         "compare them on held-out rows",
                        description="On 2 CPU cores one LoRA step (batch 8 x 256 tokens, SmolLM2-135M) takes "
                                    "about 12 s: policies x seeds x steps sets the time.")
    ev.add_argument("output", help="a finished, scored run")
    ev.add_argument("--model", required=True, help="the compressed model folder")
    ev.add_argument("--rows", type=int, required=True, help="the budget: rows each policy selects")
    ev.add_argument("--policies", default="random,superfiltering,cluster_balanced,paser",
                    help="comma-separated; LABEL=POLICY runs a policy twice with other --param values, e.g. "
                         "rds=targeted,less=targeted (default random,superfiltering,cluster_balanced,paser)")
    ev.add_argument("--param", action="append", default=[], metavar="POLICY.KEY=VALUE",
                    help="a policy parameter, e.g. --param cluster_balanced.score=ifd_loss (repeatable)")
    ev.add_argument("--seeds", default="0,1,2", help="paired seeds (default 0,1,2)")
    ev.add_argument("--heldout", type=int, default=48,
                    help="held-out rows of the run, never selectable (default 48; 0: only the --eval sets)")
    ev.add_argument("--dense", help="the dense model (default: the compressed model card's base model)")
    ev.add_argument("--steps", type=int, help="LoRA steps per recovery (default: one epoch)")
    ev.add_argument("--lr", type=float)
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--cutoff", type=int)
    ev.add_argument("--objective", choices=OBJECTIVES, help="recovery objective: sft, kd or sft+kd (default sft)")
    ev.add_argument("--kd-weight", type=float, help="sft+kd: the weight of the KD term (default 1)")
    ev.add_argument("--eval", action="append", default=[], metavar="NAME=PATH",
                    help="an evaluation set of your own (any row form curate reads; repeatable). Pool rows that "
                         "also occur in it, exactly or as near duplicates, are never selected")
    ev.add_argument("--length-matched", default="all", metavar="all|none|P1,P2",
                    help="policies that also get a random baseline of the same token count (default all)")
    ev.add_argument("--no-whole-pool", action="store_true",
                    help="skip the whole-pool baseline (run by default when the steps cover the pool once)")
    ev.add_argument("--out", help="results folder (default OUTPUT/eval)")
    rep = sub.add_parser("report", help="(re)write a finished run's report.html")
    rep.add_argument("output")
    rep.add_argument("--out", help="file to write (default OUTPUT/report.html)")
    return ap


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception in one line. Beam wraps a worker's error in a long
    message whose last ``SomeError: ...`` line is the cause; that line is the one shown."""
    text = str(exc)
    causes = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[A-Za-z_][\w.]*(Error|Exception): ", ln)]
    line = causes[-1] if causes else f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"
    line = re.sub(r" \[while running '.*$", "", line).strip()
    return line if len(line) <= 300 else line[:297] + "..."


def crash_log(command: str, output: str | None, exc: BaseException) -> str:
    """Write the traceback to a log file and return its path: beside the run's output folder
    when there is one on this machine's disk, else under curate's cache folder."""
    from curate.models import cache_root
    from curate.storage import is_remote

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidates = []
    if output and not is_remote(output):
        out = os.path.abspath(output)
        candidates.append(f"{out}.error-{stamp}.log")
    candidates.append(os.path.join(cache_root(), "logs", f"curate-{command}-{stamp}-{os.getpid()}.log"))
    body = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for path in candidates:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(f"curate {__version__} {command}: {one_line(exc)}\n\n{body}")
            return path
        except OSError:
            continue
    return "(no log could be written; the traceback follows)\n" + body


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    _setup_logging(args.verbose)
    commands = {"validate": cmd_validate, "inspect": cmd_inspect, "select": cmd_select, "policies": cmd_policies,
                "export": cmd_export, "report": cmd_report, "compress": cmd_compress, "recover": cmd_recover,
                "evaluate": cmd_evaluate}
    try:
        if args.command == "run":
            return cmd_run(args, extra)
        if extra:
            return _fail(f"unrecognized arguments: {' '.join(extra)}")
        return commands[args.command](args)
    except CurateError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        print("curate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in a log
        path = crash_log(args.command, getattr(args, "output_dir", None) or getattr(args, "output", None), exc)
        print(f"curate: unexpected error: {one_line(exc)} (traceback in {path})", file=sys.stderr)
        return BUG


if __name__ == "__main__":
    sys.exit(main())
