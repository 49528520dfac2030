"""``python -m benchmarks NAME... [--quick]`` (``all`` runs every benchmark)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

BENCHMARKS = {
    "foundation": "benchmarks.foundation",
    "minhash": "benchmarks.minhash",
    "near_quality": "benchmarks.near_quality",
    "embed": "benchmarks.embed",
    "ifd": "benchmarks.ifd",
    "ifd_llama": "benchmarks.ifd_llama",
    "ifd_onnx": "benchmarks.ifd_onnx",
    "ifd_compile": "benchmarks.ifd_compile",
    "select": "benchmarks.select",
    "recovery": "benchmarks.recovery",
    "targeted": "benchmarks.targeted",
    "less": "benchmarks.less",
    "rewrite": "benchmarks.rewrite",
    "scale": "benchmarks.scale",
    "throughput": "benchmarks.throughput",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(BENCHMARKS)} or all")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes: 1 to 4 minutes each on 2 cores (an AMD EPYC with AVX-512: ifd 70 s, "
                         "embed 74 s, scale 152 s, targeted 219 s; an AMD EPYC with AVX2 only: ifd 105 s, embed 114 s, "
                         "ifd_llama 79 s, ifd_onnx 142 s)")
    ap.add_argument("--only", metavar="SCENARIO[,SCENARIO]",
                    help="recovery: run these scenarios only (general, targeted, noisy, noisy-replication)")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        module.run(args.quick, only=args.only) if args.only and name == "recovery" else module.run(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
