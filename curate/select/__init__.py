"""Selection policies: the protocol (``Policy``, ``Param``, ``Budget``, ``Pool``, ``Selection``),
the built-ins and the plugin registry (entry-point group ``curate.policies``).

A minimal plugin::

    from curate.select import Param, Policy, ranked

    class LongestResponse(Policy):
        name = "longest_response"
        summary = "the rows with the longest responses"
        params = {"min_chars": Param((int,), 0, "shorter responses are dropped")}
        requires = ("response_chars",)
        needs_budget = True

        def choose(self, pool):
            chars = pool.values("response_chars")
            dropped = {pool.ids[i]: "too_short" for i in range(len(pool)) if chars[i] < self.p["min_chars"]}
            return pool.take_in_order(ranked(chars), dropped)
"""
from curate.select.base import Budget, FreeParam, Param, Policy, PolicyError, Pool, Selection, approx_tokens, ranked
from curate.select.features import features_table, pool_of
from curate.select.registry import BUILTINS, GROUP, available, make

__all__ = ["Budget", "FreeParam", "Param", "Policy", "PolicyError", "Pool", "Selection", "approx_tokens", "ranked",
           "features_table", "pool_of", "BUILTINS", "GROUP", "available", "make", "apply"]


def apply(policy: Policy, table, budget: Budget | None = None, seed: int = 0, embeddings=None) -> Selection:
    """Run ``policy`` on a features table (see ``features_table``)."""
    return policy.run(table, budget, seed, embeddings)
