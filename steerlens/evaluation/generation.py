"""What an edit does to generated text: greedy and sampled continuations generated under an
intervention, and the unsteered model's perplexity of them (fluency).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steerlens import _tl
from steerlens.errors import InputError
from steerlens.hooks import HookFn, hooked
from steerlens.sites import as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.methods.intervention import Intervention


def _prompt_with_room(model: HookedTransformer, tokens: Tensor, n_tokens: int) -> Tensor:
    """``tokens`` as a [1, pos] batch, after checking that ``n_tokens`` more fit the context."""
    if n_tokens < 1:
        raise InputError(f"n_tokens must be >= 1, got {n_tokens}")
    seq = tokens.view(1, -1)
    if seq.shape[1] + n_tokens > model.cfg.n_ctx:
        raise InputError(
            f"{seq.shape[1]} prompt tokens + {n_tokens} generated exceed the model's context of "
            f"{model.cfg.n_ctx}"
        )
    return seq


@torch.no_grad()
def _continue(
    model: HookedTransformer,
    prompt: Tensor,
    n_tokens: int,
    intervention: Intervention | None,
    rows: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``rows`` continuations [rows, pos + n_tokens] of ``prompt`` [1, pos], generated with
    ``intervention`` applied: row 0 greedily (argmax), the others (if any) sampled from the
    softmax with ``generator``.

    The prompt runs once and each new token once, with a key-value cache (TransformerLens's
    own) that the rows share for the prompt. The intervention is applied to every pass with the
    prompt's attention mask, so a one-token pass counts as a generation step
    (:func:`steerlens.hooks.edit_at`): ``@last`` and ``@all`` edit each new token and ``@p``
    only the prompt's p-th, as a full forward of the whole sequence at every step would (the
    edit at earlier positions is in their cached keys and values)."""

    def steered(n: int) -> AbstractContextManager[object]:
        if intervention is None:
            return nullcontext()
        return intervention.apply(model, attention_mask=torch.ones_like(prompt).expand(n, -1))

    cache = _tl.new_kv_cache(model, 1)
    with steered(1):
        first = _tl.forward_filling_cache(model, prompt, cache, last_only=True)
        logits = first[:, -1].expand(rows, -1)
    _tl.repeat_kv_cache(cache, rows)
    out = [prompt.expand(rows, -1)]
    with steered(rows):
        for i in range(n_tokens):
            nxt = logits[:1].argmax(-1, keepdim=True)
            if rows > 1:
                probs = torch.softmax(logits[1:].double(), -1)
                picked = torch.multinomial(probs, 1, generator=generator)
                nxt = torch.cat([nxt, picked.to(nxt.dtype)], 0)
            out.append(nxt.to(prompt.dtype))
            if i + 1 < n_tokens:
                logits = _tl.forward_filling_cache(model, out[-1], cache)[:, -1]
    return torch.cat(out, 1)


#: the most logits (rows × positions × vocabulary) one pass of :func:`_perplexity` holds
MAX_LOGITS = 50_000_000


