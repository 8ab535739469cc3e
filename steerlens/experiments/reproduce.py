"""The FishBack reproduction on the default model: verb-morphology concepts × layers × methods at
matched concept probability on held-out contexts, plus the geometry behind it.

For each concept (past, third person, -ing) the verb pairs are split by verb; contexts from the
State of the Union corpus whose next token is a base form are split the same way. The contrastive
methods (CAA, ActAdd) and the probe learn from training contexts; every method is evaluated on test
contexts, which the model continues with the base form (the contexts where its base probability
is highest). Per (concept, layer, context, method, target) one record: whether the target was
reached, the strength, the measures of :mod:`steerlens.evaluate`, and ρ of the method's direction
at the clean point (:mod:`steerlens.cost`), beside the measured KL ratio to FishBack.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.concepts import (
    PairConcept,
    VerbContext,
    load_corpus,
    train_test_contexts,
    verb_concept,
    verb_contexts,
    verb_contrast_pairs,
)
from steerlens.concepts.probes import train_probe
from steerlens.cost import spectral_cost_ratio
from steerlens.diagnostics import diagnostics_table
from steerlens.errors import InputError
from steerlens.evaluate import match_strength, next_logprobs, outcome_measures, summarize
from steerlens.methods.intervention import Intervention
from steerlens.methods.iterative import (
    EuclideanConfig,
    FishBackConfig,
    TruncatedFisherConfig,
    steer_iteratively,
)
from steerlens.methods.vector import actadd_intervention, caa_intervention, probe_intervention
from steerlens.metric.local import LocalPath
from steerlens.metric.pullback import MetricOptions, pullback_sweep
from steerlens.sites import Site

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

ITERATIVE = ("fishback", "euclidean", "depth0")
FIXED = ("caa", "actadd", "probe")
METHOD_NAMES = ITERATIVE + FIXED

#: the FishBack paper's claims on GPT-2 small (abstract; arXiv 2605.17231)
PAPER_CLAIMS = {
    "deviation_from_euclidean": "> 0.97",
    "participation_fraction": "0.02–0.17",
    "kl_ratio euclidean / fishback": "1.3–2.5",
    "kl_ratio caa / fishback": "≈ 1.5",
}


@dataclass(frozen=True)
class ReproduceConfig:
    """What the reproduction runs. ``step``: the concept rise per iterative step (nats);
    ``damping``: FishBack's and ρ's relative ridge; ``train_pairs``: contrast pairs for CAA and
    the probe."""

    concepts: tuple[str, ...] = ("past", "third", "ing")
    layers: tuple[int, ...] = (6, 12, 18, 24)
    contexts: int = 1
    targets: tuple[float, ...] = (0.5, 0.9)
    methods: tuple[str, ...] = METHOD_NAMES
    step: float = 1.0
    damping: float = 1e-2
    train_pairs: int = 48
    sentences: int = 30000
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHOD_NAMES)
        if unknown:
            raise InputError(f"unknown methods {sorted(unknown)}; valid: {METHOD_NAMES}")
        if "fishback" not in self.methods:
            raise InputError("the reproduction compares every method to fishback: keep it")
        if not self.targets or any(not 0 < t < 1 for t in self.targets):
            raise InputError(f"targets must be probabilities in (0, 1), got {self.targets}")
        if self.contexts < 1:
            raise InputError(f"contexts must be >= 1, got {self.contexts}")

    @classmethod
    def quick(cls) -> ReproduceConfig:
        """A small run for CI and a first look (1 concept, 2 layers, 1 context)."""
        return cls(
            concepts=("past",),
            layers=(8, 20),
            contexts=1,
            targets=(0.5,),
            train_pairs=32,
            sentences=15000,
        )


@dataclass(frozen=True)
class ReproduceResult:
    records: pd.DataFrame
    summary: pd.DataFrame
    geometry: pd.DataFrame
    shares: pd.DataFrame
    spectra: dict[int | str, Tensor]
    claims: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def context_tokens(model: HookedTransformer, ctx: VerbContext) -> Tensor:
    """The context's ids with the model's BOS prepended if it uses one."""
    ids = list(ctx.token_ids)
    tok: Any = model.tokenizer
    if model.cfg.default_prepend_bos and tok is not None and tok.bos_token_id is not None:
        ids = [int(tok.bos_token_id)] + ids
    return torch.tensor(ids, dtype=torch.long, device=model.cfg.device)


def _pick_test(model: HookedTransformer, contexts: tuple[VerbContext, ...], n: int, top: float):
    """The n test contexts with the highest base-form probability, among those whose target
    probability is below the lowest target."""
    scored = []
    for ctx in contexts[: 12 * n]:
        logp = next_logprobs(model, context_tokens(model, ctx))
        if float(_share(logp, ctx)) < top:
            scored.append((float(logp[ctx.base_id]), ctx))
    scored.sort(key=lambda s: -s[0])
    return [c for _, c in scored[:n]]


def _share(logp: Tensor, ctx: VerbContext) -> Tensor:
    """The target's share of the pair, p_t / (p_t + p_b)."""
    return (logp[ctx.target_id] - torch.logaddexp(logp[ctx.target_id], logp[ctx.base_id])).exp()


