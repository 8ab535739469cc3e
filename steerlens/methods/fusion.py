"""Fusion steering as its paper ran it, per prompt (Chang and Yasin, *Fusion Steering:
Prompt-Specific Activation Control*, arXiv 2505.22572, 2025).

For one question prompt with a known answer:

1. **Reference completion.** The enriched prompt (``reference_prompt``; for a question,
   :data:`REFERENCE_TEMPLATE`, "Question: … Answer and Explanation:") followed by the answer's
   tokens, then the explanation the unsteered model writes after them (greedy,
   ``explanation_tokens`` tokens, cut at the end-of-sequence token). The reference completion
   is the answer and that explanation.
2. **Reference activations.** h_l, the mean of ``hook_resid_post`` of layer l over the
   reference completion's positions, in one pass over the enriched prompt and the reference.
3. **The model's own activations.** μ_l, the mean of the same site over every position of the
   unsteered run on the question alone: with ``baseline="completion"`` the prompt and the
   model's own greedy completion (``completion_tokens`` tokens), with ``"prompt"`` the prompt.
4. **Injection.** At each layer l of segment k, at every position (the prompt's and each
   generated token's): a_steered = a + γ_k (h_l − μ_l), fused with the original activation,
   α_k a_steered + (1 − α_k) a = a + α_k γ_k (h_l − μ_l). One segment (all layers, one
   (α, γ)) is the paper's full-layer steering; several contiguous segments its segmented one.
5. **Per-prompt tuning.** Optuna (TPE, seeded) draws α_k ∈ [0, 1] and γ_k ∈ [0.01, 1] for
   ``trials`` trials and keeps the best of

       token_f1(completion, reference) − perplexity_weight · ln perplexity(completion)

   where the completion is the greedy one of ``completion_tokens`` tokens generated under the
   injection (cut at the end-of-sequence token).

The result is one :class:`Intervention` for that one prompt: a vector α_k γ_k (h_l − μ_l) at
``resid_post.l@all`` for every layer (the fusion folded in); ``info`` has the reference, the
segments, each segment's α and γ, the best trial's objective, overlap and perplexity, and every
trial. The tuning reads the answer: the reference starts with it, and the objective rewards
overlap with the reference. A tuned injection is therefore not a zero-knowledge improvement of
the model; it is what the paper measures, a per-prompt edit given the answer.

Choices the paper does not fix, made here: the site is ``hook_resid_post`` (each decoder block's
output, the hidden state a Hugging Face model returns per layer); token overlap is SQuAD's F1
over token-id multisets of the model's own tokenizer (:func:`steerlens.evaluation.qa.token_f1`),
not words; the perplexity is the unsteered model's, of the steered completion, and enters as
its logarithm (the mean negative log-likelihood per token) with weight ``perplexity_weight``;
μ_l's positions (``baseline``); the explanation's decoding (greedy) and length; the prompt
templates; the segments' boundaries (contiguous runs of near-equal length,
:func:`~steerlens.methods.multisite.contiguous_segments`); the search budget (``trials``); and,
with ``warm_start`` (the default), the two trials the search starts from: α_k = 0 at every
segment (the unsteered completion, so the tuned injection never scores below doing nothing on
its own objective) and α_k = 1, γ_k = 0.01 (the smallest strength the ranges allow); the other
trials are TPE's. Since the fusion is linear, only the product α_k γ_k acts; both are drawn, as
in the paper, so the search's prior over the product is the paper's.

A run returns only when every trial has finished with a finite objective; an interrupt or a
non-finite objective raises, so no half-tuned intervention exists to be saved as if finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlens.errors import InputError, MethodError, NonFiniteError
from steerlens.evaluation.generation import greedy_continuation
from steerlens.evaluation.qa import completion, completion_perplexity, token_f1, until_eos
from steerlens.hooks import record
from steerlens.methods.intervention import Intervention
from steerlens.methods.multisite import build, contiguous_segments, tpe_study
from steerlens.methods.registry import FitInputs, MethodSpec, register_method
from steerlens.prompts import PromptsLike, as_prompts, check_tokens
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: the question-only prompt
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
#: the enriched prompt the answer and its explanation follow (the paper's wording)
REFERENCE_TEMPLATE = "Question: {question}\nAnswer and Explanation:"
#: what μ_l averages over: the prompt and the model's own completion, or the prompt alone
BASELINES = ("completion", "prompt")
#: the paper's ranges: fusion weight α and steering strength γ
ALPHA_RANGE = (0.0, 1.0)
GAMMA_RANGE = (0.01, 1.0)
#: the warm-start trials (α, γ) at every segment: no injection, and the smallest strength
WARM_START = ((0.0, GAMMA_RANGE[0]), (1.0, GAMMA_RANGE[0]))

TokensLike = str | Sequence[int] | Tensor


def qa_prompts(question: str) -> tuple[str, str]:
    """(the question-only prompt, the enriched reference prompt) of ``question``.

    >>> qa_prompts("Which country is Rome in?")[1]
    'Question: Which country is Rome in?\\nAnswer and Explanation:'
    """
    if not question.strip():
        raise InputError("the question is empty")
    return PROMPT_TEMPLATE.format(question=question), REFERENCE_TEMPLATE.format(question=question)


def _ids(model: HookedTransformer, value: TokensLike, what: str) -> Int[Tensor, " ids"]:
    """``value`` as token ids on the model's device, text tokenized with no special tokens."""
    if isinstance(value, str):
        if model.tokenizer is None:
            raise InputError(f"{what} is text but the model has no tokenizer: give token ids")
        ids = [int(i) for i in model.tokenizer.encode(value, add_special_tokens=False)]
    elif isinstance(value, Tensor):
        if value.dim() != 1 or value.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{what}: token ids must be a 1-D integer tensor")
        ids = value.tolist()
    elif isinstance(value, Sequence) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        ids = list(value)
    else:
        raise InputError(f"{what} must be text or token ids, got {value!r}")
    out = torch.tensor(ids, dtype=torch.long, device=model.cfg.device)
    if len(out):
        check_tokens(model, out, what)
    return out


