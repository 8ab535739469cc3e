"""Low-rank updates of a block's output projection, applied through hooks, never to the weights.

A block writes into the residual stream through two output projections: attention's ``W_O``
(its input the heads' ``hook_z`` at each position, flattened to n_heads·d_head; its output
``hook_attn_out``) and the MLP's ``W_out`` (input ``mlp.hook_post``, d_mlp wide; output
``hook_mlp_out``). With x the projection's input at a position, the update W → W + ΔW changes
its output by exactly x ΔW, so a :class:`LowRankUpdate` ΔW = A B (A ``[d_in, rank]``, B
``[rank, d_model]``) is applied by a hook pair: the input hook keeps x, the output hook adds
(x A) B. That is the edited model's forward pass, position by position (cached generation
included), while the user's weights stay as they are; A and B may require grad (LoRA training).

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> proj = OutputProjection.parse("W_out.1").validate(model)
>>> proj.name, proj.d_in(model)
('blocks.1.mlp.W_out', 32)
>>> g = torch.Generator().manual_seed(0)
>>> upd = LowRankUpdate(torch.randn(32, 2, generator=g, dtype=torch.float64),
...                     torch.randn(2, 16, generator=g, dtype=torch.float64))
>>> import copy
>>> edited = copy.deepcopy(model)
>>> with torch.no_grad():
...     _ = edited.blocks[1].mlp.W_out.add_(upd.delta())
>>> tokens = torch.tensor([[1, 2, 3]])
>>> with apply_update(model, proj, upd):
...     hooked_logits = model(tokens)
>>> torch.allclose(hooked_logits, edited(tokens))
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from steerlens._tl import attention_weights, mlp_weights
from steerlens.errors import InputError, NonFiniteError, SiteError
from steerlens.hooks import hooked

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

ProjectionKind = Literal["attn", "mlp"]
#: the output projections a low-rank update can act on
PROJECTION_KINDS: tuple[str, ...] = ("attn", "mlp")
_SHORT = {"W_O": "attn", "W_out": "mlp"}
_LONG = {"attn": "attn.W_O", "mlp": "mlp.W_out"}
_SHORT_RE = re.compile(r"^(W_O|W_out)\.(-?\d+)$")
_FULL_RE = re.compile(r"^blocks\.(-?\d+)\.(attn\.W_O|mlp\.W_out)$")


@dataclass(frozen=True)
class OutputProjection:
    """The output projection of block ``layer``: ``kind`` "attn" (``W_O``) or "mlp"
    (``W_out``)."""

    layer: int
    kind: ProjectionKind

    def __post_init__(self) -> None:
        if self.kind not in PROJECTION_KINDS:
            raise InputError(
                f"unknown projection kind {self.kind!r}; valid kinds: {PROJECTION_KINDS} "
                "(attention's W_O, the MLP's W_out)"
            )
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise InputError(f"a projection's layer must be an int, got {self.layer!r}")

    @classmethod
    def parse(cls, spec: str | OutputProjection) -> OutputProjection:
        """``"W_out.3"``, ``"W_O.3"``, ``"blocks.3.mlp.W_out"`` or ``"blocks.3.attn.W_O"``."""
        if isinstance(spec, OutputProjection):
            return spec
        if not isinstance(spec, str):
            raise InputError(f"a projection is a string, got {type(spec).__name__}")
        text = spec.strip()
        if m := _SHORT_RE.match(text):
            return cls(int(m.group(2)), _SHORT[m.group(1)])  # type: ignore[arg-type]
        if m := _FULL_RE.match(text):
            kind = "attn" if m.group(2) == "attn.W_O" else "mlp"
            return cls(int(m.group(1)), kind)
        raise InputError(
            f"cannot parse projection {spec!r}; write 'W_out.<layer>' or 'W_O.<layer>' (or "
            "'blocks.<layer>.mlp.W_out', 'blocks.<layer>.attn.W_O')"
        )

    @property
    def name(self) -> str:
        """The weight's TransformerLens parameter name, e.g. ``blocks.3.mlp.W_out``."""
        return f"blocks.{self.layer}.{_LONG[self.kind]}"

    @property
    def input_hook(self) -> str:
        return f"blocks.{self.layer}." + ("attn.hook_z" if self.kind == "attn" else "mlp.hook_post")

    @property
    def output_hook(self) -> str:
        return f"blocks.{self.layer}." + (
            "hook_attn_out" if self.kind == "attn" else "hook_mlp_out"
        )

    def validate(self, model: HookedTransformer) -> OutputProjection:
        """The projection with a non-negative layer, checked against ``model``: a
        :class:`SiteError` names a layer that does not exist (and the valid ones) or an MLP
        projection of an attention-only model."""
        n_layers = model.cfg.n_layers
        layer = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= layer < n_layers:
            raise SiteError(
                f"layer {self.layer} does not exist for projection {self.name}: the model has "
                f"{n_layers} layers (valid: 0..{n_layers - 1})"
            )
        if self.kind == "mlp" and model.cfg.attn_only:
            raise SiteError(
                f"{self.name}: the model is attention-only and has no MLP; valid kind: 'attn'"
            )
        return OutputProjection(layer, self.kind)

    def d_in(self, model: HookedTransformer) -> int:
        """The width of the projection's input: n_heads·d_head for W_O, d_mlp for W_out."""
        cfg = model.cfg
        if self.kind == "attn":
            return cfg.n_heads * cfg.d_head
        assert cfg.d_mlp is not None
        return cfg.d_mlp

    def weight(self, model: HookedTransformer) -> Float[Tensor, "d_in d_model"]:
        """The projection's weight as a ``[d_in, d_model]`` matrix (W_O's heads flattened, head
        major: the layout of ``hook_z`` flattened)."""
        if self.kind == "attn":
            return attention_weights(model, self.layer).w_o.reshape(-1, model.cfg.d_model)
        return mlp_weights(model, self.layer).w_out

    def bias(self, model: HookedTransformer) -> Float[Tensor, " d_model"]:
        """The projection's output bias (``b_O`` or ``b_out``)."""
        if self.kind == "attn":
            return attention_weights(model, self.layer).b_o
        return mlp_weights(model, self.layer).b_out

    def flat_input(self, act: Tensor) -> Tensor:
        """The input hook's activation as ``[..., pos, d_in]`` (heads flattened for W_O)."""
        return act.flatten(-2) if self.kind == "attn" else act


