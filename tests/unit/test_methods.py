"""Steering methods on tiny float64 models, against straightforward reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

import steerlens as sl
from steerlens import errors
from steerlens.activations import harvest
from steerlens.concepts import ContrastPairs, TokenSet
from steerlens.concepts.sae import SaeFeature
from steerlens.methods import (
    DualConfig,
    EuclideanConfig,
    FishBackConfig,
    TruncatedFisherConfig,
    actadd_intervention,
    caa_intervention,
    load_intervention,
    probe_intervention,
    sae_intervention,
    steer_iteratively,
)
from steerlens.methods.iterative import conjugate_gradient
from steerlens.metric.local import LocalPath
from tests.conftest import assert_untouched, fallback_model, unchecked, weights_snapshot
from tests.oracle import kl, oracle_metric

TARGET = 7
SITE = "resid_post.0"


@torch.no_grad()
def prob(model, tokens, intervention=None, token=TARGET) -> float:
    if intervention is None:
        logits = model(tokens[None])[0, -1]
    else:
        with intervention.apply(model):
            logits = model(tokens[None])[0, -1]
    return float(torch.softmax(logits, -1)[token])


def concept_for(model) -> TokenSet:
    return TokenSet.from_ids([TARGET], d_vocab=model.cfg.d_vocab)


def full_grad(model, tokens, site: str, concept) -> torch.Tensor:
    """∇ of the concept w.r.t. a perturbation at the site's last position, through the whole
    model (the reference)."""
    s = sl.Site.parse(site)
    delta = torch.zeros(model.cfg.d_model, dtype=torch.float64, requires_grad=True)

    def hook(act, hook):
        act = act.clone()
        act[0, -1] = act[0, -1] + delta
        return act

    with model.hooks(fwd_hooks=[(s.hook_name, hook)]):
        logits = model(tokens[None])[0, -1]
    value = concept.value(None, logits)
    return torch.autograd.grad(value, delta)[0]


CONFIGS = [
    EuclideanConfig(SITE, 0.4),
    FishBackConfig(SITE, 0.4),
    FishBackConfig("resid_pre.1", 0.4, off_target=False),
    TruncatedFisherConfig("resid_pre.0", 0.4, depth=1),
    DualConfig("resid_post.0", 0.4),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-{c.site}")
def test_iterative_reaches_target_on_the_real_model(model, tokens, cfg):
    snap = weights_snapshot(model)
    concept = concept_for(model)
    run = steer_iteratively(model, cfg, concept, tokens)
    iv = run.intervention
    assert run.reached and run.steps >= 1
    assert prob(model, tokens, iv) == pytest.approx(0.4, abs=1e-5)
    assert math.isclose(run.final_value, math.log(0.4), abs_tol=1e-5)
    assert run.path.shape == (run.steps + 1, model.cfg.d_model)
    assert torch.equal(run.path[-1], iv.vector()) and run.path[0].abs().max() == 0
    assert_untouched(model, snap)


def test_local_path_gradient_equals_whole_model(model, tokens):
    concept = concept_for(model)
    with LocalPath(model, tokens, SITE) as path:
        x = path.x0.clone().requires_grad_(True)
        g = torch.autograd.grad(concept.value(x, path.logits(x)), x)[0]
    assert torch.allclose(g, full_grad(model, tokens, SITE, concept), atol=1e-10)


@pytest.mark.parametrize("flavour", ["plain", "fallback"])
def test_local_path_batched_equals_one_point_at_a_time(model, tokens, flavour):
    net = model if flavour == "plain" else fallback_model()
    concept = concept_for(net)
    with LocalPath(net, tokens, SITE) as path:
        assert path.vectorized == (flavour == "plain")
        gen = torch.Generator().manual_seed(3)
        xs = path.x0 + torch.randn(5, net.cfg.d_model, generator=gen, dtype=path.x0.dtype)
        one = torch.stack([concept.value(x, path.logits(x)) for x in xs])
        many = path.batched(lambda x: concept.value(x, path.logits(x)), xs)
        assert torch.allclose(one, many, atol=1e-12, rtol=0)
        with unchecked(), pytest.raises(errors.InputError, match=r"points must be \[n, "):
            path.batched(path.logits, path.x0)


@pytest.mark.parametrize("off_target", [True, False])
def test_fishback_first_step_is_damped_natural_gradient(model, tokens, off_target):
    """Reference: u = (G + λI)⁻¹g with G by jacrev of the full logits (exact vocabulary)."""
    concept = concept_for(model)
    cfg = FishBackConfig(SITE, 0.9, off_target=off_target, vocab="full", max_steps=1)
    run = steer_iteratively(model, cfg, concept, tokens)
    iv = run.intervention
    g = full_grad(model, tokens, SITE, concept)
    exclude = [TARGET] if off_target else []
    big_g = oracle_metric(model, tokens, sl.Site.parse(SITE), exclude=exclude)
    lam = cfg.damping * torch.trace(big_g) / big_g.shape[0]
    u = torch.linalg.solve(big_g + lam * torch.eye(big_g.shape[0], dtype=big_g.dtype), g)
    got = iv.vector()
    cos = float(got @ u / (got.norm() * u.norm()))
    assert cos > 1 - 1e-9
    assert run.trajectory[1].value > run.trajectory[0].value


def test_euclidean_first_step_is_the_gradient(model, tokens):
    concept = concept_for(model)
    run = steer_iteratively(model, EuclideanConfig(SITE, 0.9, max_steps=1), concept, tokens)
    iv = run.intervention
    g = full_grad(model, tokens, SITE, concept)
    got = iv.vector()
    assert float(got @ g / (got.norm() * g.norm())) > 1 - 1e-12


def test_fishback_pays_less_off_target_kl_than_euclidean(model, tokens):
    """To second order FishBack is the least off-target KL per unit of concept change."""
    concept = concept_for(model)
    p0 = prob(model, tokens)
    target = min(p0 * 1.3, 0.9)
    with torch.no_grad():
        clean = torch.log_softmax(model(tokens[None])[0, -1], -1)
    kls = {}
    for cfg in (
        EuclideanConfig(SITE, target, step=0.05),
        FishBackConfig(SITE, target, step=0.05, vocab="full", damping=1e-6),
    ):
        run = steer_iteratively(model, cfg, concept, tokens)
        iv = run.intervention
        with iv.apply(model), torch.no_grad():
            steered = torch.log_softmax(model(tokens[None])[0, -1], -1)
        keep = torch.arange(model.cfg.d_vocab) != TARGET
        p = clean[keep] - torch.logsumexp(clean[keep], 0)
        q = steered[keep] - torch.logsumexp(steered[keep], 0)
        kls[cfg.name] = float(kl(p, q))
    assert kls["fishback"] < kls["euclidean"]


def test_dual_solves_with_conjugate_gradient():
    torch.manual_seed(1)
    b = torch.randn(12, 12, dtype=torch.float64)
    a = b @ b.T + 0.1 * torch.eye(12, dtype=torch.float64)
    rhs = torch.randn(12, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, rhs, 50)
    assert torch.allclose(x, torch.linalg.solve(a, rhs), atol=1e-8)


def logit_probe(model, token=TARGET) -> sl.LinearProbe:
    """A unit probe along the token's unembedding direction (minus the mean one)."""
    weight = (model.W_U[:, token] - model.W_U.mean(1)).detach()
    return sl.LinearProbe(SITE, weight / weight.norm(), 0.0)


