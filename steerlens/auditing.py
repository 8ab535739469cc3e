"""Audit: which downstream components (attention heads, MLPs, SAE features) a steering edit moves.

For each prompt, two forward passes:

- one **forward-mode** pass (``torch.autograd.forward_ad``) whose edit is a dual number with
  primal 0 and tangent ``scale × vector``: its primal is the clean run and its tangent the
  first-order change J·δ of every component output at once;
- one **steered** pass: the actual change is steered − clean.

Components are read at the prediction position (the last token), where the next-token
distribution is read: each attention head's output z_h W_O[h] and each MLP's output, at every
layer downstream of the edit. Per component the audit reports

- ``change_norm``: ‖actual change‖; ``first_order_norm``: ‖J·δ‖; ``agreement``: their cosine;
- ``dla_concept``: direct logit attribution of the actual change to the concept, ∇_z c · W_Uᵀ J_ln Δ
  (the final norm linearized at the clean residual, as DLA does);
- ``dla_off_target_kl``: ½ (W_Uᵀ J_ln Δ)ᵀ F_off (W_Uᵀ J_ln Δ), the second-order off-target KL of the
  change's direct effect alone (F_off: the Fisher matrix of the concept's off-target distribution);
- ``metric_share`` (and ``off_target_share``): the component's share of δᵀGδ, the first-order
  cost of the edit in the pullback metric, ⟨ℓ_c, ℓ⟩_F / ⟨ℓ, ℓ⟩_F with ℓ_c the component's direct
  logit change and ℓ the total one. Since the final residual's change is the sum of the component
  changes plus the edit's own skip path, the shares and ``skip_share`` sum to 1 exactly: a block
  decomposition of the metric along the edit.

With SAEs given (site → sae-lens SAE), the features whose activation the edit moves most at
those sites. Several methods side by side: pass a mapping name → intervention.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> vector = torch.linspace(-1, 1, 16, dtype=torch.float64)
>>> result = audit(model, vector, torch.tensor([1, 2, 3]), site="resid_post.0", scale=1e-3)
>>> result.components[["component", "layer", "head"]].head(3).values.tolist()
[['L1H0', 1, 0], ['L1H1', 1, 1], ['L1H2', 1, 2]]
>>> round(float(result.summary["agreement"].iloc[0]), 4)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

from steerlens.audit_result import MEASURES, Audit
from steerlens.concepts.base import Concept
from steerlens.errors import ConceptError, InputError, MethodError
from steerlens.hooks import hooked, record, site_index
from steerlens.methods.intervention import Intervention
from steerlens.metric.autodiff import load_forward_ad
from steerlens.metric.outcomes import complement_kl
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

__all__ = ["MEASURES", "Audit", "SteeringLike", "audit", "edits_nothing"]

SteeringLike = Intervention | Tensor | Sequence[Intervention]

# --------------------------------------------------------------------------- inputs


def edits_nothing(iv: Intervention) -> bool:
    """Whether ``iv``'s added vectors and multipliers change nothing (its scale is 0, or every
    vector is zero and no multiplier is non-zero): an edit :func:`audit` refuses, since it has
    nothing to audit. Clamps and scalar functions are refused by the audit on their own."""
    still = all(not bool(v.any()) for v in iv.vectors.values())
    return iv.scale == 0 or (still and not any(iv.multipliers.values()))


def _runs(
    model: HookedTransformer,
    steering: SteeringLike | Mapping[str, SteeringLike],
    site: str | Site | None,
    scale: float | None,
    n_prompts: int,
) -> dict[str, list[Intervention]]:
    """Each method's intervention per prompt."""
    named = steering if isinstance(steering, Mapping) else {"": steering}
    if not named:
        raise InputError("no steering given to audit")
    out: dict[str, list[Intervention]] = {}
    for name, item in named.items():
        if isinstance(item, Tensor):
            if site is None:
                raise InputError("auditing a bare vector needs site=, e.g. site='resid_post.6'")
            item = Intervention("vector", {as_site(site, model).name: item})
        elif site is not None:
            raise InputError("site= is only for a bare vector; an intervention names its sites")
        items = [item] * n_prompts if isinstance(item, Intervention) else list(item)
        if len(items) != n_prompts or not all(isinstance(i, Intervention) for i in items):
            raise InputError(
                f"steering {name or 'given'!r} must be an Intervention, a vector, or a list of "
                f"{n_prompts} interventions (one per prompt)"
            )
        items = [iv if scale is None else iv.scaled(scale) for iv in items]
        for iv in items:
            iv.check(model)
            if iv.clamps:
                raise MethodError(
                    f"steering {iv.method!r} clamps an SAE feature: its edit depends on the "
                    "activation, so it has no first-order tangent to audit; audit the added "
                    "decoder row instead (sae_intervention(..., mode='add'))"
                )
            if iv.scalar_functions:
                raise MethodError(
                    f"steering {iv.method!r} scales by learned functions of the activation "
                    "(dynamic activation scaling), which the audit's tangents do not cover; "
                    "audit static multipliers (the 'scaling' method) instead"
                )
            if edits_nothing(iv):
                raise InputError(f"steering {iv.method!r} is zero: nothing to audit")
        label = name or items[0].method
        out[label] = items
    return out


