"""`steerlens evaluate / diagnose / where / steer` on the default model with a user's concept
file and contexts file, and their clear failures on bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from steerlens.cli import main

pytestmark = pytest.mark.integration

PAIRS = {"▁go": "▁went", "▁take": "▁took", "▁make": "▁made", "▁see": "▁saw", "▁come": "▁came"}
CONTEXTS = ["I really want to", "Tomorrow morning we will"]


@pytest.fixture(scope="module", autouse=True)
def _default_model_installed(default_model):
    """Fails clearly (through the shared fixture) if the default model is not installed."""


@pytest.fixture
def files(tmp_path):
    concept = tmp_path / "past.json"
    concept.write_text(json.dumps(PAIRS))
    contexts = tmp_path / "contexts.txt"
    contexts.write_text("\n".join(CONTEXTS) + "\n")
    return concept, contexts


def _run(argv, capsys) -> dict:
    assert main(argv + ["--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_evaluate_records(files, tmp_path, capsys):
    concept, contexts = files
    out_csv = tmp_path / "out" / "records.csv"
    argv = ["evaluate", "--concept", str(concept), "--contexts", str(contexts)]
    argv += ["--layers", "12", "--methods", "fishback", "euclidean", "caa", "--targets", "0.5"]
    out = _run(argv + ["--fluency-tokens", "4", "--out", str(out_csv)], capsys)
    records = pd.DataFrame(out["records"])
    assert len(records) == len(CONTEXTS) * 3
    needed = {"method", "layer", "context", "target_probability", "reached", "off_target_kl"}
    assert needed | {"off_target_kl_merged", "perplexity", "rho"} <= set(records.columns)
    assert (records.clean_probability < 0.5).all()  # these contexts continue with a base form
    fish = records[records.method == "fishback"].set_index("context")
    euc = records[records.method == "euclidean"].set_index("context")
    assert fish.reached.all() and ((fish.probability - 0.5).abs() < 1e-2).all()
    assert (fish.off_target_kl < euc.off_target_kl).all()
    assert (records.perplexity > 1).all()
    assert out["fixed_methods_fitted_in_sample"] is True
    assert len(pd.read_csv(out_csv)) == len(records)
    assert not list(out_csv.parent.glob(".*partial"))


def test_diagnose_rho(files, capsys):
    concept, contexts = files
    argv = ["diagnose", "--concept", str(concept), "--contexts", str(contexts), "--layers", "12"]
    out = _run(argv + ["--methods", "fishback", "euclidean", "depth0"], capsys)
    rows = pd.DataFrame(out["records"])
    fish, euc = rows[rows.method == "fishback"], rows[rows.method == "euclidean"]
    assert ((fish.rho - 1).abs() < 1e-4).all()
    assert (euc.rho > 1).all()
    assert (euc.rho <= euc.kantorovich_bound * (1 + 1e-6)).all()  # ρ(g) never exceeds the bound
    assert set(rows.implicit_metric) >= {"I", "full pullback Fisher (off-target)"}


def test_where_ranks_every_layer(files, capsys):
    concept, contexts = files
    argv = ["where", "--concept", str(concept), "--contexts", str(contexts)]
    out = _run(argv + ["--kinds", "resid_post"], capsys)
    sites = pd.DataFrame(out["sites"])
    assert len(sites) == 30 and list(sites["rank"]) == sorted(sites["rank"])
    assert (sites.kl_per_unit > 0).all() and (sites.contexts == len(CONTEXTS)).all()


def test_steer_generates(files, tmp_path, capsys):
    concept, _ = files
    argv = ["steer", "--method", "fishback", "--concept", str(concept), "--layer", "12"]
    argv += ["--prompt", CONTEXTS[0], "--max-new-tokens", "6", "--save", str(tmp_path / "iv")]
    out = _run(argv, capsys)
    assert out["reached"] and out["share_steered"] >= 0.9 - 1e-3 > out["share_clean"]
    assert out["steered"] != out["clean"] and out["steered"].startswith(CONTEXTS[0])
    assert (tmp_path / "iv").is_dir()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("multi_token", "not a single token"),
        ("missing_concept", "does not exist"),
        ("not_json", "is not JSON"),
        ("empty_contexts", "no non-empty lines"),
        ("long_context", "past the model's context"),
        ("bad_layer", "out of range"),
        ("bad_target", "targets must be probabilities"),
        ("caa_without_pairs", "give --train-contexts"),
    ],
)
def test_bad_input_fails_clearly(case, message, files, tmp_path, capsys):
    concept, contexts = files
    out_csv = tmp_path / "never.csv"
    args = {"concept": str(concept), "contexts": str(contexts), "layers": ["12"]}
    extra: list[str] = []
    command = "evaluate"
    if case == "multi_token":
        (tmp_path / "bad.json").write_text(json.dumps({"▁go": "▁wentzzqx"}))
        args["concept"] = str(tmp_path / "bad.json")
    elif case == "missing_concept":
        args["concept"] = str(tmp_path / "nope.json")
    elif case == "not_json":
        (tmp_path / "bad.json").write_text("{not json")
        args["concept"] = str(tmp_path / "bad.json")
    elif case == "empty_contexts":
        (tmp_path / "empty.txt").write_text("\n\n")
        args["contexts"] = str(tmp_path / "empty.txt")
    elif case == "long_context":
        (tmp_path / "long.txt").write_text("word " * 9000 + "\n")
        args["contexts"] = str(tmp_path / "long.txt")
    elif case == "bad_layer":
        args["layers"] = ["99"]
    elif case == "bad_target":
        extra = ["--targets", "1.5"]
    elif case == "caa_without_pairs":
        command = "steer"
    if command == "steer":
        argv = ["steer", "--method", "caa", "--concept", args["concept"], "--layer", "12"]
        argv += ["--prompt", CONTEXTS[0]]
    else:
        argv = [command, "--concept", args["concept"], "--contexts", args["contexts"]]
        argv += ["--layers", *args["layers"], "--out", str(out_csv), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out_csv.exists()
