"""The honest scoreboard: copy, Markov and frequency baselines and change-frame metrics, checked
by hand on tiny batches; the Markov-table heads; the training options aimed at the changes."""

import json
import subprocess
import sys

import msgspec
import numpy as np
import pytest

import exphil
from conftest import REPLAYS, ROOT

K = exphil.HEADS


def _tiny_batch():
    """Three scored frames (a fourth is padding) with hand-chosen targets, current inputs and
    model outputs. main_x: current 8 8 4 | target 8 4 4 | model 8 8 4 (copy right on frames
    0 and 2, the model likewise; frame 1 changes and both miss it). Button A: current 0 1 1 |
    target 1 1 0 | model 1 1 1."""
    mask = np.array([[1, 1, 1, 0]], np.float32)
    batch, out = {"mask": mask}, {"loss": 0.0, **{f"loss.{h}": 0.0 for h in K}}
    for h, n in K.items():
        if h == "buttons":
            target, current = np.zeros((1, 4, 8)), np.zeros((1, 4, 8), np.int64)
            target[0, :, 0], current[0, :, 0] = [1, 1, 0, 1], [0, 1, 1, 1]
            logits = np.full((1, 4, 8), -5.0, np.float32)
            logits[0, :, 0] = 5
            batch["target.buttons"], batch["current.buttons"], out["buttons"] = target.astype(np.float32), current, logits
        else:
            target, current, pred = ([[8, 4, 4, 0]], [[8, 8, 4, 0]], [[8, 8, 4, 0]]) if h == "main_x" else \
                ([[1, 1, 1, 0]], [[1, 1, 1, 0]], [[2, 2, 2, 0]])
            batch[f"target.{h}"] = np.eye(n, dtype=np.float32)[target]
            batch[f"current.{h}"] = np.array(current)
            out[h] = np.eye(n, dtype=np.float32)[pred]
    return batch, out


