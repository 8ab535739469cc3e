"""Sites: where an activation is read, measured or steered.

A :class:`Site` names one activation of a :class:`~transformer_lens.HookedTransformer`: a hook kind,
a layer, an optional head and a position rule. It parses what users type, validates itself against
a model with errors that list what is valid, and knows the width of its activation.

>>> Site.parse("blocks.6.hook_resid_post")
Site('resid_post', layer=6)
>>> Site.parse("resid_post.6") == Site.parse("blocks.6.hook_resid_post")
True
>>> Site.parse("blocks.6.attn.hook_z:3").hook_name, Site.parse("z.6:3").head
('blocks.6.attn.hook_z', 3)
>>> Site.parse("resid_pre.2@all").position
'all'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from steerlens.errors import SiteError

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer

Position = int | Literal["last", "all"]

#: hook kind -> hook name template inside ``blocks.{layer}``
HOOKS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "mlp_pre": "mlp.hook_pre",
    "mlp_post": "mlp.hook_post",
}
KINDS: tuple[str, ...] = tuple(HOOKS)
RESIDUAL_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
HEAD_KINDS: tuple[str, ...] = ("z", "result")
#: the order of sites inside one block, upstream first
BLOCK_ORDER: tuple[str, ...] = (
    "resid_pre",
    "z",
    "result",
    "attn_out",
    "resid_mid",
    "mlp_pre",
    "mlp_post",
    "mlp_out",
    "resid_post",
)

_HOOK_TO_KIND = {v: k for k, v in HOOKS.items()}
_FULL_RE = re.compile(r"^blocks\.(-?\d+)\.((?:attn\.|mlp\.)?hook_\w+)$")
_SHORT_RE = re.compile(r"^(\w+?)\.(-?\d+)$")
_POSITION_HELP = "a position is '@last', '@all' or '@<int>' (e.g. 'resid_post.6@-1')"


@dataclass(frozen=True)
class Site:
    """One activation: ``kind`` at ``layer`` (``head`` for per-head kinds), at ``position``.

    ``position`` is ``"last"`` (the prediction position, the default), an integer index into the
    prompt (negative counts from the end), or ``"all"``: one vector tied across every position,
    as CAA adds it. ``head=None`` at a per-head kind means all heads, flattened.
    """

    kind: str
    layer: int
    head: int | None = None
    position: Position = "last"

    def __post_init__(self) -> None:
        if self.kind not in HOOKS:
            raise SiteError(f"unknown site kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise SiteError(f"site layer must be an int, got {self.layer!r}")
        if self.head is not None and self.kind not in HEAD_KINDS:
            raise SiteError(
                f"site kind {self.kind!r} has no heads; per-head kinds: {', '.join(HEAD_KINDS)}"
            )
        pos = self.position
        if not (pos in ("last", "all") or (isinstance(pos, int) and not isinstance(pos, bool))):
            raise SiteError(f"invalid position {pos!r}; {_POSITION_HELP}")

    def __repr__(self) -> str:
        extra = "" if self.head is None else f", head={self.head}"
        extra += "" if self.position == "last" else f", position={self.position!r}"
        return f"Site({self.kind!r}, layer={self.layer}{extra})"

    def __str__(self) -> str:
        return self.name

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name, e.g. ``blocks.6.attn.hook_z``."""
        return f"blocks.{self.layer}.{HOOKS[self.kind]}"

    @property
    def name(self) -> str:
        """The canonical name: the hook name, ``:head`` if any, ``@position`` unless last."""
        name = self.hook_name
        if self.head is not None:
            name += f":{self.head}"
        if self.position != "last":
            name += f"@{self.position}"
        return name

    def at(self, position: Position) -> Site:
        """The same site at another position rule."""
        return replace(self, position=position)

    @classmethod
    def parse(cls, spec: str | Site, *, position: Position | None = None) -> Site:
        """Parse ``blocks.6.hook_resid_post``, ``resid_post.6``, ``blocks.6.attn.hook_z:3`` or
        ``z.6:3``, optionally followed by ``@last``, ``@all`` or ``@<int>``.

        ``position`` overrides a position given in the string.
        """
        if isinstance(spec, Site):
            return spec if position is None else spec.at(position)
        if not isinstance(spec, str):
            raise SiteError(f"a site is a string or a Site, got {type(spec).__name__}")
        text = spec.strip()
        pos: Position = "last"
        if "@" in text:
            text, pos_text = text.rsplit("@", 1)
            pos = _parse_position(pos_text, spec)
        head = None
        if ":" in text:
            text, head_text = text.rsplit(":", 1)
            if not re.fullmatch(r"\d+", head_text):
                raise SiteError(
                    f"invalid head {head_text!r} in site {spec!r}; a head is an int >= 0"
                )
            head = int(head_text)
        if m := _FULL_RE.match(text):
            layer, hook = int(m.group(1)), m.group(2)
            if hook not in _HOOK_TO_KIND:
                raise SiteError(
                    f"unknown hook {hook!r} in site {spec!r}; valid hooks: "
                    + ", ".join(HOOKS.values())
                )
            kind = _HOOK_TO_KIND[hook]
        elif m := _SHORT_RE.match(text):
            kind, layer = m.group(1), int(m.group(2))
            if kind not in HOOKS:
                raise SiteError(
                    f"unknown site kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}"
                )
        else:
            raise SiteError(
                f"cannot parse site {spec!r}; write e.g. 'blocks.6.hook_resid_post', "
                "'resid_post.6' or 'blocks.6.attn.hook_z:3'"
            )
        return cls(kind, layer, head, pos if position is None else position)

    def validate(self, model: HookedTransformer) -> Site:
        """Check the layer and head against ``model`` and return the site with a non-negative
        layer. Raises :class:`SiteError` naming the problem and the valid range."""
        n_layers = model.cfg.n_layers
        layer = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= layer < n_layers:
            raise SiteError(
                f"layer {self.layer} is out of range for site {self.name}: "
                f"the model has {n_layers} layers (valid: 0..{n_layers - 1})"
            )
        if self.head is not None and not 0 <= self.head < model.cfg.n_heads:
            raise SiteError(
                f"head {self.head} is out of range for site {self.name}: "
                f"the model has {model.cfg.n_heads} heads (valid: 0..{model.cfg.n_heads - 1})"
            )
        if self.kind in ("mlp_pre", "mlp_post") and model.cfg.attn_only:
            raise SiteError(f"site {self.name}: the model is attention-only and has no MLP")
        return replace(self, layer=layer)

    def resolve_position(self, n_pos: int) -> int | Literal["all"]:
        """The position index (>= 0) this site acts on in a prompt of ``n_pos`` tokens, or
        ``"all"``. Raises :class:`SiteError` for a position past the prompt."""
        if self.position == "all":
            return "all"
        if self.position == "last":
            return n_pos - 1
        pos = self.position + n_pos if self.position < 0 else self.position
        if not 0 <= pos < n_pos:
            raise SiteError(
                f"position {self.position} is past the prompt for site {self.name}: "
                f"the prompt has {n_pos} tokens (valid: {-n_pos}..{n_pos - 1})"
            )
        return pos

    def dim(self, model: HookedTransformer) -> int:
        """The width of the activation vector at this site (all heads flattened if head is None)."""
        cfg = model.cfg
        if self.kind in ("mlp_pre", "mlp_post"):
            assert cfg.d_mlp is not None
            return cfg.d_mlp
        if self.kind == "z":
            return cfg.d_head * (cfg.n_heads if self.head is None else 1)
        if self.kind == "result":
            return cfg.d_model * (cfg.n_heads if self.head is None else 1)
        return cfg.d_model


