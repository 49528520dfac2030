"""Quota policies: cluster_balanced (Diversify-and-Conquer's kMQ) and mixture (per-source shares).

Quotas are whole numbers that sum exactly to the budget (or to the pool, when smaller):
each group gets its share of what is left, capped at its size, and what a small group
cannot take goes to the others (methods.md 6a: the reference floors and under-fills).
Leftover single rows go by the largest fractional part, ties by group name.

Within a group rows are taken best first by a score (``top``), or sampled without
replacement with p proportional to exp(score / temperature) (``softmax``, kMQ) or uniformly
(``uniform``). Sampling uses the Gumbel-top-k trick with a seeded per-id Gumbel noise, so the
draw depends on the seed and the ids only. The final rank interleaves the groups (first of
each group, then second, ...), so any prefix of the ranking stays balanced.
"""
from __future__ import annotations

import math

import numpy as np

from curate.select.base import Budget, FreeParam, Param, Policy, PolicyError, Pool, Selection, ranked
from curate.select.scored import hash_keys, numeric_column, numeric_value


def allocate(budget: int, sizes: dict, weights: dict) -> dict:
    """Whole quotas per group summing to min(budget, total size), each at most its size.

    Largest remainder (Hamilton): each group gets the floor of its share, the seats left go
    one each to the largest fractional parts (ties by group name); seats a full group cannot
    take are shared again among the others."""
    quota = {g: 0 for g in sizes}
    left = min(budget, sum(sizes.values()))
    while left > 0:
        active = [g for g in sorted(sizes, key=str) if quota[g] < sizes[g] and weights.get(g, 0) > 0]
        if not active:
            break
        total = sum(weights[g] for g in active)
        raw = {g: left * weights[g] / total for g in active}
        give = {g: min(int(math.floor(raw[g])), sizes[g] - quota[g]) for g in active}
        seats = left - sum(give.values())
        for g in sorted(active, key=lambda g: (-(raw[g] - math.floor(raw[g])), str(g))):
            if seats == 0:
                break
            if quota[g] + give[g] < sizes[g]:
                give[g] += 1
                seats -= 1
        for g, n in give.items():
            quota[g] += n
        left -= sum(give.values())
    return quota


def gumbel(ids: list[str], seed: int) -> np.ndarray:
    u = np.clip(hash_keys(ids, seed), 1e-300, 1 - 1e-16)
    return -np.log(-np.log(u))


def within_group_keys(pool: Pool, column: str | None, how: str, temperature: float, policy: str,
                      sign: float = 1.0) -> np.ndarray:
    """Sort keys, larger first: the score (top), score/T + Gumbel (softmax) or Gumbel (uniform).

    ``sign`` -1 ranks smaller scores first (r-IFD: lower is better aligned)."""
    if how == "top":
        return sign * numeric_column(pool, column, policy)
    noise = gumbel(pool.ids, pool.seed)
    if how == "softmax":
        return sign * numeric_column(pool, column, policy) / temperature + noise
    return noise


def take_by_quota(pool: Pool, groups: list, quota: dict, keys: np.ndarray, dropped: dict,
                  over: str = "over_quota") -> Selection:
    members: dict = {}
    for i in ranked(keys, True):
        rid = pool.ids[i]
        if rid not in dropped:
            members.setdefault(groups[i], []).append(i)
    picked = {g: rows[:quota.get(g, 0)] for g, rows in members.items()}
    for g, rows in members.items():
        for i in rows[quota.get(g, 0):]:
            dropped[pool.ids[i]] = over
    order = sorted(((pos, str(g), i) for g, rows in picked.items() for pos, i in enumerate(rows)))
    return Selection([pool.ids[i] for _, _, i in order], dropped)


SCORE = Param((str,), None, "score column that ranks rows within a group (none: uniform)")
WITHIN = Param((str,), "auto", "top (best score first), softmax (sample p ~ exp(score/T), kMQ), uniform, "
                               "or auto (top with a score, else uniform)",
               choices=("auto", "top", "softmax", "uniform"))
TEMPERATURE = Param((int, float), 1.0, "softmax temperature", minimum=1e-6)
HIGHER = Param((bool,), True, "true: larger scores first (ifd_loss); false: smaller first (rifd, "
               "lower is better aligned)")
UPPER = Param((int, float), None, "rows whose score is at or above this are dropped as score_ge_upper (e.g. 1.0 "
              "with ifd_loss: misaligned pairs, as superfiltering drops them); none: no limit")


