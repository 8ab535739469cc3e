"""The study's wide-grid stage: fixed-direction searches that stopped at the grid's last point,
searched again on a grid extended by a rule fixed before the stage runs.

The main stage finds each fixed direction's scale on a grid that ends at :data:`GRID_END`
(:func:`~steerlens.evaluation.strength_search`). A record it leaves unreached with the peak
share at that last point says only that the share was still rising where the grid stopped. The
rule, which reads the main stage's records and the clean model and nothing the new searches
find:

- a (unit, fixed method) is redone when one of its targets is unreached with the peak at the
  grid's end (its ``strength`` is :data:`GRID_END`);
- its grid is extended an octave at a time until the share peaks before the end, the highest
  target is reached, or the edit's norm reaches :data:`WIDE_FACTOR` times the norm of the clean
  residual at the site (the prediction position). Past a few times that norm a pre-norm
  model's later blocks see mostly the added direction, so the share settles toward its limit;
- only the targets that were unreached are rewritten (a reached target's first crossing lies
  on the main grid, which the extended grid begins with); every other record of the unit
  stands as the main stage wrote it. A redone record keeps the main record's ρ along FishBack's
  path (it does not depend on the scale) and adds ``grid_end``, the extended grid's last scale.

The stage is a run folder of its own (:mod:`steerlens.experiments.runner`), ``wide/`` inside
the main folder, with the main folder's unit keys: resumable, sharded over ``torchrun`` ranks,
and a unit the main stage has not finished yet is left for a later run.
:func:`apply_wide` puts its records in place of the main ones (the report does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from steerlens.errors import InputError
from steerlens.evaluation import strength_grid
from steerlens.experiments.baselines import FIXED
from steerlens.experiments.matched import UnitRecords, edit_norm, shares_of
from steerlens.experiments.runner import MANIFEST, read_all_done, run_units
from steerlens.experiments.study import Study, StudyConfig, UnitInputs

if TYPE_CHECKING:
    from steerlens._tl import HookedTransformer
    from steerlens.methods.intervention import Intervention

#: the main stage's last grid scale (``strength_search``'s default ``max_scale``)
GRID_END = strength_grid()[-1]
#: the extended grid ends where the edit's norm is this many clean residual norms
WIDE_FACTOR = 16.0
#: the stage's folder inside the main study folder
WIDE_FOLDER = "wide"
#: what identifies a record within a study
RECORD_KEY = ("concept", "context_index", "layer", "method", "target_probability")
#: the main record's share at the grid's end and the refitted direction's must agree this well
SHARE_TOLERANCE = 1e-4


def stopped_at_grid_end(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per fixed method of one unit's main records, the targets left unreached with the peak
    share at the grid's last point."""
    out: dict[str, list[float]] = {}
    for row in rows:
        if row["method"] not in FIXED or bool(row["reached"]):
            continue
        if float(row["strength"]) >= GRID_END * (1 - 1e-9):
            out.setdefault(row["method"], []).append(float(row["target_probability"]))
    return out


def main_config(folder: Path) -> tuple[dict[str, Any], StudyConfig]:
    """The main study folder's manifest and the :class:`StudyConfig` it was written with."""
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} is not a study folder: no {MANIFEST}")
    manifest = json.loads(path.read_text())
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in manifest["study"].items()
    }
    return manifest, StudyConfig(**fields)


class WideStage:
    """The wide-grid stage of the study in ``folder`` on ``model`` (the module docstring)."""

    def __init__(self, model: HookedTransformer, folder: str | Path) -> None:
        self.main = Path(folder)
        manifest, cfg = main_config(self.main)
        self.study = Study(model, cfg)
        mine = self.study.manifest()
        theirs = {k: v for k, v in manifest.items() if k != "units"}
        if json.loads(json.dumps(mine, default=str)) != theirs:
            raise InputError(
                f"{self.main} was written by another model or steerlens version "
                f"({theirs.get('model')!r}, {theirs.get('steerlens')!r}); run the wide stage "
                f"with the main stage's ({mine['model']!r}, {mine['steerlens']!r})"
            )
        self.units = list(manifest["units"])
        self.done = read_all_done(self.main, self.units)

    @property
    def folder(self) -> Path:
        return self.main / WIDE_FOLDER

    def manifest(self) -> dict[str, Any]:
        rule = {"grid_end": GRID_END, "wide_factor": WIDE_FACTOR}
        return {**self.study.manifest(), "stage": "wide grid", "rule": rule}

    def ready(self, key: str) -> bool:
        return key in self.done

    def work(self, key: str) -> list[dict[str, Any]]:
        rows = self.done[key]
        if not stopped_at_grid_end(rows):
            return []
        return widened_records(self.study.model, self.study.unit(key), rows, key)


