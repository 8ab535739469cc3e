"""Benchmark: dynamic activation scaling beside the static scalars, on templates and prompt
lengths never trained on (Stoehr et al., 2024, "Activation Scaling for Steering and Interpreting
Language Models", its dynamic-scalar experiment in miniature).

    .venv/bin/python bench/dynamic_scaling.py      # bench/results/dynamic_scaling.{md,csv,json,png}
    .venv/bin/python bench/dynamic_scaling.py --render   # the .md and .png again from .csv, .json
    .venv/bin/python bench/dynamic_scaling.py --render --reading "..."  # with a reading

**Task.** The country of a city, on the default model: ``steerlens.datasets.countries
.capital_facts(model, template)`` keeps, per template, the cities whose country the model
predicts (among the listed countries) and pairs each with the model's likeliest wrong country.
The intervention must flip the two: the wrong country (target) above the model's answer (source)
at the last position, the "Italy vs France" logit flip of the paper, here towards the runner-up
because the model's own answer is the correct one. The training set is the first
``--train-cities`` known cities of each of four short templates, prompts of at most
``--max-train-len`` tokens; the held-out set is the first ``--heldout-cities`` known cities of
three other templates, keeping only prompts longer than any training prompt: every held-out
prompt has a template and a length never trained on (the cities overlap).

**Methods**, each ``--steps`` proximal gradient steps on the same three-term objective (flip
softplus with margin 1 + ``--faithfulness``·off-target KL + L1), over every head's ``hook_z`` and
every MLP output of all 30 layers (300 components), each fitted at every learning rate of
``--lrs``; the one reported per method is chosen on the training prompts alone, by the lowest
mean flip loss + ``--faithfulness``·KL (the two terms every method shares; the L1 terms differ
between the static scalars and the functions), and every fit's training row is in the grid
table:

- ``static@last``: the registered ``scaling`` method, one signed scalar per component at the
  last position;
- ``static@all``: the same scalars at every position;
- ``dynamic@all``: the registered ``dynamic_scaling`` method, m_c(a) = b_c + w_c · a/‖a‖ at every
  position, group L1 on (b_c, w_c).

**Measures** (``steerlens.methods.scaling_measures``), means over a set's prompts: effectiveness
(flip rate, logit difference z_t − z_s, the flip loss), faithfulness (off-target KL from the
clean next-token distribution, nats), minimality (Σ|m| over every activation vector scaled in a
prompt, and the number of components with a non-zero scalar or function).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import time
from datetime import UTC, datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from common import OUT, header, machine  # noqa: E402

import steerlens as sl  # noqa: E402
from steerlens.datasets.countries import capital_facts  # noqa: E402
from steerlens.methods import scaling_measures  # noqa: E402

TRAIN_TEMPLATES = (
    "{city} is in",
    "{city}, a city in",
    "The city of {city} is located in",
    "{city} is a city in the country of",
)
HELDOUT_TEMPLATES = (
    "My friend lives in {city}, which is in",
    "Q: Which country is {city} in? A:",
    "Everyone knows that the city of {city} is found in the country of",
)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prompts(model, templates, n_cities: int, keep) -> pd.DataFrame:
    rows = []
    for template in templates:
        facts = [f for f in capital_facts(model, template) if keep(len(f.tokens))][:n_cities]
        rows += [
            {
                "template": template,
                "city": f.city,
                "tokens": torch.tensor(f.tokens),
                "target": f.wrong_id,
                "source": f.correct_id,
            }
            for f in facts
        ]
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--train-cities", type=int, default=4)
    parser.add_argument("--heldout-cities", type=int, default=8)
    parser.add_argument("--max-train-len", type=int, default=8)
    parser.add_argument("--faithfulness", type=float, default=1.0)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--static-l1", type=float, default=0.05)
    parser.add_argument("--dynamic-l1", type=float, default=0.2)
    parser.add_argument("--render", action="store_true", help="re-render from the .csv/.json")
    parser.add_argument(
        "--reading", help="with --render: the reading of the results to store and print"
    )
    args = parser.parse_args()
    if args.render:
        facts = json.loads((OUT / "dynamic_scaling.json").read_text())
        if args.reading:
            facts["reading"] = args.reading
            (OUT / "dynamic_scaling.json").write_text(json.dumps(facts, indent=1) + "\n")
        render(pd.read_csv(OUT / "dynamic_scaling.csv"), facts)
        return
    torch.manual_seed(0)
    started, cpu_start = time.perf_counter(), cpu_seconds()
    model = sl.load_model()
    train = prompts(model, TRAIN_TEMPLATES, args.train_cities, lambda n: n <= args.max_train_len)
    longest = max(len(t) for t in train["tokens"])
    heldout = prompts(model, HELDOUT_TEMPLATES, args.heldout_cities, lambda n: n > longest)
    sets = {"train": train, "held-out": heldout}
    common: dict[str, Any] = dict(steps=args.steps, faithfulness=args.faithfulness)
    runs: dict[str, tuple[str, dict[str, Any]]] = {
        "static@last": ("scaling", dict(position="last", l1=args.static_l1)),
        "static@all": ("scaling", dict(position="all", l1=args.static_l1)),
        "dynamic@all": ("dynamic_scaling", dict(position="all", l1=args.dynamic_l1)),
    }
    rows = []
    for (name, (method, fixed)), lr in itertools.product(runs.items(), args.lrs):
        options = {**fixed, "lr": lr}
        t0 = time.perf_counter()
        iv = sl.fit(
            model,
            method,
            prompt=list(train["tokens"]),
            targets=list(train["target"]),
            sources=list(train["source"]),
            **common,
            **options,
        )
        fit_seconds = time.perf_counter() - t0
        kept = len(iv.info["kept"])
        print(f"{name} lr {lr}: fitted in {fit_seconds:.0f} s, {kept} kept", flush=True)
        for split, frame in sets.items():
            m = scaling_measures(
                model, iv, list(frame["tokens"]), list(frame["target"]), list(frame["source"])
            )
            rows.append(
                {
                    "method": name,
                    "set": split,
                    "prompts": len(frame),
                    **m.as_dict(),
                    "lr": options["lr"],
                    "l1": options["l1"],
                    "fit_seconds": round(fit_seconds, 1),
                }
            )
    table = choose(pd.DataFrame(rows), args.faithfulness)
    wall_min = (time.perf_counter() - started) / 60
    cpu_min = (cpu_seconds() - cpu_start) / 60
    lengths = {name: sorted({len(t) for t in frame["tokens"]}) for name, frame in sets.items()}
    facts = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": header("")[-1].removeprefix("Command: `").removesuffix("`"),
        "machine": f"{machine()}, torch {torch.__version__}",
        "wall_min": round(wall_min, 1),
        "cpu_min": round(cpu_min, 1),
        "steps": args.steps,
        "faithfulness": args.faithfulness,
        "lrs": args.lrs,
        **{
            f"{key}_{name}": value
            for name, frame in (("train", train), ("heldout", heldout))
            for key, value in (
                ("prompts", len(frame)),
                ("templates", len(set(frame["template"]))),
                ("min_len", lengths["train" if name == "train" else "held-out"][0]),
                ("max_len", lengths["train" if name == "train" else "held-out"][-1]),
            )
        },
    }
    OUT.mkdir(exist_ok=True)
    table.to_csv(OUT / "dynamic_scaling.csv", index=False)
    (OUT / "dynamic_scaling.json").write_text(json.dumps(facts, indent=1) + "\n")
    render(table, facts)


def training_grid(table: pd.DataFrame, faithfulness: float) -> pd.DataFrame:
    """The training rows of ``table`` with ``selection_score`` = flip loss + ``faithfulness`` ·
    KL, what the learning rate is chosen by."""
    train = table[table["set"] == "train"]
    return train.assign(selection_score=train["flip_loss"] + faithfulness * train["kl"])


def choose(table: pd.DataFrame, faithfulness: float) -> pd.DataFrame:
    """``table`` with ``chosen``: per method, the learning rate whose training rows have the
    lowest selection score (held-out rows are never read)."""
    grid = training_grid(table, faithfulness)
    best = grid.sort_values("selection_score").groupby("method")["lr"].first()
    return table.assign(chosen=table["lr"] == table["method"].map(best))


def render(table: pd.DataFrame, facts: dict[str, Any]) -> None:
    grid = training_grid(table, facts["faithfulness"])
    grid = grid[["method", "lr", "selection_score", "flip_rate", "kl", "scalar_l1", "chosen"]]
    table = table[table["chosen"]].drop(columns="chosen")
    figure = plot(table)
    figure.savefig(OUT / "dynamic_scaling.png", dpi=110, bbox_inches="tight")
    f = facts
    lines = header("Dynamic vs static activation scaling on held-out templates and lengths")
    lines[-1] = f"Command: `{f['command']}`"  # the run's, not a re-render's
    lines += [
        "",
        f"{f['date']}, {f['machine']}; wall time {f['wall_min']:.1f} min, CPU time "
        f"{f['cpu_min']:.1f} min (a machine shared with other developers' runs: the seconds "
        "are not clean timings).",
        "",
        f"Default model, country of a city, flipped to the model's runner-up country. Train: "
        f"{f['prompts_train']} prompts, {f['templates_train']} templates, lengths "
        f"{f['min_len_train']}–{f['max_len_train']} tokens; held-out: {f['prompts_heldout']} "
        f"prompts, {f['templates_heldout']} other templates, lengths "
        f"{f['min_len_heldout']}–{f['max_len_heldout']} (none trained on). {f['steps']} "
        f"proximal gradient steps each, faithfulness weight {f['faithfulness']}, over the 300 "
        f"heads and MLP outputs of all 30 layers; each method fitted at learning rates "
        f"{f['lrs']} and reported at the one with the lowest training flip loss + "
        f"{f['faithfulness']}·KL (the grid below). "
        "`logit_diff` = z_target − z_source at the last position (> 0: flipped); `flip_loss` = "
        "softplus(1 − logit_diff); `kl` = off-target KL from the clean distribution (nats); "
        "`scalar_l1` = Σ|m| over every activation vector scaled in a prompt; `components` = "
        "components with a non-zero scalar or function. Templates (train then held-out): "
        + "; ".join(f"`{t}`" for t in (*TRAIN_TEMPLATES, *HELDOUT_TEMPLATES))
        + ".",
        "",
        table.to_markdown(index=False, floatfmt=".4g"),
        "",
        "**The learning-rate grid** (training prompts only; `selection_score` = flip loss + "
        f"{f['faithfulness']}·KL, lowest chosen):",
        "",
        grid.to_markdown(index=False, floatfmt=".4g"),
        "",
        f"**Reading.** A miniature: {f['prompts_train']} training prompts, one seed, "
        f"{f['steps']} steps, one L1 weight per method, the learning rate searched on the "
        f"training prompts; one held-out prompt is {100 / f['prompts_heldout']:.0f} points of "
        "flip rate. Static scalars here are not the paper's per-position static scalars, which "
        "cannot be applied to another length at all: steerlens's `scaling` scales a position "
        "*rule* (`@last`), so it transfers to new lengths too and is the strong baseline. "
        + f.get("reading", ""),
        "",
        "Figure: `bench/results/dynamic_scaling.png` (flip rate, KL and Σ|m| per method and set).",
    ]
    (OUT / "dynamic_scaling.md").write_text("\n".join(lines) + "\n")


def plot(table: pd.DataFrame):
    measures = [("flip_rate", "flip rate"), ("kl", "off-target KL (nats)"), ("scalar_l1", "Σ|m|")]
    fig, axes = plt.subplots(1, len(measures), figsize=(11, 3.2))
    methods = list(dict.fromkeys(table["method"]))
    sets = list(dict.fromkeys(table["set"]))
    width = 0.8 / len(sets)
    for ax, (column, title) in zip(axes, measures, strict=True):
        for j, split in enumerate(sets):
            values = [
                float(table.loc[(table["method"] == m) & (table["set"] == split), column].iloc[0])
                for m in methods
            ]
            ax.bar([i + j * width for i in range(len(methods))], values, width, label=split)
        ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(methods))], methods)
        ax.set_title(title)
        if column == "scalar_l1":
            ax.set_yscale("log")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(frameon=False)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
