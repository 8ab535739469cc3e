"""The demo behind the README's first command: one prompt through the default model, its top
next tokens, the hook sites steerlens can address, and the pullback metric at every layer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from steerlens.diagnostics import diagnostics_table
from steerlens.metric import pullback_sweep
from steerlens.models import load_model
from steerlens.prompts import as_prompts
from steerlens.sites import BLOCK_ORDER, Site, all_sites


@dataclass(frozen=True)
class DemoResult:
    summary: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def top_tokens(model, prompt: str, top: int = 5) -> pd.DataFrame:
    """The ``top`` most likely next tokens after ``prompt`` with their probabilities."""
    tokens = as_prompts(model, prompt)[0]
    with torch.no_grad():
        probs = torch.softmax(model(tokens[None])[0, -1].double(), -1)
    values, ids = probs.topk(top)
    return pd.DataFrame(
        {
            "token": [repr(model.tokenizer.decode([i])) for i in ids.tolist()],
            "id": ids.tolist(),
            "probability": values.tolist(),
        }
    )


def site_summary(model) -> pd.DataFrame:
    """Each site kind: how many sites the model has, the activation width, an example name."""
    rows = []
    for kind in BLOCK_ORDER:
        sites = all_sites(model, [kind], per_head=True)
        if sites:
            rows.append(
                {
                    "kind": kind,
                    "sites": len(sites),
                    "dim": sites[0].dim(model),
                    "example": sites[len(sites) // 2].name,
                }
            )
    return pd.DataFrame(rows)


def run_demo(model_name: str | None, prompt: str, top: int = 5) -> DemoResult:
    start = time.perf_counter()
    model = load_model(model_name)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    sites = [Site("resid_post", layer) for layer in range(model.cfg.n_layers)]
    sweep = pullback_sweep(model, prompt, sites, decompose=False)
    swept = time.perf_counter() - start
    table = diagnostics_table(sweep)[
        [
            "layer",
            "participation_ratio",
            "participation_fraction",
            "rank_90",
            "rank_99",
            "deviation_from_euclidean",
        ]
    ]
    summary = {
        "model": model.cfg.model_name,
        "layers": model.cfg.n_layers,
        "d_model": model.cfg.d_model,
        "prompt": prompt,
        "load seconds": round(loaded, 1),
        "metric sweep seconds (all layers)": round(swept, 2),
        "vocab": f"top-{sweep.info.top_k} + rest, dropped mass {sweep.info.dropped_mass:.1e}",
    }
    return DemoResult(
        summary,
        {
            "next tokens": top_tokens(model, prompt, top),
            "sites": site_summary(model),
            "metric at hook_resid_post": pd.DataFrame(table),
        },
    )
