"""Joint adaptation on tiny float64 models: the training loop against a hand-written reference
(the low-rank update as an edited weight through ``torch.func.functional_call``, the shift as a
plain hook), its special cases (post-block alone, LoRA alone), the registry, save and load, the
accuracy it is scored by, bad input, and an interrupted run that leaves nothing behind."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import steerlens as sl
from steerlens import errors
from steerlens.methods import answer_accuracy, joint_intervention
from steerlens.methods.joint import orthogonality_penalty
from tests.conftest import assert_untouched, weights_snapshot

PROMPTS = [
    torch.tensor([3, 1, 4, 1, 5]),
    torch.tensor([2, 7, 1, 8]),
    torch.tensor([1, 6, 1, 8, 0]),
    torch.tensor([9, 4, 2, 6]),
    torch.tensor([5, 3, 5, 8, 9]),
]
TARGETS = [11, 12, 11, 12, 13]


def reference(model, shift_layers, lora_layers, lora_on, rank, steps, batch_size, **hyper):
    """The module docstring's loop written out: δ through a hook, ΔW = A B into the weight."""
    gen = torch.Generator().manual_seed(hyper["seed"])
    d_model = model.cfg.d_model
    deltas = {
        L: torch.zeros(d_model, dtype=torch.float64, requires_grad=True) for L in shift_layers
    }
    factors = {}
    for layer in lora_layers:
        for kind in lora_on:
            d_in = model.cfg.n_heads * model.cfg.d_head if kind == "attn" else model.cfg.d_mlp
            a = torch.randn(d_in, rank, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
            b = torch.zeros(rank, d_model, dtype=torch.float64)
            factors[(layer, kind)] = (a.requires_grad_(True), b.requires_grad_(True))
    params = [{"params": list(deltas.values()), "lr": hyper["lr_shift"]}]
    params.append({"params": [t for ab in factors.values() for t in ab], "lr": hyper["lr_lora"]})
    opt = torch.optim.Adam([p for p in params if p["params"]])
    order: list[int] = []
    names = dict(model.named_parameters())
    batches = torch.Generator().manual_seed(hyper["seed"])
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = torch.randperm(len(PROMPTS), generator=batches).tolist()
            batch.append(order.pop(0))
        weights = {}
        for (layer, kind), (a, b) in factors.items():
            name = f"blocks.{layer}." + ("attn.W_O" if kind == "attn" else "mlp.W_out")
            w = names[name]
            weights[name] = w.detach() + (a @ b).reshape(w.shape)
        hooks = [
            (f"blocks.{L}.hook_resid_post", lambda act, hook, d=d: act + d)
            for L, d in deltas.items()
        ]
        loss = torch.zeros((), dtype=torch.float64)
        opt.zero_grad()
        with model.hooks(fwd_hooks=hooks):
            for i in batch:
                logits = torch.func.functional_call(model, weights, (PROMPTS[i][None],))[0, -1]
                loss = loss + F.cross_entropy(logits[None], torch.tensor([TARGETS[i]])) / len(batch)
        pairs = [(deltas[layer], b) for (layer, _), (_, b) in factors.items() if layer in deltas]
        penalties = []
        for d, b in pairs:
            if float(b.detach().abs().min()) > 0 and float(d.detach().norm()) > 0:
                penalties.append(((b @ d) ** 2 / ((b * b).sum(1) * (d * d).sum())).mean())
            else:
                penalties.append(torch.zeros((), dtype=torch.float64))
        if pairs:
            loss = loss + hyper["orthogonality"] * torch.stack(penalties).mean()
        loss.backward()
        opt.step()
    return deltas, factors


def test_joint_matches_the_reference_loop(model):
    kwargs = dict(
        shift_layers=(1,),
        lora_layers=(0, 1),
        lora_on=("mlp", "attn"),
        rank=2,
        steps=6,
        batch_size=3,
        lr_shift=0.05,
        lr_lora=0.02,
        orthogonality=0.5,
        seed=3,
    )
    before = weights_snapshot(model)
    iv = joint_intervention(model, PROMPTS, TARGETS, **kwargs)  # type: ignore[arg-type]
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())  # restored as found
    deltas, factors = reference(model, **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(
        iv.vectors["blocks.1.hook_resid_post@all"], deltas[1].detach(), rtol=1e-7, atol=1e-10
    )
    for (layer, kind), (a, b) in factors.items():
        name = f"blocks.{layer}." + ("attn.W_O" if kind == "attn" else "mlp.W_out")
        upd = iv.weight_updates[name]
        torch.testing.assert_close(upd.a, a.detach(), rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(upd.b, b.detach(), rtol=1e-7, atol=1e-10)
    assert iv.info["steps_done"] == 6
    assert iv.info["trained_parameters"] == 16 + 2 * (2 * (32 + 16) + 2 * (16 + 16))


def test_post_block_alone_and_lora_alone_learn_the_task(gpt2_model):
    model = gpt2_model
    common = dict(steps=40, batch_size=5, lr_shift=0.05, lr_lora=0.02)
    shift = joint_intervention(model, PROMPTS, TARGETS, shift_layers=(1,), lora_layers=(), **common)  # type: ignore[arg-type]
    lora = joint_intervention(model, PROMPTS, TARGETS, shift_layers=(), lora_layers=(1,), **common)  # type: ignore[arg-type]
    assert shift.sites == ("blocks.1.hook_resid_post@all",) and not shift.weight_updates
    assert not lora.vectors
    assert set(lora.weight_updates) == {"blocks.1.mlp.W_out"}
    assert shift.info["trained_parameters"] == 16 and shift.info["rank"] is None
    assert lora.info["trained_parameters"] == 4 * (32 + 16)
    assert lora.info["model_parameters"] == sum(p.numel() for p in model.parameters())
    base = answer_accuracy(model, PROMPTS, TARGETS)
    for iv in (shift, lora):
        assert iv.info["end_loss"] < 0.5 * iv.info["start_loss"]
        assert answer_accuracy(model, PROMPTS, TARGETS, iv) > base


def test_orthogonality_penalty():
    d = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert float(orthogonality_penalty(d, b)) == pytest.approx(0.25)  # mean of 1/2 and 0
    assert float(orthogonality_penalty(torch.zeros(3, dtype=torch.float64), b)) == 0.0
    assert float(orthogonality_penalty(d, torch.zeros(2, 3, dtype=torch.float64))) == 0.0


def test_the_penalty_separates_shift_and_update(gpt2_model):
    runs = {
        w: joint_intervention(
            gpt2_model,
            PROMPTS,
            TARGETS,
            shift_layers=(1,),
            lora_layers=(1,),
            steps=30,
            batch_size=5,
            lr_shift=0.05,
            lr_lora=0.02,
            orthogonality=w,
        )  # fmt: skip
        for w in (0.0, 10.0)
    }
    cos2 = {
        w: float(orthogonality_penalty(iv.vector(), iv.weight_updates["blocks.1.mlp.W_out"].b))
        for w, iv in runs.items()
    }
    assert cos2[10.0] < 0.5 * cos2[0.0]


def test_answer_accuracy_is_the_greedy_hit_rate(model):
    want = [int(model(t[None])[0, -1].argmax()) for t in PROMPTS]
    targets = [want[0], want[1], (want[2] + 1) % 48, want[3], (want[4] + 1) % 48]
    assert answer_accuracy(model, PROMPTS, targets) == pytest.approx(3 / 5)
    assert answer_accuracy(model, PROMPTS, targets, batch_size=2) == pytest.approx(3 / 5)


def test_fit_registry_save_load(gpt2_model, tmp_path):
    iv = sl.fit(
        gpt2_model,
        "joint",
        prompt=PROMPTS,
        targets=TARGETS,
        shift_layers=(1,),
        lora_layers=(0,),
        steps=3,
    )
    assert iv.method == "joint" and "joint" in set(sl.list_methods().name)
    loaded = sl.load_intervention(iv.save(tmp_path / "joint"))
    assert loaded.info == iv.info
    torch.testing.assert_close(loaded.vector(), iv.vector())
    with iv.apply(gpt2_model):
        want = gpt2_model(PROMPTS[0][None])
    with loaded.apply(gpt2_model):
        got = gpt2_model(PROMPTS[0][None])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(errors.InputError, match="joint needs shift_layers=, lora_layers="):
        sl.fit(gpt2_model, "joint", prompt=PROMPTS, targets=TARGETS)


def test_bad_input(model):
    before = weights_snapshot(model)
    ok = dict(shift_layers=(1,), lora_layers=(1,))
    with pytest.raises(errors.SiteError, match=r"layer 5 is out of range.*valid: 0\.\.1"):
        joint_intervention(model, PROMPTS, TARGETS, shift_layers=(), lora_layers=(5,))
    with pytest.raises(errors.SiteError, match=r"layer 2 is out of range"):
        joint_intervention(model, PROMPTS, TARGETS, shift_layers=(2,), lora_layers=())
    with pytest.raises(errors.InputError, match="5 prompts but 4 targets"):
        joint_intervention(model, PROMPTS, TARGETS[:4], **ok)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match=r"target 48 is not a token id in 0\.\.47"):
        joint_intervention(model, PROMPTS, [*TARGETS[:4], 48], **ok)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match="nothing to train"):
        joint_intervention(model, PROMPTS, TARGETS, shift_layers=(), lora_layers=())
    with pytest.raises(errors.InputError, match=r"lora_on is a sequence of \('attn', 'mlp'\)"):
        joint_intervention(model, PROMPTS, TARGETS, lora_on=("W_Q",), **ok)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match=r"rank must be an int in 1\.\.16"):
        joint_intervention(model, PROMPTS, TARGETS, rank=17, **ok)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match="lists a layer twice"):
        joint_intervention(model, PROMPTS, TARGETS, shift_layers=(1, -1), lora_layers=())
    with pytest.raises(errors.InputError, match="steps >= 1"):
        joint_intervention(model, PROMPTS, TARGETS, steps=0, **ok)  # type: ignore[arg-type]
    with pytest.raises(errors.InputError, match="lr_lora must be a finite number > 0"):
        joint_intervention(model, PROMPTS, TARGETS, lr_lora=float("nan"), **ok)  # type: ignore[arg-type]
    assert_untouched(model, before)


def _after(module, calls: int, effect):
    original = module.forward
    count = {"n": 0}

    def forward(*args, **kwargs):
        count["n"] += 1
        out = original(*args, **kwargs)
        return effect(out) if count["n"] > calls else out

    return mock.patch.object(module, "forward", forward)


def _interrupt(out):
    raise KeyboardInterrupt


def test_an_interrupted_or_diverging_run_leaves_nothing(model):
    before = weights_snapshot(model)
    ok = dict(shift_layers=(1,), lora_layers=(0, 1), steps=10, batch_size=2)
    with _after(model.unembed, 3, _interrupt), pytest.raises(KeyboardInterrupt):
        joint_intervention(model, PROMPTS, TARGETS, **ok)  # type: ignore[arg-type]
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())
    with _after(model.unembed, 4, lambda out: out * float("nan")):
        with pytest.raises(errors.NonFiniteError, match="loss is not finite at step"):
            joint_intervention(model, PROMPTS, TARGETS, **ok)  # type: ignore[arg-type]
    assert_untouched(model, before)
