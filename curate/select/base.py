"""The policy protocol: a policy turns a pool of per-row features into ranked ids plus drop reasons.

A policy is plain Python over an Arrow table (one row per candidate: ``id``, ``source``,
lengths, dedup flags, ``cluster_id``, the score columns; embeddings on request) and a
budget. The base class owns the bookkeeping (parameter checks, required columns, the
budget, the accounting of every id, determinism); a subclass owns one decision in
``choose``. Pools are sorted by id before ``choose`` sees them, so the input order never
changes the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError
from curate.options import ConfigError, Opt, check_value


class PolicyError(CurateError, ValueError):
    """A policy that cannot run on this pool or with these parameters (one-line message)."""


@dataclass(frozen=True)
class Param:
    """A documented, validated policy parameter."""

    types: tuple
    default: Any = None
    doc: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False

    def check(self, value: Any, path: str) -> Any:
        if value is None and self.required:
            raise PolicyError(f"{path}: required parameter is missing")
        opt = Opt(self.types, self.default, self.choices, self.minimum, self.maximum)
        try:
            return check_value(value, opt, path)
        except ConfigError as err:
            raise PolicyError(str(err)) from None


@dataclass(frozen=True)
class FreeParam:
    """A mapping parameter with free keys and numeric values (e.g. per-source shares)."""

    doc: str = ""
    value_type: type = float
    required: bool = True
    default: Any = None

    def check(self, value: Any, path: str) -> dict:
        if value is None:
            if self.required:
                raise PolicyError(f"{path}: required parameter is missing")
            return {}
        if not isinstance(value, dict):
            raise PolicyError(f"{path}: expected a mapping of name: number, got {value!r}")
        out = {}
        for key, item in value.items():
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise PolicyError(f"{path}.{key}: expected a number, got {item!r}")
            out[str(key)] = self.value_type(item)
        return out


@dataclass(frozen=True)
class Budget:
    """How much to keep: ``rows``, ``fraction`` (of the pool the selection started from) or
    ``tokens`` (approximate, see ``approx_tokens``). All None: no cap."""

    rows: int | None = None
    fraction: float | None = None
    tokens: int | None = None

    @classmethod
    def parse(cls, spec: dict | None, path: str = "budget") -> "Budget":
        spec = dict(spec or {})
        unknown = set(spec) - {"rows", "fraction", "tokens"}
        if unknown:
            raise PolicyError(f"{path}: unknown key {sorted(unknown)[0]!r} (use rows, fraction or tokens)")
        set_keys = [k for k in ("rows", "fraction", "tokens") if spec.get(k) is not None]
        if len(set_keys) > 1:
            raise PolicyError(f"{path}: give one of rows, fraction or tokens, not {' and '.join(set_keys)}")
        rows = Param((int,), None, minimum=0).check(spec.get("rows"), f"{path}.rows")
        fraction = Param((int, float), None, minimum=0.0, maximum=1.0).check(spec.get("fraction"), f"{path}.fraction")
        tokens = Param((int,), None, minimum=0).check(spec.get("tokens"), f"{path}.tokens")
        return cls(rows, None if fraction is None else float(fraction), tokens)

    @property
    def unlimited(self) -> bool:
        return self.rows is None and self.fraction is None and self.tokens is None

    def max_rows(self, pool_size: int) -> int | None:
        """The row cap for a pool that started with ``pool_size`` rows (None: no row cap)."""
        if self.rows is not None:
            return self.rows
        if self.fraction is not None:
            return int(round(self.fraction * pool_size))
        return None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("rows", self.rows), ("fraction", self.fraction), ("tokens", self.tokens))
                if v is not None}


@dataclass
class Selection:
    """The outcome: selected ids in rank order (rank 1 first) and a reason for every dropped id."""

    selected: list[str]
    dropped: dict[str, str] = field(default_factory=dict)

    def ranks(self) -> dict[str, int]:
        return {i: r for r, i in enumerate(self.selected, start=1)}


def approx_tokens(chars: np.ndarray) -> np.ndarray:
    """Tokens estimated as characters / 4 (rounded up): the usual rule of thumb for English BPE
    tokenizers, so a token budget does not need a model's tokenizer."""
    return np.ceil(np.asarray(chars, dtype=np.float64) / 4.0).astype(np.int64)


