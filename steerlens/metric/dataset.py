"""The expected metric over a dataset: streamed in constant memory, sharded across processes.

G = mean over prompts of the per-prompt metric. Each prompt's factor rows are folded into a running
d×d Gram matrix per site (float64) and dropped, so memory does not grow with the dataset. Under
``torch.distributed`` every rank takes every world_size-th prompt and one all-reduce of the Gram
matrices and the count finishes the job (gloo on CPU, nccl on GPU; launch with ``torchrun``).

``samples=k`` swaps each prompt's exact output factor for the sampled Fisher: k outcomes drawn
from the model's own next-token distribution, k rows pulled back in the same recursion instead of
up to d, unbiased for the exact (full-vocabulary) E[G]. Prompt i draws from a generator seeded by
(``seed``, i), so the result does not depend on how the prompts are sharded.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model("llama")
>>> prompts = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2])]
>>> exact = expected_metric(model, prompts, "resid_post.0", vocab="full", progress=False)
>>> sampled = expected_metric(model, prompts, "resid_post.0", samples=8, progress=False)
>>> sampled["blocks.0.hook_resid_post"].info.samples
8
>>> exact["blocks.0.hook_resid_post"].matrix().shape == (16, 16)
True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import islice
from numbers import Integral
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.errors import InputError
from steerlens.metric.core import Metric
from steerlens.metric.info import MetricInfo
from steerlens.metric.outcomes import DEFAULT_DROPPED_MASS, OffTarget
from steerlens.metric.precision import compute_model
from steerlens.metric.pullback import MetricOptions, _prompt_rows, lens_layer
from steerlens.metric.state import prompt_state
from steerlens.prompts import as_prompts, unpad
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


def expected_metric(
    model: HookedTransformer,
    prompts: Iterable[str | Tensor],
    sites: str | Site | Sequence[str | Site],
    *,
    vocab: str = "auto",
    dropped_mass: float = DEFAULT_DROPPED_MASS,
    off_target: OffTarget | None = None,
    depth: int | None = None,
    progress: bool = True,
    total: int | None = None,
    distributed: bool | None = None,
    samples: int | None = None,
    seed: int = 0,
    attention_mask: Tensor | None = None,
) -> dict[str, Metric]:
    """The dataset-mean pullback metric at each site, keyed by site name, held as Gram matrices.

    ``prompts`` may be any iterable (a generator over a large file is fine): each item is a
    string or a 1-D token tensor; or a padded ``[batch, pos]`` token tensor with its
    ``attention_mask`` (each row's real tokens are one prompt). ``distributed`` (default:
    whether ``torch.distributed`` is initialized) shards the prompts over ranks and
    all-reduces; every rank gets the same result.

    ``samples`` (None: exact) draws that many outcomes per prompt from the model's own
    (off-target-transformed) next-token distribution, seeded by ``seed`` and the prompt's index:
    the sampled Fisher, unbiased for the full-vocabulary metric, at k rows a prompt. ``vocab``
    and ``dropped_mass`` do not apply to it. ``info`` (a :class:`~steerlens.metric.info.MetricInfo`)
    records ``samples`` and ``seed``.
    """
    _check_sampling(samples, seed, vocab, dropped_mass)
    if attention_mask is not None:
        if not isinstance(prompts, Tensor):
            raise InputError("attention_mask goes with a padded [batch, pos] token tensor")
        prompts = unpad(prompts, attention_mask)
    if isinstance(prompts, str):
        raise InputError(
            "prompts must be an iterable of prompts, not one string: wrap it in a list"
        )
    model = compute_model(model)
    single = isinstance(sites, (str, Site))
    parsed = [as_site(s, model) for s in ([sites] if single else sites)]  # type: ignore[list-item]
    if not parsed:
        raise InputError("no sites given for the expected metric")
    depths = {lens_layer(s, depth, model.cfg.n_layers) for s in parsed}
    if len(depths) > 1:
        raise InputError("sites of one expected_metric call must share a lens layer; split them")
    top = depths.pop()
    options = MetricOptions(vocab, dropped_mass, off_target, samples=samples)
    use_dist = dist.is_available() and dist.is_initialized() if distributed is None else distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    # accumulators live on the model's device (nccl all-reduces GPU tensors only)
    acc = {"dtype": torch.float64, "device": model.cfg.device}
    grams = {s.name: torch.zeros(s.dim(model), s.dim(model), **acc) for s in parsed}
    count = torch.zeros((), **acc)
    max_dropped = torch.zeros((), **acc)
    shard = islice(prompts, rank, None, world)
    bar = tqdm(shard, disable=not progress or rank != 0, total=total, desc="metric")
    for j, prompt in enumerate(bar):
        tokens = as_prompts(model, prompt if isinstance(prompt, Tensor) else [prompt])[0]
        state = prompt_state(model, tokens)
        for s in parsed:
            s.resolve_position(state.n_pos)
        if samples is not None:
            options = replace(options, seed=prompt_seed(seed, rank + j * world))
        rows, info, _ = _prompt_rows(model, state, parsed, top, options, decompose=False)
        for name, r in rows.items():
            r = r.double()
            grams[name] += r.T @ r
        count += 1
        max_dropped = max_dropped.clamp_min(info.dropped_mass)
    if use_dist:
        for g in grams.values():
            dist.all_reduce(g)
        dist.all_reduce(count)
        dist.all_reduce(max_dropped, op=dist.ReduceOp.MAX)
    if count == 0:
        raise InputError("the dataset is empty: no prompts were given")
    info = MetricInfo(
        vocab if samples is None else "sampled",
        float(max_dropped),
        n_prompts=int(count),
        depth=depth,
        off_target=off_target.name if off_target else None,
        samples=samples,
        seed=None if samples is None else seed,
        world_size=world,
    )
    dtype = model.cfg.dtype
    return {name: Metric(None, name, info, gram=(g / count).to(dtype)) for name, g in grams.items()}


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s draws: independent streams per (seed, index) pair."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _check_sampling(samples: object, seed: object, vocab: str, dropped_mass: float) -> None:
    if samples is not None and (
        isinstance(samples, bool) or not isinstance(samples, Integral) or samples < 1
    ):
        raise InputError(
            f"samples must be a positive integer (outcomes drawn per prompt) or None for the "
            f"exact metric, got {samples!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if samples is not None and (vocab != "auto" or dropped_mass != DEFAULT_DROPPED_MASS):
        raise InputError(
            f"samples={samples} draws from the whole distribution: vocab={vocab!r} and "
            f"dropped_mass={dropped_mass} apply only to the exact metric (samples=None)"
        )