def test_dual_with_a_probe_stops_on_tokens(model, tokens):
    # steps of 2 logits of the probe reach p = 0.3 in a few steps on both tiny models; smaller
    # steps wander (gpt2 does not reach it in 60 steps of 1)
    iv = sl.fit(
        model,
        "dual",
        site=SITE,
        concept=logit_probe(model),
        prompt=tokens,
        stop_on=concept_for(model),
        target_probability=0.3,
        step=2.0,
    )
    assert iv.info["reached"] and 1 <= iv.info["steps"] < 60
    assert prob(model, tokens, iv) == pytest.approx(0.3, abs=1e-5)
    assert iv.info["final_value"] == pytest.approx(math.log(0.3), abs=1e-5)
    probe_values = [t["value"] for t in iv.info["trajectory"]]
    assert all(b > a for a, b in zip(probe_values, probe_values[1:], strict=False))


def test_dual_out_of_steps_reports_the_target_unreached(model, tokens):
    iv = sl.fit(
        model,
        "dual",
        site=SITE,
        concept=logit_probe(model),
        prompt=tokens,
        stop_on=concept_for(model),
        target_probability=0.3,
        step=2.0,
        max_steps=1,
    )
    assert not iv.info["reached"] and iv.info["steps"] == 1
    assert iv.info["target_value"] == pytest.approx(math.log(0.3))
    assert iv.info["final_value"] < iv.info["target_value"]
    assert prob(model, tokens, iv) < 0.3
    assert prob(model, tokens, iv) == pytest.approx(math.exp(iv.info["final_value"]), rel=1e-9)


