"""The report's per-row aggregates (Arrow, no Python object per row) against plain Python loops."""
import math
import random

import numpy as np
import pyarrow as pa

from curate import report
from curate.select.features import DEDUP_REASONS


def _table(n=400, seed=3):
    rng = random.Random(seed)
    reasons = [None, None, None, "random:over_budget", "min_score:below", *DEDUP_REASONS]
    rows = []
    for i in range(n):
        reason = rng.choice(reasons)
        selected = reason is None and rng.random() < 0.7
        score = rng.choice([None, math.nan, math.inf, rng.gauss(1, 0.3), rng.gauss(1, 0.3)])
        rows.append({"id": f"r{i:04d}", "selected": selected, "drop_reason": None if selected else (reason or "cap"),
                     "cluster_id": rng.choice([None, 0, 1, 2, 3, 7]), "ifd_loss": score,
                     "rds_subtask": rng.choice([None, "math", "code"])})
    return pa.Table.from_pylist(rows), rows


def test_cluster_counts_and_score_split_match_a_row_by_row_count():
    table, rows = _table()
    cand = [r for r in rows if r["drop_reason"] not in DEDUP_REASONS]
    pool, chosen = {}, {}
    for r in cand:
        if r["cluster_id"] is not None:
            pool[r["cluster_id"]] = pool.get(r["cluster_id"], 0) + 1
            chosen[r["cluster_id"]] = chosen.get(r["cluster_id"], 0) + int(r["selected"])
    expected = sorted(((c, n, chosen[c]) for c, n in pool.items()), key=lambda t: (-t[1], t[0]))
    assert report.cluster_counts(table) == expected and len(expected) == 5

    finite = lambda r: r["ifd_loss"] is not None and math.isfinite(r["ifd_loss"])  # noqa: E731
    kept, dropped = report.score_table(table, "ifd_loss")
    assert kept.tolist() == [r["ifd_loss"] for r in cand if r["selected"] and finite(r)]
    assert dropped.tolist() == [r["ifd_loss"] for r in cand if not r["selected"] and finite(r)]
    assert len(kept) and len(dropped) and not np.isnan(np.concatenate([kept, dropped])).any()


def test_the_report_reads_no_text_column_of_every_row():
    assert not set(report.REPORT_COLUMNS) & {*report.TEXT_COLUMNS, "instruction", "input"}
    assert {"ifd_loss", "rds_score", "rds_subtask", "cluster_id", "near_dup_of"} <= set(report.REPORT_COLUMNS)
