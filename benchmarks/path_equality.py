"""The batch path's outputs against the row path's and Dask's, row for row, on a scale pool.

``python -m benchmarks.path_equality [ROWS] [row,batch_dask]``: runs the throughput job (exact and
near dedup, ``random`` 25%) on ``benchmarks.scale.make_pool``'s pool of ROWS rows (default 10,000)
with the batch path on the default runner, the row path (``path: row``) and the batch path on Dask
with 2 workers, and asserts annotated/ and selected/ are equal frame for frame. A check at sizes
the test suite cannot afford (10,000 rows: about 40 s on 2 cores; 100,000: about 2.2 minutes).
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pandas as pd
import yaml

from benchmarks.common import REPO, pinned_job
from benchmarks.scale import SOURCES, make_pool


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    tmp = tempfile.mkdtemp(prefix="curate-paths-")
    try:
        _compare(n, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compare(n: int, tmp: str) -> None:
    data = os.path.join(tmp, "pool")
    os.makedirs(data)
    make_pool(n, data)
    runs = {"batch": ("batch", []), "row": ("row", []), "batch_dask": ("batch", ["--runner=DaskRunner", "--dask_workers=2"])}
    if len(sys.argv) > 2:
        runs = {"batch": runs["batch"], **{k: v for k, v in runs.items() if k in sys.argv[2].split(",")}}
    out = {}
    for name, (path, flags) in runs.items():
        o = os.path.join(tmp, name)
        job = {**pinned_job(("dedup.exact", "dedup.near"), name="eq", output=o,
                            inputs=[{"source": s, "path": os.path.join(data, f"{s}.jsonl")} for s in SOURCES],
                            select={"policy": "random", "budget": {"fraction": 0.25}}), "path": path}
        with open(o + ".yaml", "w") as fh:
            yaml.safe_dump(job, fh)
        r = subprocess.run([sys.executable, "-m", "curate", "run", o + ".yaml", "--overwrite", *flags], capture_output=True,
                           text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = {k: pd.read_parquet(f"{o}/{k}").sort_values("id").reset_index(drop=True) for k in ("annotated", "selected")}
    base = out.pop("batch")
    for name, o in out.items():
        for k in ("annotated", "selected"):
            pd.testing.assert_frame_equal(base[k], o[k])
        print(name, "identical to batch:", {k: len(v) for k, v in o.items()})
    print("selected", base["selected"].shape, base["annotated"].drop_reason.value_counts().to_dict())


if __name__ == "__main__":
    main()