def test_method_raising_midway_leaves_model_untouched(model, tokens):
    snap = weights_snapshot(model)

    class Exploding:
        name = "exploding"
        calls = 0

        def value(self, act, logits):
            Exploding.calls += 1
            if Exploding.calls > 3:
                raise KeyboardInterrupt
            return torch.log_softmax(logits, -1)[TARGET]

        def target_value(self, p):
            return math.log(p)

        def off_target(self):
            return None

        def check_site(self, site, model):
            pass

    with pytest.raises(KeyboardInterrupt):
        steer_iteratively(model, FishBackConfig(SITE, 0.99), Exploding(), tokens)
    assert_untouched(model, snap)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"site": "mlp_out.0"}, errors.SiteError),
        ({"site": "resid_post.0@all"}, errors.SiteError),
        ({"site": "resid_post.9"}, errors.SiteError),
        ({"site": SITE, "target_probability": 1.5}, errors.InputError),
        ({"site": SITE, "damping": -1.0}, errors.InputError),
        ({"site": SITE, "step": float("nan")}, errors.InputError),
        ({"site": SITE, "bogus": 1}, errors.InputError),
    ],
)
def test_iterative_bad_inputs(model, tokens, kwargs, error):
    snap = weights_snapshot(model)
    with pytest.raises(error):
        sl.fit(model, "fishback", concept=concept_for(model), prompt=tokens, **kwargs)
    assert_untouched(model, snap)


def test_unknown_method_and_missing_arguments(model, tokens):
    with pytest.raises(errors.MethodError, match="registered methods"):
        sl.fit(model, "telepathy")
    with pytest.raises(errors.InputError, match="needs site"):
        sl.fit(model, "fishback", prompt=tokens)
    with pytest.raises(errors.InputError, match="postblock needs"):
        sl.fit(model, "postblock", prompt=tokens)


def test_registry_lists_every_method():
    names = set(sl.list_methods()["name"])
    assert names == {
        "repe",
        "iti",
        "fishback",
        "euclidean",
        "truncated_fisher",
        "dual",
        "probe",
        "sae",
        "caa",
        "actadd",
        "postblock",
        "scaling",
        "dynamic_scaling",
        "multisite",
        "fusion",
        "joint",
    }


# ----------------------------------------------------------------------------- probes


def test_probe_fits_and_steers(model):
    torch.manual_seed(0)
    pos = [torch.tensor([i, j, 5]) for i in range(10, 15) for j in range(20, 24)]
    neg = [torch.tensor([i, j, 6]) for i in range(10, 15) for j in range(20, 24)]
    probe = sl.train_probe(model, "resid_post.0", pos, neg, test_fraction=0.25)
    assert probe.test_accuracy == 1.0 and probe.n_test == 10
    iv = probe_intervention(model, probe)
    h = harvest(model, neg[:1], "resid_post.0")
    before = float(probe.value(h[0]))
    assert float(probe.value(h[0] + 2.0 * iv.vector())) == pytest.approx(
        before + 2.0 * float(probe.weight.norm())
    )


def test_probe_errors(model):
    with pytest.raises(errors.ConceptError, match="zero weight"):
        sl.LinearProbe(SITE, torch.zeros(16, dtype=torch.float64), 0.0)
    with pytest.raises(errors.NonFiniteError):
        sl.LinearProbe(SITE, torch.full((16,), math.nan, dtype=torch.float64), 0.0)
    wide = sl.LinearProbe("mlp_post.0", torch.ones(64, dtype=torch.float64), 0.0)
    with pytest.raises(errors.ConceptError, match="trained at"):
        probe_intervention(model, wide, SITE)
    wrong = sl.LinearProbe(SITE, torch.ones(5, dtype=torch.float64), 0.0)
    with pytest.raises(errors.ConceptError, match="width"):
        probe_intervention(model, wrong)
    with pytest.raises(errors.ConceptError, match="labels 0 and 1"):
        sl.fit_probe(torch.randn(6, 4), [1] * 6, site=SITE)


