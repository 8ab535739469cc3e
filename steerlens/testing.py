"""Test support, outside the public API: tiny random models (GPT-2-like and Llama-like, float64
by default) and a fake tokenizer, for tests, doctests and examples that need no real model.

Three flavours of tiny model cover the architectures steerlens must handle:

- ``"gpt2"``: LayerNorm, learned absolute positions, GELU MLP, multi-head attention.
- ``"llama"``: RMSNorm, rotary positions, gated SiLU MLP, grouped-query attention.
- ``"gemma"``: Gemma 3's block: the llama flavour with a gated tanh-GELU MLP, per-head QK-norm,
  norms after attention and after the MLP, and local (sliding-window, its own rotary base) and
  global layers in turn; its norm weights are drawn around one so that every norm matters.

>>> model = tiny_model("llama")
>>> model.cfg.n_layers, model.cfg.d_model, model.cfg.n_key_value_heads
(2, 16, 1)
>>> WhitespaceTokenizer(["a", " b"]).encode("a b")
[0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from steerlens._tl import HookedTransformer, HookedTransformerConfig
from steerlens.errors import InputError

Flavour = Literal["gpt2", "llama", "gemma"]
FLAVOURS: tuple[str, ...] = ("gpt2", "llama", "gemma")


def tiny_config(
    flavour: Flavour = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 16,
    n_heads: int = 4,
    d_vocab: int = 48,
    n_ctx: int = 32,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> HookedTransformerConfig:
    """The :class:`HookedTransformerConfig` of a tiny random model of one flavour."""
    common: dict[str, Any] = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=2 * d_model,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        dtype=dtype,
        seed=seed,
        device="cpu",
        default_prepend_bos=False,
        init_weights=True,
    )
    if flavour == "gpt2":
        return HookedTransformerConfig(
            **common,
            act_fn="gelu_new",
            normalization_type="LN",
            positional_embedding_type="standard",
        )
    llama: dict[str, Any] = dict(
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_model // n_heads,
        gated_mlp=True,
        n_key_value_heads=max(1, n_heads // 4),
        final_rms=True,
    )
    if flavour == "llama":
        return HookedTransformerConfig(**common, **llama)
    if flavour == "gemma":  # Gemma 3's block on the llama flavour
        gemma: dict[str, Any] = llama | dict(
            act_fn="gelu_pytorch_tanh",
            rotary_base=10000,
            rotary_base_local=100,
            use_qk_norm=True,
            use_normalization_before_and_after=True,
            use_local_attn=True,
            attn_types=["local" if i % 2 == 0 else "global" for i in range(n_layers)],
            window_size=n_ctx,
        )
        return HookedTransformerConfig(**common, **gemma)
    raise InputError(f"unknown tiny model flavour {flavour!r}; valid flavours: {FLAVOURS}")


def tiny_model(
    flavour: Flavour = "gpt2", *, device: str | torch.device | None = None, **kwargs: object
) -> HookedTransformer:
    """A tiny random :class:`HookedTransformer` (float64 by default), weights scaled so that its
    next-token distributions are far from uniform (a realistic Fisher spectrum).

    The weights are drawn on the CPU (the same numbers on every machine) and then moved to
    ``device`` when one is given (e.g. ``"cuda"``)."""
    cfg = tiny_config(flavour, **kwargs)  # type: ignore[arg-type]
    model = HookedTransformer(cfg)
    with torch.no_grad():
        # Default init gives near-uniform softmax outputs; sharpen the unembedding so that the
        # next-token distribution has a few dominant tokens, as real models do.
        model.unembed.W_U.mul_(4.0)
        norm_draws = torch.Generator().manual_seed((cfg.seed or 0) + 1)
        for name, param in model.named_parameters():
            if name.endswith(("b_in", "b_out", "b_Q", "b_K", "b_V", "b_O", "b_U")):
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(cfg.seed or 0))
            if flavour == "gemma" and name.endswith(".w"):  # the norms' weights, ones at init
                param.normal_(1.0, 0.3, generator=norm_draws)
    model.eval()
    if device is not None and torch.device(device) != torch.device(str(model.cfg.device)):
        model.to(device)
    return model


class WhitespaceTokenizer:
    """A tiny stand-in tokenizer for examples and tests: a fixed vocabulary of strings, greedy
    longest match from the left; a character matching nothing is its own token,
    ``len(vocab) + ord(char)``."""

    def __init__(self, vocab: Sequence[str], bos_token_id: int | None = None) -> None:
        self.vocab = list(vocab)
        self.bos_token_id = bos_token_id
        self._index = {piece: i for i, piece in enumerate(self.vocab)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out: list[int] = []
        rest = text
        while rest:
            for end in range(len(rest), 0, -1):
                if rest[:end] in self._index:
                    out.append(self._index[rest[:end]])
                    rest = rest[end:]
                    break
            else:
                out.append(len(self.vocab) + ord(rest[0]))
                rest = rest[1:]
        if add_special_tokens and self.bos_token_id is not None:
            out.insert(0, self.bos_token_id)
        return out

    def _piece(self, i: int) -> str:
        return self.vocab[i] if i < len(self.vocab) else chr(i - len(self.vocab))

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._piece(int(i)) for i in ids)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._piece(int(i)) for i in ids]


__all__ = ["FLAVOURS", "WhitespaceTokenizer", "tiny_config", "tiny_model"]
