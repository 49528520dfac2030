"""``curate`` command line: run, validate, inspect.

Exit codes: 0 success; 2 a problem with the job file, an input or the output
folder (one line on stderr, no traceback); 1 an unexpected failure (a bug:
the traceback is printed).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from curate import __version__
from curate.config import ConfigError

USAGE_ERROR = 2


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


def _fail(message: str) -> int:
    print(f"curate: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
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
    parts.append(_table(st, ("stage", "busy s", "rows/busy s", "counts")))
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
    beam_args = flags
    from curate.device import DeviceUnavailable
    from curate.models import ModelNotFound

    try:
        man = job.run(cfg, beam_args, overwrite=args.overwrite)
    except (job.OutputExistsError, job.InputError, ModelNotFound, DeviceUnavailable) as err:
        return _fail(str(err))
    print(summary(man))
    out = os.path.dirname(man["outputs"]["manifest"])
    print(f"\noutputs in {out}/")
    for name in ("selected", "annotated", "rejects"):
        print(f"  {name + '/':<11} {man['outputs'][name]}")
    print(f"  {'manifest':<11} {man['outputs']['manifest']}")
    return 0


def cmd_validate(args) -> int:
    from curate import config

    try:
        cfg = config.load(args.job, args.set)
    except ConfigError as err:
        return _fail(str(err))
    n_files = sum(len(s["files"]) for s in cfg["inputs"])
    print(f"{args.job}: valid; {len(cfg['inputs'])} source(s), {n_files} file(s), output {cfg['output']}")
    if args.show:
        print(json.dumps(cfg, indent=2))
    return 0


def cmd_inspect(args) -> int:
    path = os.path.join(args.output, "manifest.json")
    if not os.path.isfile(path):
        return _fail(f"{args.output}: no manifest.json (not a finished curate run)")
    try:
        with open(path, encoding="utf-8") as fh:
            man = json.load(fh)
        print(summary(man))
    except (ValueError, KeyError) as err:
        return _fail(f"{path}: unreadable manifest ({err})")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    _setup_logging(args.verbose)
    if args.command == "run":
        return cmd_run(args, extra)
    if extra:
        return _fail(f"unrecognized arguments: {' '.join(extra)}")
    return {"validate": cmd_validate, "inspect": cmd_inspect}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
