"""The ``steerlens`` command line: parses arguments, calls the library, prints the results.

steerlens demo                                   # top next tokens, sites, metric per layer
steerlens metric --prompt "The Eiffel Tower is in" --site resid_post.12
steerlens evaluate --concept past.json --contexts contexts.txt --layers 6 12 --json
steerlens diagnose --concept past --contexts contexts.txt --layers 12
steerlens where --concept past --contexts contexts.txt
steerlens steer --method fishback --concept past --prompt "Yesterday we" --layer 12
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from steerlens.cli_concept import COMMANDS as CONCEPT_COMMANDS
from steerlens.cli_concept import add_concept_commands
from steerlens.cli_util import add_command, print_result
from steerlens.errors import SteerlensError
from steerlens.metric.outcomes import DEFAULT_DROPPED_MASS

DEFAULT_PROMPT = "The Eiffel Tower is in the city of"

EXAMPLES = {
    "reproduce": (
        "examples:\n"
        "  steerlens reproduce            # 3 concepts x 4 layers x 7 methods (~15 min, 2 cores)\n"
        "  steerlens reproduce --quick    # 1 concept x 2 layers (~2 min)\n"
        "  steerlens reproduce --layers 6 18 --concepts past --contexts 2 --json"
    ),
    "study": (
        "examples:\n"
        "  steerlens study --out results/study            # the full study (many hours, 2 cores)\n"
        "  steerlens study --out /tmp/pilot --contexts 2 --layers 12 --concepts past\n"
        "  torchrun --nproc-per-node 2 -m steerlens.cli study --out results/study  # 2 ranks\n"
        "  steerlens study --out results/study --report   # rebuild study.md (partial runs too)\n"
        "  steerlens study --out results/study --wide     # re-search the runs the grid stopped"
    ),
    "forecast": (
        "examples:\n"
        "  steerlens forecast                     # results/study -> results/forecast\n"
        "  steerlens forecast --study results/study --second results/study_gemma"
    ),
    "report": (
        "examples:\n"
        "  steerlens report                # rebuild results/reproduction.md and its figures\n"
        "  steerlens report --results my_results --figures my_figures"
    ),
    "train-sae": (
        "examples:\n"
        "  steerlens train-sae --site resid_post.12 --tokens 1000000 --out my_sae\n"
        "  steerlens train-sae --site resid_post.6 --tokens 20000 --d-sae 1152 --out /tmp/sae"
    ),
    "demo": "example:\n  steerlens demo --prompt 'The Eiffel Tower is in the city of'",
    "metric": (
        "examples:\n"
        "  steerlens metric --prompt 'The Eiffel Tower is in the city of' --site resid_post.12\n"
        "  steerlens metric --all --kinds resid_pre resid_post --json\n"
        "  steerlens metric --prompts-file prompts.txt --site blocks.6.attn.hook_z:3"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerlens",
        description="The pullback Fisher geometry of activation steering.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = add_command(
        sub,
        "demo",
        "load the model, show top tokens, sites and the metric at every layer",
        EXAMPLES["demo"],
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--top", type=int, default=5, help="how many next tokens to show")

    rep = add_command(
        sub,
        "reproduce",
        "the FishBack experiment: methods at matched concept probability, with figures",
        EXAMPLES["reproduce"],
    )
    rep.add_argument("--quick", action="store_true", help="a small run (what CI runs)")
    rep.add_argument("--concepts", nargs="+", choices=["past", "third", "ing"])
    rep.add_argument("--layers", nargs="+", type=int)
    rep.add_argument("--contexts", type=int, help="test contexts per concept")
    rep.add_argument("--targets", nargs="+", type=float, help="target probabilities")
    rep.add_argument("--results", type=Path, default=Path("results"), help="tables go here")
    rep.add_argument("--figures", type=Path, default=Path("figures"), help="PNG figures go here")

    study = add_command(
        sub,
        "study",
        "the study: many contexts, every measure, fair baselines; resumable and sharded",
        EXAMPLES["study"],
    )
    study.add_argument("--out", type=Path, default=Path("results/study"), help="the run folder")
    study.add_argument("--concepts", nargs="+", choices=["past", "third", "ing"])
    study.add_argument("--layers", nargs="+", type=int)
    study.add_argument("--contexts", type=int, help="test contexts per concept (default 30)")
    study.add_argument("--targets", nargs="+", type=float, help="target probabilities")
    study.add_argument("--generation-tokens", type=int, help="tokens per continuation (0: none)")
    study.add_argument("--samples", type=int, help="sampled continuations per record")
    study.add_argument(
        "--wide",
        action="store_true",
        help="run the wide-grid stage on the folder's finished units "
        "(steerlens.experiments.wide), then rebuild study.md",
    )
    study.add_argument(
        "--report", action="store_true", help="only rebuild study.md from the folder's records"
    )

    fc = add_command(
        sub,
        "forecast",
        "score the cost-ratio forecast on a study's records (partial runs too)",
        EXAMPLES["forecast"],
    )
    fc.add_argument("--study", type=Path, default=Path("results/study"), help="a study folder")
    fc.add_argument("--second", type=Path, help="another model's study folder (held out)")
    fc.add_argument("--out", type=Path, default=Path("results/forecast"), help="written here")

    report = add_command(
        sub,
        "report",
        "rebuild the reproduction's report and record figures from its saved results",
        EXAMPLES["report"],
    )
    report.add_argument("--results", type=Path, default=Path("results"), help="saved by reproduce")
    report.add_argument("--figures", type=Path, default=Path("figures"), help="PNG figures go here")

    metric = add_command(
        sub,
        "metric",
        "diagnostics of the pullback Fisher metric at one site or all sites",
        EXAMPLES["metric"],
    )
    src = metric.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help=f"one prompt (default: {DEFAULT_PROMPT!r})")
    src.add_argument("--prompts-file", type=Path, help="a text file, one prompt per line")
    which = metric.add_mutually_exclusive_group()
    which.add_argument("--site", action="append", help="a site, e.g. resid_post.12 (repeatable)")
    which.add_argument("--all", action="store_true", help="every site of the kinds in --kinds")
    metric.add_argument(
        "--kinds",
        nargs="+",
        default=["resid_pre", "resid_mid", "resid_post"],
        help="site kinds for --all (default: the residual stream)",
    )
    metric.add_argument("--vocab", choices=["auto", "full"], default="auto")
    metric.add_argument("--dropped-mass", type=float, default=DEFAULT_DROPPED_MASS)

    add_concept_commands(sub)

    train = add_command(
        sub,
        "train-sae",
        "train a TopK SAE at a site on local text with sae-lens's trainer",
        EXAMPLES["train-sae"],
    )
    train.add_argument("--site", default="resid_post.12")
    train.add_argument("--tokens", type=int, default=1_000_000, help="training activations")
    train.add_argument("--d-sae", type=int, default=4608, help="dictionary size")
    train.add_argument("--k", type=int, default=32, help="active features per token (TopK)")
    train.add_argument("--batch-size", type=int, default=1024)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--held-out-tokens", type=int, default=32768)
    train.add_argument("--source", default="sotu", help="local text corpus")
    train.add_argument("--out", type=Path, required=True, help="folder to save the SAE in")
    train.add_argument("--float32", action="store_true", help="save float32 (default float16)")
    return parser


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from steerlens.experiments.inputs import read_lines

    if getattr(args, "prompts_file", None):
        return read_lines(args.prompts_file, "prompts")
    return [args.prompt or DEFAULT_PROMPT]


def cmd_demo(args: argparse.Namespace) -> None:
    from steerlens.experiments.demo import run_demo

    result = run_demo(args.model, args.prompt, top=args.top)
    print_result(result.summary, result.tables, args.json)


def cmd_metric(args: argparse.Namespace) -> None:
    from steerlens.diagnostics import diagnostics_table
    from steerlens.metric import pullback_sweep
    from steerlens.models import load_model
    from steerlens.sites import all_sites

    prompts = _read_prompts(args)
    model = load_model(args.model)
    if args.all or not args.site:
        sites = all_sites(model, args.kinds, per_head=True)
    else:
        sites = args.site
    sweep = pullback_sweep(
        model,
        prompts,
        sites,
        vocab=args.vocab,
        dropped_mass=args.dropped_mass,
        decompose=False,
        progress=len(prompts) > 1,
    )
    table = diagnostics_table(sweep)
    cols = [
        "site",
        "dim",
        "trace",
        "participation_ratio",
        "participation_fraction",
        "rank_90",
        "rank_95",
        "rank_99",
        "deviation_from_euclidean",
    ]
    summary = {
        "model": model.cfg.model_name,
        "prompts": len(prompts),
        "vocab": sweep.info.vocab,
        "dropped_mass (max over prompts)": sweep.info.dropped_mass,
        "definitions": "participation_ratio=(trG)^2/tr(G^2); rank_q=fewest eigen-directions "
        "holding q of trG; deviation_from_euclidean=||G-(trG/d)I||_2/||G||_2",
    }
    print_result(summary, {"diagnostics": pd.DataFrame(table[cols])}, args.json)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from steerlens.experiments.reproduce import (
        ReproduceConfig,
        run_reproduction,
        save_reproduction,
    )
    from steerlens.models import load_model

    cfg = ReproduceConfig.quick() if args.quick else ReproduceConfig()
    overrides = {
        "concepts": tuple(args.concepts) if args.concepts else None,
        "layers": tuple(args.layers) if args.layers else None,
        "contexts": args.contexts,
        "targets": tuple(args.targets) if args.targets else None,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    model = load_model(args.model)
    result = run_reproduction(model, cfg, progress=not args.json)
    paths = save_reproduction(result, args.results, args.figures)
    summary = {
        "model": model.cfg.model_name,
        "seconds": round(result.info.seconds, 1),
        "written": [str(p) for p in paths],
    }
    print_result(
        summary,
        {"paper claims vs default model": result.claims, "summary": result.summary},
        args.json,
    )


def cmd_study(args: argparse.Namespace) -> None:
    import os
    from dataclasses import replace

    from steerlens.experiments.study import StudyConfig, run_study
    from steerlens.experiments.study_report import write_study_report

    overrides = {
        "concepts": tuple(args.concepts) if args.concepts else None,
        "layers": tuple(args.layers) if args.layers else None,
        "contexts": args.contexts,
        "targets": tuple(args.targets) if args.targets else None,
        "generation_tokens": args.generation_tokens,
        "samples": args.samples,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if args.wide and (given or args.report):
        from steerlens.errors import InputError

        named = [f"--{k.replace('_', '-')}" for k in given] + ["--report"] * args.report
        raise InputError(
            f"--wide takes the main stage's configuration from its folder: drop {', '.join(named)}"
        )
    if args.report:
        paths = write_study_report(args.out)
        print_result({"written": [str(p) for p in paths]}, {}, args.json)
        return
    cfg = replace(StudyConfig(), **given)
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")  # torchrun: one rank per process
    from steerlens.models import load_model

    model = load_model(args.model)
    if args.wide:
        from steerlens.experiments.wide import run_wide

        run_wide(model, args.out, progress=not args.json)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        paths = write_study_report(args.out)
        print_result({"written": [str(p) for p in paths]}, {}, args.json)
        return
    records = run_study(model, cfg, args.out, progress=not args.json)
    if records is None:  # not rank 0: rank 0 merges and reports
        return
    paths = write_study_report(args.out)
    summary = {"model": model.cfg.model_name, "records": len(records)}
    print_result(summary | {"written": [str(p) for p in paths]}, {}, args.json)


def cmd_forecast(args: argparse.Namespace) -> None:
    from steerlens.experiments.forecast_report import write_forecast

    paths = write_forecast(args.study, args.out, args.second)
    print_result({"written": [str(p) for p in paths]}, {}, args.json)


def cmd_report(args: argparse.Namespace) -> None:
    from steerlens.experiments.reproduce import rebuild_report

    paths = rebuild_report(args.results, args.figures)
    print_result({"written": [str(p) for p in paths]}, {}, args.json)


def cmd_train_sae(args: argparse.Namespace) -> None:
    from steerlens.models import load_model
    from steerlens.sae_training import SaeTrainingConfig, save_sae, train_sae

    cfg = SaeTrainingConfig(
        site=args.site,
        d_sae=args.d_sae,
        k=args.k,
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        held_out_tokens=args.held_out_tokens,
        source=args.source,
    )
    model = load_model(args.model)
    sae, report = train_sae(model, cfg, progress=not args.json)
    report["command"] = "steerlens " + " ".join(sys.argv[1:])
    path = save_sae(sae, args.out, report, half=not args.float32)
    print_result({"saved": str(path), **report["held_out"]}, {}, args.json)


COMMANDS = {
    "demo": cmd_demo,
    "forecast": cmd_forecast,
    "metric": cmd_metric,
    "reproduce": cmd_reproduce,
    "report": cmd_report,
    "study": cmd_study,
    "train-sae": cmd_train_sae,
    **CONCEPT_COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SteerlensError as exc:
        print(f"steerlens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