@dataclass(frozen=True)
class Reference:
    """A reference completion: the enriched ``prompt``'s ids, then the ``answer``'s and the
    ``explanation``'s."""

    prompt: Int[Tensor, " pos"]
    answer: Int[Tensor, " answer"]
    explanation: Int[Tensor, " explanation"]

    @property
    def completion(self) -> Int[Tensor, " reference"]:
        """The answer and its explanation: the positions h_l averages over."""
        return torch.cat([self.answer, self.explanation])


def reference_completion(
    model: HookedTransformer,
    reference_prompt: TokensLike,
    answer: TokensLike,
    *,
    explanation: TokensLike | None = None,
    explanation_tokens: int = 24,
) -> Reference:
    """The reference completion of step 1 (module docstring): ``answer`` after the enriched
    ``reference_prompt`` (text is tokenized with the model's BOS convention for the prompt and
    none for the answer), then ``explanation`` if given, else the unsteered model's greedy
    explanation of ``explanation_tokens`` tokens cut at the end-of-sequence token."""
    if isinstance(reference_prompt, str):
        prompt = as_prompts(model, reference_prompt)[0]
    else:
        prompt = _ids(model, reference_prompt, "the reference prompt")
        if not len(prompt):
            raise InputError("the reference prompt has no tokens")
    answer_ids = _ids(model, answer, "the answer")
    if not len(answer_ids):
        raise InputError(
            "the answer is empty, so the reference completion (the answer, then its explanation) "
            "has nothing to start from: give the answer's text or token ids"
        )
    if explanation is not None:
        expl = _ids(model, explanation, "the explanation")
    elif explanation_tokens < 0:
        raise InputError(f"explanation_tokens must be >= 0, got {explanation_tokens}")
    elif explanation_tokens == 0:
        expl = answer_ids[:0]
    else:
        start = torch.cat([prompt, answer_ids])
        expl = until_eos(
            model, greedy_continuation(model, start, None, explanation_tokens)[len(start) :]
        )
    ref = Reference(prompt, answer_ids, expl)
    check_tokens(model, torch.cat([prompt, ref.completion]), "the reference prompt and completion")
    return ref


def _mean_resid(
    model: HookedTransformer, tokens: Tensor, layers: Sequence[int], start: int
) -> dict[int, Tensor]:
    """Per layer, the float64 mean of ``hook_resid_post`` over ``tokens``' positions from
    ``start`` on, in one pass."""
    with torch.no_grad(), record(model, [f"resid_post.{layer}" for layer in layers]) as acts:
        model(tokens[None])
    return {
        layer: acts[f"blocks.{layer}.hook_resid_post"][0, start:].double().mean(0)
        for layer in layers
    }