@torch.no_grad()
def _perplexity(model: HookedTransformer, seqs: Tensor, start: int) -> Tensor:
    """The unsteered model's perplexity of each row of ``seqs`` [batch, pos] from position
    ``start`` on: exp of the mean negative log-likelihood per token, [batch]. The rows share
    their first ``start`` tokens (one prompt): it runs once, into a key-value cache that each
    chunk of rows (at most :data:`MAX_LOGITS` logits a chunk) then shares for its own
    tokens."""
    prompt = seqs[:1, :start]
    if not torch.equal(seqs[:, :start], prompt.expand_as(seqs[:, :start])):
        raise InputError("the continuations scored together must share their prompt")
    cache = _tl.new_kv_cache(model, 1)
    first = _tl.forward_filling_cache(model, prompt, cache, last_only=True)
    n_new = seqs.shape[1] - start
    chunk = max(1, MAX_LOGITS // (n_new * model.cfg.d_vocab))
    out = []
    for rows in seqs.split(chunk):
        logits = first.expand(rows.shape[0], -1, -1)
        if n_new > 1:
            shared = _tl.stack_kv_caches(model, [cache], [rows.shape[0]])
            rest = _tl.forward_filling_cache(model, rows[:, start:-1], shared)
            logits = torch.cat([logits, rest], 1)
        logp = torch.log_softmax(logits.double(), -1)
        out.append((-logp.gather(2, rows[:, start:, None]).mean((1, 2))).exp())
    return torch.cat(out)


@torch.no_grad()
def greedy_continuation(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None = None,
    n_tokens: int = 8,
) -> Tensor:
    """``tokens`` followed by ``n_tokens`` greedy tokens generated with ``intervention``
    applied (an ``@last`` edit steers each new prediction position and nothing else; see
    :func:`_continue`)."""
    seq = _prompt_with_room(model, tokens, n_tokens)
    return _continue(model, seq, n_tokens, intervention)[0]


@torch.no_grad()
def continuation_perplexity(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None = None,
    n_tokens: int = 8,
) -> float:
    """Fluency: the unsteered model's perplexity (exp of the mean negative log-likelihood per
    token) of the :func:`greedy_continuation` generated under ``intervention``."""
    seq = greedy_continuation(model, tokens, intervention, n_tokens)
    return float(_perplexity(model, seq[None], tokens.numel())[0])


@dataclass(frozen=True)
class Generation:
    """What an edit does to generated text (:func:`generation_measures`)."""

    target_first_greedy: float
    target_first_sampled: float
    perplexity_greedy: float
    perplexity_sampled: float

    def row(self) -> dict[str, float]:
        """The measures as a record's columns."""
        return asdict(self)


#: the most rows (each intervention's greedy and sampled continuations) one batched
#: generation pass runs in :func:`generation_measures_many`
MAX_ROWS = 128


def _step_edits(
    model: HookedTransformer, interventions: Sequence[Intervention | None], per: int
) -> tuple[list[tuple[str, HookFn]], bool] | None:
    """The hooks that make a one-token generation step of ``per`` rows per intervention, all
    stacked in one batch, what each intervention's own :meth:`~Intervention.apply` makes of
    its rows: each row's ``@last`` and ``@all`` vectors added to its one new token (``@p``
    edits only the prompt), nothing added to the rows of ``None``; and whether a site needs
    ``hook_result``. None where an intervention does more than add vectors (scales, clamps,
    weight updates): such runs are generated one intervention at a time."""
    for iv in interventions:
        if iv is not None:
            iv.check(model)
    rows = per * len(interventions)
    sums: dict[tuple[str, int | None], Tensor] = {}
    need_result = False
    for k, iv in enumerate(interventions):
        if iv is None:
            continue
        if iv.multipliers or iv.clamps or iv.weight_updates or iv.scalar_functions:
            return None
        for spec, vector in iv.vectors.items():
            site = as_site(spec, model)
            if site.position not in ("all", "last"):
                continue
            delta = (iv.scale * vector).to(dtype=model.cfg.dtype, device=model.cfg.device)
            key = (site.hook_name, site.head)
            if key not in sums:
                sums[key] = delta.new_zeros(rows, delta.numel())
            sums[key][k * per : (k + 1) * per] += delta.reshape(-1)
            need_result |= site.kind == "result"
    by_hook: dict[str, list[tuple[int | None, Tensor]]] = {}
    for (name, head), added in sums.items():
        by_hook.setdefault(name, []).append((head, added))

    def hook_for(edits: list[tuple[int | None, Tensor]]) -> HookFn:
        def hook(act: Tensor, hook: object) -> Tensor:
            if act.shape[:2] != (rows, 1):
                raise InputError(
                    f"a batched generation step runs {rows} rows of one token, got {act.shape}"
                )
            for head, added in edits:
                if head is None:
                    act = act + added.view(act.shape).to(act.dtype)
                else:
                    act = act.clone()
                    part = act[:, :, head]
                    act[:, :, head] = part + added.view(part.shape).to(act.dtype)
            return act

        return hook

    return [(name, hook_for(edits)) for name, edits in by_hook.items()], need_result


@torch.no_grad()
def _continue_many(
    model: HookedTransformer,
    prompt: Tensor,
    n_tokens: int,
    interventions: Sequence[Intervention | None],
    samples: int,
    seed: int,
) -> Tensor:
    """:func:`_continue` for each of ``interventions`` (1 greedy + ``samples`` sampled rows,
    each intervention's sampling seeded with ``seed``, as :func:`generation_measures` seeds
    it), stacked in intervention order: [len · (1 + samples), pos + n_tokens]. The prompt runs
    once per intervention under its own ``apply``; the generation steps of all of them run as
    one batch, each row steered as its intervention steers a step (:func:`_step_edits`).
    Interventions that do more than add vectors are generated one at a time."""
    per = 1 + samples
    device = prompt.device
    found = _step_edits(model, interventions, per)
    if found is None:
        return torch.cat(
            [
                _continue(
                    model,
                    prompt,
                    n_tokens,
                    iv,
                    per,
                    torch.Generator(device=device).manual_seed(seed),
                )
                for iv in interventions
            ]
        )
    hooks, need_result = found
    caches, firsts = [], []
    for iv in interventions:
        cache = _tl.new_kv_cache(model, 1)
        steer = (
            nullcontext()
            if iv is None
            else iv.apply(model, attention_mask=prompt.new_ones(prompt.shape))
        )
        with steer:
            logits = _tl.forward_filling_cache(model, prompt, cache, last_only=True)
            firsts.append(logits[:, -1].expand(per, -1))
        caches.append(cache)
    cache = _tl.stack_kv_caches(model, caches, [per] * len(caches))
    logits = torch.cat(firsts)
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in interventions]
    out = [prompt.expand(per * len(interventions), -1)]
    with hooked(model, hooks, need_result=need_result):
        for i in range(n_tokens):
            picked = []
            for k, generator in enumerate(generators):
                block = logits[k * per : (k + 1) * per]
                picked.append(block[:1].argmax(-1, keepdim=True))
                if per > 1:
                    probs = torch.softmax(block[1:].double(), -1)
                    picked.append(torch.multinomial(probs, 1, generator=generator))
            out.append(torch.cat([p.to(prompt.dtype) for p in picked]))
            if i + 1 < n_tokens:
                logits = _tl.forward_filling_cache(model, out[-1], cache)[:, -1]
    return torch.cat(out, 1)


