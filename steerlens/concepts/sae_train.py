"""Moved to :mod:`steerlens.sae_training`; the names resolve here, with a
:class:`DeprecationWarning`, until the next release."""

from typing import Any

from steerlens._moved import moved_attribute

_MOVED = {
    "REPORT_FILE": "steerlens.sae_training",
    "SaeTrainingConfig": "steerlens.sae_training",
    "harvest_tokens": "steerlens.sae_training",
    "held_out_windows": "steerlens.sae_training",
    "sae_quality": "steerlens.sae_training",
    "save_sae": "steerlens.sae_training",
    "token_windows": "steerlens.sae_training",
    "train_sae": "steerlens.sae_training",
}


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name, _MOVED)
