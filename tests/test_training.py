"""Training on onnxruntime-training, on the shipped replays."""

import json

import numpy as np
import pytest

import exphil
from conftest import REPLAYS, ROOT, SPECS


def test_trained_run_beats_the_frequency_baseline(mlp_run):
    info = mlp_run.info
    assert info["final"]["val_loss"] < info["baseline_loss"]["total"]
    assert np.isfinite(info["final"]["train_loss"])


def test_run_folder_contents(mlp_run):
    run = mlp_run.path
    for f in ("spec.toml", "run.json", "metrics.jsonl", "step.onnx", "window.onnx", "train/checkpoint"):
        assert (run / f).exists(), f
    info = json.loads((run / "run.json").read_text())
    assert info["feature_version"] == exphil.FEATURE_VERSION
    assert info["replays"]["train"] and info["replays"]["val"]
    assert not set(info["replays"]["train"]) & set(info["replays"]["val"])
    assert {"config", "baseline_loss", "final", "frame_delay", "label_frequencies"} <= set(info)
    assert exphil.load_spec(run / "spec.toml") == exphil.load_spec(ROOT / "specs" / "mlp.toml")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert {"train_loss", "val_loss", "val_heads", "val_button_f1", "val_accuracy", "train_button_f1"} <= set(rows[0])


def test_exported_graphs_carry_the_trained_weights(mlp_run):
    """step.onnx and window.onnx hold the same trained values, which differ from the init."""
    step, window = (exphil.load_params(mlp_run.path / f) for f in ("step.onnx", "window.onnx"))
    assert step.keys() == window.keys()
    assert all(np.array_equal(step[k], window[k]) for k in step)
    fresh = exphil.Model(exphil.load_spec(ROOT / "specs" / "mlp.toml")).params
    assert any(not np.allclose(fresh[k], step[k]) for k in step)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_spec_trains(path, tmp_path):
    """Artifacts generate for each spec; optimizer steps change the loss and keep it finite."""
    model = exphil.Model(exphil.load_spec(path))
    trainer = exphil.Trainer(model, tmp_path, lr=3e-3, length=8)
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    batch = exphil.make_batch(eps, exphil.windows(eps, 8)[100:116], 8, returns=model.spec.returns_used)
    before = float(trainer.evaluate(dict(batch))["loss"])
    for _ in range(3):
        trainer.step(dict(batch))
    after = float(trainer.evaluate(dict(batch))["loss"])
    assert np.isfinite(after) and after < before
    trained = trainer.params()
    assert set(trained) == set(model.params)
    assert any(not np.array_equal(trained[k], model.params[k]) for k in trained)


def test_recurrent_spec_beats_baseline(tmp_path):
    """A recurrent model (LSTM, 2 x 256) also learns something real in an epoch."""
    run = exphil.train(ROOT / "specs" / "lstm.toml", REPLAYS, epochs=1, batch_size=16, out=tmp_path / "lstm",
                       quiet=True)
    assert run.info["final"]["val_loss"] < run.info["baseline_loss"]["total"]
    agent = exphil.Agent(run.path)
    assert agent.step.state_names  # the Agent carries the LSTM state


def test_streams_walk_each_game_in_order():
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp") + \
        exphil.load_replay(REPLAYS / "hohav-peppi__duplicate_game_end.slp")
    plan = exphil.streams(eps, 60, 3, rng=np.random.default_rng(0))
    assert all(len(b) == 2 for b in plan)  # 4 games in at most 3 streams: 2 streams of 2 games each
    seen = [tuple(w) for b in plan for w in b.tolist() if w[0] >= 0]
    assert sorted(seen) == sorted(map(tuple, exphil.windows(eps, 60)[:].tolist()))  # every window exactly once
    for row in range(2):
        walk = [b[row].tolist() for b in plan if b[row][0] >= 0]
        for (i, s), (j, t) in zip(walk, walk[1:]):
            assert (j == i and t == s + 60) or (t == 0 and i != j)  # consecutive, or a new game


def test_carried_state_resets_at_game_start():
    model = exphil.Model(exphil.load_spec(ROOT / "specs" / "gru.toml"))
    prev = {"state_out.layers.0.mixer.h": np.ones((3, 1, 256), np.float32),
            "state_out.layers.1.mixer.h": np.ones((3, 1, 256), np.float32)}
    batch = exphil.carry_state({}, prev, [(0, 60), (1, 0), (-1, 0)], model)  # (episode -1: padding)
    h = batch["state_in.layers.0.mixer.h"]
    assert h[0].min() == 1 and h[1].max() == 0 and h[2].max() == 0


def test_recurrent_validation_plays_whole_games(tmp_path):
    """A model with state is validated on whole games, each walked from its start with the
    state carried (what play sees): the same numbers as `evaluate` gives for the exported run."""
    run = exphil.train(ROOT / "specs" / "gated_ssm.toml", REPLAYS, epochs=1, batch_size=8, stateful=True,
                       out=tmp_path / "run", quiet=True)
    final = run.info["final"]
    assert run.info["config"]["stateful"] and final["val_loss"] < run.info["baseline_loss"]["total"]
    again = exphil.evaluate(run.path, [run.info["replays"]["val"][0]])
    assert again["loss"] == pytest.approx(final["val_loss"], rel=1e-4) and again["frames"] == final["val_frames"]


def test_metrics_count_f1_and_accuracy_over_unmasked_frames():
    """Button F1 (micro, over all buttons) and top-1 accuracy, on frames with mask 1 only."""
    k = exphil.HEADS
    mask = np.array([[1, 1, 1, 0]], np.float32)
    buttons = np.zeros((1, 4, 8), np.float32)
    buttons[0, :, 0] = [1, 1, 0, 1]  # A held on frames 0, 1 and (masked) 3
    logits = np.full((1, 4, 8), -5.0, np.float32)
    logits[0, :, 0] = [5, -5, 5, 5]  # predicted on frames 0, 2, 3: TP 1, FN 1, FP 1 (frame 3 masked)
    batch = {"mask": mask, "target.buttons": buttons}
    out = {"loss": 2.0, "buttons": logits, **{f"loss.{h}": 1.0 if h == "buttons" else 0.2 for h in k}}
    for h, n in k.items():
        if h != "buttons":
            batch[f"target.{h}"] = np.eye(n, dtype=np.float32)[[[3, 3, 3, 3]]]
            out[h] = np.eye(n, dtype=np.float32)[[[3, 3, 4, 4]]]  # right on frames 0 and 1 only
    m = exphil.Metrics()
    m.add(out, batch)
    r = m.result("val")
    assert r["val_button_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1), abs=1e-4)
    assert all(v == pytest.approx(2 / 3, abs=1e-4) for v in r["val_accuracy"].values())  # rounded to 5 places
    assert r["val_loss"] == pytest.approx(1.0 + 5 * 0.2) and r["val_heads"]["buttons"] == 1.0


def test_stateful_training_feeds_the_carried_state(tmp_path, monkeypatch):
    carried = []
    original = exphil.carry_state

    def spy(batch, previous, wins, model):
        out = original(batch, previous, wins, model)
        if previous is not None:
            carried.append(max(float(np.abs(out[f"state_in.{n}"]).max()) for n, _ in model.states))
        return out

    monkeypatch.setattr(exphil, "carry_state", spy)
    exphil.train(ROOT / "specs" / "gru.toml", REPLAYS, stateful=True, batch_size=4, max_steps=5, val_split=0,
                 out=tmp_path / "run", quiet=True)  # (no validation games: only training's carried states are seen)
    assert carried and max(carried) > 0  # later windows start from a real, non-zero state