def fusion_deltas(
    model: HookedTransformer,
    prompt: Int[Tensor, " pos"],
    reference: Reference,
    layers: Sequence[int],
    *,
    baseline: str = "completion",
    completion_tokens: int = 12,
) -> dict[int, Float[Tensor, " d_model"]]:
    """Per layer, h_l − μ_l (steps 2 and 3 of the module docstring), in the model's dtype."""
    if baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r}; valid: {BASELINES}")
    for layer in layers:
        Site("resid_post", layer).validate(model)
    ref_tokens = torch.cat([reference.prompt, reference.completion])
    h = _mean_resid(model, ref_tokens, layers, len(reference.prompt))
    own = prompt
    if baseline == "completion":
        own = torch.cat([prompt, completion(model, prompt, None, completion_tokens)])
    mu = _mean_resid(model, own, layers, 0)
    out = {layer: (h[layer] - mu[layer]).to(model.cfg.dtype) for layer in layers}
    if all(float(v.norm()) == 0 for v in out.values()):
        raise MethodError("the reference's activations equal the model's own at every layer")
    return out


def fusion_objective(
    model: HookedTransformer,
    intervention: Intervention,
    prompt: Int[Tensor, " pos"],
    reference: Reference,
    *,
    completion_tokens: int = 12,
    perplexity_weight: float = 0.1,
) -> tuple[float, float, float]:
    """(objective, token overlap, perplexity) of ``intervention`` on ``prompt`` (step 5)."""
    got = completion(model, prompt, intervention, completion_tokens)
    overlap = token_f1(got, reference.completion)
    perplexity = completion_perplexity(model, prompt, got)
    return overlap - perplexity_weight * math.log(perplexity), overlap, perplexity


def fusion_intervention(
    model: HookedTransformer,
    prompt: PromptsLike,
    answer: TokensLike,
    *,
    reference_prompt: TokensLike | None = None,
    explanation: TokensLike | None = None,
    explanation_tokens: int = 24,
    completion_tokens: int = 12,
    layers: Sequence[int] | None = None,
    segments: int = 1,
    trials: int = 20,
    perplexity_weight: float = 0.1,
    baseline: str = "completion",
    seed: int = 0,
    warm_start: bool = True,
) -> Intervention:
    """Fusion steering tuned for one ``prompt`` with its ``answer`` (the module docstring).
    ``reference_prompt``: the enriched prompt (default: ``prompt`` itself); ``explanation``:
    the explanation's text or ids (default: the model's own, ``explanation_tokens`` long);
    ``layers``: default every layer; ``segments``: 1 for full-layer steering, more for
    segmented; ``warm_start``: the first trials are :data:`WARM_START` (counted in
    ``trials``)."""
    toks = as_prompts(model, prompt)
    if len(toks) != 1:
        raise InputError(
            f"fusion steering is tuned per prompt: give one prompt, got {len(toks)}; fit each "
            "prompt on its own"
        )
    (tokens,) = toks
    if trials < 1 or completion_tokens < 1 or not perplexity_weight >= 0:
        raise InputError(
            f"trials >= 1, completion_tokens >= 1 and perplexity_weight >= 0 needed, got "
            f"{trials}, {completion_tokens}, {perplexity_weight}"
        )
    if warm_start and trials < len(WARM_START):
        raise InputError(
            f"warm_start runs {len(WARM_START)} trials first, so trials must be >= "
            f"{len(WARM_START)}, got {trials}; raise trials or set warm_start=False"
        )
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if not layer_list or len(set(layer_list)) != len(layer_list):
        raise InputError(f"layers must be distinct and non-empty, got {layer_list}")
    segs = contiguous_segments(layer_list, segments)
    ref = reference_completion(
        model,
        tokens if reference_prompt is None else reference_prompt,
        answer,
        explanation=explanation,
        explanation_tokens=explanation_tokens,
    )
    deltas = fusion_deltas(
        model, tokens, ref, layer_list, baseline=baseline, completion_tokens=completion_tokens
    )

    def weights(params: dict[str, float]) -> list[float]:
        return [params[f"alpha{k}"] * params[f"gamma{k}"] for k in range(len(segs))]

    def run(trial: Any) -> float:
        params = {}
        for k in range(len(segs)):
            params[f"alpha{k}"] = trial.suggest_float(f"alpha{k}", *ALPHA_RANGE)
            params[f"gamma{k}"] = trial.suggest_float(f"gamma{k}", *GAMMA_RANGE)
        iv = build(deltas, segs, weights(params), {}, "fusion")
        value, overlap, perplexity = fusion_objective(
            model,
            iv,
            tokens,
            ref,
            completion_tokens=completion_tokens,
            perplexity_weight=perplexity_weight,
        )
        if not math.isfinite(value):
            raise NonFiniteError(f"fusion trial {trial.number}: the objective is {value}")
        trial.set_user_attr("overlap", overlap)
        trial.set_user_attr("perplexity", perplexity)
        return value

    study = tpe_study(seed)
    if warm_start:
        for alpha, gamma in WARM_START:
            start: dict[str, float] = {}
            for k in range(len(segs)):
                start[f"alpha{k}"], start[f"gamma{k}"] = alpha, gamma
            study.enqueue_trial(start)
    study.optimize(run, n_trials=trials)
    done = [t for t in study.trials if t.value is not None]
    if len(done) != trials:
        raise MethodError(f"fusion tuning finished {len(done)} of {trials} trials")
    best = study.best_trial
    params = {k: float(v) for k, v in best.params.items()}
    info = {
        "answer": ref.answer.tolist(),
        "explanation": ref.explanation.tolist(),
        "reference_prompt": ref.prompt.tolist(),
        "baseline": baseline,
        "segments": segs,
        "alpha": [params[f"alpha{k}"] for k in range(len(segs))],
        "gamma": [params[f"gamma{k}"] for k in range(len(segs))],
        "objective": float(best.value) if best.value is not None else math.nan,
        "overlap": best.user_attrs["overlap"],
        "perplexity": best.user_attrs["perplexity"],
        "perplexity_weight": perplexity_weight,
        "completion_tokens": completion_tokens,
        "warm_start": warm_start,
        "trials": [
            {**{k: float(v) for k, v in t.params.items()}, "objective": t.value, **t.user_attrs}
            for t in study.trials
        ],
    }
    return build(deltas, segs, weights(params), info, "fusion")


