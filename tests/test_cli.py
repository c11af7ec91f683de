import json
import shutil
import subprocess
import sys

import onnx

import exphil
from conftest import REPLAYS, ROOT


def cli(*args):
    return subprocess.run([sys.executable, "-m", "exphil", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_compile_writes_both_graphs(tmp_path):
    res = cli("compile", "specs/lstm.toml", "--out", tmp_path / "lstm", "--window", 8)
    assert res.returncode == 0, res.stderr
    window, step = (onnx.load(tmp_path / "lstm" / f) for f in ("window.onnx", "step.onnx"))
    assert window.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 8
    assert {t.name for t in window.graph.initializer} == {t.name for t in step.graph.initializer}


def test_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "specs" / "mlp.toml").read_text().replace("hidden = 512", "hidden = -1"))
    for args, expected, code in [(("compile", bad, "--out", tmp_path / "x"), "field `hidden`", 1),
                                 (("compile", "specs/mlp.toml", "--out", "/dev/null/x"), "/dev/null/x", 1),
                                 (("train", "specs/mlp.toml", "--replays", tmp_path / "none", "--out", tmp_path / "r"),
                                  "no such replay file or directory", 1),
                                 (("eval", tmp_path, "--replays", REPLAYS), "not a finished run folder", 1),
                                 (("train", "--replays", REPLAYS, "--out", tmp_path / "r"), "give a spec file", 2),
                                 (("compile", "mlp"), "the following arguments are required: --out", 2),
                                 (("play", tmp_path, "--dolphin", "d", "--iso", "i", "--cpu-level", "3",
                                   "--connect-code", "AB#1"), "exclude each other", 2)]:
        res = cli(*args)
        assert res.returncode == code, (args, res.stderr)
        assert "Traceback" not in res.stderr and expected in res.stderr, res.stderr


def test_eval_reports_loss_and_baseline(mlp_run):
    res = cli("eval", mlp_run.path, "--replays", REPLAYS, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["games"] == 3 and out["frames"] > 20000 and not out["skipped"]
    assert 0 < out["loss"] < out["frequency"]["loss"]
    assert set(out["heads"]) == set(exphil.HEADS)
    # without --replays or --data: the run's own validation games, scored as when named
    val = mlp_run.info["replays"]["val"]
    res = cli("eval", mlp_run.path, "--json")
    assert res.returncode == 0, res.stderr
    own, named = json.loads(res.stdout), exphil.evaluate(mlp_run.path, val, quiet=True)
    assert own["games"] == len(val) > 0 and own["loss"] == named["loss"] and own["frames"] == named["frames"]



def test_eval_of_a_run_without_validation_games_asks_for_games(mlp_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(mlp_run.path, run)
    info = json.loads((run / "run.json").read_text())
    info["replays"]["val"] = []
    (run / "run.json").write_text(json.dumps(info))
    for judged in ([], ["--field-scores"]):
        res = cli("eval", run, *judged)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{run}: it has no validation games to judge it on; pass --replays or --data" in res.stderr


def test_specs_version_and_unknown_spec_names():
    res = cli("specs")
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert res.returncode == 0 and names == sorted(p.stem for p in (ROOT / "specs").glob("*.toml"))
    shown = cli("specs", "show", "gru").stdout
    assert exphil.parse_spec(shown) == exphil.load_spec(ROOT / "specs" / "gru.toml") and shown.startswith("# GRU")
    assert cli("--version").stdout.strip() == f"exphil {exphil.__version__}"
    res = cli("train", "grue", "--replays", REPLAYS, "--out", "/tmp/never")
    assert res.returncode == 2 and "grue: no such spec file, and no built-in spec of that name (built-in: attention" in res.stderr