def _parse_position(text: str, spec: str) -> Position:
    if text in ("last", "all"):
        return text  # type: ignore[return-value]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    raise SiteError(f"invalid position {text!r} in site {spec!r}; {_POSITION_HELP}")


def as_site(spec: str | Site, model: HookedTransformer | None = None) -> Site:
    """Parse ``spec`` and, if a model is given, validate it against the model."""
    site = Site.parse(spec)
    return site.validate(model) if model is not None else site


def all_sites(
    model: HookedTransformer,
    kinds: tuple[str, ...] | list[str] | None = None,
    *,
    layers: list[int] | range | None = None,
    per_head: bool = True,
) -> list[Site]:
    """Every site of ``model`` of the given kinds (default: all), upstream first.

    Per-head kinds give one site per head when ``per_head`` (else one all-heads site).

    >>> from steerlens.testing import tiny_model
    >>> [s.name for s in all_sites(tiny_model(), ["resid_pre", "resid_post"])]
    ['blocks.0.hook_resid_pre', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_pre', \
'blocks.1.hook_resid_post']
    """
    kinds = tuple(kinds) if kinds is not None else KINDS
    for kind in kinds:
        if kind not in HOOKS:
            raise SiteError(f"unknown site kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    layers = range(model.cfg.n_layers) if layers is None else layers
    sites = []
    for layer in layers:
        for kind in BLOCK_ORDER:
            if kind not in kinds or (kind.startswith("mlp_") and model.cfg.attn_only):
                continue
            if kind in HEAD_KINDS and per_head:
                sites += [Site(kind, layer, h) for h in range(model.cfg.n_heads)]
            else:
                sites.append(Site(kind, layer))
    return [s.validate(model) for s in sites]