def _concepts(concept: Any, n_prompts: int) -> list[Any]:
    if concept is None:
        return [None] * n_prompts
    many = isinstance(concept, Sequence) and not isinstance(concept, str)
    items: list[Any] = list(concept) if many else [concept] * n_prompts
    if len(items) != n_prompts:
        raise InputError(f"got {len(items)} concepts for {n_prompts} prompts: give one or one each")
    for c in items:
        off = c.off_target() if isinstance(c, Concept) else None
        if off is None:
            raise ConceptError(
                f"the audit attributes to output concepts (a TokenSet or PairConcept); "
                f"got {type(c).__name__}"
            )
        if off.merge:
            raise ConceptError("the audit's off-target measures use a complement, not a merge")
    return items


def _sae_sites(model: HookedTransformer, saes: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for spec, sae in (saes or {}).items():
        site = as_site(spec, model)
        if not hasattr(sae, "encode") or not hasattr(sae, "cfg"):
            raise InputError(f"the SAE for {spec} is a {type(sae).__name__}, not a sae-lens SAE")
        if int(sae.cfg.d_in) != site.dim(model):
            raise InputError(
                f"the SAE for {site.name} reads width {sae.cfg.d_in}, but the site has width "
                f"{site.dim(model)}"
            )
        out[site.name] = sae
    return out


# --------------------------------------------------------------------------- one prompt


@dataclass
class _Pass:
    """Component outputs at the last position ([C, d]), the final residual, the logits and the
    SAE-site activations of one pass."""

    comps: Tensor
    final: Tensor
    logits: Tensor
    sae_acts: dict[str, Tensor]


def _component_names(model: HookedTransformer, first_layer: int) -> list[tuple[int, int | None]]:
    out: list[tuple[int, int | None]] = []
    for layer in range(first_layer, model.cfg.n_layers):
        out += [(layer, h) for h in range(model.cfg.n_heads)] + [(layer, None)]
    return out


def _read(
    model: HookedTransformer, acts: dict[str, Tensor], first_layer: int, logits: Tensor, part: Any
) -> _Pass:
    """Split recorded activations (dual or plain) into a :class:`_Pass` of primals or tangents."""

    def get(t: Tensor) -> Tensor:
        value = part(t)
        return torch.zeros_like(fwad.unpack_dual(t).primal) if value is None else value

    rows = []
    for layer in range(first_layer, model.cfg.n_layers):
        z = get(acts[f"blocks.{layer}.attn.hook_z"])[0, -1]
        w_o = model.blocks[layer].attn.W_O.detach()
        rows.append(torch.einsum("hd,hdm->hm", z, w_o))
        rows.append(get(acts[f"blocks.{layer}.hook_mlp_out"])[0, -1].unsqueeze(0))
    d = model.cfg.d_model
    final_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    comps = (
        torch.cat(rows)
        if rows
        else torch.zeros(0, d, dtype=model.cfg.dtype, device=model.cfg.device)
    )
    sae = {k[4:]: get(v)[0, -1] for k, v in acts.items() if k.startswith("sae:")}
    return _Pass(comps, get(acts[final_name])[0, -1], get(logits)[0, -1], sae)


def _record_names(model: HookedTransformer, first_layer: int) -> list[str]:
    names = [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    for layer in range(first_layer, model.cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
    return names


def _dual_pass(
    model: HookedTransformer,
    iv: Intervention,
    tokens: Tensor,
    first_layer: int,
    sae_sites: Mapping[str, Any],
) -> tuple[_Pass, _Pass]:
    """(clean, first-order change) from one forward-mode pass."""
    load_forward_ad()
    acts: dict[str, Tensor] = {}
    sites = [as_site(s, model) for s in iv.sites]

    def add(site: Site, vector: Tensor):
        def hook(act: Tensor, hook: object) -> Tensor:
            index = site_index(site, act.shape[1])
            tangent = torch.zeros_like(act)
            if index is not None:
                tangent[index] += vector.to(act).view(act.shape[len(index) :])
            return act + fwad.make_dual(torch.zeros_like(act), tangent)

        return hook

    def grab(key: str, head: int | None = None):
        def hook(act: Tensor, hook: object) -> None:
            acts[key] = act if head is None else act[:, :, head]

        return hook

    def multiply(site: Site, m: float):
        """Activation scaling a → (1 + t·m)·a: its tangent at t = 0 is m·a."""

        def hook(act: Tensor, hook: object) -> Tensor:
            index = site_index(site, act.shape[1])
            primal = fwad.unpack_dual(act).primal
            tangent = torch.zeros_like(primal)
            if index is not None:
                tangent[index] = m * primal[index]
            return act + fwad.make_dual(torch.zeros_like(primal), tangent)

        return hook

    fwd: list[tuple[str, Any]] = [(s.hook_name, add(s, iv.vector(s.name))) for s in sites]
    fwd += [
        (as_site(spec, model).hook_name, multiply(as_site(spec, model), iv.scale * m))
        for spec, m in iv.multipliers.items()
    ]
    fwd += [(name, grab(name)) for name in _record_names(model, first_layer)]
    sae_parsed = [as_site(k, model) for k in sae_sites]
    fwd += [(s.hook_name, grab(f"sae:{s.name}", s.head)) for s in sae_parsed]
    scaled = [as_site(spec, model) for spec in iv.multipliers]
    need_result = any(s.kind == "result" for s in sites + sae_parsed + scaled)
    with fwad.dual_level(), torch.no_grad(), hooked(model, fwd, need_result=need_result):
        logits = model(tokens.unsqueeze(0))
        clean = _read(model, acts, first_layer, logits, lambda t: fwad.unpack_dual(t).primal)
        change = _read(model, acts, first_layer, logits, lambda t: fwad.unpack_dual(t).tangent)
    return clean, change


def _steered_pass(
    model: HookedTransformer,
    iv: Intervention,
    tokens: Tensor,
    first_layer: int,
    sae_sites: Mapping[str, Any],
) -> _Pass:
    names = _record_names(model, first_layer)
    with torch.no_grad(), iv.apply(model), record(model, names) as acts:
        with record(model, list(sae_sites)) as sae_acts:
            logits = model(tokens.unsqueeze(0))
    acts.update({f"sae:{k}": v for k, v in sae_acts.items()})
    return _read(model, acts, first_layer, logits, lambda t: t)


def _fisher(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ in the Fisher metric of the distribution p over logits (rows of a against b)."""
    return (p * a * b).sum(-1) - (p * a).sum(-1) * (p * b).sum(-1)


def _off_target(logits: Tensor, concept: Any) -> Tensor:
    """The concept's off-target distribution over the vocabulary (0 on excluded tokens)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[list(concept.off_target().exclude)] = False
    q = torch.zeros_like(logits)
    q[keep] = torch.softmax(logits[keep], -1)
    return q


def _audit_prompt(
    model: HookedTransformer,
    iv: Intervention,
    tokens: Tensor,
    concept: Any,
    first_layer: int,
    sae_sites: Mapping[str, Any],
) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Tensor]]:
    clean, lin = _dual_pass(model, iv, tokens, first_layer, sae_sites)
    steered = _steered_pass(model, iv, tokens, first_layer, sae_sites)
    actual = (steered.comps - clean.comps).double()
    first = lin.comps.double()

    # the final norm linearized at the clean residual, then the unembedding
    with torch.enable_grad():
        jac = torch.func.jacrev(lambda x: model.ln_final(x.view(1, 1, -1)).view(-1))(clean.final)
    jac = jac.detach()
    w_u = model.W_U.detach()

    def logit_change(delta: Tensor) -> Tensor:
        return ((delta.to(jac.dtype) @ jac.T).to(w_u.dtype) @ w_u).double()

    total_lin = logit_change(lin.final.unsqueeze(0))[0]
    skip_lin = logit_change((lin.final - first.sum(0).to(lin.final.dtype)).unsqueeze(0))[0]
    comp_lin = logit_change(first)
    comp_actual = logit_change(actual)
    p = torch.softmax(clean.logits.double(), -1)
    quad = _fisher(p, total_lin, total_lin)
    cos = torch.nn.functional.cosine_similarity(actual, first, dim=-1)
    zero = (actual.norm(dim=-1) == 0) | (first.norm(dim=-1) == 0)
    cols: dict[str, Any] = {
        "change_norm": actual.norm(dim=-1),
        "first_order_norm": first.norm(dim=-1),
        "agreement": torch.where(zero, torch.nan, cos),
        "metric_share": _fisher(p, comp_lin, total_lin) / quad,
    }
    flat_a, flat_f = actual.flatten(), first.flatten()
    summary: dict[str, Any] = {
        "agreement": float(torch.nn.functional.cosine_similarity(flat_a, flat_f, dim=0))
        if len(flat_a)
        else math.nan,
        "norm_correlation": float(
            torch.corrcoef(torch.stack([cols["change_norm"], cols["first_order_norm"]]))[0, 1]
        )
        if len(actual) > 1
        else math.nan,
        "quad_full": float(quad),
        "skip_share": float(_fisher(p, skip_lin, total_lin) / quad),
        "logit_first_order_error": float(
            (total_lin - lin.logits.double()).norm() / lin.logits.double().norm()
        ),
    }
    if concept is not None:
        logits = clean.logits.detach().double().clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(concept.value(None, logits), logits)
        q = _off_target(clean.logits.double(), concept)
        quad_off = _fisher(q, total_lin, total_lin)
        cols["dla_concept"] = comp_actual @ grad
        skip_actual = (steered.final - clean.final).double() - actual.sum(0)
        cols["dla_off_target_kl"] = 0.5 * _fisher(q, comp_actual, comp_actual)
        cols["off_target_share"] = _fisher(q, comp_lin, total_lin) / quad_off
        before = float(concept.value(None, clean.logits.double()))
        after = float(concept.value(None, steered.logits.double()))
        exclude = concept.off_target().exclude
        summary |= {
            "quad_off_target": float(quad_off),
            "skip_off_target_share": float(_fisher(q, skip_lin, total_lin) / quad_off),
            "skip_dla_concept": float(logit_change(skip_actual.unsqueeze(0))[0] @ grad),
            "concept_clean": before,
            "concept_steered": after,
            "off_target_kl": complement_kl(clean.logits, steered.logits, exclude),
        }
    frame = pd.DataFrame({k: v.detach().cpu().numpy() for k, v in cols.items()})
    sae_rows = {}
    for key, sae in sae_sites.items():
        both = torch.stack([clean.sae_acts[key], steered.sae_acts[key]]).to(sae.dtype)
        with torch.no_grad():
            sae_rows[key] = sae.encode(both).double().cpu()
    return frame, summary, sae_rows


# --------------------------------------------------------------------------- entry point


def audit(
    model: HookedTransformer,
    steering: SteeringLike | Mapping[str, SteeringLike],
    tokens: PromptsLike,
    *,
    site: str | Site | None = None,
    scale: float | None = None,
    concept: Any = None,
    saes: Mapping[str, Any] | None = None,
    top_features: int = 10,
) -> Audit:
    """Which downstream heads, MLPs and SAE features ``steering`` moves on ``tokens``.

    Args:
        steering: an :class:`~steerlens.Intervention`, a vector (with ``site``), a list of
            interventions one per prompt (e.g. FishBack fitted per context), or a mapping from a
            method name to any of those, to audit methods side by side.
        tokens: a prompt, a list of prompts, or token ids ([pos] or [batch, pos]).
        scale: overrides every intervention's scale.
        concept: a :class:`~steerlens.TokenSet` or :class:`~steerlens.concepts.PairConcept`
            (or one per prompt) for the direct-effect and off-target columns.
        saes: site → sae-lens SAE: report the features the edit moves there.
        top_features: how many SAE features to keep per (method, site).

    The model is left as found: no hooks, no change to weights or config.
    """
    prompts = as_prompts(model, tokens)
    runs = _runs(model, steering, site, scale, len(prompts))
    concepts = _concepts(concept, len(prompts))
    sae_sites = _sae_sites(model, saes)
    if top_features < 1:
        raise InputError(f"top_features must be >= 1, got {top_features}")
    names = _component_names(model, 0)
    frames, summaries, sae_frames = [], [], []
    for method, ivs in runs.items():
        sae_sum: dict[str, Tensor] = {}
        for i, (toks, iv, c) in enumerate(zip(prompts, ivs, concepts, strict=True)):
            first_layer = _first_layer(model, iv)
            frame, summary, sae_rows = _audit_prompt(model, iv, toks, c, first_layer, sae_sites)
            mine = [n for n in names if n[0] >= first_layer]
            frame.insert(0, "layer", [layer for layer, _ in mine])
            frame.insert(1, "head", pd.array([h for _, h in mine], dtype="Int64"))
            frame.insert(0, "component", [_label(n) for n in mine])
            frame.insert(0, "prompt", i)
            frame.insert(0, "method", method)
            frame["column"] = ["MLP" if h is None else f"H{h}" for _, h in mine]
            frames.append(frame)
            summaries.append({"method": method, "prompt": i, **summary})
            for key, rows in sae_rows.items():
                sae_sum[key] = sae_sum.get(key, 0) + rows
        for key, total in sae_sum.items():
            mean = total / len(prompts)
            change = mean[1] - mean[0]
            top = change.abs().argsort(descending=True)[:top_features]
            sae_frames.append(
                pd.DataFrame(
                    {
                        "method": method,
                        "site": key,
                        "feature": top.numpy(),
                        "clean": mean[0, top].numpy(),
                        "steered": mean[1, top].numpy(),
                        "change": change[top].numpy(),
                    }
                )
            )
    per_prompt: Any = pd.concat(frames, ignore_index=True)
    keys = ["method", "component", "layer", "head", "column"]
    components = (
        per_prompt.drop(columns="prompt")
        .groupby(keys, sort=False, dropna=False)
        .mean()
        .reset_index()
    )
    per_summary: Any = pd.DataFrame(summaries)
    summary = per_summary.drop(columns="prompt").groupby("method", sort=False).mean()
    summary.insert(0, "prompts", len(prompts))
    sae_table = pd.concat(sae_frames, ignore_index=True) if sae_frames else pd.DataFrame()
    return Audit(components, per_prompt, summary.reset_index(), sae_table, model.cfg.n_heads)


def _first_layer(model: HookedTransformer, iv: Intervention) -> int:
    """The first layer whose components an edit at the intervention's sites can move."""
    layers = []
    for spec in (*iv.sites, *iv.multipliers):
        site = as_site(spec, model)
        layers.append(site.layer + 1 if site.kind in ("resid_post", "mlp_out") else site.layer)
    return min(layers)


def _label(name: tuple[int, int | None]) -> str:
    layer, head = name
    return f"L{layer} MLP" if head is None else f"L{layer}H{head}"