def test_probe_save_load(tmp_path):
    probe = sl.LinearProbe(SITE, torch.arange(1.0, 5.0), 0.5, name="p", test_accuracy=0.75)
    probe.save(tmp_path / "p")
    back = sl.LinearProbe.load(tmp_path / "p")
    assert torch.equal(back.weight, probe.weight) and back.bias == 0.5
    assert back.test_accuracy == 0.75


# ----------------------------------------------------------------------------- SAEs


def tiny_sae(model, kind: str):
    d = model.cfg.d_model
    if kind == "topk":
        return TopKSAE(TopKSAEConfig(d_in=d, d_sae=32, k=4, dtype="float64"))
    return StandardSAE(StandardSAEConfig(d_in=d, d_sae=32, dtype="float64"))


@pytest.mark.parametrize("kind", ["standard", "topk"])
def test_sae_feature_value_is_pre_activation(model, kind):
    sae = tiny_sae(model, kind)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    feature = sl.sae_feature(sae, 5, SITE)
    x = torch.randn(model.cfg.d_model, dtype=torch.float64)
    with torch.no_grad():
        want = (x - sae.b_dec) @ sae.W_enc[:, 5] + sae.b_enc[5]
    assert float(feature.value(x, None).detach()) == pytest.approx(float(want))


def test_sae_fisher_step_raises_the_feature(model, tokens):
    sae = tiny_sae(model, "standard")
    feature = sl.sae_feature(sae, 3, SITE)
    with LocalPath(model, tokens, SITE) as path:
        start = float(feature.value(path.x0, None).detach())
    iv = sl.fit(
        model, "fishback", site=SITE, concept=feature, prompt=tokens, target_value=start + 1.0
    )
    assert iv.info["reached"]
    with LocalPath(model, tokens, SITE) as path:
        assert float(feature.value(path.x0 + iv.vector(), None).detach()) == pytest.approx(
            start + 1.0, abs=1e-6
        )


