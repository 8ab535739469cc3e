"""A learned scalar function of one component's activation, applied through hooks: dynamic
activation scaling's unit (:mod:`steerlens.methods.dynamic_scaling`).

A :class:`ScalarFunction` maps an activation vector a (one head's ``hook_z``, an MLP's output, at
one position) to a signed scalar m(a) = b + w · a / ‖a‖: a bias b (the static scalar of
:mod:`steerlens.methods.scaling`) plus a linear read-out of the activation's direction, so |m(a)|
is at most |b| + ‖w‖ whatever the activation's norm. While applied
(:func:`scale_by_function`), the activation at each position the site's rule selects is
multiplied by 1 + scale·m(a): the scalar is computed from the activation itself, so one function
serves prompts of any length. With w = 0 it is the static multiplier b.

>>> import torch
>>> from steerlens.testing import tiny_model
>>> model = tiny_model()
>>> f64 = torch.float64
>>> fn = ScalarFunction(torch.zeros(16, dtype=f64), torch.tensor(-1.0, dtype=f64))
>>> tokens = torch.tensor([[1, 2, 3]])
>>> with scale_by_function(model, "mlp_out.0@all", fn):  # m = -1: the MLP's output ablated
...     steered = model(tokens)
>>> with torch.no_grad(), model.hooks([("blocks.0.hook_mlp_out", lambda a, hook: 0 * a)]):
...     ablated = model(tokens)
>>> torch.allclose(steered, ablated)
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from steerlens.errors import InputError, NonFiniteError
from steerlens.hooks import Mask, edit_at
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

#: the site kinds a scalar function can scale (per-head kinds need a head)
SCALABLE_KINDS: tuple[str, ...] = ("z", "result", "mlp_out", "attn_out", "mlp_post")


def check_scalable(site: Site) -> None:
    """An InputError unless activation scaling can act on ``site``: one head's z or result, an
    attention or MLP output, or the MLP's hidden activation."""
    if site.kind not in SCALABLE_KINDS or (site.kind in ("z", "result") and site.head is None):
        raise InputError(
            f"{site.name}: activation scaling acts on one head's z or result, attn_out, "
            "mlp_out or mlp_post"
        )


@dataclass(frozen=True)
class ScalarFunction:
    """m(a) = ``bias`` + ``weight`` · a / ‖a‖ for an activation a of width ``weight.shape[0]``
    (a zero activation reads as direction 0). The tensors may require grad (training)."""

    weight: Float[Tensor, " dim"]
    bias: Float[Tensor, ""]

    def __post_init__(self) -> None:
        if not isinstance(self.weight, Tensor) or self.weight.dim() != 1:
            raise InputError("a scalar function's weight must be a 1-D tensor")
        if not isinstance(self.bias, Tensor) or self.bias.dim() != 0:
            raise InputError("a scalar function's bias must be a 0-D tensor")
        for name, t in (("weight", self.weight), ("bias", self.bias)):
            if not t.is_floating_point():
                raise InputError(
                    f"a scalar function's {name} must be floating point, not {t.dtype}"
                )
            if not bool(torch.isfinite(t.detach()).all()):
                raise NonFiniteError(f"a scalar function's {name} contains NaN or inf")

    @property
    def dim(self) -> int:
        """The width of the activation it reads."""
        return int(self.weight.shape[0])

    def norm(self) -> float:
        """‖(b, w)‖₂: the group-lasso size of the function (0 when it never scales)."""
        return math.hypot(float(self.bias.detach()), float(self.weight.detach().norm()))

    def __call__(self, act: Float[Tensor, "*batch dim"]) -> Float[Tensor, "*batch"]:
        """m(a) for each activation vector along the last dimension, in ``act``'s dtype."""
        if act.shape[-1] != self.dim:
            raise InputError(
                f"the scalar function reads {self.dim}-wide activations, got width {act.shape[-1]}"
            )
        unit = F.normalize(act, dim=-1)
        return self.bias.to(act.dtype) + unit @ self.weight.to(act.dtype)

    def check(self, site: Site, model: HookedTransformer) -> None:
        """Raise a steerlens error unless the function can scale ``site`` on ``model``: a
        scalable site whose activation is as wide as the function's weight."""
        check_scalable(site)
        width = site.dim(model)
        if width != self.dim:
            cfg = model.cfg
            raise InputError(
                f"scalar function at {site.name} reads {self.dim}-wide activations but that site "
                f"is {width} wide on this model (d_model={cfg.d_model}, d_head={cfg.d_head}, "
                f"d_mlp={cfg.d_mlp}): it was trained for a model of another width"
            )

    def packed(self) -> Float[Tensor, " dim_plus_1"]:
        """(b, w) as one detached vector, the form an artifact stores."""
        return torch.cat([self.bias.detach().reshape(1), self.weight.detach()])

    @classmethod
    def unpack(cls, packed: Float[Tensor, " dim_plus_1"]) -> ScalarFunction:
        """The function :meth:`packed` wrote."""
        if packed.dim() != 1 or packed.shape[0] < 2:
            raise InputError(f"a packed scalar function is (b, w...), got {tuple(packed.shape)}")
        return cls(packed[1:], packed[0])


@contextmanager
def scale_by_function(
    model: HookedTransformer,
    site: str | Site,
    fn: ScalarFunction,
    scale: float = 1.0,
    *,
    attention_mask: Mask | None = None,
) -> Iterator[HookedTransformer]:
    """While inside the block, multiply the activation at ``site`` (each position of its rule;
    one head for per-head sites) by 1 + ``scale``·m(activation). With an ``attention_mask`` the
    rule counts each row's real tokens (:func:`steerlens.hooks.edit_at`)."""
    parsed = as_site(site, model)
    fn.check(parsed, model)
    scale = float(scale)
    if not math.isfinite(scale):
        raise NonFiniteError(f"scale {scale} at {parsed.name} is not finite")

    def edit(x: Tensor, shape: torch.Size) -> Tensor:
        # a copy: the slice is a view that edit_at then overwrites, and autograd keeps x
        x = x.clone()
        return x * (1 + scale * fn(x)).unsqueeze(-1)

    with edit_at(model, parsed, edit, attention_mask=attention_mask):
        yield model