class _Quota(Policy):
    needs_budget = True
    scopes = ("global",)  # its quotas span clusters (or sources): it needs the whole pool
    at_scale = "keyed: decided range by range (with a token budget, its own ranking is its shortlist)"
    over_reason = "over_quota"
    # with a rows or fraction budget its decision is a sort (curate.select.keyed): the Beam step
    # counts each group's eligible rows, sets the quotas from those counts and takes each group's
    # first rows range by range, never gathering the pool

    def required_columns(self):
        return (self.group_column,) + ((self.p["score"],) if self.p["score"] else ())

    def validate(self):
        if self.p.get("upper") is not None and not self.p["score"]:
            raise PolicyError(f"policy {self.name}: upper needs a score column")
        if self.p["within"] == "auto":
            self.p["within"] = "top" if self.p["score"] else "uniform"
        if self.p["within"] in ("top", "softmax") and not self.p["score"]:
            raise PolicyError(f"policy {self.name}: within {self.p['within']} needs a score column")

    def keyed(self, budget: Budget) -> bool:
        return budget.tokens is None

    def _eligible(self, group) -> bool:
        return True

    def row_key(self, row: dict, seed: int):
        group = row.get(self.group_column)
        group = "none" if group is None else group
        score = numeric_value(row, self.p["score"], self.name) if self.p["score"] else None
        if score is not None and math.isnan(score):
            return "score_nan"
        if score is not None and self.p.get("upper") is not None and score >= self.p["upper"]:
            return "score_ge_upper"
        if not self._eligible(group):
            return "source_not_in_mixture"
        how = self.p["within"]
        if score is not None and not self.p["higher_is_better"]:
            score = -score
        if how == "top":
            return group, -score
        noise = float(gumbel([row["id"]], seed)[0])
        return group, -(score / self.p["temperature"] + noise if how == "softmax" else noise)

    def quotas(self, candidates: int, sizes: dict, budget: Budget) -> dict:
        if budget.tokens is not None:
            raise PolicyError(f"policy {self.name}: takes a rows or fraction budget, not tokens")
        return self._quota(min(budget.max_rows(candidates), candidates), sizes)

    def _quota(self, budget: int, sizes: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def choose(self, pool: Pool) -> Selection:
        budget = pool.rows_budget(self.name)
        groups, keys, dropped, sizes = self._prepare(pool)
        for i, g in enumerate(groups):
            if pool.ids[i] not in dropped and not self._eligible(g):
                dropped[pool.ids[i]] = "source_not_in_mixture"
        sizes = {g: n for g, n in sizes.items() if self._eligible(g)}
        return take_by_quota(pool, groups, self._quota(budget, sizes), keys, dropped)

    def _prepare(self, pool: Pool):
        groups = [("none" if g is None else g) for g in pool.strings(self.group_column)]
        keys = within_group_keys(pool, self.p["score"], self.p["within"], self.p["temperature"], self.name,
                                 1.0 if self.p["higher_is_better"] else -1.0)
        dropped = {}
        if self.p["score"]:
            raw = numeric_column(pool, self.p["score"], self.name)
            dropped = {pool.ids[i]: "score_nan" for i in np.flatnonzero(np.isnan(raw))}
            if self.p.get("upper") is not None:
                with np.errstate(invalid="ignore"):
                    dropped.update({pool.ids[i]: "score_ge_upper" for i in np.flatnonzero(raw >= self.p["upper"])})
        sizes: dict = {}
        for i, g in enumerate(groups):
            if pool.ids[i] not in dropped:
                sizes[g] = sizes.get(g, 0) + 1
        return groups, keys, dropped, sizes


class ClusterBalanced(_Quota):
    name = "cluster_balanced"
    summary = ("per-cluster quotas (proportional, equal or sqrt of the cluster size) with a within-cluster "
               "ranking; softmax sampling on a quality score is Diversify-and-Conquer's kMQ (methods.md 6a)")
    params = {"quota": Param((str,), "proportional", "how the budget is shared between clusters",
                             choices=("proportional", "equal", "sqrt")),
              "score": SCORE, "higher_is_better": HIGHER, "within": WITHIN, "temperature": TEMPERATURE,
              "upper": UPPER}
    group_column = "cluster_id"

    def _quota(self, budget: int, sizes: dict) -> dict:
        weight = {"proportional": float, "equal": lambda n: 1.0, "sqrt": math.sqrt}[self.p["quota"]]
        return allocate(budget, sizes, {g: weight(n) for g, n in sizes.items()})


class Mixture(_Quota):
    name = "mixture"
    summary = "per-source shares of the budget (normalised to sum 1); a short source's rest goes to the others"
    params = {"shares": FreeParam("source name -> share, e.g. {alpaca: 0.7, gsm8k: 0.3}", float),
              "redistribute": Param((bool,), True, "false: a source short of its share leaves the budget unfilled"),
              "score": SCORE, "higher_is_better": HIGHER, "within": WITHIN, "temperature": TEMPERATURE,
              "upper": UPPER}
    group_column = "source"

    def validate(self):
        super().validate()
        shares = self.p["shares"]
        if not shares:
            raise PolicyError("policy mixture: shares is empty (give source: share pairs)")
        if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
            raise PolicyError("policy mixture: shares must be >= 0 and not all 0")

    def _shares(self) -> dict:
        return {str(k): float(v) for k, v in self.p["shares"].items()}

    def _eligible(self, group) -> bool:
        return group in self._shares()

    def _quota(self, budget: int, sizes: dict) -> dict:
        shares = self._shares()
        if self.p["redistribute"]:
            return allocate(budget, sizes, shares)
        want = allocate(budget, {g: budget for g in shares}, shares)
        return {g: min(want[g], sizes.get(g, 0)) for g in shares}
