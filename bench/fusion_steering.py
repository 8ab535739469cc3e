"""Benchmark: fusion steering as the paper ran it, per prompt (Chang and Yasin, arXiv 2505.22572),
in miniature on the default model, with a train / held-out split of prompts.

    .venv/bin/python bench/fusion_steering.py  # bench/results/fusion_steering.{md,csv}, a figure

**Task.** Country questions built from the packaged city → country facts
(``steerlens.datasets.countries.CITIES``, the countries that are one token): the prompt
``Question: Which country is Rome in?\\nAnswer:`` and the enriched prompt ``Question: Which
country is Rome in?\\nAnswer and Explanation:`` followed by the answer `` Italy`` and the
explanation the model writes after it (``steerlens.methods.fusion.qa_prompts``,
``reference_completion``). Every prompt is kept, whether the model answers it or not; the
measures are also given on the prompts the unsteered model fails (the paper kept only those).

**Methods.** No steering; fusion steering in full (one α, γ for all 30 layers) and segmented
(``--segments`` contiguous segments, one α, γ each), each tuned per prompt by optuna
(``--trials`` trials, seed 0) on token overlap with the reference − λ · ln perplexity of the
steered greedy completion. The search starts from two trials (``fusion.WARM_START``): no
injection (α = 0), so the tuned injection never scores below the unsteered completion on its
own objective, and the smallest strength (α = 1, γ = 0.01); the rest are TPE's, past its
random startup trials at the default budget.

**What "held-out" means here.** Fusion steering is tuned per prompt and its tuning reads the
answer: the reference completion starts with it and the objective rewards overlap with the
reference. So no prompt's injection is ever applied to another prompt, and a held-out prompt is
tuned too. What is chosen on the training prompts alone is the method's one free
hyper-parameter, λ (``--weights``), per configuration: the value with the most training prompts
whose steered completion contains the answer (ties: the higher mean log-probability of the
answer). The held-out prompts are then tuned with that λ, using only their own reference, as
the paper does; the answer is read outside the tuning only to score the result. The gains below
are therefore what a per-prompt edit *given the answer* achieves, not a zero-knowledge
improvement of the model.

**Measures** (``steerlens.evaluation.qa.qa_outcome``, greedy completions of
``--completion-tokens`` tokens cut at the end-of-sequence token): ``answer_first``, the
completion's first token is the answer (exact match of the answer token); ``answer_in_completion``,
the answer token is anywhere in it (token-overlap accuracy: the answer's overlap with the
completion is 1); ``answer_logprob`` at the answer position; ``reference_f1``, the paper's token
overlap with the reference (what the tuning maximizes); ``perplexity``, the unsteered model's, of
the completion; ``off_target_kl``, at the answer position, on every token but the answer, new to
steerlens. Then the audit (``steerlens.audit``) of each held-out prompt's tuned injection: which
heads and MLPs it moves at the answer position, and the figure of that.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

import pandas as pd
import torch
from common import OUT, header, machine

import steerlens as sl
from steerlens.audit_result import Audit
from steerlens.auditing import edits_nothing
from steerlens.concepts import TokenSet
from steerlens.concepts.tokenization import encode_word
from steerlens.datasets.countries import CITIES
from steerlens.evaluation.qa import qa_outcome
from steerlens.methods.fusion import qa_prompts, reference_completion
from steerlens.prompts import as_prompts

ROOT = Path(__file__).resolve().parent.parent
AUDIT_FRAMES = ("components", "per_prompt", "summary", "sae_features")
FIGURE = ROOT / "figures/fusion_steering_audit.png"
MEASURES = [
    "answer_first",
    "answer_in_completion",
    "answer_logprob",
    "reference_f1",
    "perplexity",
    "off_target_kl",
]


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def items(model, n: int) -> list[tuple[str, str, int]]:
    """(city, country, the country's token) for the first ``n`` facts whose country is one token
    and whose city is not its own country's name."""
    out = []
    for city, country in CITIES:
        ids = encode_word(model.tokenizer, "▁" + country)
        if len(ids) == 1 and city != country:
            out.append((city, country, ids[0]))
    return out[:n]


def split(rows: list, n_train: int, seed: int) -> tuple[list, list]:
    ranked = sorted(rows, key=lambda r: sha256(f"{seed}:{r[0]}".encode()).digest())
    return ranked[:n_train], ranked[n_train:]


def run_prompt(model, item, args, configs: dict[str, list[float]], split_name: str):
    """The unsteered outcome and each (configuration, λ)'s tuned outcome of one question, and
    the tuned interventions."""
    city, country, answer = item
    prompt_text, ref_text = qa_prompts(f"Which country is {city} in?")
    prompt = as_prompts(model, prompt_text)[0]
    ref = reference_completion(
        model, ref_text, [answer], explanation_tokens=args.explanation_tokens
    )
    common = dict(split=split_name, city=city, country=country)
    base = qa_outcome(
        model, prompt, [answer], None, reference=ref.completion, n_tokens=args.completion_tokens
    )
    rows = [{**common, "method": "none", "weight": float("nan"), **base.row()}]
    ivs = {}
    for name, weights in configs.items():
        for weight in weights:
            started = time.perf_counter()
            iv = sl.fit(
                model,
                "fusion",
                prompt=prompt_text,
                answer=[answer],
                reference_prompt=ref_text,
                explanation=ref.explanation.tolist(),
                completion_tokens=args.completion_tokens,
                segments=1 if name == "full" else args.segments,
                trials=args.trials,
                perplexity_weight=weight,
            )
            seconds = time.perf_counter() - started
            out = qa_outcome(
                model,
                prompt,
                [answer],
                iv,
                reference=ref.completion,
                n_tokens=args.completion_tokens,
            )
            info = iv.info
            rows.append(
                {
                    **common,
                    "method": name,
                    "weight": weight,
                    **out.row(),
                    "objective": info["objective"],
                    "objective_unsteered": info["trials"][0]["objective"],
                    "chose_no_injection": float(all(a == 0 for a in info["alpha"])),
                    "alpha": " ".join(f"{a:.3f}" for a in info["alpha"]),
                    "gamma": " ".join(f"{g:.3f}" for g in info["gamma"]),
                    "alpha_gamma_mean": sum(
                        a * g for a, g in zip(info["alpha"], info["gamma"], strict=True)
                    )
                    / len(info["alpha"]),
                    "fit_seconds": seconds,
                }
            )
            ivs[(name, weight)] = iv
    text = model.tokenizer.decode(ref.completion.tolist()).replace("\n", " ")
    print(f"{split_name} {city}: reference {text!r}", flush=True)
    return rows, ivs, prompt, answer


def choose(frame: pd.DataFrame) -> dict[str, float]:
    """Per configuration, the λ with the most training prompts answered (ties: answer_logprob)."""
    out = {}
    for name, rows in frame[frame.method != "none"].groupby("method"):
        means = rows.groupby("weight")[["answer_in_completion", "answer_logprob"]].mean()
        best = means.sort_values(["answer_in_completion", "answer_logprob"]).index[-1]
        out[str(name)] = float(best)
    return out


def audit_nonzero(model, ivs: dict[str, list], prompts: list, concepts: list) -> Audit:
    """The audit of each configuration's tuned injections over the prompts where the search
    kept one (where no injection scored best there is nothing to audit), as one :class:`Audit`."""
    parts = []
    for name, fitted in ivs.items():
        keep = [i for i, iv in enumerate(fitted) if not edits_nothing(iv)]
        if keep:
            parts.append(
                sl.audit(
                    model,
                    {name: [fitted[i] for i in keep]},
                    [prompts[i] for i in keep],
                    concept=[concepts[i] for i in keep],
                )
            )
    if not parts:
        raise SystemExit("no configuration kept an injection on any held-out prompt")
    return Audit(
        *(pd.concat([getattr(p, f) for p in parts], ignore_index=True) for f in AUDIT_FRAMES),
        n_heads=parts[0].n_heads,
    )


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    grouped = frame.groupby(["split", "method"], sort=False)
    table = grouped[MEASURES].mean()
    table.insert(0, "prompts", grouped.size())
    table["perplexity_median"] = grouped["perplexity"].median()
    return table.reset_index()


def search_note(trials: int) -> list[str]:
    """Lines on the search: the budget against optuna's TPE startup trials, and the warm start."""
    import inspect

    import optuna

    from steerlens.methods.fusion import WARM_START

    startup = inspect.signature(optuna.samplers.TPESampler).parameters["n_startup_trials"].default
    past = trials - len(WARM_START) - startup
    lines = [
        "",
        f"**The search.** {trials} trials per prompt and configuration: the {len(WARM_START)} "
        "warm-start trials first (no injection, α = 0; the smallest strength, α = 1, γ = 0.01), "
        f"then TPE's {startup} random startup trials, then ",
    ]
    if past > 0:
        lines[-1] += f"{past} trials where TPE models the objective."
    else:
        lines[-1] += (
            "none where TPE models it: this budget is within the startup trials, so the search "
            "picks among seeded random draws."
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=6)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--completion-tokens", type=int, default=8)
    ap.add_argument("--explanation-tokens", type=int, default=16)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.05, 0.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), load()
    cpu_before = time.process_time()
    model = sl.load_model()
    train, heldout = split(items(model, args.train + args.heldout), args.train, args.seed)

    rows: list[dict] = []
    grid = {"full": list(args.weights), "segmented": list(args.weights)}
    for item in train:
        rows += run_prompt(model, item, args, grid, "train")[0]
    chosen = choose(pd.DataFrame([r for r in rows if r["split"] == "train"]))
    print(f"chosen on train: {chosen}", flush=True)
    ivs: dict[str, list] = {"fusion full": [], "fusion segmented": []}
    prompts, concepts = [], []
    for item in heldout:
        more, fitted, prompt, answer = run_prompt(
            model, item, args, {k: [v] for k, v in chosen.items()}, "held-out"
        )
        rows += more
        ivs["fusion full"].append(fitted[("full", chosen["full"])])
        ivs["fusion segmented"].append(fitted[("segmented", chosen["segmented"])])
        prompts.append(prompt)
        concepts.append(TokenSet.from_ids([answer], d_vocab=model.cfg.d_vocab))
    frame = pd.DataFrame(rows)
    OUT.mkdir(exist_ok=True)
    frame.to_csv(OUT / "fusion_steering.csv", index=False)
    audit = audit_nonzero(model, ivs, prompts, concepts)
    figure = audit.plot("change_norm")
    FIGURE.parent.mkdir(exist_ok=True)
    figure.savefig(FIGURE, dpi=110, bbox_inches="tight")

    # what is reported: the training rows at the chosen λ; every λ of the grid below
    picked = frame[
        (frame.method == "none")
        | (frame.weight == frame.method.map(chosen).astype(float))
        | (frame.split == "held-out")
    ]
    failed = set(frame[(frame.method == "none") & (frame.answer_in_completion == 0)].city)
    table = summary(picked)
    fails = summary(picked[picked.city.isin(failed)])
    grid_table = (
        frame[(frame.split == "train") & (frame.method != "none")]
        .groupby(["method", "weight"])[["answer_in_completion", "answer_logprob", "reference_f1"]]
        .mean()
        .reset_index()
    )
    tuned = picked[picked.method != "none"].groupby(["split", "method"], sort=False)
    tuned_cols = ["alpha_gamma_mean", "objective", "objective_unsteered", "chose_no_injection"]
    tuned_table = tuned[[*tuned_cols, "fit_seconds"]].mean().reset_index()
    tuned_rows = picked[picked.method != "none"]
    below = int((tuned_rows.objective < tuned_rows.objective_unsteered - 1e-12).sum())
    audit_cols = ["method", "prompts", "agreement", "skip_share", "off_target_kl"]
    audit_cols += ["concept_clean", "concept_steered"]
    top = pd.concat([audit.top(5, method=m) for m in audit.methods])
    top = top[["method", "component", "change_norm", "agreement", "dla_concept"]]

    wall = (time.perf_counter() - started) / 60
    cpu = (time.process_time() - cpu_before) / 60
    lines = header("Fusion steering per prompt, in miniature (country questions)")
    lines += [
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(threads=args.threads)}, torch "
        f"{torch.__version__}; wall time {wall:.1f} min, CPU time {cpu:.1f} min; load average "
        f"{load_before:.1f} at the start, {load():.1f} at the end (a machine shared with other "
        "developers' runs: the seconds are not clean timings).",
        "",
        f"Default model ({model.cfg.n_layers} layers). {len(train)} training and {len(heldout)} "
        f"held-out questions (split by a seeded hash of the city); fusion steering at "
        f"`resid_post` of every layer, full (one α, γ) and segmented ({args.segments} contiguous "
        f"segments), {args.trials} optuna trials per prompt and configuration, "
        f"{args.explanation_tokens}-token explanations, {args.completion_tokens}-token greedy "
        f"completions. λ (the perplexity weight) chosen on the training prompts from "
        f"{args.weights}: {chosen}.",
        *search_note(args.trials),
        "",
        "**Read this first.** The per-prompt tuning reads the answer (the reference completion "
        "starts with it; the objective rewards overlap with the reference). Held-out prompts are "
        "tuned too, with the λ chosen on the training prompts and their own reference only; the "
        "answer is read outside the tuning only to score. So the rows below measure what a "
        "per-prompt edit *given the answer* does, as the paper does, not a zero-knowledge "
        "improvement. The paper's own score (token overlap combined with an LLM grader, on "
        "SimpleQA with Gemma-2-2B-IT) is not reproduced: there is no grader offline.",
        "",
        "## Before and after, per split",
        "",
        table.to_markdown(index=False, floatfmt=".4g"),
        "",
        f"## On the prompts the unsteered model fails ({len(failed)} of "
        f"{len(train) + len(heldout)}: its completion lacks the answer)",
        "",
        fails.to_markdown(index=False, floatfmt=".4g") if len(fails) else "(none)",
        "",
        "## The training grid of λ",
        "",
        grid_table.to_markdown(index=False, floatfmt=".4g"),
        "",
        "## The tuned injections",
        "",
        "`alpha_gamma_mean`: the mean over segments of α·γ, the factor on h_l − μ_l; "
        "`objective` the tuned injection's, `objective_unsteered` the unsteered completion's "
        "on the same objective (the first warm-start trial); `chose_no_injection` the fraction "
        "of prompts where no injection scored best.",
        "",
        tuned_table.to_markdown(index=False, floatfmt=".4g"),
        "",
        f"Tuned objective below the unsteered one: {below} of {len(tuned_rows)} tuned "
        "prompts and configurations.",
        "",
        "## Audit of each held-out prompt's tuned injection (at the answer position)",
        "",
        "Means over the held-out prompts where the search kept an injection (`prompts`; where "
        "no injection scored best there is nothing to audit) (`steerlens.audit`, concept = the "
        "answer token): "
        "`agreement` of the actual and first-order change, the `skip_share` of the metric cost, "
        "the off-target KL, the answer's log-probability before and after.",
        "",
        audit.summary[[c for c in audit_cols if c in audit.summary]].to_markdown(
            index=False, floatfmt=".4g"
        ),
        "",
        "The five components each moves most (mean over prompts):",
        "",
        top.to_markdown(index=False, floatfmt=".4g"),
        "",
        f"The figure, `{FIGURE.relative_to(ROOT)}`: ‖steered − clean‖ of every head and MLP at "
        "the answer position, mean over the held-out prompts, one panel per configuration.",
        "",
        "Per-prompt rows (every λ of the training grid): `fusion_steering.csv`.",
    ]
    (OUT / "fusion_steering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