def _concept(ctx: VerbContext) -> PairConcept:
    return PairConcept(ctx.base_id, ctx.target_id, f"{ctx.target_word} over {ctx.verb}")


def _directions(
    model: HookedTransformer, site: Site, tokens: Tensor, ctx: VerbContext, damping: float
) -> tuple[Tensor, Any, Tensor]:
    """The concept gradient g, the off-target metric and the depth-0 direction at the clean
    point."""
    concept = _concept(ctx)
    with LocalPath(model, tokens, site) as path:
        with torch.enable_grad():
            x = path.x0.clone().requires_grad_(True)
            g = torch.autograd.grad(concept.value(x, path.logits(x)), x)[0].detach()
        off = path.metric(path.x0, MetricOptions(off_target=concept.off_target()))
        depth0 = path.metric(path.x0, MetricOptions(), depth=0).solve(g, damping)
    return g, off, depth0


def run_reproduction(
    model: HookedTransformer, cfg: ReproduceConfig | None = None, *, progress: bool = True
) -> ReproduceResult:
    """Run the experiment of the module docstring."""
    cfg = cfg or ReproduceConfig()
    for layer in cfg.layers:
        Site("resid_post", layer).validate(model)
    started = time.perf_counter()
    sentences = load_corpus("sotu", seed=cfg.seed)[: cfg.sentences]
    records: list[dict[str, Any]] = []
    geometry_prompts: list[Tensor] = []
    lo_target = min(cfg.targets)
    jobs = [(kind, layer) for kind in cfg.concepts for layer in cfg.layers]
    bar = tqdm(total=len(jobs) * cfg.contexts, disable=not progress, desc="reproduce")
    split_cache: dict[str, Any] = {}
    for kind, layer in jobs:
        if kind not in split_cache:
            mapping = verb_concept(model, kind)
            found = verb_contexts(model, mapping, sentences, 600, max_per_verb=4)
            split = train_test_contexts(found, mapping, test_fraction=0.3, seed=cfg.seed)
            test = _pick_test(model, split.test, cfg.contexts, lo_target)
            if not test:
                raise InputError(f"no usable test contexts for {kind!r}")
            split_cache[kind] = (mapping, split, test)
            geometry_prompts += [context_tokens(model, c) for c in test[:1]]
        mapping, split, test = split_cache[kind]
        site = Site("resid_post", layer)
        pairs = verb_contrast_pairs(split.train[: cfg.train_pairs], name=kind)
        fixed: dict[str, Intervention] = {}
        if "caa" in cfg.methods:
            fixed["caa"] = caa_intervention(model, pairs, layer)
        if "actadd" in cfg.methods:
            assert pairs.token_pairs is not None
            plus, minus = pairs.token_pairs[0]
            fixed["actadd"] = actadd_intervention(
                model, torch.tensor(plus), torch.tensor(minus), layer, pad_token=0
            )
        if "probe" in cfg.methods:
            assert pairs.token_pairs is not None
            probe = train_probe(
                model,
                site,
                [torch.tensor(p) for p, _ in pairs.token_pairs],
                [torch.tensor(m) for _, m in pairs.token_pairs],
                seed=cfg.seed,
            )
            fixed["probe"] = probe_intervention(model, probe, site)
        merge = mapping.as_dict()
        for ctx in test:
            tokens = context_tokens(model, ctx)
            clean = next_logprobs(model, tokens)
            g, off_metric, depth0_dir = _directions(model, site, tokens, ctx, cfg.damping)
            common = {
                "concept": kind,
                "layer": layer,
                "context": ctx.text,
                "verb": ctx.verb,
                "target_word": ctx.target_word,
                "clean_probability": float(_share(clean, ctx)),
            }

            def rho(v: Tensor | None, g=g, off_metric=off_metric) -> float:
                if v is None or float(v @ g) <= 0:
                    return math.nan
                return spectral_cost_ratio(off_metric, v.to(g), g, cfg.damping)

            directions: dict[str, Tensor | None] = {
                "fishback": off_metric.solve(g, cfg.damping),
                "euclidean": g,
                "depth0": depth0_dir,
                "caa": fixed["caa"].vector() if "caa" in fixed else None,
                "actadd": None,  # added at the prompt's first positions, not at the site
                "probe": fixed["probe"].vector() if "probe" in fixed else None,
            }
            records += _run_iterative(
                model, cfg, ctx, tokens, site, clean, merge, common, rho, directions
            )
            for name, iv in fixed.items():
                for target in cfg.targets:

                    def prob(scale: float, iv=iv, tokens=tokens, ctx=ctx) -> float:
                        return float(_share(next_logprobs(model, tokens, iv.scaled(scale)), ctx))

                    scale, reached = match_strength(prob, target)
                    steered = next_logprobs(model, tokens, iv.scaled(scale))
                    records.append(
                        {
                            **common,
                            "method": name,
                            "target_probability": target,
                            "reached": reached,
                            "strength": scale,
                            "steps": math.nan,
                            **outcome_measures(
                                clean, steered, ctx.target_id, merge, base=ctx.base_id
                            ),
                            "rho": rho(directions[name]),
                        }
                    )
            bar.update()
    bar.close()
    frame = pd.DataFrame(records)
    geometry, shares, spectra = _geometry(model, geometry_prompts, cfg.layers)
    summary = summarize(frame)
    claims = _claims(geometry, summary)
    info = {"config": asdict(cfg), "seconds": time.perf_counter() - started}
    return ReproduceResult(frame, summary, geometry, shares, spectra, claims, info)


