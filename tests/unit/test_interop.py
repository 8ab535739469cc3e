"""steerlens.interop against the libraries themselves, on tiny float64 models: steering-vectors'
own ``SteeringVector.apply`` on a TransformerLens model's blocks, repeng's own ``ControlModule``
around a block and its ``export_gguf`` / ``import_gguf``, the ``gguf`` package's reader, and a
sae-lens SAE; the layer numbering of each checked against TransformerLens hooks by hand; the
imported vectors diagnosed (ρ, audit, matched share) without re-fitting; bad input refused."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import gguf
import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from steerlens import errors
from steerlens.auditing import audit
from steerlens.concepts import PairConcept
from steerlens.diagnostics import concept_gradients, spectral_cost_ratio
from steerlens.evaluation import match_strength, next_logprobs, outcome_measures
from steerlens.interop import (
    LAYER_TYPES,
    from_control_vector,
    from_sae_feature,
    from_steering_vector,
    from_tensor,
    read_gguf_control_vector,
    to_gguf_control_vector,
)
from steerlens.methods import Intervention
from steerlens.metric import pullback_metric
from steerlens.sites import Site
from steerlens.testing import tiny_model
from tests.conftest import DEVICE, assert_untouched, unchecked, weights_snapshot

CONCEPT = PairConcept(base=3, target=4)
#: steering-vectors' layer config for a TransformerLens model: the modules whose outputs are
#: resid_post, attn_out and mlp_out (steering-vectors guesses HF names; TL's are given)
TL_LAYER_CONFIG = {
    "decoder_block": "blocks.{num}",
    "self_attn": "blocks.{num}.attn",
    "mlp": "blocks.{num}.mlp",
}
HOOK = {"resid_post": "hook_resid_post", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


@pytest.fixture(scope="module")
def steering_vectors() -> ModuleType:
    return pytest.importorskip(
        "steering_vectors",
        reason="steering-vectors is not installed "
        "(scripts/setup.sh: pip install --no-deps steering-vectors==0.12.2)",
    )


@pytest.fixture(scope="module")
def repeng() -> ModuleType:
    """repeng 0.4.0, its latest release, names ``np.float_`` (gone in numpy 2) in three
    annotations of ``ControlVector``, evaluated at import; the alias is set for the import
    only, and nothing else in repeng uses it."""
    if importlib.util.find_spec("repeng") is None:
        pytest.skip(
            "repeng is not installed (scripts/setup.sh: pip install --no-deps repeng==0.4.0)"
        )
    added = "float_" not in vars(np)
    if added:
        np.float_ = np.float64  # type: ignore[attr-defined]
    try:
        import repeng
        import repeng.control
    finally:
        if added:
            del np.float_  # type: ignore[attr-defined]
    return repeng


@pytest.fixture(scope="module")
def deep_model():
    """Four layers, so that llama.cpp's steerable layers 1..3 are more than one."""
    return tiny_model("llama", n_layers=4, device=DEVICE)


def _logits(model, tokens, intervention=None, scale=None):
    with torch.no_grad():
        if intervention is None:
            return model(tokens[None])
        with intervention.apply(model, scale):
            return model(tokens[None])


def _by_hand(model, tokens, hook_name, vector):
    """Logits with ``vector`` added at every position of ``hook_name`` (TransformerLens only)."""
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, lambda act, hook: act + vector)]):
        return model(tokens[None])


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- steering-vectors


