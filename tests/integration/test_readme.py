"""The README's example, run as a reader would paste it: the one Python block between its
``example`` markers, verbatim, on the default model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import steerlens as sl

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("[start:example]", 1)[1].split("[end:example]", 1)[0]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    return code


def test_the_readme_example_runs(default_model, capsys):
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(_example(), str(README), "exec"), namespace)
    model, iv, metric = namespace["model"], namespace["iv"], namespace["metric"]
    assert isinstance(metric, sl.Metric) and metric.site == "blocks.15.hook_resid_post"
    assert isinstance(iv, sl.Intervention) and iv.method == "fishback" and iv.info["reached"]
    # the edit holds the share at 0.9, and the model is left without hooks
    tokens = model.to_tokens(namespace["prompt"])
    with torch.no_grad(), iv.apply(model):
        p = model(tokens)[0, -1].softmax(-1)
    share = float(p[namespace["went"]] / (p[namespace["went"]] + p[namespace["go"]]))
    assert abs(share - 0.9) < 1e-3
    assert not any(m._forward_hooks for m in model.modules())
    printed = capsys.readouterr().out
    assert printed.startswith("Metric('blocks.15.hook_resid_post'")
    assert "Tomorrow morning we will" in printed