@torch.no_grad()
def generation_measures_many(
    model: HookedTransformer,
    tokens: Tensor,
    interventions: Sequence[Intervention | None],
    target: int,
    *,
    n_tokens: int = 20,
    samples: int = 4,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
) -> list[Generation]:
    """:func:`generation_measures` of each of ``interventions`` on the same prompt, in order,
    generated together: at most ``max_rows`` continuations (``1 + samples`` an intervention)
    a batch, whose generation steps read the model's weights once for all their rows (the
    cost of a step on one core is mostly reading them), and the clean model's perplexities
    of all of them from one run of the prompt. Each intervention's continuations are the ones
    it generates alone, seed and all, up to rounding: a batched matrix product's, two vectors
    of one intervention at one hook added as their sum, and ``hook_result`` turned on for
    every row of a batch where one intervention edits a head's result."""
    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}")
    if max_rows < 1 + samples:
        raise InputError(
            f"max_rows must hold one intervention's {1 + samples} rows, got {max_rows}"
        )
    seq = _prompt_with_room(model, tokens, n_tokens)
    start, per = seq.shape[1], 1 + samples
    ivs = list(interventions)
    step = max_rows // per
    both = (
        torch.cat(
            [
                _continue_many(model, seq, n_tokens, ivs[i : i + step], samples, seed)
                for i in range(0, len(ivs), step)
            ]
        )
        if ivs
        else seq.new_zeros(0, start + n_tokens)
    )
    perplexity = _perplexity(model, both, start) if ivs else torch.zeros(0)
    out = []
    for k in range(len(ivs)):
        rows, ppl = both[k * per : (k + 1) * per], perplexity[k * per : (k + 1) * per]
        out.append(
            Generation(
                target_first_greedy=float(rows[0, start] == target),
                target_first_sampled=float((rows[1:, start] == target).double().mean()),
                perplexity_greedy=float(ppl[0]),
                perplexity_sampled=float(ppl[1:].mean()),
            )
        )
    return out


@torch.no_grad()
def generation_measures(
    model: HookedTransformer,
    tokens: Tensor,
    intervention: Intervention | None,
    target: int,
    *,
    n_tokens: int = 20,
    samples: int = 4,
    seed: int = 0,
) -> Generation:
    """What the edit does to generated text: a greedy continuation and ``samples`` sampled ones
    (temperature 1, seeded), ``n_tokens`` each, generated with ``intervention`` applied to every
    pass (an ``@last`` edit so steers each generated token). ``target_first_greedy``: 1.0 if the
    greedy continuation's next word is the target token; ``target_first_sampled``: the fraction
    of sampled continuations whose next word is; ``perplexity_greedy`` /
    ``perplexity_sampled`` (mean over samples): the unsteered model's perplexity of the
    continuations (exp of the mean negative log-likelihood per generated token). Many
    interventions on one prompt: :func:`generation_measures_many`."""
    (out,) = generation_measures_many(
        model, tokens, [intervention], target, n_tokens=n_tokens, samples=samples, seed=seed
    )
    return out