@pytest.mark.parametrize("layer_type", sorted(LAYER_TYPES))
@pytest.mark.parametrize("layer", [0, -1])
def test_steering_vector_matches_the_library_apply(
    model, tokens, steering_vectors, layer_type, layer
):
    vector = torch.randn(model.cfg.d_model, dtype=torch.float64)
    sv = steering_vectors.SteeringVector({layer: vector}, layer_type)
    snapshot = weights_snapshot(model)
    iv = from_steering_vector(sv, model)
    block = layer % model.cfg.n_layers
    kind = LAYER_TYPES[layer_type]
    assert iv.sites == (f"blocks.{block}.{HOOK[kind]}@all",)
    ours = _logits(model, tokens, iv, scale=2.5)
    with torch.no_grad(), sv.apply(model, layer_config=TL_LAYER_CONFIG, multiplier=2.5):
        theirs = model(tokens[None])
    _close(ours, theirs)
    _close(ours, _by_hand(model, tokens, f"blocks.{block}.{HOOK[kind]}", 2.5 * vector))
    assert not torch.allclose(ours, _logits(model, tokens))
    assert_untouched(model, snapshot)


def test_steering_vector_layers_and_positions(gpt2_model, steering_vectors):
    v = torch.ones(16)
    sv = steering_vectors.SteeringVector({0: v, 1: 2 * v}, "decoder_block")
    iv = from_steering_vector(sv, position="last", scale=3.0)
    assert iv.sites == ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    assert iv.info == {
        "source": "steering-vectors",
        "layer_type": "decoder_block",
        "layers": [0, 1],
    }
    assert iv.vector("resid_post.1").dtype == torch.float32  # no model: kept as given
    with_model = from_steering_vector(sv, gpt2_model)
    assert with_model.vector("resid_post.1@all").dtype == torch.float64
    torch.testing.assert_close(with_model.vector("resid_post.1@all"), 2 * v.double())


def test_steering_vector_bad_input(gpt2_model, steering_vectors):
    v = torch.ones(16, dtype=torch.float64)
    for layer_type in ("input_layernorm", "post_attention_layernorm", "resid"):
        sv = steering_vectors.SteeringVector({0: v}, layer_type)  # type: ignore[arg-type]
        with pytest.raises(errors.InputError, match=f"'{layer_type}'.*no steerlens site") as err:
            from_steering_vector(sv, gpt2_model)
        assert "'decoder_block' (→ resid_post)" in str(err.value)
        assert "'self_attn' (→ attn_out)" in str(err.value)
    narrow = steering_vectors.SteeringVector({0: torch.ones(8)}, "decoder_block")
    with pytest.raises(errors.InputError, match=r"layer 0 has shape \(8,\).*needs shape \(16,\)"):
        from_steering_vector(narrow, gpt2_model)
    deep = steering_vectors.SteeringVector({5: v}, "decoder_block")
    with pytest.raises(errors.SiteError, match=r"layer 5.*2 layers \(valid: 0\.\.1\)"):
        from_steering_vector(deep, gpt2_model)
    with pytest.raises(errors.SiteError, match="layer -3"):
        from_steering_vector(steering_vectors.SteeringVector({-3: v}), gpt2_model)
    with pytest.raises(errors.InputError, match="expected a steering_vectors.SteeringVector"):
        from_steering_vector({0: v})
    with pytest.raises(errors.InputError, match="layer keys must be ints"):
        from_steering_vector(steering_vectors.SteeringVector({"0": v}))  # type: ignore[dict-item]
    both = steering_vectors.SteeringVector({1: v, -1: v}, "decoder_block")
    with pytest.raises(errors.InputError, match="both land on blocks.1.hook_resid_post@all"):
        from_steering_vector(both, gpt2_model)


def test_post_norm_blocks_refuse_module_outputs(steering_vectors):
    from steerlens import _tl
    from steerlens.testing import tiny_config

    fields = _tl.config_to_dict(tiny_config("llama")) | {"use_normalization_before_and_after": True}
    model = _tl.HookedTransformer(_tl.config_from_dict(fields))
    v = torch.ones(16, dtype=torch.float64)
    for layer_type in ("self_attn", "mlp"):
        sv = steering_vectors.SteeringVector({0: v}, layer_type)
        with pytest.raises(errors.InputError, match="normalises each attention and MLP output"):
            from_steering_vector(sv, model)
    assert from_steering_vector(steering_vectors.SteeringVector({0: v}), model).sites