def _run_iterative(
    model: HookedTransformer,
    cfg: ReproduceConfig,
    ctx: VerbContext,
    tokens: Tensor,
    site: Site,
    clean: Tensor,
    merge: dict[int, int],
    common: dict[str, Any],
    rho: Any,
    directions: dict[str, Tensor | None],
) -> list[dict[str, Any]]:
    """One run per iterative method to the highest target; lower targets from checkpoints."""
    out = []
    concept = _concept(ctx)
    top = max(cfg.targets)
    configs = {
        "fishback": FishBackConfig(site.name, top, step=cfg.step, damping=cfg.damping),
        "euclidean": EuclideanConfig(site.name, top, step=cfg.step),
        "depth0": TruncatedFisherConfig(site.name, top, step=cfg.step, damping=cfg.damping),
    }
    for name, mcfg in configs.items():
        if name not in cfg.methods:
            continue
        checkpoints = [math.log(t) for t in cfg.targets if t < top]
        iv = steer_iteratively(model, mcfg, concept, tokens, checkpoints=checkpoints)
        for target in cfg.targets:
            if target == top:
                vec, reached = iv.vector(), bool(iv.info["reached"])
            else:
                mark = iv.info["checkpoints"].get(repr(math.log(target)))
                reached = mark is not None
                vec = torch.tensor(mark, dtype=iv.vector().dtype) if reached else iv.vector()
            steered = next_logprobs(model, tokens, Intervention(name, {site.name: vec}))
            out.append(
                {
                    **common,
                    "method": name,
                    "target_probability": target,
                    "reached": reached,
                    "strength": float(vec.norm()),
                    "steps": iv.info["steps"],
                    **outcome_measures(clean, steered, ctx.target_id, merge, base=ctx.base_id),
                    "rho": rho(directions[name]),
                }
            )
    return out