class Pool:
    """What ``choose`` works on: the features sorted by id, the budget, the seed, embeddings."""

    def __init__(self, table: pa.Table, budget: Budget, seed: int, embeddings: np.ndarray | None = None,
                 start_size: int | None = None, texts: list[str] | None = None):
        order = pc.sort_indices(table, sort_keys=[("id", "ascending")]) if table.num_rows else None
        self.table = table.take(order) if order is not None else table
        self.embeddings = None if embeddings is None else np.asarray(embeddings, dtype=np.float32)[
            order.to_numpy() if order is not None else slice(None)]
        self.texts = None if texts is None else (
            [texts[i] for i in order.to_numpy()] if order is not None else list(texts))
        self.ids: list[str] = self.table.column("id").to_pylist() if table.num_rows else []
        self.budget = budget
        self.seed = seed
        self.start_size = len(self.ids) if start_size is None else start_size

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_rows(self) -> int | None:
        return self.budget.max_rows(self.start_size)

    def rows_budget(self, policy: str) -> int:
        """The row count to select, for policies that cannot take a token budget."""
        if self.budget.tokens is not None:
            raise PolicyError(f"policy {policy}: takes a rows or fraction budget, not tokens")
        return min(self.max_rows, len(self))

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def values(self, name: str) -> np.ndarray:
        """A numeric column as float64, null -> NaN."""
        col = self.table.column(name)
        return np.asarray(pc.fill_null(col.cast(pa.float64()), math.nan).to_numpy(zero_copy_only=False),
                          dtype=np.float64) if len(col) else np.zeros(0)

    def strings(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def tokens(self) -> np.ndarray:
        if self.has("approx_tokens"):
            return np.nan_to_num(self.values("approx_tokens"), nan=0.0).astype(np.int64)
        return np.zeros(len(self), dtype=np.int64)

    def take_in_order(self, order, dropped: dict[str, str] | None = None,
                      over: str = "over_budget") -> Selection:
        """Walk ``order`` (row indices, best first) and keep rows while the budget allows; every
        other row gets ``over`` unless ``dropped`` already gives it a reason. With a token budget
        a row that does not fit is skipped and later, shorter rows may still fit."""
        dropped = dict(dropped or {})
        cap = self.max_rows
        room = self.budget.tokens
        tokens = self.tokens() if room is not None else None
        chosen: list[str] = []
        taken: set[str] = set()
        for i in order:
            i = int(i)
            rid = self.ids[i]
            if rid in dropped:
                continue
            if cap is not None and len(chosen) >= cap:
                dropped[rid] = over
                continue
            if room is not None:
                if tokens[i] > room:
                    dropped[rid] = over
                    continue
                room -= int(tokens[i])
            chosen.append(rid)
            taken.add(rid)
        for rid in self.ids:
            if rid not in dropped and rid not in taken:
                dropped[rid] = over
        return Selection(chosen, dropped)


def ranked(keys: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Row indices best first by ``keys``; ties keep id order (the pool is sorted by id); NaN last."""
    keys = np.asarray(keys, dtype=np.float64)
    k = -keys if higher_is_better else keys
    k = np.where(np.isnan(k), np.inf, k)
    return np.argsort(k, kind="stable")


class Policy:
    """Base of every selection policy. Subclasses set ``name``, ``summary``, ``params``,
    ``requires`` (columns the pool must have) and implement ``choose(pool) -> Selection``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    requires: ClassVar[tuple[str, ...]] = ()
    needs_embeddings: ClassVar[bool] = False
    needs_text: ClassVar[bool] = False  # the pool carries each row's prompt + response (Pool.texts)
    needs_budget: ClassVar[bool] = False
    keeps_step_names: ClassVar[bool] = False  # composite policies: reasons keep their steps' prefixes
    # where the policy may run (curate.select.scope): "global" (all candidates at once) and
    # "cluster" (each cluster alone with its share of the budget); a policy whose decision spans
    # clusters or sources lists "global" only
    scopes: ClassVar[tuple[str, ...]] = ("global", "cluster")
    # what the Beam step does with it on a large pool with scope global (``curate policies`` shows it):
    # keyed (``keyed``), through a shortlist (``shortlist``), or every candidate on one worker
    at_scale: ClassVar[str] = "gathers every candidate on one worker (no shortlist)"

    def __init__(self, **params: Any):
        where = f"policy {self.name}"
        for key in params:
            if key not in self.params:
                known = ", ".join(sorted(self.params)) or "none"
                raise PolicyError(f"{where}: unknown parameter {key!r} (parameters: {known})")
        self.p = {key: spec.check(params.get(key), f"{where}: {key}") for key, spec in self.params.items()}
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks (raise PolicyError)."""

    def required_columns(self) -> tuple[str, ...]:
        """Columns this instance needs (may depend on its parameters)."""
        return self.requires

    def wants_embeddings(self) -> bool:
        return self.needs_embeddings

    def wants_text(self) -> bool:
        return self.needs_text

    def supported_scopes(self) -> tuple[str, ...]:
        return self.scopes

    # A keyed policy's decision is a sort (curate.select.keyed): each row's drop reason or (group,
    # sort value) comes from the row alone and each group's quota from counts, so the Beam step
    # selects over the whole pool without gathering it. Those that are not keep the default.
    over_reason: ClassVar[str] = "over_budget"

    def keyed(self, budget: Budget) -> bool:
        """Whether this instance's decision under ``budget`` is a sort (``row_key`` and ``quotas``)."""
        return False

    def row_key(self, row: dict, seed: int):
        """A drop reason, or (group, sort value: smaller first; ties by id), from one features row."""
        raise NotImplementedError

    def row_keys(self, table: pa.Table, seed: int) -> list:
        """``row_key`` of each row of a features table with every feature column
        (``features.complete``); a policy may answer by column instead, with the same values."""
        return [self.row_key(r, seed) for r in table.to_pylist()]

    def quotas(self, candidates: int, sizes: dict, budget: Budget) -> dict:
        """Rows each group keeps, from the count of candidates and of each group's eligible rows:
        one group, capped by the budget (of the candidates)."""
        cap = budget.max_rows(candidates)
        return {g: n if cap is None else min(n, cap) for g, n in sizes.items()}

    def shortlist(self) -> "Policy | None":
        """For a policy that is not keyed: a keyed policy whose first ``select.max_candidates`` rows
        are all this one needs to see of a large pool (``curate.select.shortlist``); None: it sees
        every candidate. A policy keyed under a rows budget (gathered only for a token budget) is
        its own shortlist."""
        return self if self.keyed(Budget(rows=1)) else None

    def describe(self) -> dict:
        return {"policy": self.name, "params": dict(self.p)}

    def choose(self, pool: Pool) -> Selection:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, table: pa.Table, budget: Budget | None = None, seed: int = 0,
            embeddings: np.ndarray | None = None, start_size: int | None = None,
            texts: list[str] | None = None) -> Selection:
        """Apply the policy; every id of ``table`` ends up selected or dropped with a reason
        prefixed by the policy name (``superfiltering:ifd_not_below_upper``)."""
        budget = budget or Budget()
        if self.needs_budget and budget.unlimited:
            raise PolicyError(f"policy {self.name}: needs a budget (rows, fraction or tokens)")
        missing = [c for c in ("id", *self.required_columns()) if c not in table.column_names
                   or (table.num_rows and table.column(c).null_count == table.num_rows)]
        if missing:
            raise PolicyError(f"policy {self.name}: needs the column(s) {', '.join(missing)}, which this run "
                              f"does not have (enable the stage that writes them)")
        if self.wants_embeddings() and embeddings is None and table.num_rows:
            raise PolicyError(f"policy {self.name}: needs embeddings (enable the embed stage)")
        ids = table.column("id").to_pylist()
        if len(set(ids)) != len(ids):
            raise PolicyError(f"policy {self.name}: ids in the pool are not unique")
        pool = Pool(table, budget, seed, embeddings, start_size, texts)
        result = self.choose(pool)
        return self._checked(result, set(ids))

    def _checked(self, result: Selection, ids: set[str]) -> Selection:
        chosen = set(result.selected)
        if len(chosen) != len(result.selected):
            raise PolicyError(f"policy {self.name}: selected an id twice")
        if chosen & set(result.dropped):
            raise PolicyError(f"policy {self.name}: an id is both selected and dropped")
        decided = chosen | set(result.dropped)
        if decided != ids:
            lost = sorted(ids - decided)[:3]
            extra = sorted(decided - ids)[:3]
            raise PolicyError(f"policy {self.name}: every pool id must be selected or dropped exactly once "
                              f"(undecided: {lost}, unknown: {extra})")
        prefix = f"{self.name}:"
        dropped = {i: (r if r.startswith(prefix) or self.keeps_step_names else prefix + r)
                   for i, r in result.dropped.items()}
        return Selection(list(result.selected), dropped)
