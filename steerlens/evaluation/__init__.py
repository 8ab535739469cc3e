"""The matched-concept protocol: steer each context to the same target probability with every
method, then measure what else changed.

- :mod:`~steerlens.evaluation.measures`: the measures of one steered next-token distribution
  against the clean one (probability, complement, pair-merge and whole-distribution KL, rank
  change);
- :mod:`~steerlens.evaluation.generation`: greedy and sampled continuations under an edit and the
  unsteered model's perplexity of them (fluency, e.g. the records' ``perplexity``);
- :mod:`~steerlens.evaluation.strength`: the scale at which a fixed direction reaches a target;
- :mod:`~steerlens.evaluation.ratios`: each method's cost over the baseline's on the same runs
  (KLs and perplexities as paired ratios, fractions and masses as paired differences).

Strength: iterative methods stop at the target themselves (one run serves every target through
checkpoints); a fixed-direction method's scale is found by bisection. A context where a method
cannot reach a target (within ``max_scale`` or ``max_steps``) is a row with ``reached=False``,
never dropped. What predicts the KL ratio, and the path lengths behind ``rho_own``, are
:mod:`steerlens.diagnostics`'.
"""

from steerlens.evaluation.generation import (
    Generation,
    continuation_perplexity,
    generation_measures,
    generation_measures_many,
    greedy_continuation,
)
from steerlens.evaluation.measures import KL_MEASURES, Outcome, next_logprobs, outcome_measures
from steerlens.evaluation.ratios import (
    DIFFERENCE_MEASURES,
    RATIO_MEASURES,
    bootstrap_ci,
    difference_table,
    paired_differences,
    paired_ratios,
    ratio_table,
    summarize,
)
from steerlens.evaluation.strength import (
    StrengthMatch,
    match_strength,
    strength_grid,
    strength_search,
)

__all__ = [
    "DIFFERENCE_MEASURES",
    "KL_MEASURES",
    "RATIO_MEASURES",
    "Generation",
    "Outcome",
    "StrengthMatch",
    "bootstrap_ci",
    "continuation_perplexity",
    "difference_table",
    "generation_measures",
    "generation_measures_many",
    "greedy_continuation",
    "match_strength",
    "next_logprobs",
    "outcome_measures",
    "paired_differences",
    "paired_ratios",
    "ratio_table",
    "strength_grid",
    "strength_search",
    "summarize",
]