@dataclass(frozen=True)
class FusionConfig:
    """``answer``: the prompt's known answer (text or token ids); ``reference_prompt``: the
    enriched prompt the reference completion follows (default: the prompt; for a question,
    :func:`qa_prompts`); ``explanation``: the explanation (default: the model's own, greedy,
    ``explanation_tokens`` long); ``completion_tokens``: the greedy completion the objective
    scores; ``layer``: one layer, a list, or None (every layer); ``segments``: 1 for full-layer
    steering, more for segmented (one α and γ each); ``trials`` optuna trials on token overlap −
    ``perplexity_weight`` · ln perplexity; ``baseline``: what μ averages over (``"completion"``
    or ``"prompt"``); ``warm_start``: the first trials are no injection and the smallest
    strength (:data:`WARM_START`)."""

    answer: str | Sequence[int]
    reference_prompt: str | Sequence[int] | None = None
    explanation: str | Sequence[int] | None = None
    explanation_tokens: int = 24
    completion_tokens: int = 12
    layer: int | list[int] | None = None
    segments: int = 1
    trials: int = 20
    perplexity_weight: float = 0.1
    baseline: str = "completion"
    seed: int = 0
    warm_start: bool = True


def _fit_fusion(model: HookedTransformer, cfg: FusionConfig, inputs: FitInputs) -> Intervention:
    assert inputs.prompt is not None
    return fusion_intervention(
        model,
        inputs.prompt,
        cfg.answer,
        reference_prompt=cfg.reference_prompt,
        explanation=cfg.explanation,
        explanation_tokens=cfg.explanation_tokens,
        completion_tokens=cfg.completion_tokens,
        layers=[cfg.layer] if isinstance(cfg.layer, int) else cfg.layer,
        segments=cfg.segments,
        trials=cfg.trials,
        perplexity_weight=cfg.perplexity_weight,
        baseline=cfg.baseline,
        seed=cfg.seed,
        warm_start=cfg.warm_start,
    )


register_method(
    MethodSpec(
        "fusion",
        FusionConfig,
        _fit_fusion,
        needs=("prompt",),
        implicit_metric="per-segment Euclidean, (α, γ) tuned per prompt by optuna",
        description="fusion steering's per-prompt method (the paper's steps; the objective's "
        "exact form, the site and the budget are ours): the reference completion's (answer + "
        "the model's explanation) activations minus the model's own at every layer, full or "
        "segmented, (α, γ) tuned by optuna on token overlap and perplexity",
    )
)