# ----------------------------------------------------------------------------- repeng


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_control_vector_matches_repeng_control_module(repeng, tokens, flavour):
    """repeng's own ControlModule, wrapped around TransformerLens's block i (what its
    ControlModel does to ``model.layers[i]``), against the import at resid_post.i@all."""
    model = tiny_model(flavour, device=DEVICE)
    direction = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    cv = repeng.ControlVector(model_type="llama", directions={1: direction})
    iv = from_control_vector(cv, model)
    assert iv.sites == ("blocks.1.hook_resid_post@all",)
    assert iv.info["model_type"] == "llama"
    ours = _logits(model, tokens, iv, scale=2.0)
    block = model.blocks[1]
    model.blocks[1] = repeng.control.ControlModule(block)
    try:
        control = torch.tensor(2.0 * direction).to(model.cfg.dtype)
        model.blocks[1].set_control(repeng.control.BlockControlParams(control=control))
        theirs = _logits(model, tokens)
    finally:
        model.blocks[1] = block
    _close(ours, theirs)
    _close(ours, _by_hand(model, tokens, "blocks.1.hook_resid_post", 2.0 * torch.tensor(direction)))
    assert not torch.allclose(ours, _logits(model, tokens))


def test_control_vector_bad_input(gpt2_model, deep_model, repeng):
    wide = repeng.ControlVector("llama", {1: np.ones(32, np.float32)})
    with pytest.raises(errors.InputError, match=r"layer 1 has shape \(32,\).*needs shape \(16,\)"):
        from_control_vector(wide, gpt2_model)
    deep = repeng.ControlVector("llama", {3: np.ones(16, np.float32)})
    with pytest.raises(errors.SiteError, match=r"repeng direction for layer 3.*valid: 0\.\.1"):
        from_control_vector(deep, gpt2_model)
    assert from_control_vector(deep, deep_model).sites == ("blocks.3.hook_resid_post@all",)
    with pytest.raises(errors.InputError, match="must hold floats"):
        from_control_vector(repeng.ControlVector("llama", {1: np.ones(16, np.int64)}))
    with pytest.raises(errors.InputError, match="expected a repeng ControlVector"):
        from_control_vector(np.ones(16))


# ----------------------------------------------------------------------------- GGUF


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    kv = {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, np.array(t.data)) for t in reader.tensors}
    return {"kv": kv, "tensors": tensors}


def test_gguf_round_trip_through_repeng(repeng, deep_model, tmp_path):
    rng = np.random.default_rng(0)
    directions = {layer: rng.standard_normal(16).astype(np.float32) for layer in (1, 3)}
    cv = repeng.ControlVector(model_type="llama", directions=directions)
    iv = from_control_vector(cv, deep_model)
    ours = to_gguf_control_vector(iv, tmp_path / "steerlens.gguf", deep_model, model_hint="llama")
    cv.export_gguf(tmp_path / "repeng.gguf")
    # the same file as repeng writes: keys, types, values, tensor names, dtypes, data
    mine, theirs = _fields(ours), _fields(tmp_path / "repeng.gguf")
    assert mine["kv"] == theirs["kv"]
    assert mine["kv"]["general.architecture"][1] == "controlvector"
    assert mine["kv"]["controlvector.model_hint"] == ([gguf.GGUFValueType.STRING], "llama")
    assert mine["kv"]["controlvector.layer_count"] == ([gguf.GGUFValueType.UINT32], 2)
    assert sorted(mine["tensors"]) == sorted(theirs["tensors"]) == ["direction.1", "direction.3"]
    for name, (kind, data) in mine["tensors"].items():
        assert kind == gguf.GGMLQuantizationType.F32 and data.shape == (16,)
        np.testing.assert_array_equal(data, theirs["tensors"][name][1])
    back = repeng.ControlVector.import_gguf(ours)
    assert back.model_type == "llama" and sorted(back.directions) == [1, 3]
    for layer, direction in directions.items():
        np.testing.assert_array_equal(back.directions[layer], direction)
    # and read back by steerlens, from either file, as the intervention it came from
    for path in (ours, tmp_path / "repeng.gguf"):
        read = read_gguf_control_vector(path, deep_model)
        assert read.sites == iv.sites and read.info["model_hint"] == "llama"
        for site in iv.sites:
            torch.testing.assert_close(read.vector(site), iv.vector(site), rtol=0, atol=0)


