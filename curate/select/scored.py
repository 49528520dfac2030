"""Policies that rank by one score column: all, random, threshold, top_k, targeted, superfiltering.

NaN (a failed or undefined score) is never selected: it is dropped as ``score_nan``.
Ties are broken by id (the pool is sorted by id and the sorts are stable).
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from curate.cluster import sample_rank
from curate.select.base import Budget, Param, Policy, PolicyError, Pool, Selection, ranked

COLUMN = Param((str,), None, "score column to rank by (any numeric column of annotated/)", required=True)
HIGHER = Param((bool,), True, "true: larger scores are better")


def hash_keys(ids: list[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random key per id in [0, 1), from the id alone, so no order or batch
    changes it (the k-means sample's ``sample_rank``, scaled)."""
    return np.array([sample_rank(seed, rid) / 2.0 ** 64 for rid in ids], dtype=np.float64)


def numeric_value(row: dict, name: str, policy: str) -> float:
    """One row's ``numeric_column`` value: null -> NaN."""
    v = row.get(name)
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PolicyError(f"policy {policy}: column {name!r} is {type(v).__name__}, not numeric")
    return float(v)


def numeric_column(pool: Pool, name: str, policy: str) -> np.ndarray:
    import pyarrow as pa

    col = pool.table.column(name)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
        raise PolicyError(f"policy {policy}: column {name!r} is {col.type}, not numeric")
    return pool.values(name)


class All(Policy):
    name = "all"
    at_scale = "keyed: decided range by range (with a token budget, its own ranking is its shortlist)"
    summary = "keep every row no earlier stage dropped (the default); a budget keeps the first rows by id"

    def keyed(self, budget: Budget) -> bool:
        return budget.tokens is None

    def row_key(self, row: dict, seed: int):
        return 0, 0.0  # id order

    def choose(self, pool: Pool) -> Selection:
        return pool.take_in_order(range(len(pool)))


class Random(Policy):
    name = "random"
    at_scale = "keyed: decided range by range (with a token budget, its own ranking is its shortlist)"
    summary = "seeded uniform sample, the baseline every other policy should beat"
    needs_budget = True

    def keyed(self, budget: Budget) -> bool:
        return budget.tokens is None

    def row_key(self, row: dict, seed: int):
        return 0, sample_rank(seed, row["id"]) / 2.0 ** 64  # hash_keys' value

    def row_keys(self, table: pa.Table, seed: int) -> list:
        return [(0, v) for v in hash_keys(table.column("id").to_pylist(), seed).tolist()]

    def choose(self, pool: Pool) -> Selection:
        return pool.take_in_order(np.argsort(hash_keys(pool.ids, pool.seed), kind="stable"))


class _ByColumn(Policy):
    at_scale = "keyed: decided range by range (with a token budget, its own ranking is its shortlist)"

    def required_columns(self):
        return (self.p["column"],)

    def keyed(self, budget: Budget) -> bool:
        return budget.tokens is None

    def _drop(self, v: float) -> str | None:
        """A reason to drop a row whose score ``v`` is not NaN (none by default)."""
        return None

    def row_key(self, row: dict, seed: int):
        v = numeric_value(row, self.p["column"], self.name)
        if math.isnan(v):
            return "score_nan"
        why = self._drop(v)
        if why:
            return why
        return 0, -v if self.p.get("higher_is_better", True) else v

    def _keys(self, pool: Pool) -> tuple[np.ndarray, dict[str, str]]:
        keys = numeric_column(pool, self.p["column"], self.name)
        dropped = {}
        for i, v in enumerate(keys):
            why = "score_nan" if np.isnan(v) else self._drop(float(v))
            if why:
                dropped[pool.ids[i]] = why
        return keys, dropped


class Threshold(_ByColumn):
    name = "threshold"
    summary = "keep rows whose score lies within [min, max]; ranked by the score, a budget caps the count"
    params = {"column": COLUMN,
              "min": Param((int, float), None, "lowest score kept"),
              "max": Param((int, float), None, "highest score kept"),
              "strict": Param((bool,), False, "true: exclude the bounds themselves"),
              "higher_is_better": HIGHER}

    def validate(self):
        if self.p["min"] is None and self.p["max"] is None:
            raise PolicyError("policy threshold: give min, max or both")
        if self.p["min"] is not None and self.p["max"] is not None and self.p["min"] > self.p["max"]:
            raise PolicyError("policy threshold: min is above max")

    def _drop(self, v: float) -> str | None:
        lo, hi, strict = self.p["min"], self.p["max"], self.p["strict"]
        if lo is not None and (v <= lo if strict else v < lo):
            return "below_min"
        if hi is not None and (v >= hi if strict else v > hi):
            return "above_max"
        return None

    def choose(self, pool: Pool) -> Selection:
        keys, dropped = self._keys(pool)
        return pool.take_in_order(ranked(keys, self.p["higher_is_better"]), dropped)


class TopK(_ByColumn):
    name = "top_k"
    summary = "the budget's best rows by one score column"
    params = {"column": COLUMN, "higher_is_better": HIGHER}
    needs_budget = True

    def choose(self, pool: Pool) -> Selection:
        keys, dropped = self._keys(pool)
        return pool.take_in_order(ranked(keys, self.p["higher_is_better"]), dropped)


