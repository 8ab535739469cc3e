"""Dynamic activation scaling against a hand-written re-implementation of its definition on tiny
float64 models: the functions applied at every position (prompts of unseen lengths included),
the proximal training steps, the three measures, artifacts, widths and bad input."""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import steerlens as sl
import steerlens.methods.scaling as scaling_module
from steerlens.errors import ArtifactError, InputError, MethodError, NonFiniteError
from steerlens.interop import to_gguf_control_vector
from steerlens.methods import Intervention, bias_edit, scaling_measures
from steerlens.methods.dynamic_scaling import dynamic_scaling_intervention
from steerlens.methods.scalar_function import ScalarFunction, scale_by_function
from steerlens.methods.scaling import component_sites, scaling_intervention
from steerlens.testing import tiny_model
from tests.conftest import assert_untouched, unchecked, weights_snapshot

PROMPTS = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]), torch.tensor([9, 3, 2])]
LONGER = torch.tensor([4, 8, 15, 16, 23, 42, 7])  # a length never trained on


def _task(model, prompts=PROMPTS):
    """Each prompt's answer (source) and runner-up (target): flip them."""
    with torch.no_grad():
        logits = [model(t[None])[0, -1] for t in prompts]
    sources = [int(x.argmax()) for x in logits]
    targets = [int(x.argsort(descending=True)[1]) for x in logits]
    return targets, sources


def _ref_logits(model, tokens, theta):
    """Last-position logits with every head's z and MLP output, at every position, times
    1 + b + w·a/‖a‖ for the (b, w) of ``theta[site]`` (absent: unscaled). Differentiable."""

    def scaled(a, key):
        if key not in theta:
            return a
        b, w = theta[key]
        m = b + (a / a.norm(dim=-1, keepdim=True)) @ w
        return a * (1 + m)[..., None]

    def hook(act, hook):
        layer = int(hook.name.split(".")[1])
        if hook.name.endswith("hook_z"):
            heads = [
                scaled(act[:, :, h], f"blocks.{layer}.attn.hook_z:{h}@all")
                for h in range(model.cfg.n_heads)
            ]
            return torch.stack(heads, dim=2)
        return scaled(act, f"blocks.{layer}.hook_mlp_out@all")

    names = [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)]
    names += [f"blocks.{i}.hook_mlp_out" for i in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=[(n, hook) for n in names]):
        return model(tokens[None])[0, -1]


def _ref_terms(model, theta, targets, sources, prompts=PROMPTS, margin=1.0):
    """Per prompt: softplus(margin − (z_t − z_s)) and the renormalized off-target KL."""
    eff, kl = [], []
    for tokens, t, s in zip(prompts, targets, sources, strict=True):
        with torch.no_grad():
            clean = model(tokens[None])[0, -1]
        steered = _ref_logits(model, tokens, theta)
        eff.append(F.softplus(margin - (steered[t] - steered[s])))
        keep = torch.ones_like(clean, dtype=torch.bool)
        keep[[t, s]] = False
        p, q = torch.log_softmax(clean[keep], -1), torch.log_softmax(steered[keep], -1)
        kl.append((p.exp() * (p - q)).sum())
    return torch.stack(eff), torch.stack(kl)


def _ref_fit(model, targets, sources, *, steps, lr, l1, faithfulness):
    """The method written out plainly: one (b, w) per component, a gradient step on the mean
    flip + faithfulness·KL, then each (b, w) shrunk by lr·l1 in norm (to 0 if shorter)."""
    theta = {}
    for site in component_sites(model, position="all"):
        width = model.cfg.d_head if "hook_z" in site else model.cfg.d_model
        theta[site] = (
            torch.zeros((), dtype=torch.float64),
            torch.zeros(width, dtype=torch.float64),
        )
    for _ in range(steps):
        params = {
            k: (b.requires_grad_(True), w.requires_grad_(True)) for k, (b, w) in theta.items()
        }
        eff, kl = _ref_terms(model, params, targets, sources)
        loss = eff.mean() + faithfulness * kl.mean()
        flat = [p for bw in params.values() for p in bw]
        grads = iter(torch.autograd.grad(loss, flat))
        new = {}
        for k, (b, w) in params.items():
            b, w = (b - lr * next(grads)).detach(), (w - lr * next(grads)).detach()
            norm = math.hypot(float(b), float(w.norm()))
            shrink = max(0.0, 1 - lr * l1 / norm) if norm > 0 else 0.0
            new[k] = (b * shrink, w * shrink)
        theta = new
    return theta