def test_gguf_layer_convention(deep_model, tokens, tmp_path):
    """direction.il is added to block il's output at every position (llama.cpp's
    ``build_cvec(cur, il)`` after the block's last residual add): TransformerLens's
    blocks.il.hook_resid_post at @all. resid_pre.l is the same stream as resid_post.(l-1)."""
    rng = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, generator=rng, dtype=torch.float64) for _ in range(2))
    iv = Intervention(
        "x", {"resid_post.2@all": a, "resid_pre.3@all": b, "resid_post.1@all": b}, 2.0
    )
    path = to_gguf_control_vector(iv, tmp_path / "cv.gguf", deep_model)
    stored = _fields(path)["tensors"]
    assert sorted(stored) == ["direction.1", "direction.2"]
    np.testing.assert_allclose(stored["direction.2"][1], (2 * (a + b)).float().numpy(), rtol=1e-6)
    read = read_gguf_control_vector(path, deep_model)
    assert read.sites == ("blocks.1.hook_resid_post@all", "blocks.2.hook_resid_post@all")
    steered = _logits(deep_model, tokens, iv)
    torch.testing.assert_close(_logits(deep_model, tokens, read), steered, rtol=0, atol=1e-5)
    # the float32 round trip aside, the file steers exactly as adding at hook_resid_post by hand
    added = {il: torch.from_numpy(stored[f"direction.{il}"][1]).double() for il in (1, 2)}
    hooks = [
        (f"blocks.{il}.hook_resid_post", lambda act, hook, v=v: act + v) for il, v in added.items()
    ]
    with torch.no_grad(), deep_model.hooks(fwd_hooks=hooks):
        by_hand = deep_model(tokens[None])
    _close(_logits(deep_model, tokens, read), by_hand)
    assert read.info["model_hint"] == deep_model.cfg.model_name


def test_gguf_export_refuses_what_llama_cpp_cannot_hold(deep_model, gpt2_model, tmp_path):
    v = torch.ones(16, dtype=torch.float64)
    out = tmp_path / "cv.gguf"
    cases = {
        "resid_post.0@all": "block 0's output.*direction.0",
        "resid_pre.1@all": "block 0's output",
        "resid_pre.0@all": "resid_pre.0.*valid: resid_post.1..resid_post.3 or resid_pre.2",
        "resid_mid.2@all": "added to a block's output",
        "mlp_out.2@all": "added to a block's output",
        "resid_post.2": "position 'last'.*any_position=True",
        "resid_post.2@0": "position 0",
    }
    for site, message in cases.items():
        with pytest.raises(errors.InputError, match=message):
            to_gguf_control_vector(Intervention("x", {site: v}), out, deep_model)
    assert not out.exists()
    to_gguf_control_vector(
        Intervention("x", {"resid_post.2": v}), out, deep_model, any_position=True
    )
    assert read_gguf_control_vector(out).sites == ("blocks.2.hook_resid_post@all",)
    with pytest.raises(errors.InputError, match=r"needs shape \(16,\)"):
        to_gguf_control_vector(
            Intervention("x", {"resid_post.1@all": torch.ones(8)}), out, deep_model
        )
    with pytest.raises(errors.SiteError, match="valid: 0..1"):
        to_gguf_control_vector(Intervention("x", {"resid_post.3@all": v}), out, gpt2_model)
    scaled = Intervention("x", {"resid_post.1@all": v}, multipliers={"mlp_out.1": 0.5})
    with pytest.raises(errors.InputError, match="also has multipliers; a control vector holds"):
        to_gguf_control_vector(scaled, out, deep_model)
    with pytest.raises(errors.NonFiniteError, match="overflows float32"):
        to_gguf_control_vector(Intervention("x", {"resid_post.1@all": v}, 1e300), out, deep_model)


