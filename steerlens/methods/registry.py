"""The method registry: every steering method by name, with its frozen config, its fit function,
what it fits on and its implicit metric.

Each method module registers its own entries with :func:`register_method` (SAELens'
``register_sae_class`` is the model); :func:`fit`, :func:`list_methods`, the CLI and the
matched protocol read the same entries. A method's options are its config's fields, checked by
the config's own constructor; its inputs (the data it fits on) are the fields of
:class:`FitInputs`, checked against the entry's ``needs`` and ``input_types``.

>>> sorted(list_methods()["name"])[:3]
['actadd', 'caa', 'dual']
>>> method_spec("caa").needs
('pairs',)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from steerlens.concepts.base import Concept
from steerlens.errors import InputError, MethodError
from steerlens.methods.intervention import Intervention
from steerlens.prompts import PromptsLike

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class FitInputs:
    """The data a method fits on. ``concept``: what to raise (a token-set concept, a probe, an
    SAE feature); ``prompt``: the prompt(s) to steer or tune on; ``pairs``: contrast pairs (a
    :class:`~steerlens.concepts.pairs.ContrastPairs`, or one (plus, minus) prompt pair for
    ActAdd); ``stop_on``: the concept whose target stops an iterative run (default ``concept``);
    ``concepts``: one concept per tuning prompt (multisite)."""

    concept: Concept | None = None
    prompt: PromptsLike | None = None
    pairs: Any = None
    stop_on: Concept | None = None
    concepts: Sequence[Concept] | None = None

    def given(self) -> tuple[str, ...]:
        """The names of the inputs that are set."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)


#: the names :func:`fit` takes as inputs (everything else is a config field)
INPUT_NAMES = tuple(f.name for f in dataclasses.fields(FitInputs))

FitFn = Callable[["HookedTransformer", Any, FitInputs], Intervention]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method. ``config``: its frozen config dataclass; ``fit``: (model, config,
    inputs) → :class:`Intervention`, called once inputs are checked; ``needs``: the inputs it
    must have; ``accepts``: optional further inputs; ``input_types``: the types an input must
    have (checked with ``isinstance``); ``iterative``: an iterative run at one site (its full
    run is :func:`~steerlens.methods.iterative.steer_iteratively`)."""

    name: str
    config: type
    fit: FitFn
    needs: tuple[str, ...]
    implicit_metric: str
    description: str
    accepts: tuple[str, ...] = ()
    input_types: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    iterative: bool = False

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config):
            raise MethodError(f"{self.name}: config must be a dataclass, got {self.config!r}")
        unknown = (set(self.needs) | set(self.accepts) | set(self.input_types)) - set(INPUT_NAMES)
        if unknown:
            raise MethodError(
                f"{self.name}: unknown inputs {sorted(unknown)}; valid: {INPUT_NAMES}"
            )

    @property
    def options(self) -> tuple[str, ...]:
        """The config's field names: the method's options."""
        return tuple(f.name for f in dataclasses.fields(self.config))

    @property
    def fits_on(self) -> str:
        """What it fits on, in words: its needed inputs (optional ones in brackets)."""
        return ", ".join([*self.needs, *(f"[{a}]" for a in self.accepts)])

    def make_config(self, **options: Any) -> Any:
        """The config with ``options``; an unknown or missing option is an InputError naming the
        valid ones."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise InputError(
                f"{self.name} has no options {sorted(unknown)}; its options: "
                f"{', '.join(self.options)}"
            )
        missing = [
            f.name
            for f in dataclasses.fields(self.config)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in options
        ]
        if missing:
            raise InputError(
                f"{self.name} needs {', '.join(f'{n}=' for n in missing)}; its options: "
                f"{', '.join(self.options)}"
            )
        try:
            return self.config(**options)
        except TypeError as err:
            raise InputError(
                f"bad options for {self.name}: {err}; its options: {', '.join(self.options)}"
            ) from None

    def check_inputs(self, inputs: FitInputs) -> None:
        """Every needed input given, none it does not use, each of its declared type."""
        given = set(inputs.given())
        missing = [n for n in self.needs if n not in given]
        if missing:
            raise InputError(
                f"{self.name} needs {', '.join(f'{n}=' for n in self.needs)}; missing "
                f"{', '.join(f'{n}=' for n in missing)}"
            )
        unused = given - set(self.needs) - set(self.accepts)
        if unused:
            raise InputError(
                f"{self.name} does not use {', '.join(f'{n}=' for n in sorted(unused))}; it fits "
                f"on {self.fits_on}"
            )
        for name, kind in self.input_types.items():
            value = getattr(inputs, name)
            if value is not None and not isinstance(value, kind):
                want = (
                    kind.__name__
                    if isinstance(kind, type)
                    else " or ".join(k.__name__ for k in kind)
                )
                raise InputError(f"{self.name} needs {name}= a {want}, got {type(value).__name__}")


