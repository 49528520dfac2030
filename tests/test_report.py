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


def test_the_map_reads_only_the_sampled_embeddings_and_draws_the_same_points(tmp_path):
    import pyarrow.parquet as pq
    import pytest

    from curate import runs

    rng = np.random.default_rng(0)
    vectors = {f"r{i:04d}": rng.normal(size=8).astype(np.float32) for i in range(0, 400, 2)}  # half the rows
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "manifest.json").write_text("{}")  # a finished run's marker; nothing else is read here
    items = sorted(vectors.items())
    for k, part in enumerate((items[:120], items[120:])):
        pq.write_table(pa.table({"id": [i for i, _ in part],
                                 "embedding": pa.array([v.tolist() for _, v in part], pa.list_(pa.float32(), 8))}),
                       tmp_path / "embeddings" / f"part-{k}.parquet")
    table, rows = _table()
    xy, sel = report.embedding_map(str(tmp_path), table, limit=50, seed=1)
    # the same points as taking them from the whole matrix
    keep = [i for i, r in enumerate(rows) if r["id"] in vectors]
    keep = sorted(np.random.default_rng(1).choice(keep, 50, replace=False).tolist())
    x = np.stack([vectors[rows[i]["id"]] for i in keep]).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    assert np.allclose(xy, x @ vt[:2].T) and sel.tolist() == [rows[i]["selected"] for i in keep]
    got = runs.embeddings(str(tmp_path), ["r0398", "r0000", "r0398"])  # in the order asked, across files
    assert np.array_equal(got, np.stack([vectors["r0398"], vectors["r0000"], vectors["r0398"]]))
    assert runs.embeddings(str(tmp_path), []).shape == (0, 8)
    with pytest.raises(runs.RunError, match="lacks 1 of the ids"):
        runs.embeddings(str(tmp_path), ["r0000", "r0001"])