def test_copy_and_change_frame_metrics_by_hand():
    batch, out = _tiny_batch()
    m = exphil.Metrics()
    m.add(out, batch)
    r = m.result("val")
    assert r["val_frames"] == 3
    # copy: main_x right on 2 of 3; the other stick heads never change: copy right on 3 of 3
    assert r["val_copy"]["accuracy"]["main_x"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["val_copy"]["accuracy"]["c_y"] == 1.0 and r["val_accuracy"]["c_y"] == 0.0
    # copy buttons: A predicted 0 1 1 vs 1 1 0 -> TP 1, FP 1, FN 1 -> F1 0.5 (other buttons never pressed)
    assert r["val_copy"]["button_f1"] == pytest.approx(0.5)
    # model buttons: A predicted 1 1 1 (the others never) -> TP 2, FP 1, FN 0
    assert r["val_button_f1"] == pytest.approx(4 / 5, abs=1e-4)
    # change frames: main_x changes on frame 1 only (model wrong): 0 of 1; A changes on frames 0
    # and 2 (model right on 0: 1 of 2)
    assert r["val_change"]["frames"]["main_x"] == 1 and r["val_change"]["accuracy"]["main_x"] == 0.0
    assert r["val_change"]["frames"]["buttons"] == 2 and r["val_change"]["accuracy"]["buttons"] == 0.5
    assert r["val_change"]["frames"]["c_x"] == 0


def test_markov_and_frequency_losses_by_hand():
    batch, out = _tiny_batch()
    markov = {h: (np.full((2, 8), 0.1) if h == "buttons" else np.full((n, n), 1.0 / n)).tolist() for h, n in K.items()}
    markov["buttons"][1][0] = 0.9  # A: P(pressed next | pressed now) = 0.9, else 0.1
    table = np.full((17, 17), 0.01)
    table[8, 8], table[8, 4], table[4, 4] = 0.5, 0.25, 0.8
    markov["main_x"] = table.tolist()
    freqs = {h: [0.5] + [0.2] * 7 if h == "buttons" else ((np.arange(n) + 1) / (n * (n + 1) / 2)).tolist()
             for h, n in K.items()}
    m = exphil.Metrics(baselines={"frequency": freqs, "markov": markov})
    m.add(out, batch)
    r = m.result("val")
    # main_x pairs (current, target): (8, 8), (8, 4), (4, 4)
    assert r["val_markov"]["heads"]["main_x"] == pytest.approx(-(np.log(0.5) + np.log(0.25) + np.log(0.8)) / 3, abs=1e-4)
    # A: (0 -> 1) p 0.1, (1 -> 1) p 0.9, (1 -> 0) p 0.9; other buttons (0 -> 0) with p 0.1 each
    a = -(np.log(0.1) + np.log(0.9) + np.log(0.1)) / 3
    assert r["val_markov"]["heads"]["buttons"] == pytest.approx(a + 7 * -np.log(0.9), abs=1e-4)
    assert r["val_markov"]["loss"] == pytest.approx(sum(r["val_markov"]["heads"].values()), abs=1e-4)
    q = np.asarray(freqs["main_x"])
    assert r["val_frequency"]["heads"]["main_x"] == pytest.approx(-(np.log(q[8]) + 2 * np.log(q[4])) / 3, abs=1e-4)
    assert r["val_frequency"]["accuracy"]["main_x"] == 0.0  # the most common class (16) never occurs


def test_markov_tables_count_pairs():
    """Frame t pairs with frame t + 1 + delay; rows are add-one smoothed."""
    labels = {h: np.zeros((6, 8) if h == "buttons" else 6, np.int64) for h in K}
    labels["main_x"] = np.array([8, 8, 16, 16, 8, 8])
    labels["buttons"][:, 0] = [0, 1, 1, 0, 0, 1]
    ep = exphil.Episode("x", 1, np.zeros((6, 5), np.int64), np.zeros((6, 49), np.float32), labels)
    t = exphil.markov_tables([ep], delay=0)
    mx = np.asarray(t["main_x"])  # pairs 8->8, 8->16, 16->16, 16->8, 8->8
    assert mx[8, 8] == pytest.approx((2 + 1 / 17) / 4) and mx[8, 16] == pytest.approx((1 + 1 / 17) / 4)
    assert mx[16, 8] == pytest.approx((1 + 1 / 17) / 3) and mx[3, 5] == pytest.approx(1 / 17)
    b = np.asarray(t["buttons"])  # A pairs 0->1, 1->1, 1->0, 0->0, 0->1
    assert b[0, 0] == pytest.approx((2 + 1) / (3 + 2)) and b[1, 0] == pytest.approx((1 + 1) / (2 + 2))
    d2 = np.asarray(exphil.markov_tables([ep], delay=2)["main_x"])  # pairs 8->16, 8->8, 16->8
    assert d2[8, 16] == pytest.approx((1 + 1 / 17) / 3) and d2[16, 8] == pytest.approx((1 + 1 / 17) / 2)


def _markov_model(spec="mlp"):
    spec = exphil.load_spec(ROOT / "specs" / f"{spec}.toml")
    return exphil.Model(msgspec.structs.replace(spec, heads=exphil.Heads(markov=True)))


def test_markov_heads_read_the_current_class_like_the_labels():
    """With the other logits zeroed, each head's output is exactly its table's row of the
    current controller class, recovered inside the graph from the controller features, on every
    frame of the shipped replays."""
    model = _markov_model()
    rng = np.random.default_rng(0)
    for h in K:
        model.params[f"heads.markov.{h}"] = rng.normal(size=model.params[f"heads.markov.{h}"].shape).astype(np.float32)
    model.params["heads.out.weight"][:] = 0
    model.params["heads.out.bias"][:] = 0
    run = exphil._window_runner(model)
    eps = [e for g in exphil.load_games(REPLAYS)[0] for e in g]
    checked = 0
    for wins in exphil.chunks(exphil.windows(eps, model.spec.window), 4096):
        batch = exphil.make_batch(eps, wins, 1, mirror=rng.random(len(wins)) < 0.5)
        out = run(batch)
        for h in K:
            table, cur = model.params[f"heads.markov.{h}"], batch[f"current.{h}"][:, 0]
            want = np.where(cur == 1, table[1], table[0]) if h == "buttons" else table[cur]
            np.testing.assert_allclose(out[h][:, 0], want, atol=1e-6, err_msg=h)
        checked += len(wins)
    assert checked > 40000  # every frame with a target, of the 3 games seen from both sides


def test_markov_heads_start_at_the_markov_baseline(tmp_path):
    """An untrained model with Markov heads (feature weights zeroed) scores exactly the Markov
    baseline on validation frames; a short training run with them stays near it (on two
    training games it cannot learn much more), far below the frequency baseline."""
    eps = [e for g in exphil.load_games(REPLAYS)[0] for e in g]
    train, val = eps[:4], eps[4:]
    baselines = {"frequency": exphil.label_frequencies(train), "markov": exphil.markov_tables(train)}
    model = _markov_model()
    model.start_from_baselines(baselines["frequency"], baselines["markov"])
    model.params["heads.out.weight"][:] = 0
    r = exphil.evaluate_batches(exphil._window_runner(model, exphil.add_loss),
                                (exphil.make_batch(val, w, 1) for w in exphil.chunks(exphil.windows(val, 1), 4096)),
                                exphil.Metrics(baselines=baselines)).result("val")
    assert r["val_loss"] == pytest.approx(r["val_markov"]["loss"], rel=1e-4)

    assert exphil.load_spec(ROOT / "specs" / "gru.toml").heads.markov  # as every shipped spec
    run = exphil.train(ROOT / "specs" / "gru.toml", REPLAYS, epochs=1, batch_size=16, max_steps=20, out=tmp_path / "run", quiet=True)
    final = run.info["final"]
    assert final["val_loss"] < 1.02 * final["val_markov"]["loss"] < 0.5 * final["val_frequency"]["loss"]


def test_change_weight_is_the_weighted_mean_of_frame_losses():
    """The training loss with --change-weight W equals, in NumPy, the per-frame losses averaged
    with weight W on frames where any head's target differs from the current input."""
    model = exphil.Model(exphil.load_spec(ROOT / "specs" / "mlp.toml"))
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    wins = exphil.windows(eps, 1)[3000:3512]
    plain = exphil.make_batch(eps, wins, 1)
    weighted = exphil.make_batch(eps, wins, 1, change_weight=4.0)
    run = exphil._window_runner(model, exphil.add_loss)
    out = run(plain)
    changed = np.any([(plain[f"target.{h}"].argmax(-1) != plain[f"current.{h}"]) if h != "buttons" else
                      (plain["target.buttons"] != plain["current.buttons"]).any(-1) for h in K], axis=0)
    assert 0 < changed.mean() < 0.5
    assert np.array_equal(weighted["mask"], np.where(changed, 4.0, 1.0).astype(np.float32))
    per_frame = 0
    for h in K:
        x, y = out[h].astype(np.float64), plain[f"target.{h}"]
        if h == "buttons":
            per_frame = per_frame + (np.logaddexp(0, x) - x * y).sum(-1)
        else:
            per_frame = per_frame - (y * (x - np.log(np.exp(x).sum(-1, keepdims=True)))).sum(-1)
    w = weighted["mask"]
    assert float(run(weighted)["loss"]) == pytest.approx((per_frame * w).sum() / w.sum(), rel=1e-4)
    assert float(out["loss"]) == pytest.approx(per_frame.mean(), rel=1e-4)


def test_controller_dropout_zeroes_only_the_controller_inputs():
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    wins = exphil.windows(eps, 60)[20:52]
    plain = exphil.make_batch(eps, wins, 60)
    dropped = exphil.make_batch(eps, wins, 60, controller_dropout=(0.3, 7))
    ctrl = exphil.NUM_FIELDS.index("button_A")
    assert np.array_equal(plain["num"][..., :ctrl], dropped["num"][..., :ctrl])
    hidden = (dropped["num"][..., ctrl:] == 0).all(-1) & (plain["num"][..., ctrl:] != 0).any(-1)
    assert 0.25 < hidden.sum() / (plain["num"][..., ctrl:] != 0).any(-1).sum() < 0.35
    kept = ~(dropped["num"][..., ctrl:] == 0).all(-1)
    assert np.array_equal(plain["num"][kept], dropped["num"][kept])
    for h in K:  # targets and the scored current input are untouched
        assert np.array_equal(plain[f"target.{h}"], dropped[f"target.{h}"])
        assert np.array_equal(plain[f"current.{h}"], dropped[f"current.{h}"])
    assert np.array_equal(dropped["num"], exphil.make_batch(eps, wins, 60, controller_dropout=(0.3, 7))["num"])


def test_cli_reports_the_scoreboard(tmp_path):
    """`exphil train` ends with the exported epoch beside its baselines; `eval` prints and
    returns them with the scored frames and the frame delay."""
    res = subprocess.run([sys.executable, "-m", "exphil", "train", "mlp", "--replays", REPLAYS, "--epochs", "2",
                          "--batch-size", "512", "--hidden", "64", "--budget-seconds", "600", "--change-weight", "2",
                          "--out", tmp_path / "run"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    best = info["best"]["epoch"]
    assert f"exported epoch {best} (best validation loss)" in res.stdout and "(markov " in res.stdout
    assert "(copy " in res.stdout and "change frames:" in res.stdout
    assert info["config"]["change_weight"] == 2 and info["config"]["budget_seconds"] == 600
    assert info["exported_metrics"]["epoch"] == best
    res = subprocess.run([sys.executable, "-m", "exphil", "eval", tmp_path / "run", "--replays", REPLAYS, "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    out = json.loads(res.stdout)
    assert out["frame_delay"] == 0 and "t + 1" in out["target"] and out["frames"] > 20000
    assert out["frames"] == sum(out["change"]["frames"][h] for h in ("main_x",)) + round(
        out["frames"] * out["copy"]["accuracy"]["main_x"])
    assert set(out["markov"]["heads"]) == set(K) and 0 < out["markov"]["loss"] < out["frequency"]["loss"]


def test_dropout_is_on_in_training_steps_only(tmp_path):
    """A spec's dropout acts in train steps (two steps at learning rate 0 see different losses)
    and nowhere else: evaluation equals the exported window graph, which has no Dropout node."""
    spec = msgspec.structs.replace(exphil.load_spec(ROOT / "specs" / "gru.toml"), dropout=0.3)
    model = exphil.Model(spec)
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    batch = exphil.make_batch(eps, exphil.windows(eps, 60)[10:26], 60)
    trainer = exphil.Trainer(model, tmp_path / "t")
    assert "training" in trainer.inputs
    evaluated = float(trainer.evaluate(dict(batch))["loss"])
    assert evaluated == float(trainer.evaluate(dict(batch))["loss"])
    assert evaluated == pytest.approx(float(exphil._window_runner(model, exphil.add_loss)(dict(batch))["loss"]), rel=1e-6)
    stepped = {float(trainer.step(dict(batch), lr=0.0)["loss"]) for _ in range(3)}
    assert len(stepped) == 3 and all(abs(v - evaluated) > 1e-6 for v in stepped)
    for step in (False, True):
        assert "Dropout" not in {n.op_type for n in model.build(step=step).graph.node}
    with pytest.raises(exphil.SpecError, match="field `dropout`"):
        exphil.parse_spec(msgspec.toml.encode(spec).decode().replace("dropout = 0.3", "dropout = 1.0"), "x.toml")


def test_button_threshold_is_chosen_on_the_counted_frames():
    """F1 is counted at every threshold; the best one is the highest threshold with the best F1,
    the threshold the run records for its teacher-forced scores."""
    batch, out = _tiny_batch()
    out["buttons"] = np.full((1, 4, 8), -5.0, np.float32)
    out["buttons"][0, :, 0] = exphil._logit(0.32)  # A: p 0.32 on every frame; targets 1 1 0
    m = exphil.Metrics()
    m.add(out, batch)
    r = m.result("val")
    assert r["val_button_f1"] == 0.0 and r["val_button_f1_by_threshold"]["0.3"] == pytest.approx(0.8)
    assert r["val_button_f1_by_threshold"]["0.35"] == 0.0 and r["val_button_f1_by_threshold"]["0.1"] == pytest.approx(0.8)
    assert m.best_button_threshold() == 0.3
    m3 = exphil.Metrics(button_threshold=0.3)
    m3.add(out, batch)
    assert m3.result("val")["val_button_f1"] == pytest.approx(0.8)
    assert "at p > 0.3" in exphil.summary_line(m3.result("val"), "val")
