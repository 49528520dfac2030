"""Selection policies: the protocol (``Policy``, ``Param``, ``Budget``, ``Pool``, ``Selection``),
the built-ins and the plugin registry (entry-point group ``curate.policies``).

A plugin subclasses ``Policy``, implements ``choose(pool) -> Selection`` and registers
under the entry-point group ``curate.policies``: ``examples/policy_plugin/`` is a complete one,
and the README walks through it.
"""
from curate.select.base import Budget, FreeParam, Param, Policy, PolicyError, Pool, Selection, approx_tokens, ranked
from curate.select.features import features_table, pool_of
from curate.select.registry import BUILTINS, GROUP, available, make

__all__ = ["Budget", "FreeParam", "Param", "Policy", "PolicyError", "Pool", "Selection", "approx_tokens", "ranked",
           "features_table", "pool_of", "BUILTINS", "GROUP", "available", "make"]
