"""The ``steerlens`` subcommands for a user's concept: ``evaluate``, ``diagnose``, ``where``
and ``steer``. A concept is a JSON file of base word → target word (or a built-in verb concept);
contexts are a text file, one per line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from steerlens.cli_util import add_command, print_result, write_csv
from steerlens.errors import InputError

EXAMPLES = {
    "evaluate": (
        "examples:\n"
        "  steerlens evaluate --concept past.json --contexts contexts.txt --layers 6 12\n"
        "  steerlens evaluate --concept past --contexts contexts.txt --layers 12 \\\n"
        "      --methods fishback euclidean caa --targets 0.5 --json > records.json\n"
        "past.json maps base words to target words ('▁' marks a leading space):\n"
        '  {"▁walk": "▁walked", "▁see": "▁saw"}\n'
        "contexts.txt: one context per line whose next word is a base form,\n"
        "  e.g. 'I really want to'"
    ),
    "diagnose": (
        "examples:\n"
        "  steerlens diagnose --concept past --contexts contexts.txt --layers 6 12 18\n"
        "  steerlens diagnose --concept past.json --contexts contexts.txt --layers 12 --json"
    ),
    "where": (
        "examples:\n"
        "  steerlens where --concept past --contexts contexts.txt\n"
        "  steerlens where --concept past.json --contexts contexts.txt --kinds resid_post --top 5"
    ),
    "steer": (
        "examples:\n"
        "  steerlens steer --method fishback --concept past --layer 12 \\\n"
        "      --prompt 'Every morning the two of them' --target 0.9\n"
        "  steerlens steer --method caa --concept past --layer 12 --prompt 'They' \\\n"
        "      --train-contexts contexts.txt --save caa_past"
    ),
}


def _add_concept_args(
    p: argparse.ArgumentParser, *, contexts: bool = True, train: bool = True
) -> None:
    p.add_argument(
        "--concept",
        required=True,
        help="a JSON file of base word -> target word, or a built-in concept: past, third, ing",
    )
    if contexts:
        p.add_argument("--contexts", type=Path, required=True, help="one context per line")
    if train:
        p.add_argument(
            "--train-contexts",
            type=Path,
            help="contexts to fit CAA/ActAdd/probe on (default: the evaluation contexts)",
        )
    p.add_argument("--damping", type=float, default=1e-2, help="relative ridge λ·tr(G)/d")


def _add_layers_and_methods(p: argparse.ArgumentParser) -> None:
    from steerlens.experiments.matched import DEFAULT_METHODS, METHOD_NAMES

    p.add_argument("--layers", nargs="+", type=int, required=True)
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(DEFAULT_METHODS))


def add_concept_commands(sub: Any) -> None:
    from steerlens.diagnostics import WHERE_KINDS
    from steerlens.experiments.matched import METHOD_NAMES

    ev = add_command(
        sub,
        "evaluate",
        "methods x layers at matched concept probability on your contexts",
        EXAMPLES["evaluate"],
    )
    _add_concept_args(ev)
    _add_layers_and_methods(ev)
    ev.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.9])
    ev.add_argument("--step", type=float, default=1.0, help="nats per iterative step")
    ev.add_argument("--fluency-tokens", type=int, default=8, help="0 skips perplexity")
    ev.add_argument("--out", type=Path, help="also write the records as CSV here")

    dg = add_command(
        sub,
        "diagnose",
        "spectral cost ratio ρ of each method's direction for a concept",
        EXAMPLES["diagnose"],
    )
    _add_concept_args(dg)
    _add_layers_and_methods(dg)

    wh = add_command(
        sub,
        "where",
        "rank sites by the least off-target KL any direction pays to move the concept",
        EXAMPLES["where"],
    )
    _add_concept_args(wh, train=False)
    wh.add_argument("--kinds", nargs="+", choices=WHERE_KINDS, default=list(WHERE_KINDS))
    wh.add_argument("--top", type=int, default=10, help="rows to print (--json prints all)")

    st = add_command(
        sub,
        "steer",
        "generate with a steering method applied, beside the clean generation",
        EXAMPLES["steer"],
    )
    _add_concept_args(st, contexts=False)
    st.add_argument("--method", choices=METHOD_NAMES, required=True)
    st.add_argument("--prompt", required=True)
    st.add_argument("--layer", type=int, required=True, help="steer at resid_post.<layer>")
    st.add_argument("--target", type=float, default=0.9, help="target pair share")
    st.add_argument("--max-new-tokens", type=int, default=20)
    st.add_argument("--save", type=Path, help="save the fitted intervention here")


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from steerlens.experiments.matched import MatchedSettings

    return MatchedSettings(
        targets=tuple(getattr(args, "targets", (0.5, 0.9))),
        methods=tuple(args.methods),
        damping=args.damping,
        **extra,
    )


def _concept_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str], list[str] | None]:
    from steerlens.experiments.inputs import load_pair_file, read_lines
    from steerlens.models import load_model

    contexts = read_lines(args.contexts) if getattr(args, "contexts", None) else []
    train_file = getattr(args, "train_contexts", None)
    train = read_lines(train_file, "train contexts") if train_file else None
    model = load_model(args.model)
    return model, load_pair_file(model, args.concept), contexts, train


def cmd_evaluate(args: argparse.Namespace) -> None:
    from steerlens.evaluation import summarize
    from steerlens.experiments.concept import evaluate_concept

    settings = _settings(args, step=args.step, fluency_tokens=args.fluency_tokens)
    model, mapping, contexts, train = _concept_inputs(args)
    records, info = evaluate_concept(
        model,
        mapping,
        contexts,
        args.layers,
        settings,
        train_contexts=train,
        progress=not args.json,
    )
    if args.out:
        write_csv(records, args.out)
        info["written"] = str(args.out)
    summary = summarize(records) if "fishback" in settings.methods else pd.DataFrame()
    if not summary.empty:
        for col in ("off_target_kl_ci", "kl_ratio_ci"):
            summary[col] = [list(v) for v in summary[col]]
    brief = ["method", "layer", "context_index", "target_probability", "reached"]
    brief += ["probability", "off_target_kl", "off_target_kl_merged", "rho"]
    shown: pd.DataFrame = records if args.json else pd.DataFrame(records[brief])
    tables = {"records": shown} | ({"summary": summary} if not summary.empty else {})
    print_result({"model": model.cfg.model_name, **info}, tables, args.json)


def cmd_diagnose(args: argparse.Namespace) -> None:
    from steerlens.experiments.concept import diagnose_concept, rho_summary

    settings = _settings(args)
    model, mapping, contexts, train = _concept_inputs(args)
    rows, info = diagnose_concept(
        model, mapping, contexts, args.layers, settings, train_contexts=train
    )
    tables = {"rho": rho_summary(rows)}
    if args.json:
        tables["records"] = rows
    print_result({"model": model.cfg.model_name, **info}, tables, args.json)


def cmd_where(args: argparse.Namespace) -> None:
    from steerlens.diagnostics import site_costs
    from steerlens.experiments.inputs import user_contexts
    from steerlens.experiments.matched import context_tokens, pair_concept
    from steerlens.sites import all_sites

    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    model, mapping, texts, _ = _concept_inputs(args)
    ctxs = user_contexts(model, mapping, texts)
    pairs = [(context_tokens(model, c), pair_concept(c)) for c in ctxs]
    table = site_costs(model, pairs, all_sites(model, args.kinds), damping=args.damping)
    info = {
        "model": model.cfg.model_name,
        "concept": mapping.name,
        "contexts": len(ctxs),
        "damping": args.damping,
        "measure": "kl_per_unit = 1/(2 gᵀ(G+λI)⁻¹g), nats",
    }
    print_result(info, {"sites": table if args.json else table.head(args.top)}, args.json)


def cmd_steer(args: argparse.Namespace) -> None:
    from steerlens.datasets import verb_contrast_pairs
    from steerlens.evaluation import greedy_continuation, match_strength, next_logprobs
    from steerlens.experiments.inputs import user_contexts
    from steerlens.experiments.matched import (
        FIXED,
        MatchedSettings,
        context_tokens,
        fit_fixed,
        iterative_runs,
        pair_share,
        share_at,
    )
    from steerlens.sites import Site

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, mapping, _, train = _concept_inputs(args)
    Site("resid_post", args.layer).validate(model)
    (ctx,) = user_contexts(model, mapping, [args.prompt])
    settings = MatchedSettings((args.target,), (args.method,), damping=args.damping)
    tokens = context_tokens(model, ctx)
    if args.method in FIXED:
        if train is None:
            raise InputError(f"{args.method} learns from contrast pairs: give --train-contexts")
        train_ctxs = user_contexts(model, mapping, train)
        pairs = verb_contrast_pairs(train_ctxs, name=mapping.name)
        iv = fit_fixed(model, settings.methods, pairs, args.layer, train_ctxs, seed=settings.seed)[
            args.method
        ]
        scale, reached = match_strength(share_at(model, tokens, ctx, iv), args.target)
        iv = iv.scaled(scale)
    else:
        (edit,) = iterative_runs(model, settings, ctx, tokens, Site("resid_post", args.layer))
        iv, reached = edit.intervention, edit.reached
    tok: Any = model.tokenizer
    n = tokens.numel()
    clean = greedy_continuation(model, tokens, None, args.max_new_tokens)
    steered = greedy_continuation(model, tokens, iv, args.max_new_tokens)
    out = {
        "model": model.cfg.model_name,
        "method": args.method,
        "sites": list(iv.sites),
        "pair": f"{ctx.verb} -> {ctx.target_word}",
        "reached": bool(reached),
        "share_clean": float(pair_share(next_logprobs(model, tokens), ctx)),
        "share_steered": float(pair_share(next_logprobs(model, tokens, iv), ctx)),
        "clean": args.prompt + tok.decode(clean[n:].tolist()),
        "steered": args.prompt + tok.decode(steered[n:].tolist()),
    }
    if args.save:
        out["saved"] = str(iv.save(args.save))
    print_result(out, {}, args.json)


COMMANDS = {
    "evaluate": cmd_evaluate,
    "diagnose": cmd_diagnose,
    "where": cmd_where,
    "steer": cmd_steer,
}