def test_training_steps_match_the_written_out_method(model):
    before = weights_snapshot(model)
    targets, sources = _task(model)
    options: dict[str, Any] = dict(steps=6, lr=0.5, l1=0.3, faithfulness=0.3)
    iv = dynamic_scaling_intervention(model, PROMPTS, targets, sources, **options)
    assert_untouched(model, before)
    for p in model.parameters():
        assert p.grad is None
    ref = _ref_fit(model, targets, sources, **options)
    kept_ref = {k for k, (b, w) in ref.items() if float(b) != 0 or bool(w.any())}
    assert set(iv.scalar_functions) == kept_ref
    assert 0 < len(kept_ref) < len(ref)  # the group L1 drops some components exactly
    for site, fn in iv.scalar_functions.items():
        torch.testing.assert_close(fn.bias, ref[site][0], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(fn.weight, ref[site][1], rtol=1e-8, atol=1e-10)
    norms = [n for _, n in iv.info["kept"]]
    assert norms == sorted(norms, reverse=True)
    assert iv.info["end"]["l1"] == pytest.approx(0.3 * sum(norms))


def test_flips_and_applies_as_defined_at_every_position_of_any_length(model):
    targets, sources = _task(model)
    iv = sl.fit(
        model, "dynamic_scaling", prompt=PROMPTS, targets=targets, sources=sources, steps=60,
        l1=0.05, faithfulness=0.1,
    )  # fmt: skip
    start, end = iv.info["start"], iv.info["end"]
    assert start["flip_rate"] == 0 and end["flip_rate"] == 1
    theta = {k: (fn.bias, fn.weight) for k, fn in iv.scalar_functions.items()}
    assert any(float(fn.weight.norm()) > 0 for fn in iv.scalar_functions.values())
    for tokens in [*PROMPTS, LONGER]:
        with torch.no_grad(), iv.apply(model):
            mine = model(tokens[None])[0, -1]
        with torch.no_grad():
            torch.testing.assert_close(mine, _ref_logits(model, tokens, theta))
    # the reported loss terms and the three measures, recomputed from the reference logits
    with torch.no_grad():
        eff, kl = _ref_terms(model, theta, targets, sources)
    assert end["effectiveness"] == pytest.approx(float(eff.mean()), rel=1e-9)
    assert end["faithfulness"] == pytest.approx(float(kl.mean()), rel=1e-9)
    measures = scaling_measures(model, iv, PROMPTS, targets, sources)
    assert measures.flip_loss == pytest.approx(float(eff.mean()), rel=1e-9)
    assert measures.kl == pytest.approx(float(kl.mean()), rel=1e-9)
    assert measures.flip_rate == 1 and measures.components == len(iv.scalar_functions)


def test_minimality_sums_the_scalars_applied_in_the_steered_run(gpt2_model):
    model = gpt2_model
    targets, sources = _task(model)
    g = torch.Generator().manual_seed(1)
    f64 = torch.float64
    fn0 = ScalarFunction(
        0.3 * torch.randn(4, generator=g, dtype=f64), torch.tensor(-0.2, dtype=f64)
    )
    fn1 = ScalarFunction(
        0.3 * torch.randn(16, generator=g, dtype=f64), torch.tensor(0.4, dtype=f64)
    )
    iv = Intervention("dyn", {}, 1.0, scalar_functions={"z.1:2@all": fn0, "mlp_out.0@all": fn1})
    seen: list[float] = []  # by hand: mlp_out.0 is scaled before layer 1's z is computed

    def mlp(act, hook):
        m = 0.4 + (act / act.norm(dim=-1, keepdim=True)) @ fn1.weight
        seen.append(float(m.abs().sum()))
        return act * (1 + m)[..., None]

    def z(act, hook):
        a = act[:, :, 2]
        seen.append(float((-0.2 + (a / a.norm(dim=-1, keepdim=True)) @ fn0.weight).abs().sum()))
        return act

    hooks = [("blocks.0.hook_mlp_out", mlp), ("blocks.1.attn.hook_z", z)]
    for tokens in PROMPTS:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(tokens[None])
    total = sum(seen)
    measures = scaling_measures(model, iv, PROMPTS, targets, sources)
    assert measures.scalar_l1 == pytest.approx(total / len(PROMPTS), rel=1e-10)
    # static multipliers at one position each: Σ|m| per prompt
    static = scaling_intervention(model, PROMPTS, targets, sources, steps=20, lr=0.1)
    got = scaling_measures(model, static, PROMPTS, targets, sources)
    assert got.scalar_l1 == pytest.approx(sum(abs(v) for v in static.multipliers.values()))
    assert got.flip_loss == pytest.approx(static.info["end"]["effectiveness"], rel=1e-9)
    assert got.kl == pytest.approx(static.info["end"]["faithfulness"], rel=1e-9)


def test_with_zero_weight_it_is_the_static_multiplier(model):
    zero = torch.zeros(model.cfg.d_head, dtype=torch.float64)
    fn = ScalarFunction(zero, torch.tensor(-0.7, dtype=torch.float64))
    dynamic = Intervention("dyn", {}, 0.5, scalar_functions={"z.1:0@last": fn})
    static = Intervention("static", {}, 0.5, multipliers={"z.1:0@last": -0.7})
    with torch.no_grad():
        with dynamic.apply(model):
            a = model(LONGER[None])
        with static.apply(model):
            b = model(LONGER[None])
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, model(LONGER[None]))


