"""Example curate policy plugin: the budget's rows with the longest responses."""
from curate.select import Param, Policy, ranked


class LongestResponse(Policy):
    name = "longest_response"
    summary = "the rows with the longest responses (an example plugin)"
    params = {"min_chars": Param((int,), 0, "responses shorter than this are dropped", minimum=0)}
    requires = ("response_chars",)
    needs_budget = True

    def choose(self, pool):
        chars = pool.values("response_chars")
        dropped = {pool.ids[i]: "too_short" for i in range(len(pool)) if chars[i] < self.p["min_chars"]}
        return pool.take_in_order(ranked(chars), dropped)
