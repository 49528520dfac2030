"""Finding policies by name: the built-ins plus plugins registered under the entry-point group
``curate.policies`` (``name = "package.module:PolicyClass"``), and ``chain``, which applies
policies in sequence."""
from __future__ import annotations

import difflib
import logging
from importlib.metadata import entry_points
from typing import Any

import pyarrow as pa

from curate.select.base import Budget, Param, Policy, PolicyError, Pool, Selection
from curate.select.diversity import Deita, FacilityLocation, SuperfilteringDiverse
from curate.select.paser import Paser
from curate.select.quotas import ClusterBalanced, Mixture
from curate.select.scored import All, Random, Superfiltering, Targeted, Threshold, TopK

GROUP = "curate.policies"
log = logging.getLogger("curate")


class Chain(Policy):
    name = "chain"
    at_scale = "shortlist: its first step's ranking when that step is keyed, else every candidate on one worker"
    summary = ("apply policies in sequence, each to the rows the previous one kept, e.g. superfiltering "
               "to 20% then facility_location to 2%; fractions are of the pool the chain started from")
    params = {"steps": Param((list,), None, "list of {policy: NAME, params: {...}, budget: {rows|fraction|tokens}}; "
                                            "the chain's own budget is the last step's when it gives none",
                             required=True)}
    keeps_step_names = True

    def validate(self):
        steps = self.p["steps"]
        if not steps:
            raise PolicyError("policy chain: steps is empty")
        self.steps: list[tuple[Policy, Budget | None]] = []
        for i, step in enumerate(steps):
            where = f"policy chain: steps[{i}]"
            if not isinstance(step, dict) or "policy" not in step:
                raise PolicyError(f"{where}: expected a mapping with a policy name")
            unknown = set(step) - {"policy", "params", "budget"}
            if unknown:
                raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r} (use policy, params, budget)")
            policy = make(step["policy"], step.get("params") or {})
            budget = Budget.parse(step["budget"], f"{where}.budget") if step.get("budget") else None
            self.steps.append((policy, budget))

    def required_columns(self):
        return tuple(dict.fromkeys(c for p, _ in self.steps for c in p.required_columns()))

    def wants_embeddings(self) -> bool:
        return any(p.wants_embeddings() for p, _ in self.steps)

    def wants_text(self) -> bool:
        return any(p.wants_text() for p, _ in self.steps)

    def supported_scopes(self) -> tuple[str, ...]:
        return tuple(s for s in self.scopes if all(s in p.supported_scopes() for p, _ in self.steps))

    def shortlist(self) -> Policy | None:
        """The first step when it is keyed (its ranking is the chain's first cut), else none."""
        first, _ = self.steps[0]
        return first if first.keyed(Budget(rows=1)) else None

    def describe(self) -> dict:
        return {"policy": self.name, "steps": [{**p.describe(), **({"budget": b.as_dict()} if b else {})}
                                               for p, b in self.steps]}

    def choose(self, pool: Pool) -> Selection:
        table, emb, texts, dropped = pool.table, pool.embeddings, pool.texts, {}
        result = Selection([], {})
        for n, (policy, budget) in enumerate(self.steps):
            last = n == len(self.steps) - 1
            budget = budget or (pool.budget if last else Budget())
            result = policy.run(table, budget, pool.seed, emb, pool.start_size, texts)
            dropped.update(result.dropped)
            kept = set(result.selected)
            rows = [i for i, rid in enumerate(table.column("id").to_pylist()) if rid in kept]
            table = table.take(pa.array(rows, pa.int64()))
            emb = None if emb is None else emb[rows]
            texts = None if texts is None else [texts[i] for i in rows]
        return Selection(result.selected, dropped)


BUILTINS: dict[str, type[Policy]] = {cls.name: cls for cls in (
    All, Random, Threshold, TopK, Targeted, Superfiltering, SuperfilteringDiverse, FacilityLocation, ClusterBalanced,
    Deita, Mixture, Chain, Paser)}


def available() -> dict[str, type[Policy]]:
    """Every installed policy by name: built-ins, then plugins (a plugin cannot replace a built-in)."""
    found = dict(BUILTINS)
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in BUILTINS:
            log.warning("policy plugin %s (%s) ignored: a built-in has that name", ep.name, ep.value)
            continue
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break the others
            log.warning("policy plugin %s (%s) could not be loaded: %s", ep.name, ep.value, err)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            log.warning("policy plugin %s (%s) is not a curate.select.Policy subclass; ignored", ep.name, ep.value)
            continue
        found[ep.name] = cls
    return found


def make(name: Any, params: dict | None = None) -> Policy:
    """A policy instance with validated parameters, or PolicyError naming the problem."""
    known = available()
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(str(name), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PolicyError(f"unknown policy {name!r}{hint}; installed: {', '.join(sorted(known))}")
    if not isinstance(params or {}, dict):
        raise PolicyError(f"policy {name}: params must be a mapping")
    cls = known[name]
    policy = cls(**(params or {}))
    if policy.name != name:  # a plugin registered under another name than its class says
        policy.name = name
    return policy
