"""Linear probes: logistic regression on activations at a site; a probe is a concept c = wᵀh + b.

Fitting uses scikit-learn's :class:`~sklearn.linear_model.LogisticRegression` on raw activations
(so ``w`` lives in the site's own coordinates), with a held-out split whose accuracy is reported.

>>> import torch
>>> h = torch.cat([torch.randn(40, 4) + 2, torch.randn(40, 4) - 2]).double()
>>> y = torch.cat([torch.ones(40), torch.zeros(40)])
>>> probe = fit_probe(h, y, site="blocks.0.hook_resid_post")
>>> probe.test_accuracy > 0.9, probe.weight.shape
(True, torch.Size([4]))
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from steerlens.activations import harvest
from steerlens.artifacts import check_dtype, load_artifact, save_artifact
from steerlens.errors import ArtifactError, ConceptError, InputError, NonFiniteError
from steerlens.prompts import PromptsLike, as_prompts
from steerlens.sites import Site, as_site

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer


@dataclass(frozen=True)
class LinearProbe:
    """A logistic-regression probe at ``site``: P(concept | h) = σ(wᵀh + b).

    ``test_accuracy`` is measured on a held-out split of ``n_test`` examples (NaN when the probe
    was built without one).
    """

    site: str
    weight: Float[Tensor, " dim"]
    bias: float
    name: str = "probe"
    train_accuracy: float = math.nan
    test_accuracy: float = math.nan
    n_train: int = 0
    n_test: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight.dim() != 1 or not self.weight.is_floating_point():
            raise InputError(f"probe weight must be a 1-D float tensor, got {self.weight.shape}")
        if not torch.isfinite(self.weight).all() or not math.isfinite(self.bias):
            raise NonFiniteError(f"probe {self.name!r} has NaN or inf parameters")
        if float(self.weight.norm()) == 0:
            raise ConceptError(f"probe {self.name!r} has a zero weight: it reads nothing")

    def __repr__(self) -> str:
        return (
            f"LinearProbe({self.name!r}, site={self.site!r}, d={self.weight.shape[0]}, "
            f"test_accuracy={self.test_accuracy:.3f}, n_train={self.n_train})"
        )

    def _repr_html_(self) -> str:
        row = {
            "name": self.name,
            "site": self.site,
            "d": self.weight.shape[0],
            "test_accuracy": self.test_accuracy,
            "n_train": self.n_train,
        }
        return pd.DataFrame([row]).to_html(index=False, float_format="%.3f")

    # the Concept interface
    def value(
        self, act: Float[Tensor, "... dim"], logits: Tensor | None = None
    ) -> Float[Tensor, "..."]:
        """The probe's logit wᵀh + b (differentiable in ``act``)."""
        if act.shape[-1] != self.weight.shape[0]:
            raise InputError(
                f"probe {self.name!r} reads {self.weight.shape[0]}-dim activations at "
                f"{self.site}, got shape {tuple(act.shape)}"
            )
        return act @ self.weight.to(act) + self.bias

    def target_value(self, probability: float) -> float:
        """The probe logit log(p/(1−p)) of a target probability."""
        if not 0 < probability < 1:
            raise InputError(f"target probability must be in (0, 1), got {probability}")
        return math.log(probability / (1 - probability))

    def probability(self, value: float) -> float:
        return 1 / (1 + math.exp(-value))

    def off_target(self) -> None:
        """None: the concept is read at the site, so its off-target price is the whole
        next-token distribution's."""
        return None

    def check_site(self, site: str | Site, model: HookedTransformer) -> None:
        """Raise :class:`ConceptError` unless this probe reads ``site`` of ``model``."""
        s = as_site(site, model)
        mine = as_site(self.site, model)
        if (s.kind, s.layer, s.head) != (mine.kind, mine.layer, mine.head):
            raise ConceptError(f"probe {self.name!r} was trained at {self.site}, not {s.name}")
        if s.dim(model) != self.weight.shape[0]:
            raise ConceptError(
                f"probe {self.name!r} has width {self.weight.shape[0]} but {s.name} has "
                f"width {s.dim(model)}"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {
            "site": self.site,
            "bias": self.bias,
            "name": self.name,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "dtype": str(self.weight.dtype),
            "info": self.info,
        }
        return save_artifact(path, "probe", {"weight": self.weight}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LinearProbe:
        tensors, meta = load_artifact(path, "probe")
        if set(tensors) != {"weight"}:
            raise ArtifactError(f"probe artifact {path} holds {sorted(tensors)}, not 'weight'")
        try:
            return cls(
                site=str(meta["site"]),
                weight=tensors["weight"].to(check_dtype(meta["dtype"])),
                bias=float(meta["bias"]),
                name=str(meta["name"]),
                train_accuracy=float(meta["train_accuracy"]),
                test_accuracy=float(meta["test_accuracy"]),
                n_train=int(meta["n_train"]),
                n_test=int(meta["n_test"]),
                info=dict(meta.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"probe artifact {path} has bad metadata: {err}") from None


def fit_probe(
    acts: Float[Tensor, "n dim"],
    labels: Tensor | np.ndarray | list,
    *,
    site: str,
    name: str = "probe",
    test_fraction: float = 0.25,
    c: float = 1.0,
    seed: int = 0,
) -> LinearProbe:
    """Logistic regression (L2, inverse strength ``c``) on ``acts`` with 0/1 ``labels``; a
    stratified ``test_fraction`` is held out and its accuracy reported."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = acts.detach().double().cpu().numpy()
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(int).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise InputError(f"need acts [n, dim] and n labels, got {x.shape} and {len(y)} labels")
    if not np.isfinite(x).all():
        raise NonFiniteError("probe activations contain NaN or inf")
    counts = np.bincount(y, minlength=2)
    if set(np.unique(y)) - {0, 1} or counts.min() < 2:
        raise ConceptError(f"a probe needs labels 0 and 1, at least two of each; got {counts}")
    if not 0 <= test_fraction < 1:
        raise InputError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if test_fraction > 0:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=y
        )
    else:
        x_tr, y_tr, x_te, y_te = x, y, x[:0], y[:0]
    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(x_tr, y_tr)
    test_acc = float(clf.score(x_te, y_te)) if len(y_te) else math.nan
    return LinearProbe(
        site=site,
        weight=torch.tensor(clf.coef_[0], dtype=acts.dtype, device=acts.device),
        bias=float(np.asarray(clf.intercept_).ravel()[0]),
        name=name,
        train_accuracy=float(clf.score(x_tr, y_tr)),
        test_accuracy=test_acc,
        n_train=len(y_tr),
        n_test=len(y_te),
        info={"c": c, "seed": seed},
    )


def train_probe(
    model: HookedTransformer,
    site: str | Site,
    positive: PromptsLike,
    negative: PromptsLike,
    **kwargs: Any,
) -> LinearProbe:
    """A probe at ``site`` separating the activations of ``positive`` prompts (label 1) from
    ``negative`` ones (label 0); keyword arguments as :func:`fit_probe`."""
    site = as_site(site, model)
    pos, neg = as_prompts(model, positive), as_prompts(model, negative)
    acts = harvest(model, pos + neg, site)
    labels = [1] * len(pos) + [0] * len(neg)
    return fit_probe(acts, labels, site=site.name, **kwargs)