def test_save_load_reproduces_outputs_exactly_and_refuses_other_widths(tmp_path, gpt2_model):
    model = gpt2_model
    targets, sources = _task(model)
    iv = sl.fit(
        model, "dynamic_scaling", prompt=PROMPTS, targets=targets, sources=sources, steps=10
    )
    assert "dynamic_scaling" in set(sl.list_methods()["name"])
    loaded = sl.load_intervention(iv.save(tmp_path / "dyn"))
    assert list(loaded.scalar_functions) == list(iv.scalar_functions)
    assert loaded.info["kept"] == iv.info["kept"] and loaded.method == "dynamic_scaling"
    for tokens in [PROMPTS[0], LONGER]:
        with torch.no_grad(), loaded.apply(model):
            a = model(tokens[None])
        with torch.no_grad(), iv.apply(model):
            b = model(tokens[None])
        assert torch.equal(a, b)
    assert set(iv.table().columns) >= {"site", "dim", "bias", "weight_norm"}
    assert "scalar functions" in repr(iv)
    wider = tiny_model("gpt2", d_model=32)  # d_head 8, not 4
    before = weights_snapshot(wider)
    with pytest.raises(InputError, match=r"reads 4-wide activations but that site is 8 wide"):
        with loaded.apply(wider):
            pass
    with pytest.raises(InputError, match="another width"):
        loaded.check(wider)
    assert_untouched(wider, before)
    # a tampered artifact: a function's tensor of the wrong shape
    folder = tmp_path / "bad"
    loaded.save(folder)
    meta = (folder / "meta.json").read_text()
    (folder / "meta.json").write_text(meta.replace('"f0":', '"g0":'))
    with pytest.raises(ArtifactError, match="do not match"):
        sl.load_intervention(folder)


def test_what_it_cannot_do_says_so(gpt2_model, tmp_path):
    model = gpt2_model
    before = weights_snapshot(model)
    targets, sources = _task(model)
    fn = ScalarFunction(
        torch.zeros(16, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    )
    iv = Intervention("dyn", {}, scalar_functions={"mlp_out.0@all": fn})
    with pytest.raises(MethodError, match="scales activations"):
        bias_edit(model, iv)
    with pytest.raises(MethodError, match="learned functions of the activation"):
        sl.audit(model, iv, PROMPTS[0])
    with pytest.raises(InputError, match="scalar_functions"):
        to_gguf_control_vector(iv, tmp_path / "x.gguf", model)
    with pytest.raises(InputError, match="scaling measures are for multipliers"):
        vec = Intervention("v", {"resid_post.0": torch.ones(16, dtype=torch.float64)})
        scaling_measures(model, vec, PROMPTS, targets, sources)
    assert_untouched(model, before)


def test_bad_inputs(gpt2_model):
    model = gpt2_model
    before = weights_snapshot(model)
    targets, sources = _task(model)
    f64 = torch.float64
    with pytest.raises(InputError, match="one target and one source"):
        dynamic_scaling_intervention(model, PROMPTS, targets[:2], sources)
    with pytest.raises(InputError, match="lr must be > 0"):
        dynamic_scaling_intervention(model, PROMPTS, targets, sources, lr=0.0)
    with pytest.raises(InputError, match="acts on one head"):
        dynamic_scaling_intervention(model, PROMPTS, targets, sources, components=["z.0"])
    with pytest.raises(InputError, match="listed twice"):
        dynamic_scaling_intervention(
            model, PROMPTS, targets, sources, components=["mlp_out.1@all", "mlp_out.1@all"]
        )
    with pytest.raises(MethodError, match="kept no component"):
        dynamic_scaling_intervention(model, PROMPTS, targets, sources, steps=2, l1=1e6)
    # a loss that turns NaN mid-training stops it: no half-trained intervention comes back
    real, calls = scaling_module._losses, {"n": 0}

    def nan_after_a_while(*args, **kwargs):
        calls["n"] += 1
        eff, kl, flipped = real(*args, **kwargs)
        return (eff * math.nan if calls["n"] > 5 else eff), kl, flipped

    with mock.patch.object(scaling_module, "_losses", nan_after_a_while):
        with pytest.raises(NonFiniteError, match="diverged at step 1"):
            dynamic_scaling_intervention(model, PROMPTS, targets, sources, steps=30)
    with pytest.raises(InputError, match=r"dynamic_scaling has no options \[.position_rule.\]"):
        sl.fit(model, "dynamic_scaling", prompt=PROMPTS, targets=targets, sources=sources,
               position_rule="all")  # fmt: skip
    with pytest.raises(NonFiniteError, match="weight contains NaN"):
        ScalarFunction(torch.full((4,), math.nan, dtype=f64), torch.tensor(0.0, dtype=f64))
    with unchecked(), pytest.raises(InputError, match="bias must be a 0-D tensor"):
        ScalarFunction(torch.zeros(4, dtype=f64), torch.zeros(1, dtype=f64))
    with unchecked(), pytest.raises(InputError, match="must be a ScalarFunction"):
        Intervention("dyn", {}, scalar_functions={"mlp_out.0": 0.5})  # type: ignore[dict-item]
    fn = ScalarFunction(torch.zeros(16, dtype=f64), torch.tensor(0.5, dtype=f64))
    with pytest.raises(InputError, match="acts on one head"):
        with scale_by_function(model, "resid_post.0", fn):
            pass
    assert_untouched(model, before)