def test_sae_add_and_errors(model):
    sae = tiny_sae(model, "standard")
    feature = sl.sae_feature(sae, 3, SITE)
    iv = sae_intervention(model, feature, scale=2.0)
    direction = sae.W_dec[3].detach()
    assert torch.allclose(iv.vector(), 2.0 * direction / direction.norm())
    with pytest.raises(errors.ConceptError, match="out of range"):
        sl.sae_feature(sae, 32, SITE)
    with pytest.raises(errors.ConceptError, match="trained at"):
        sae_intervention(model, feature, "resid_post.1")
    narrow = SaeFeature(StandardSAE(StandardSAEConfig(d_in=8, d_sae=4, dtype="float64")), 0, SITE)
    with pytest.raises(errors.ConceptError, match="width"):
        sae_intervention(model, narrow)
    with pytest.raises(errors.ConceptError, match="no probability"):
        sl.fit(model, "fishback", site=SITE, concept=feature, prompt=torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- CAA, ActAdd


def toy_pairs(ids) -> ContrastPairs:
    return ContrastPairs("toy", tuple((str(p), str(m)) for p, m in ids), token_pairs=ids)


def last_token_diffs(model, ids, name: str) -> torch.Tensor:
    """Reference: h⁺ − h⁻ at each pair's last token, from run_with_cache."""
    diffs = []
    for plus, minus in ids:
        _, c_plus = model.run_with_cache(torch.tensor([plus]))
        _, c_minus = model.run_with_cache(torch.tensor([minus]))
        diffs.append((c_plus[name][0, -1] - c_minus[name][0, -1]).detach())
    return torch.stack(diffs)


def test_caa_matches_reference(model):
    ids = (((1, 2), (1, 3)), ((2, 2), (2, 3)), ((3, 1, 2), (3, 1, 3)))
    pairs = toy_pairs(ids)
    want = last_token_diffs(model, ids, "blocks.1.hook_resid_post").mean(0)
    iv = caa_intervention(model, pairs, 1)
    assert iv.sites == ("blocks.1.hook_resid_post@all",)
    assert torch.allclose(iv.vector(), want, atol=1e-12)


def test_repe_matches_reference(model):
    ids = (((1, 2), (1, 3)), ((2, 2), (2, 3)), ((3, 1, 2), (3, 1, 3)), ((4, 4), (4, 5)))
    pairs = toy_pairs(ids)
    d = last_token_diffs(model, ids, "blocks.0.hook_resid_post")
    # reference: top eigenvector of DᵀD, oriented so the differences project positively
    evecs = torch.linalg.eigh(d.T @ d)[1]
    want = evecs[:, -1] * torch.sign((d @ evecs[:, -1]).mean())
    iv = sl.fit(model, "repe", pairs=pairs, layer=[0, 1])
    assert set(iv.sites) == {"blocks.0.hook_resid_post@all", "blocks.1.hook_resid_post@all"}
    assert torch.allclose(iv.vector("blocks.0.hook_resid_post@all"), want, atol=1e-10)


def test_iti_matches_reference(model):
    """Reference: per head, mass-mean θ and σ from run_with_cache; top-k by held-out probe
    accuracy; shift α·σ·θ at hook_z of the head at the last position."""
    ids = tuple(((i, j, 5), (i, j, 6)) for i in range(10, 14) for j in range(20, 25))
    pairs = toy_pairs(ids)
    iv = sl.fit(model, "iti", pairs=pairs, layer=[0, 1], k=3, alpha=2.0)
    ranking = iv.info["heads"]
    assert len(ranking) == 2 * model.cfg.n_heads and len(iv.sites) == 3
    accs = [r["accuracy"] for r in ranking]
    assert accs == sorted(accs, reverse=True)
    top = ranking[0]
    name = f"blocks.{top['layer']}.attn.hook_z"
    zp = torch.stack(
        [model.run_with_cache(torch.tensor([p]))[1][name][0, -1, top["head"]] for p, _ in ids]
    )
    zm = torch.stack(
        [model.run_with_cache(torch.tensor([m]))[1][name][0, -1, top["head"]] for _, m in ids]
    )
    theta = zp.mean(0) - zm.mean(0)
    theta = theta / theta.norm()
    sigma = torch.cat([zp, zm]) @ theta
    want = 2.0 * sigma.std() * theta
    assert torch.allclose(iv.vector(f"{name}:{top['head']}"), want.detach(), atol=1e-10)
    tokens = torch.tensor([[1, 2, 3]])
    with iv.apply(model), torch.no_grad():
        steered = model(tokens)
    with torch.no_grad():
        assert not torch.allclose(steered, model(tokens))


def test_actadd_matches_reference(model):
    a, b = torch.tensor([4, 5, 6]), torch.tensor([7])
    iv = actadd_intervention(model, a, b, 1, scale=3.0, pad_token=0)
    n = 3
    b = torch.tensor([7, 0, 0])
    _, ca = model.run_with_cache(a[None])
    _, cb = model.run_with_cache(b[None])
    diff = ca["blocks.1.hook_resid_pre"][0] - cb["blocks.1.hook_resid_pre"][0]
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])

    def hook(act, hook):
        act = act.clone()
        act[0, :n] += 3.0 * diff
        return act

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", hook)]), torch.no_grad():
        want = model(prompt)
    with iv.apply(model), torch.no_grad():
        got = model(prompt)
    assert torch.allclose(got, want, atol=1e-12)


# ----------------------------------------------------------------------------- artifacts


def test_intervention_save_load_roundtrip(model, tokens, tmp_path):
    run = steer_iteratively(model, FishBackConfig(SITE, 0.4), concept_for(model), tokens)
    iv = run.intervention
    iv.save(tmp_path / "iv")
    back = load_intervention(tmp_path / "iv")
    assert back.method == "fishback" and back.info["reached"]
    assert torch.equal(back.vector(), iv.vector())
    assert prob(model, tokens, back) == pytest.approx(0.4, abs=1e-5)


