"""bench.py runs end to end and writes honest numbers (no timing is asserted beyond sanity)."""

import json
import subprocess
import sys

import numpy as np
import pytest

import exphil
from conftest import REPLAYS, ROOT, SHARED, SPECS, spec_text


def bench(*args):
    res = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_latency_table(tmp_path):
    """A cell for every spec x available provider x precision (and the window re-run); numbers
    positive, p99 >= p50; providers not installed are reported as absent, not a crash."""
    lstm = tmp_path / "lstm.toml"  # with independent heads: a window graph that can be re-run to play
    lstm.write_text(spec_text("lstm", "independent"))
    out = bench("--specs", "specs/mlp.toml", lstm, "--providers", "cpu", "cuda", "coreml",
                "--json", tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert set(data["step"]) == {"mlp", "lstm"} and "CPUExecutionProvider" in data["machine"]["providers"]
    assert set(data["step"]["lstm"]["cells"]) == {"cpu/fp32", "cpu/int8", "cpu/int4", "cpu/fp32 re-run", "cuda",
                                                  "coreml"}
    assert set(data["step"]["mlp"]["cells"]) == {"cpu/fp32", "cpu/int8", "cpu/int4", "cuda", "coreml"}  # no re-run
    sizes = data["step"]["mlp"]["bytes"]
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"]
    absent = {p for p in ("cuda", "coreml") if exphil.PROVIDERS[p] not in data["machine"]["providers"]}
    for row in data["step"].values():
        assert {p for p in ("cuda", "coreml") if row["cells"][p] == {"absent": True}} == absent
        for name, cell in row["cells"].items():
            if "absent" not in cell:
                assert 0 < cell["p50_ms"] <= cell["p99_ms"] and cell["calls"] >= 300, name
    assert f"Not available here: {', '.join(sorted(absent))}" in out if absent else "Not available here" not in out
    assert "cpu/int8 p50 ms" in out and "headroom" in out
    md = bench("--specs", "specs/mlp.toml", "--providers", "cpu", "--markdown", "--hidden", "64", "128",
               "--heads", "independent", "autoregressive")
    assert "| spec | params | cpu/fp32 p50 ms | cpu/int8 p50 ms | cpu/int4 p50 ms | headroom |" in md
    assert "| mlp (64 wide) independent |" in md and "| mlp (128 wide) independent |" in md
    assert "| mlp (128 wide) autoregressive |" in md


def test_heads_cost_times_each_kind_of_heads_in_turn(tmp_path):
    """The same spec's step graph with independent heads without and with Markov tables, and with
    autoregressive ones: each timed on the same frames, the ratios to the first kind's p50."""
    out = bench("--heads-cost", "--specs", "specs/mlp.toml", "--seconds", "0.2", "--json", tmp_path / "h.json")
    row = json.loads((tmp_path / "h.json").read_text())["heads_cost"]["mlp"]
    assert list(row) == ["independent, no Markov", "independent, Markov", "autoregressive, Markov"]
    assert all(0 < c["p50_ms"] <= c["p99_ms"] and c["calls"] >= 3000 for c in row.values())
    assert row["independent, no Markov"]["p50_ratio"] == 1.0
    assert "| mlp | " in out and "(1.00x)" in out


def test_architecture_table(tmp_path):
    """A fixed number of optimizer steps per spec; ranked by the margin under the Markov
    baseline, with the copy baseline beside each accuracy."""
    out = bench("--train", "--replays", REPLAYS, "--max-steps", "3", "--specs", "specs/mlp.toml",
                "specs/gated_ssm.toml", "--json", tmp_path / "a.json")
    rows = json.loads((tmp_path / "a.json").read_text())["architectures"]
    assert {r["spec"] for r in rows} == {"mlp", "gated_ssm"} and all(r["steps"] == 3 for r in rows)
    assert rows[0]["margin"] >= rows[1]["margin"]
    for r in rows:
        assert abs(r["margin"] - (1 - r["val_loss"] / r["markov_loss"])) < 1e-9
        assert 0.5 < r["copy_accuracy"]["main_x"] < 1 and 0.5 < r["copy_button_f1"] < 1
        assert set(r["field_scores"]["rows"]) == {"bot", "copy", "Markov", "most common class"}
    # the field scores of every row: the same validation frames, so the same baselines
    assert rows[0]["field_scores"]["frames"] == rows[1]["field_scores"]["frames"] > 0
    assert rows[0]["field_scores"]["rows"]["copy"] == rows[1]["field_scores"]["rows"]["copy"]
    assert "| rank | spec | val loss | markov | vs markov |" in out and "3 optimizer steps" in out
    assert "| spec | hal_buttons | mimic_buttons | main_stick |" in out and "| mlp | " in out.split("field scores")[1]


def test_throughput_without_torch(tmp_path):
    """--throughput --vs-torch where PyTorch cannot be imported: one line says so, and exphil's
    frames/s and % of the MatMul peak are still measured."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench.py"), "--throughput", "--vs-torch",
                          "--specs", "specs/mlp.toml", "--steps", "1", "--seconds", "0", "--json", tmp_path / "t.json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert [l for l in res.stdout.splitlines() if "PyTorch" in l] == [
        "--vs-torch: PyTorch is not installed here (pip install torch); measuring exphil alone"]
    data = json.loads((tmp_path / "t.json").read_text())
    row = data["throughput"]["mlp"]
    assert "torch" not in row and "first_loss" not in row and row["frames_per_s"] > 0
    assert data["matmul_peak"]["gflops"] > 0 and 0 < row["percent_of_peak"] < 100
    assert row["train_flops_per_frame"] > 0


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import bench
    return bench


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_torch_reference_same_model(spec, bench_module, tmp_path):
    """The PyTorch models are exphil's models, for every shipped spec (small: hidden 32, window
    7, batch 4, the last window partly padding), with every parameter moved off its initial
    value so that each one's mapping counts: the same loss, and the same gradient for every
    exphil parameter."""
    pytest.importorskip("torch")
    import exphil
    import bench_torch

    if not bench_torch.supports(exphil.load_spec(spec)):
        pytest.skip(f"no PyTorch reference for {spec.stem}")
    small = exphil.override_spec(exphil.load_spec(spec), window_size=7, hidden=32)
    model, batch = bench_module.throughput_setup(small, batch_size=4, window=7)
    assert 0 < batch["mask"].mean() < 1
    rng = np.random.default_rng(0)
    model.load({k: v + rng.normal(0, 0.1, v.shape) for k, v in model.params.items()})
    trainer, reference = exphil.Trainer(model, tmp_path / "t"), bench_torch.Trainer(model)
    first = bench_module.first_losses(trainer, reference, batch)
    assert first["agree"], first
    trainer.step(dict(batch))  # onnxruntime keeps the step's gradients until the next one
    reference.step(reference.tensors(batch))
    ours = reference.gradients()
    assert set(ours) == set(model.params)
    for name, grad in ours.items():
        theirs = trainer.state.parameters[name].grad
        assert np.abs(grad - theirs).max() <= 1e-4 * np.abs(theirs).max() + 1e-7, name


def test_vs_torch_refuses_different_models(bench_module, capsys):
    """A reference model whose first loss is not exphil's is not timed: no ratio, and the row
    prints both losses and says the models differ."""
    import exphil

    class Different:  # stands in for bench_torch
        supports = staticmethod(lambda spec: True)

        class Trainer:
            def __init__(self, model):
                pass

            tensors = staticmethod(dict)

            def evaluate(self, batch):
                return 123.0

    small = exphil.override_spec(exphil.load_spec(ROOT / "specs" / "mlp.toml"), hidden=32)
    row = bench_module.train_throughput(small, batch_size=2, window=4, min_steps=1, seconds=0, reference=Different)
    assert not row["first_loss"]["agree"] and row["first_loss"]["torch"] == 123.0
    assert "torch" not in row and "exphil_over_torch" not in row and row["frames_per_s"] > 0
    bench_module.add_percent_of_peak(row, {"gflops": 100.0})
    bench_module.print_throughput_row("mlp", row, header=False, compared=True)
    assert "models differ: exphil " in capsys.readouterr().out


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared replays in {SHARED}")
def test_learning_curve_and_architecture_table_on_a_dataset_split_by_player(tmp_path):
    """Tiny sizes: a dataset of 7 netplay games (4 of one player), one held out; the learning
    curve trains on 1 and then all training games, scored on the same validation game (players
    never trained on); the architecture table takes --data and --split-by player too."""
    folder = tmp_path / "replays"
    folder.mkdir()
    for r in sorted(SHARED.glob("Walnut356-SlippiStats__Game_*.slp"))[:4] + sorted(SHARED.glob(
            "project-slippi-slippi-js__*.slp")) + [SHARED / "PMcca-go-slippi__metadata.slp"]:
        (folder / r.name).symlink_to(r)
    exphil.ingest(folder, tmp_path / "data")
    out = bench("--learning-curve", "--data", tmp_path / "data", "--games", "1", "all", "--max-steps", "2",
                "--batch-size", "512", "--specs", "specs/mlp.toml", "--json", tmp_path / "c.json")
    rows = json.loads((tmp_path / "c.json").read_text())["learning_curve"]
    assert [r["train_games"] for r in rows] == [1, 6] and all(r["steps"] == 2 for r in rows)
    assert rows[0]["val_games"] == rows[1]["val_games"] == 1 and rows[0]["val_frames"] == rows[1]["val_frames"]
    assert rows[0]["train_frames"] < rows[1]["train_frames"]
    for r in rows:
        assert abs(r["margin"] - (1 - r["val_loss"] / r["markov_loss"])) < 1e-9
        assert 0.5 < r["copy_accuracy"]["main_x"] < 1 and 0 < r["common_accuracy"]["main_x"] < 1
    assert "| training games | training frames | val loss | markov |" in out and "split by player" in out
    assert rows[0]["field_scores"]["rows"]["copy"] == rows[1]["field_scores"]["rows"]["copy"]
    assert "| training games | hal_buttons |" in out
    out = bench("--train", "--data", tmp_path / "data", "--split-by", "player", "--max-steps", "2",
                "--batch-size", "512", "--specs", "specs/mlp.toml", "--json", tmp_path / "a.json")
    (row,) = json.loads((tmp_path / "a.json").read_text())["architectures"]
    assert row["spec"] == "mlp" and row["train_games"] == 6 and row["val_games"] == 1
    assert "validation split by player" in out