def check_delta(
    delta: Tensor, projection: OutputProjection, model: HookedTransformer, what: str = "ΔW"
) -> Float[Tensor, "d_in d_model"]:
    """``delta`` as the ``[d_in, d_model]`` matrix of ``projection`` (W_O's own
    ``[n_heads, d_head, d_model]`` layout is accepted too); an :class:`InputError` names a shape
    that fits neither, :class:`NonFiniteError` a NaN or inf."""
    d_in, d_model = projection.d_in(model), model.cfg.d_model
    if not isinstance(delta, Tensor) or not delta.is_floating_point():
        raise InputError(f"{what} must be a real floating-point tensor, got {type(delta).__name__}")
    shapes: list[tuple[int, ...]] = [(d_in, d_model)]
    if projection.kind == "attn":
        shapes.append((model.cfg.n_heads, model.cfg.d_head, d_model))
    if tuple(delta.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise InputError(
            f"{what} has shape {tuple(delta.shape)} but {projection.name} needs shape {want}"
        )
    if not torch.isfinite(delta).all():
        raise NonFiniteError(f"{what} for {projection.name} contains NaN or inf")
    return delta.reshape(d_in, d_model)


@dataclass(frozen=True)
class LowRankUpdate:
    """ΔW = ``a`` @ ``b`` of one output projection: ``a`` ``[d_in, rank]`` (the input side),
    ``b`` ``[rank, d_model]`` (the output side, the residual directions it writes)."""

    a: Float[Tensor, "d_in rank"]
    b: Float[Tensor, "rank d_model"]

    def __post_init__(self) -> None:
        for name, t in (("a", self.a), ("b", self.b)):
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise InputError(f"a low-rank update's {name} must be a 2-D float tensor")
        if self.a.shape[1] != self.b.shape[0]:
            raise InputError(
                f"a low-rank update needs a [d_in, rank] and b [rank, d_model] of one rank; got "
                f"a {tuple(self.a.shape)}, b {tuple(self.b.shape)}"
            )
        if not (torch.isfinite(self.a.detach()).all() and torch.isfinite(self.b.detach()).all()):
            raise NonFiniteError("a low-rank update contains NaN or inf")

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def n_parameters(self) -> int:
        return self.a.numel() + self.b.numel()

    def delta(self) -> Float[Tensor, "d_in d_model"]:
        """The dense ΔW = a b."""
        return self.a @ self.b

    @classmethod
    def from_delta(cls, delta: Float[Tensor, "d_in d_model"], rank: int) -> LowRankUpdate:
        """The best rank-``rank`` factorization of ``delta`` in Frobenius norm (truncated SVD,
        the singular values split evenly between the factors); exact if ``delta`` has at most
        that rank."""
        if not isinstance(rank, int) or not 1 <= rank <= min(delta.shape):
            raise InputError(f"rank must be an int in 1..{min(delta.shape)}, got {rank!r}")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        return cls(u[:, :rank] * root, root[:, None] * vh[:rank])

    def check(self, projection: OutputProjection, model: HookedTransformer) -> None:
        """Raise :class:`InputError` unless the factors fit ``projection`` on ``model``."""
        d_in, d_model = projection.d_in(model), model.cfg.d_model
        if self.a.shape[0] != d_in or self.b.shape[1] != d_model:
            raise InputError(
                f"low-rank update for {projection.name}: a is {tuple(self.a.shape)} and b "
                f"{tuple(self.b.shape)}, but this model needs a [{d_in}, rank] and b "
                f"[rank, {d_model}]"
            )


@contextmanager
def apply_update(
    model: HookedTransformer,
    projection: str | OutputProjection,
    update: LowRankUpdate,
    scale: float = 1.0,
) -> Iterator[HookedTransformer]:
    """While inside the block, run ``model`` as if ``projection``'s weight were W + scale·a b
    (every position of every forward pass); the hooks are removed on exit, exceptions
    included."""
    proj = OutputProjection.parse(projection).validate(model)
    update.check(proj, model)
    if not math.isfinite(scale):
        raise NonFiniteError(f"scale {scale} of the update of {proj.name} is not finite")
    kept: dict[str, Tensor] = {}

    def keep_input(act: Tensor, hook: object) -> None:
        kept["x"] = proj.flat_input(act)

    def add_output(act: Tensor, hook: object) -> Tensor:
        x = kept.pop("x", None)
        if x is None or x.shape[:-1] != act.shape[:-1]:
            raise InputError(
                f"{proj.output_hook} ran without its input {proj.input_hook} of the same "
                "positions: the update cannot be applied to this forward pass"
            )
        a, b = update.a.to(act), update.b.to(act)
        return act + scale * ((x.to(act.dtype) @ a) @ b)

    with hooked(model, [(proj.input_hook, keep_input), (proj.output_hook, add_output)]):
        yield model