def test_path_rho_one_step_is_rho_at_the_clean_point(model, tokens):
    """With one step the integral is ρ at x0: reference from the jacrev metric and gradient."""
    concept = concept_for(model)
    cfg = FishBackConfig(SITE, 0.99, vocab="full", max_steps=1)
    compare = {"euclidean": lambda path, x, g: g, "fixed": lambda path, x, g: g + 0.3 * g.flip(0)}
    run = steer_iteratively(model, cfg, concept, tokens, compare=compare)
    g = full_grad(model, tokens, SITE, concept)
    big_g = oracle_metric(model, tokens, sl.Site.parse(SITE), exclude=[TARGET])
    a = big_g + cfg.damping * torch.trace(big_g) / big_g.shape[0] * torch.eye(big_g.shape[0])
    best = g @ torch.linalg.solve(a, g)
    for name, fn in compare.items():
        v = fn(None, None, g)
        want = float((v @ a @ v) * best / (g @ v) ** 2)
        assert run.path_rho[name] == pytest.approx(want, rel=1e-8)
    assert run.path_rho["euclidean"] > 1


def test_path_rho_of_fishbacks_own_direction_is_one(model, tokens):
    """Along the whole path, FishBack's own direction at each point costs the optimum."""
    concept = concept_for(model)
    cfg = FishBackConfig(SITE, 0.99, step=0.2, max_steps=6)
    options = sl.metric.MetricOptions(
        cfg.vocab, cfg.dropped_mass, concept.off_target(), precision=cfg.precision
    )

    def own(path, x, g):
        return path.metric(x, options).solve(g, cfg.damping)

    compare = {"own": own, "euclidean": lambda path, x, g: g}
    mark = math.log(prob(model, tokens)) + 0.5  # passed at the third step or so
    run = steer_iteratively(model, cfg, concept, tokens, compare=compare, checkpoints=[mark])
    assert run.steps == 6
    assert run.path_rho["own"] == pytest.approx(1.0, abs=1e-9)
    assert run.path_rho["euclidean"] > 1
    marked = run.checkpoint(mark).path_rho
    assert marked["own"] == pytest.approx(1.0, abs=1e-9) and marked["euclidean"] > 1


def test_compare_needs_a_metric_method(model, tokens):
    with pytest.raises(errors.InputError, match="compare needs"):
        steer_iteratively(
            model,
            EuclideanConfig(SITE, 0.6),
            concept_for(model),
            tokens,
            compare={"euclidean": lambda path, x, g: g},
        )


def test_path_rho_weights_each_step_by_its_concept_change(model, tokens):
    """Reference: ρ_t, κ*_t from dense matrices at the points the loop visits, Δc_t from the
    trajectory; the checkpoint counts its crossing step only up to the checkpoint."""
    concept = concept_for(model)
    cfg = FishBackConfig(SITE, 0.99, step=0.3, max_steps=5)
    options = sl.metric.MetricOptions(
        cfg.vocab, cfg.dropped_mass, concept.off_target(), precision=cfg.precision
    )
    seen = []
    fixed = full_grad(model, tokens, SITE, concept)  # g at x0, held fixed along the path

    def record(path, x, g):
        big_g = path.metric(x, options).matrix().double()
        a = big_g + cfg.damping * torch.trace(big_g) / big_g.shape[0] * torch.eye(len(g))
        best = float(g @ torch.linalg.solve(a, g))
        rho = float((fixed @ a @ fixed) * best / (g @ fixed) ** 2)
        seen.append((rho, best))
        return fixed

    mark = math.log(prob(model, tokens)) + 0.75
    run = steer_iteratively(
        model, cfg, concept, tokens, compare={"fixed": record}, checkpoints=[mark]
    )
    values = [step.value for step in run.trajectory]
    changes = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert len(seen) == len(changes) == 5
    assert max(r for r, _ in seen) / min(r for r, _ in seen) > 1.01  # ρ_t does vary

    def integral(pairs, dcs):
        num = sum(dc * math.sqrt(r / b) for (r, b), dc in zip(pairs, dcs, strict=True))
        den = sum(dc / math.sqrt(b) for (_, b), dc in zip(pairs, dcs, strict=True))
        return (num / den) ** 2

    assert run.path_rho["fixed"] == pytest.approx(integral(seen, changes), rel=1e-7)
    cross = next(i for i, v in enumerate(values) if v >= mark) - 1  # the step that crosses it
    partial = changes[:cross] + [mark - values[cross]]
    got = run.checkpoint(mark).path_rho["fixed"]
    assert got == pytest.approx(integral(seen[: cross + 1], partial), rel=1e-7)