def _write_gguf(path, arch, tensors):
    writer = gguf.GGUFWriter(str(path), arch)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_files_that_are_not_control_vectors(gpt2_model, tmp_path):
    ones = np.ones(16, np.float32)
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(errors.ArtifactError, match="is not a GGUF file"):
        read_gguf_control_vector(not_gguf)
    with pytest.raises(errors.ArtifactError, match="no control vector file"):
        read_gguf_control_vector(tmp_path / "missing.gguf")
    model_file = _write_gguf(
        tmp_path / "m.gguf", "llama", {"token_embd.weight": np.ones((4, 16), np.float32)}
    )
    with pytest.raises(errors.ArtifactError, match="architecture 'llama', not a control vector"):
        read_gguf_control_vector(model_file)
    stray = _write_gguf(tmp_path / "s.gguf", "controlvector", {"direction.1": ones, "bias": ones})
    with pytest.raises(errors.ArtifactError, match="tensor 'bias' is not a direction"):
        read_gguf_control_vector(stray)
    flat = _write_gguf(
        tmp_path / "f.gguf", "controlvector", {"direction.1": np.ones((2, 16), np.float32)}
    )
    with pytest.raises(errors.ArtifactError, match=r"direction.1 is F32 of shape \(2, 16\)"):
        read_gguf_control_vector(flat)
    with pytest.raises(errors.ArtifactError, match="no direction tensors"):
        read_gguf_control_vector(_write_gguf(tmp_path / "e.gguf", "controlvector", {}))
    wide = _write_gguf(
        tmp_path / "w.gguf", "controlvector", {"direction.1": np.ones(32, np.float32)}
    )
    with pytest.raises(errors.InputError, match=r"w.gguf: direction for layer 1 has shape \(32,\)"):
        read_gguf_control_vector(wide, gpt2_model)
    deep = _write_gguf(tmp_path / "d.gguf", "controlvector", {"direction.7": ones})
    with pytest.raises(errors.SiteError, match=r"layer 7.*valid: 0\.\.1"):
        read_gguf_control_vector(deep, gpt2_model)


# ----------------------------------------------------------------------------- sae-lens


def _sae(d_in=16, hook="blocks.0.hook_resid_post", head=None):
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=32, dtype="float64"))
    with torch.no_grad():
        sae.W_dec.normal_(generator=torch.Generator().manual_seed(0))
    sae.cfg.metadata.hook_name = hook
    if head is not None:
        sae.cfg.metadata.hook_head_index = head
    return sae


def test_sae_feature_decoder_row(model, tokens):
    sae = _sae()
    iv = from_sae_feature(sae, 3, model)
    assert iv.sites == ("blocks.0.hook_resid_post@all",)
    torch.testing.assert_close(iv.vector(), sae.W_dec[3].detach(), rtol=0, atol=0)
    _close(
        _logits(model, tokens, iv, 2.0),
        _by_hand(model, tokens, "blocks.0.hook_resid_post", 2 * sae.W_dec[3].detach()),
    )
    assert from_sae_feature(sae, 3, model, position="last").sites == ("blocks.0.hook_resid_post",)
    assert from_sae_feature(sae, 3, site="resid_pre.1@-1").sites == ("blocks.1.hook_resid_pre@-1",)
    per_head = from_sae_feature(_sae(4, "blocks.1.attn.hook_z", head=2), 0, model)
    assert per_head.sites == ("blocks.1.attn.hook_z:2@all",)


