"""Every reason a row can leave the pool for, with its meaning: rejects (bad input), dedup drops
and policy drops (``<policy>:<reason>`` in ``drop_reason``). Users filter on these strings, so
they are stable; the generated reference lists them from here, and a test checks that the
policies emit no reason this file does not name."""
from __future__ import annotations

from curate.records import REJECT_REASONS

DEDUP = {
    "exact_duplicate": "the normalized prompt and response equal a kept row's (exact_dup_of names it)",
    "near_duplicate": "MinHash Jaccard with a kept row at or above dedup.near.threshold (near_dup_of names it)",
    "semantic_duplicate": "embedding cosine with a kept row of its cluster >= 1 - dedup.semantic.eps",
}

POLICY = {
    "over_budget": "ranked below the budget's cut",
    "over_quota": "its group (cluster or source) had filled its quota",
    "over_cluster_budget": "paser: its cluster had filled its share of the budget",
    "not_chosen": "a greedy diversity policy stopped before choosing it",
    "not_shortlisted": "past the shortlist a comparing policy sees on a large pool (select.max_candidates)",
    "score_nan": "the ranking score is NaN or null (the scoring stage failed for this row; see its status)",
    "score_ge_upper": "the score is at or above the policy's upper limit",
    "ifd_ge_upper": "superfiltering: IFD at or above upper (the response does not help: a misaligned pair)",
    "ifd_le_lower": "superfiltering: IFD at or below lower",
    "below_min": "threshold: the score is below min",
    "above_max": "threshold: the score is above max",
    "source_not_in_mixture": "mixture: its source has no share",
    "cluster_cap": "its cluster already gave max_per_cluster rows",
    "too_similar": "superfiltering_diverse: too close to a row already chosen",
    "concept_conflict": "paser: its concepts were already covered",
    "no_degradation_score": "paser: the row has no degradation score",
}

REJECT = dict(REJECT_REASONS)