def widened_records(
    model: HookedTransformer, u: UnitInputs, rows: list[dict[str, Any]], key: str = ""
) -> list[dict[str, Any]]:
    """The records the rule of the module docstring redoes for one unit: ``u`` its inputs,
    ``rows`` its main-stage records (``key`` names it in errors)."""
    redo = stopped_at_grid_end(rows)
    if not redo:
        return []
    unit = UnitRecords(model, u.ctx, u.layer, u.settings, u.fixed, u.merge, u.common)
    main = {(r["method"], float(r["target_probability"])): r for r in rows}
    reach = WIDE_FACTOR * unit.point.residual_norm
    out, ends = [], []
    for name, targets in redo.items():
        iv = u.fixed[name]
        size = edit_norm(iv.scaled(1.0))
        if not size > 0:
            raise InputError(f"unit {key!r}, {name}: no added vector to size the grid by")
        _check_share(unit, key, name, iv, main[(name, targets[0])])
        found = unit.search(iv, extend_to=max(reach / size, GRID_END))
        for target in targets:
            unit.path_rho = {target: {name: main[(name, target)]["rho_path"]}}
            out.append(unit.fixed_record(name, iv, found[target]))
            ends.append(found[target].grid_end)
    unit.generate()
    return [record | {"grid_end": end} for record, end in zip(out, ends, strict=True)]


def _check_share(
    unit: UnitRecords, key: str, name: str, iv: Intervention, row: dict[str, Any]
) -> None:
    """The refitted direction must be the main stage's: its share at the grid's end must be
    the main record's peak share."""
    with shares_of(unit.model, unit.tokens, unit.ctx, iv) as (one, _):
        share = one(GRID_END)
    wanted = float(row["peak_share"])
    if not math.isclose(share, wanted, rel_tol=1e-3, abs_tol=SHARE_TOLERANCE):
        raise InputError(
            f"unit {key!r}, {name}: the refitted direction's share at scale {GRID_END:g} is "
            f"{share:.6g}, the main stage recorded {wanted:.6g}; the fit is not the main "
            "stage's (another model, data or version?)"
        )


def run_wide(
    model: HookedTransformer, folder: str | Path, *, progress: bool = True
) -> pd.DataFrame | None:
    """Run (or resume) the wide-grid stage of the study in ``folder`` (into ``folder/wide``).
    Returns its merged records on rank 0 once every unit of the main stage has had its turn,
    else None."""
    from tqdm.auto import tqdm

    stage = WideStage(model, folder)
    bar = tqdm(total=len(stage.units), disable=not progress, desc="wide grid")

    def advance(_: str) -> None:
        bar.update()

    out = run_units(
        stage.folder, stage.manifest(), stage.units, stage.work, progress=advance, ready=stage.ready
    )
    bar.close()
    return out


def wide_records(folder: str | Path) -> tuple[pd.DataFrame, int] | None:
    """The wide stage's redone records under the study ``folder`` and how many units it has
    checked; None where the stage has not been run."""
    wide = Path(folder) / WIDE_FOLDER
    if not (wide / MANIFEST).is_file():
        return None
    units = json.loads((wide / MANIFEST).read_text())["units"]
    done = read_all_done(wide, units)
    rows = [r for key in units if key in done for r in done[key]]
    return pd.DataFrame(rows), len(done)


def apply_wide(records: pd.DataFrame, wide: pd.DataFrame) -> pd.DataFrame:
    """``records`` with each record the wide stage redid replaced by its redone one (matched on
    :data:`RECORD_KEY`; ``stage`` is ``"wide grid"`` on those, ``"main"`` on the rest).
    :class:`InputError` for a redone record that matches no main record."""
    out = records.assign(stage="main")
    if wide.empty:
        return out
    index = out.set_index(list(RECORD_KEY)).index
    keys = wide.set_index(list(RECORD_KEY)).index
    missing = keys.difference(index)
    if len(missing):
        raise InputError(f"{len(missing)} wide-grid records match no main record: {missing[0]}")
    keep = out[~index.isin(keys)]
    merged = pd.concat([keep, wide.assign(stage="wide grid")], ignore_index=True)
    order = {k: i for i, k in enumerate(index)}
    position = [order[k] for k in merged.set_index(list(RECORD_KEY)).index]
    return merged.iloc[sorted(range(len(merged)), key=position.__getitem__)].reset_index(drop=True)


__all__ = [
    "GRID_END",
    "WIDE_FACTOR",
    "WideStage",
    "apply_wide",
    "run_wide",
    "stopped_at_grid_end",
    "widened_records",
    "wide_records",
]
