"""Post-block steering: a vector at ``hook_resid_post`` trained by gradient descent on a loss, and
the export of any additive vector at ``resid_post`` or ``mlp_out`` as the exactly equivalent
bias edit of that block's output.

Training (``postblock_intervention``): δ at ``resid_post.layer`` (every position, ``@all``, or
the prediction position, ``@last``) minimizes, over the prompts,

    loss(δ) = −mean_prompts c(prompt; δ) + ``l2`` · ‖δ‖²

with Adam, c a concept of the steered activation at the site and the final logits (a token
set's log-probability, a pair share, a probe...). The model's weights are frozen; only δ is
trained, inside a hook context.

Export (``bias_edit``): adding v to ``resid_post`` of block L at every position is the same as
adding v to the MLP's output bias ``b_out`` of block L (the block's last write into the residual
stream), and so is adding v at ``mlp_out``. The edit is made on a deep copy; the user's model is
never changed. The copy is checked against the steered model on a probe input, and refused
(:class:`MethodError`) where the architecture breaks the equivalence (e.g. a norm after the MLP).

>>> import torch
>>> from steerlens.testing import tiny_model
>>> from steerlens.methods import Intervention
>>> model = tiny_model("llama")
>>> iv = Intervention("v", {"resid_post.0@all": torch.ones(16, dtype=torch.float64)})
>>> before = model.blocks[0].mlp.b_out.clone()
>>> edited = bias_edit(model, iv)
>>> tokens = torch.tensor([[1, 2, 3]])
>>> with iv.apply(model):
...     steered = model(tokens)
>>> torch.allclose(edited(tokens), steered)
True
>>> torch.equal(model.blocks[0].mlp.b_out, before)     # the user's model is unchanged
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlens.concepts.base import Concept
from steerlens.errors import InputError, MethodError, NonFiniteError
from steerlens.hooks import hooked
from steerlens.methods.intervention import Intervention
from steerlens.methods.registry import FitInputs, MethodSpec, one_layer, register_method
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: sites whose additive vector is a bias edit of the block output
BIAS_KINDS = ("resid_post", "mlp_out")


def postblock_intervention(
    model: HookedTransformer,
    concept: Concept,
    prompts: PromptsLike,
    layer: int,
    *,
    position: str = "all",
    steps: int = 100,
    lr: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
) -> Intervention:
    """Train δ at ``resid_post.layer@position`` by Adam on the loss of the module docstring.
    ``info`` records the loss and concept value at the start and the end."""
    if position not in ("all", "last"):
        raise InputError(f"position must be 'all' or 'last', got {position!r}")
    if steps < 1 or not (math.isfinite(lr) and lr > 0) or not (math.isfinite(l2) and l2 >= 0):
        raise InputError(f"need steps >= 1, lr > 0, l2 >= 0; got {steps}, {lr}, {l2}")
    site = as_site(f"resid_post.{layer}@{position}", model)
    tokens = as_prompts(model, prompts)
    gen = torch.Generator().manual_seed(seed)
    delta = (1e-3 * torch.randn(model.cfg.d_model, generator=gen, dtype=torch.float64)).to(
        dtype=model.cfg.dtype, device=model.cfg.device
    )
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)

    seen: dict[str, Tensor] = {}

    def hook(act: Tensor, hook: Any) -> Tensor:
        if position == "all":
            out = act + delta
        else:
            out = act.clone()
            out[:, -1] = out[:, -1] + delta
        seen["act"] = out[0, -1]
        return out

    def mean_value() -> Tensor:
        values = []
        for t in tokens:
            logits = model(t[None])[0, -1]
            values.append(concept.value(seen["act"], logits))
        return torch.stack(values).mean()

    history = []
    with hooked(model, [(site.hook_name, hook)]), torch.enable_grad():
        grads = [p.requires_grad for p in model.parameters()]
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for _ in range(steps):
                opt.zero_grad()
                value = mean_value()
                loss = -value + l2 * delta.pow(2).sum()
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"postblock: the loss is not finite at {site.name}")
                loss.backward()
                opt.step()
                history.append((float(loss.detach()), float(value.detach())))
        finally:
            for p, g in zip(model.parameters(), grads, strict=True):
                p.requires_grad_(g)
    info = {
        "concept": getattr(concept, "name", type(concept).__name__),
        "steps": steps,
        "lr": lr,
        "l2": l2,
        "start": {"loss": history[0][0], "value": history[0][1]},
        "end": {"loss": history[-1][0], "value": history[-1][1]},
    }
    return Intervention("postblock", {site.name: delta.detach().clone()}, 1.0, info)


def bias_edit(
    model: HookedTransformer, intervention: Intervention, *, check_tokens: Tensor | None = None
) -> HookedTransformer:
    """A deep copy of ``model`` whose MLP output biases carry the intervention's vectors (each
    at ``resid_post.L@all`` or ``mlp_out.L@all``), checked to give the steered model's logits on
    ``check_tokens`` (default: a short fixed sequence)."""
    if intervention.multipliers or intervention.scalar_functions:
        raise MethodError(
            f"{intervention.method!r} scales activations: only additive vectors are bias edits"
        )
    edits: dict[int, Tensor] = {}
    for spec in intervention.sites:
        site = Site.parse(spec)
        if site.kind not in BIAS_KINDS or site.position != "all":
            raise MethodError(
                f"{spec}: only a vector at every position ('@all') of "
                f"{' or '.join(BIAS_KINDS)} is a bias edit"
            )
        site.validate(model)
        vec = intervention.vector(spec)
        edits[site.layer] = edits.get(site.layer, 0) + vec.to(model.cfg.dtype)
    if model.cfg.attn_only:
        raise MethodError("the model has no MLPs: there is no block output bias to edit")
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer, vec in edits.items():
            b_out = getattr(edited.blocks[layer].mlp, "b_out", None)
            if b_out is None:
                raise MethodError(f"block {layer}'s MLP has no output bias b_out")
            b_out.add_(vec.to(device=b_out.device, dtype=b_out.dtype))
        probe = check_tokens if check_tokens is not None else torch.arange(1, 9)[None]
        probe = probe.to(model.cfg.device)
        with intervention.apply(model):
            steered = model(probe)
        got = edited(probe)
    tol = 1e-9 if model.cfg.dtype == torch.float64 else 1e-3
    if not torch.allclose(got, steered, rtol=tol, atol=tol * float(steered.abs().max())):
        raise MethodError(
            "the bias edit does not reproduce the steered model here (a norm after the MLP, or "
            "a parallel block, breaks the equivalence)"
        )
    return edited


@dataclass(frozen=True)
class PostblockConfig:
    """``layer``: the ``hook_resid_post`` trained at; ``position``: where δ is added; Adam for
    ``steps`` at learning rate ``lr`` on −concept + ``l2``·‖δ‖²."""

    layer: int
    position: str = "all"
    steps: int = 100
    lr: float = 0.05
    l2: float = 1e-3
    seed: int = 0


def _fit_postblock(
    model: HookedTransformer, cfg: PostblockConfig, inputs: FitInputs
) -> Intervention:
    assert inputs.concept is not None and inputs.prompt is not None
    return postblock_intervention(
        model,
        inputs.concept,
        inputs.prompt,
        one_layer("postblock", cfg.layer, "trains at"),
        position=cfg.position,
        steps=cfg.steps,
        lr=cfg.lr,
        l2=cfg.l2,
        seed=cfg.seed,
    )


register_method(
    MethodSpec(
        "postblock",
        PostblockConfig,
        _fit_postblock,
        needs=("concept", "prompt"),
        input_types={"concept": Concept},
        implicit_metric="I (trained by gradient descent)",
        description="a resid_post vector trained by Adam on −concept + l2·‖δ‖²; exportable as a "
        "bias edit",
    )
)