def one_layer(method: str, layer: Any, verb: str = "reads") -> int:
    """``layer`` if it is one int layer (not a bool, not a list), else an InputError naming the
    method: for the methods whose config takes one layer."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InputError(f"{method} {verb} one layer: pass layer= an int, got {layer!r}")
    return layer


REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a name registers once)."""
    if spec.name in REGISTRY:
        raise MethodError(f"method {spec.name!r} is registered already")
    REGISTRY[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The registered entry of ``name``."""
    if name not in REGISTRY:
        raise MethodError(f"unknown method {name!r}; registered methods: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def list_methods() -> pd.DataFrame:
    """One row per registered method: what it fits on, its implicit metric, what it does, its
    options and whether it is iterative."""
    return pd.DataFrame(
        [
            {
                "name": s.name,
                "fits_on": s.fits_on,
                "implicit_metric": s.implicit_metric,
                "description": s.description,
                "options": ", ".join(s.options),
                "iterative": s.iterative,
            }
            for s in REGISTRY.values()
        ]
    )


def method_config(name: str, **options: Any) -> Any:
    """The frozen config of method ``name`` with ``options`` (e.g. ``method_config("fishback",
    site="resid_post.12", damping=1e-2)``)."""
    return method_spec(name).make_config(**options)


def fit(
    model: HookedTransformer,
    method: str,
    config: Any = None,
    *,
    concept: Concept | None = None,
    prompt: PromptsLike | None = None,
    pairs: Any = None,
    stop_on: Concept | None = None,
    concepts: Sequence[Concept] | None = None,
    **options: Any,
) -> Intervention:
    """Fit ``method`` to an :class:`Intervention`.

    ``config``: the method's config (``method_config(method, ...)`` or its class); ``options``
    are its fields given directly (``fit(model, "caa", pairs=pairs, layer=15)``), applied over
    ``config`` if both are given. The inputs are those of :class:`FitInputs`; ``list_methods()``
    shows what each method needs and its options. An iterative method's whole run (trajectory,
    checkpoints, timings) is :func:`~steerlens.methods.iterative.steer_iteratively`'s
    :class:`~steerlens.methods.run.SteeringRun`; ``fit`` returns its intervention.
    """
    spec = method_spec(method)
    if config is None:
        cfg = spec.make_config(**options)
    elif not isinstance(config, spec.config):
        raise InputError(
            f"{method} takes a {spec.config.__name__} config, got {type(config).__name__}"
        )
    else:
        unknown = set(options) - set(spec.options)
        if unknown:
            raise InputError(
                f"{method} has no options {sorted(unknown)}; its options: {', '.join(spec.options)}"
            )
        cfg = dataclasses.replace(config, **options) if options else config
    inputs = FitInputs(concept, prompt, pairs, stop_on, concepts)
    spec.check_inputs(inputs)
    return spec.fit(model, cfg, inputs)