def test_sae_feature_bad_input(gpt2_model):
    with pytest.raises(errors.ConceptError, match=r"feature 32 is out of range.*valid: 0\.\.31"):
        from_sae_feature(_sae(), 32, gpt2_model)
    with pytest.raises(errors.InputError, match=r"shape \(8,\).*needs shape \(16,\)"):
        from_sae_feature(_sae(8), 0, gpt2_model)
    with pytest.raises(errors.SiteError, match="layer 4.*valid: 0..1"):
        from_sae_feature(_sae(hook="blocks.4.hook_resid_post"), 0, gpt2_model)
    with pytest.raises(errors.SiteError, match="cannot parse site 'blocks.0.ln1.hook_normalized'"):
        from_sae_feature(_sae(hook="blocks.0.ln1.hook_normalized"), 0, gpt2_model)
    bare = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, dtype="float64"))
    with pytest.raises(errors.ConceptError, match="does not record its hook name"):
        from_sae_feature(bare, 0, gpt2_model)


# ----------------------------------------------------------------------------- plain tensors


def test_from_tensor(model, tokens):
    v = torch.randn(16)
    iv = from_tensor(v, "blocks.1.hook_resid_post", model, scale=2.0)
    assert iv.sites == ("blocks.1.hook_resid_post",) and iv.vector().dtype == model.cfg.dtype
    assert from_tensor(v, "resid_post.1", position="all").sites == ("blocks.1.hook_resid_post@all",)
    with pytest.raises(errors.InputError, match=r"shape \(15,\).*needs shape \(16,\)"):
        from_tensor(torch.ones(15), "resid_post.1", model)
    with pytest.raises(errors.SiteError, match="valid: 0..1"):
        from_tensor(v, "resid_post.2", model)
    with unchecked(), pytest.raises(errors.InputError, match="needs a torch.Tensor"):
        from_tensor(np.ones(16), "resid_post.1", model)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- diagnosis


def test_imported_vectors_are_diagnosed_without_refitting(model, tokens, steering_vectors):
    """An imported vector goes straight into ρ, the audit and the matched-share protocol."""
    snapshot = weights_snapshot(model)
    site = Site.parse("resid_post.0")
    g = concept_gradients(model, tokens, CONCEPT, [site])[site.name]
    sv = steering_vectors.SteeringVector({0: g + 0.1 * torch.randn_like(g)}, "decoder_block")
    at_last = from_steering_vector(sv, model, position="last")
    metric = pullback_metric(model, tokens, site)
    rho = spectral_cost_ratio(metric, at_last.vector(), g)
    assert rho >= 1 and rho == pytest.approx(
        spectral_cost_ratio(metric, sv.layer_activations[0], g)
    )
    assert spectral_cost_ratio(metric, metric.solve(g, 1e-2), g) == pytest.approx(1, abs=1e-9)

    at_all = from_steering_vector(sv, model)
    result = audit(model, at_all, tokens, scale=0.5, concept=CONCEPT)
    # every head and MLP downstream of block 0's output: those of the blocks after it
    assert set(result.components["layer"]) == set(range(1, model.cfg.n_layers))
    assert len(result.components) == (model.cfg.n_layers - 1) * (model.cfg.n_heads + 1)
    assert result.summary["prompts"].iloc[0] == 1

    def share(scale: float) -> float:
        steered = next_logprobs(model, tokens, at_last.scaled(scale))
        return float(CONCEPT.value(None, steered).exp())

    clean = next_logprobs(model, tokens)
    target = share(0.0) + 0.3 * (1 - share(0.0))
    scale, reached = match_strength(share, target)
    assert reached and share(scale) == pytest.approx(target, abs=1e-3)
    steered = next_logprobs(model, tokens, at_last.scaled(scale))
    outcome = outcome_measures(clean, steered, CONCEPT.target, base=CONCEPT.base)
    assert outcome.probability == pytest.approx(share(scale)) and outcome.off_target_kl > 0
    assert_untouched(model, snapshot)
