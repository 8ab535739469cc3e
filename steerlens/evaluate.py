"""Moved to :mod:`steerlens.evaluation` (the protocol's measures, generation, strength and
ratios) and :mod:`steerlens.diagnostics` (``path_length``, ``with_kl_ratio``,
``predictor_agreement``); the names resolve here, with a :class:`DeprecationWarning`, until the
next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "KL_MEASURES": "steerlens.evaluation.measures",
    "next_logprobs": "steerlens.evaluation.measures",
    "outcome_measures": "steerlens.evaluation.measures",
    "continuation_perplexity": "steerlens.evaluation.generation",
    "generation_measures": "steerlens.evaluation.generation",
    "greedy_continuation": "steerlens.evaluation.generation",
    "StrengthMatch": "steerlens.evaluation.strength",
    "match_strength": "steerlens.evaluation.strength",
    "strength_grid": "steerlens.evaluation.strength",
    "strength_search": "steerlens.evaluation.strength",
    "bootstrap_ci": "steerlens.evaluation.ratios",
    "paired_ratios": "steerlens.evaluation.ratios",
    "ratio_table": "steerlens.evaluation.ratios",
    "summarize": "steerlens.evaluation.ratios",
    "path_length": "steerlens.diagnostics.path",
    "predictor_agreement": "steerlens.diagnostics.predictors",
    "with_kl_ratio": "steerlens.diagnostics.predictors",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