class Targeted(_ByColumn):
    name = "targeted"
    at_scale = ("keyed without max_per_cluster (a token budget: its own ranking is its shortlist); with it, "
                "shortlist: top_k by its column, the select.max_candidates rows its walk visits first")
    summary = ("targeted selection (RDS+ or LESS): the budget's rows most like the job's targets, "
               "optionally at most max_per_cluster rows from one cluster")
    params = {"column": Param((str,), "rds_score", "targeted score column to rank by"),
              "max_per_cluster": Param((int,), None, "cap on rows taken from one cluster (none: no cap); "
                                       "rows over it are dropped as cluster_cap", minimum=1),
              "subtasks": Param((str,), "max", "max: rank by the best subtask's score (a subtask whose cosines "
                                "run higher can take the whole budget); balanced: each target subtask an "
                                "equal share, filled round-robin, each subtask taking its best row not yet "
                                "taken by its own score (the *_subtasks column), so a short subtask's share "
                                "passes on (RDS+'s multi-task round-robin, arXiv 2503.01807)",
                                choices=("max", "balanced"))}
    needs_budget = True

    def validate(self):
        if self.p["subtasks"] == "balanced":
            if not self.p["column"].endswith("_score"):
                raise PolicyError("policy targeted: subtasks balanced needs a *_score column with its *_subtasks "
                                  "beside it (rds_score, less_score)")
            if self.p["max_per_cluster"] is not None:
                raise PolicyError("policy targeted: subtasks balanced and max_per_cluster do not combine")

    @property
    def subtasks_column(self) -> str:
        return self.p["column"][:-len("_score")] + "_subtasks"

    def required_columns(self):
        return (self.p["column"],) + ((self.subtasks_column,) if self.p["subtasks"] == "balanced" else ())

    def keyed(self, budget: Budget) -> bool:
        # balanced: a row's place depends on the rows other subtasks took first; not a sort of rows
        return budget.tokens is None and self.p["max_per_cluster"] is None and self.p["subtasks"] == "max"

    def shortlist(self) -> Policy | None:
        if self.p["subtasks"] == "balanced":
            return None  # a top-k by the max score would cut the subtask whose scores run lower
        # with a cluster cap it walks rows in score order: the best rows by score are the ones it visits first
        return self if self.p["max_per_cluster"] is None else TopK(column=self.p["column"])

    def _balanced_order(self, pool: Pool, dropped: dict) -> list[int]:
        """Row indices in round-robin order over the subtasks (sorted by name): at each turn a
        subtask takes its best-scoring row that no subtask took yet; ties by id (the pool's order)."""
        import json

        raw = pool.strings(self.subtasks_column)
        per_row = [json.loads(v) if v else {} for v in raw]
        names = sorted({n for d in per_row for n in d})
        ranked_by = {}
        for n in names:
            scores = np.array([d.get(n, math.nan) for d in per_row], dtype=np.float64)
            ok = [int(i) for i in ranked(scores, True) if not np.isnan(scores[int(i)])
                  and pool.ids[int(i)] not in dropped]
            ranked_by[n] = ok
        order, taken, pos = [], set(), dict.fromkeys(names, 0)
        while any(pos[n] < len(ranked_by[n]) for n in names):
            for n in names:
                rows = ranked_by[n]
                while pos[n] < len(rows) and rows[pos[n]] in taken:
                    pos[n] += 1
                if pos[n] < len(rows):
                    taken.add(rows[pos[n]])
                    order.append(rows[pos[n]])
                    pos[n] += 1
        return order

    def choose(self, pool: Pool) -> Selection:
        keys, dropped = self._keys(pool)
        if self.p["subtasks"] == "balanced":
            return pool.take_in_order(self._balanced_order(pool, dropped), dropped)
        order = ranked(keys, True)
        cap = self.p["max_per_cluster"]
        if cap is not None:
            clusters = pool.values("cluster_id") if pool.has("cluster_id") else np.full(len(pool), np.nan)
            if len(pool) and np.isnan(clusters).all():
                raise PolicyError("policy targeted: max_per_cluster needs cluster_id (enable the cluster stage)")
            taken: dict[float, int] = {}
            limit = pool.max_rows
            kept = 0
            for i in order:
                rid = pool.ids[int(i)]
                if rid in dropped or (limit is not None and kept >= limit):
                    continue
                c = clusters[int(i)]
                if np.isnan(c):  # a row without a cluster is not capped
                    kept += 1
                    continue
                if taken.get(c, 0) >= cap:
                    dropped[rid] = "cluster_cap"
                    continue
                taken[c] = taken.get(c, 0) + 1
                kept += 1
        return pool.take_in_order(order, dropped)


class Superfiltering(_ByColumn):
    name = "superfiltering"
    summary = ("Superfiltering / Cherry IFD selection: drop IFD >= upper (misaligned pairs) and NaN, "
               "keep the highest IFD (methods.md 1.5)")
    params = {"column": Param((str,), "ifd_loss", "IFD column: ifd_loss (Cherry's ratio) or ifd_ppl"),
              "upper": Param((int, float), 1.0, "rows with IFD >= upper are dropped (strict <, as the reference)"),
              "lower": Param((int, float), 0.0, "rows with IFD <= lower are dropped")}
    needs_budget = True

    def validate(self):
        if self.p["lower"] >= self.p["upper"]:
            raise PolicyError("policy superfiltering: lower must be below upper")

    def _drop(self, v: float) -> str | None:
        if v >= self.p["upper"]:
            return "ifd_ge_upper"
        if v <= self.p["lower"]:
            return "ifd_le_lower"
        return None

    def choose(self, pool: Pool) -> Selection:
        keys, dropped = self._keys(pool)
        return pool.take_in_order(ranked(keys, True), dropped)