def _geometry(model: HookedTransformer, prompts: list[Tensor], layers: tuple[int, ...]):
    sites = [Site("resid_post", layer) for layer in range(model.cfg.n_layers)]
    sweep = pullback_sweep(model, prompts, sites, decompose=True)
    table = diagnostics_table(sweep)
    spectra: dict[int | str, Tensor] = {
        layer: sweep[Site("resid_post", layer)].spectrum() for layer in layers
    }
    return table, sweep.shares, spectra


def _claims(geometry: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    ratio = summary.set_index("method")["kl_ratio_to_fishback"]

    def spread(values) -> str:
        values = [v for v in values if math.isfinite(v)]
        return f"{min(values):.3g}–{max(values):.3g}" if values else "n/a"

    rows = [
        ("deviation_from_euclidean", spread(geometry.deviation_from_euclidean)),
        ("participation_fraction", spread(geometry.participation_fraction)),
    ]
    for method in ("euclidean", "caa"):
        if method in ratio.index:
            rows.append((f"kl_ratio {method} / fishback", spread(ratio.loc[[method]].tolist())))
    return pd.DataFrame(
        [
            {"measure": m, "paper (GPT-2 small)": PAPER_CLAIMS[m], "default model": v}
            for m, v in rows
        ]
    )


def _write(path: Path, write: Any) -> Path:
    """Write through a temporary file renamed into place, so no half-written file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_reproduction(result: ReproduceResult, results_dir: Path, figures_dir: Path) -> list[Path]:
    """The tables (CSV and markdown) under ``results_dir`` and the figures (PNG) under
    ``figures_dir``; returns the paths written."""
    from steerlens import plot
    from steerlens.evaluate import with_kl_ratio

    records = with_kl_ratio(result.records)
    summary = result.summary.copy()
    for col in ("off_target_kl_ci", "kl_ratio_ci"):
        summary[col] = [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in summary[col]]
    report = "\n".join(
        [
            "# FishBack reproduction on the default model",
            "",
            f"Config: `{json.dumps(result.info['config'])}`; "
            f"{result.info['seconds']:.0f} s on this machine.",
            "",
            "## Paper claims (GPT-2 small) beside the default model",
            "",
            result.claims.to_markdown(index=False),
            "",
            "## Off-target KL at matched concept probability (mean over reached contexts, "
            "bootstrap 95% CI; ratio to FishBack on the same contexts)",
            "",
            summary.to_markdown(index=False, floatfmt=".4g"),
            "",
        ]
    )
    paths = [
        _write(results_dir / "records.csv", lambda p: records.to_csv(p, index=False)),
        _write(results_dir / "summary.csv", lambda p: result.summary.to_csv(p, index=False)),
        _write(results_dir / "geometry.csv", lambda p: result.geometry.to_csv(p, index=False)),
        _write(results_dir / "reproduction.md", lambda p: p.write_text(report)),
    ]
    figures = {
        "spectra": plot.spectra(result.spectra),
        "geometry_vs_depth": plot.geometry_vs_depth(result.geometry),
        "block_shares": plot.block_shares(result.shares),
        "kl_vs_probability": plot.kl_vs_probability(records),
        "predicted_vs_measured": plot.predicted_vs_measured(records),
    }
    for name, fig in figures.items():
        paths.append(
            _write(figures_dir / f"{name}.png", lambda p, fig=fig: fig.savefig(p, format="png"))
        )
    return paths
