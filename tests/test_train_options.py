"""The training tool's switches: resume after a kill, early stopping, presets and overrides,
augmentations, schedules, clipping, plots, distillation."""

import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import exphil
from conftest import REPLAYS, ROOT, spec_text

SPEC = ROOT / "specs"


@pytest.fixture(scope="module")
def episodes():
    return exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")


def cli_train(out, *extra):
    return [sys.executable, "-m", "exphil", "train", str(SPEC / "gru.toml"), "--replays", str(REPLAYS),
            "--out", str(out), "--epochs", "2", "--batch-size", "8", "--hidden", "64", "--quiet", *extra]


@pytest.mark.parametrize("mode", [[], ["--stateful", "--mirror-prob", "0.5"]], ids=["windows", "stateful"])
def test_killed_run_resumes_exactly(tmp_path, mode):
    """SIGKILL a real training process mid-epoch, resume it: the result equals a run that was
    never interrupted (same steps, optimizer state, data order and, in stateful training, the
    carried state), and the checkpoint it resumed from was at most --save-every steps old."""
    whole = subprocess.run(cli_train(tmp_path / "whole", "--save-every", "5", *mode), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    total = json.loads((tmp_path / "whole" / "run.json").read_text())["steps"]

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_train(out, "--save-every", "5", *mode), stderr=subprocess.PIPE)
    ckpt, deadline = out / "train" / "checkpoint", time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait for the 2nd mid-epoch checkpoint
        if ckpt.exists() and _progress(ckpt).get("step", 0) >= 10:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _progress(ckpt)
    assert 10 <= saved["step"] < total, "the kill must land mid-run"
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    res = subprocess.run([sys.executable, "-m", "exphil", "train", "--resume", "--out", str(out), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == total
    a, b = exphil.load_params(tmp_path / "whole" / "step.onnx"), exphil.load_params(out / "step.onnx")
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def _progress(ckpt):
    """Progress stored in a training checkpoint, read without touching the run."""
    _, api, _ = exphil._ort_training()
    for _ in range(20):
        try:
            state = api.CheckpointState.load_checkpoint(str(ckpt))
            return json.loads(state.properties["progress"]) if "progress" in state.properties else {}
        except Exception:  # the file is being replaced right now
            time.sleep(0.02)
    return {}


def test_a_run_folder_is_never_silently_reused(tmp_path, mlp_run):
    with pytest.raises(exphil.ExphilError, match="already holds a run: continue it with --resume"):
        exphil.train(SPEC / "mlp.toml", REPLAYS, out=mlp_run.path, quiet=True)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    small = exphil.override_spec(exphil.load_spec(SPEC / "mlp.toml"), hidden=64)
    run = exphil.train(small, REPLAYS, epochs=6, lr=1e-9, early_stopping=True, patience=2, batch_size=512,
                       out=tmp_path / "run", quiet=True)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "early stopping" in run.info["stopped"]
    assert run.info["best"]["epoch"] == 1 and run.info["exported"] == "best validation epoch"


def test_budget_and_step_limits(tmp_path):
    run = exphil.train(SPEC / "mlp.toml", REPLAYS, epochs=3, max_steps=7, batch_size=512, out=tmp_path / "run",
                       quiet=True)
    assert run.info["steps"] == 7 and "budget" in run.info["stopped"]


def test_spec_overrides(tmp_path):
    lstm = exphil.load_spec(SPEC / "lstm.toml")
    small = exphil.override_spec(lstm, window_size=20, hidden=64, num_layers=3)
    assert (small.window, small.hidden, len(small.layers)) == (20, 64, 3)
    mamba = exphil.override_spec(exphil.load_spec(SPEC / "mamba.toml"), state_size=8, expand_factor=1, conv_size=3)
    assert (mamba.layers[0].mixer.state, mamba.layers[0].mixer.expand, mamba.layers[0].mixer.conv) == (8, 1, 3)
    with pytest.raises(exphil.SpecError, match="--state-size applies to Mamba"):
        exphil.override_spec(lstm, state_size=8)
    with pytest.raises(exphil.SpecError, match="--num-layers needs one"):
        exphil.override_spec(exphil.load_spec(SPEC / "jamba.toml"), num_layers=3)
    with pytest.raises(exphil.SpecError, match="hidden"):
        exphil.override_spec(lstm, hidden=0)


def test_preset_with_overriding_flags_via_cli(tmp_path):
    out = tmp_path / "quick"
    res = subprocess.run([sys.executable, "-m", "exphil", "train", "--preset", "quick", "--replays", str(REPLAYS),
                          "--out", str(out), "--hidden", "32", "--lr", "0.002", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["spec"] == "mlp" and info["config"]["max_files"] == 5 and info["config"]["lr"] == 0.002
    assert exphil.load_spec(out / "spec.toml").hidden == 32  # the frozen copy has the override


def test_frame_delay_mirror_and_smoothing(episodes):
    wins = [(0, 600), (1, 1200)]
    plain = exphil.make_batch(episodes, wins, 30)
    delayed = exphil.make_batch(episodes, wins, 30, delay=[0, 4])
    assert np.array_equal(delayed["target.main_y"][0], plain["target.main_y"][0])
    ep = episodes[1]
    assert np.array_equal(delayed["target.main_y"][1].argmax(-1), ep.labels["main_y"][1205:1235])
    mirrored = exphil.make_batch(episodes, wins, 30, mirror=[True, False])
    cols = [exphil.NUM_FIELDS.index(n) for n in ("self_x", "opp_x", "self_facing", "main_x")]
    assert np.array_equal(mirrored["num"][0][:, cols], -plain["num"][0][:, cols])
    assert np.array_equal(mirrored["num"][1], plain["num"][1])
    y = exphil.NUM_FIELDS.index("self_y")
    assert np.array_equal(mirrored["num"][0][:, y], plain["num"][0][:, y])
    assert np.array_equal(mirrored["target.main_x"][0].argmax(-1), 16 - plain["target.main_x"][0].argmax(-1))
    smooth = exphil.make_batch(episodes, wins, 30, smoothing=0.1)
    assert np.allclose(smooth["target.c_x"].sum(-1), 1) and np.isclose(smooth["target.c_x"].min(), 0.1 / 17)


def test_learning_rate_schedules():
    cfg = exphil.TrainConfig(lr=1.0, lr_schedule="cosine", warmup_steps=10)
    lrs = [cfg.learning_rate(s, 110) for s in range(111)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and np.isclose(lrs[60], 0.5) and lrs[110] < 1e-9
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert exphil.TrainConfig(lr=0.3).learning_rate(1000, 10) == 0.3
    with pytest.raises(exphil.ExphilError, match="lr-schedule"):
        exphil.TrainConfig(lr_schedule="linear")


def test_gradient_clipping_is_in_the_optimizer(tmp_path, episodes):
    model = exphil.Model(exphil.load_spec(SPEC / "mlp.toml"))
    trainer = exphil.Trainer(model, tmp_path, lr=1e-2, max_grad_norm=0.5)
    ops = {n.op_type for n in onnx.load(tmp_path / "optimizer_model.onnx").graph.node}
    assert "InplaceClipGradNorm" in ops
    batch = exphil.make_batch(episodes, exphil.windows(episodes, 1)[:64], 1)
    assert np.isfinite(float(trainer.step(dict(batch))["loss"]))


def test_character_and_stage_filters():
    games, _ = exphil.load_games(REPLAYS)
    sheik = exphil.filter_games(games, character="sheik")
    assert len(sheik) == 1 and len(sheik[0]) == 1  # only Sheik's view of the one Sheik game
    assert exphil.filter_games(games, character="marth", opponent="sheik")[0][0].port != sheik[0][0].port
    assert exphil.filter_games(games, stage="final_destination") == []
    with pytest.raises(exphil.ExphilError, match="unknown character 'fax'"):
        exphil.filter_games(games, character="fax")


def test_filters_select_games_from_the_manifest_before_loading_them(monkeypatch):
    everything, _ = exphil.load_games(REPLAYS)  # the manifest now describes every game
    loaded, real_episodes = [], exphil.Dataset.episodes
    monkeypatch.setattr(exphil.Dataset, "episodes",
                        lambda self, row, source=None: loaded.append(source) or real_episodes(self, row, source))
    left_out = []
    games, _ = exphil.load_games(REPLAYS, keep=exphil._game_filter(opponent="marth"), left_out=left_out)
    assert [Path(p).name for p in loaded] == ["hohav-py-slippi__nintendont.slp"] and len(left_out) == 2
    views = lambda gs: [(ep.source, ep.port, ep.frames) for g in exphil.filter_games(gs, opponent="marth") for ep in g]
    assert views(games) == views(everything) and len(views(games)) == 1


def test_plot_writes_curves(mlp_run):
    path = exphil.plot(mlp_run.path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_progress_bar_only_on_a_terminal(tmp_path):
    """On a 70-column terminal every bar line fits (no wrapped lines), the bar's total is the
    --max-steps limit, and replay parsing (into an empty cache) shows a bar too."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 70, 0, 0))
    args = cli_train(tmp_path / "run")
    args.remove("--quiet")
    proc = subprocess.Popen(args[:args.index("--epochs")] + ["--epochs", "1", "--batch-size", "4", "--hidden", "64",
                                                             "--max-steps", "7"],
                            stderr=slave, stdout=subprocess.DEVNULL, env={**os.environ, "EXPHIL_CACHE": str(tmp_path / "c")})
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait() == 0
    lines = seen.decode().replace("\r\n", "\n").replace("\r", "\n").splitlines()
    assert not [l for l in lines if "frames/s ETA" in l and len(l) >= 70]
    assert not [l for l in lines if " - " in l and "[INFO]" in l]  # each message once, as printed
    bars = [l for l in lines if l.startswith("epoch 1/1 [")]
    assert bars and "frames/s ETA" in bars[-1] and " 7/7 " in bars[-1] and all("/7 " in l for l in bars)
    assert any(l.startswith("parsing replays [") and " 3/3 " in l for l in lines)
    quiet = subprocess.run(cli_train(tmp_path / "q", "--max-steps", "3"), capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_distillation_reports_agreement(tmp_path, mlp_run):
    res = subprocess.run([sys.executable, "-m", "exphil", "distill", "--teacher", str(mlp_run.path), "--student",
                          str(SPEC / "mlp.toml"), "--hidden", "64", "--replays", str(REPLAYS), "--out",
                          str(tmp_path / "student"), "--temperature", "2.0", "--alpha", "0.7", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "agreement with the teacher" in res.stdout and "step latency p50" in res.stdout
    rep = json.loads((tmp_path / "student" / "run.json").read_text())["distillation"]
    assert set(rep["agreement"]) == set(exphil.HEADS) and min(rep["agreement"].values()) > 0.5
    assert {"teacher", "student"} == set(rep["step_latency_ms"])


def test_distillation_loss_matches_its_formula(episodes):
    """The in-graph loss == alpha T^2 KL(teacher_T || student_T) + (1 - alpha) hard, in NumPy."""
    T, alpha = 2.0, 0.7
    model = exphil.Model(exphil.load_spec(SPEC / "mlp.toml"), seed=3)
    rng = np.random.default_rng(0)
    wins = exphil.windows(episodes, 1)[:32]
    teacher = {"logits": [rng.normal(0, 2, (ep.frames, 81)).astype(np.float32) for ep in episodes], "temperature": T}
    batch = exphil.make_batch(episodes, wins, 1, teacher=teacher)
    out = exphil._window_runner(model, exphil.loss_graph((T, alpha)))(batch)
    logsig = lambda x: -np.logaddexp(0, -x)
    total = 0.0
    for h in exphil.HEADS:
        x, p, y = out[h][:, 0].astype(np.float64) / T, batch[f"soft.{h}"][:, 0], batch[f"target.{h}"][:, 0]
        if h == "buttons":
            kl = (p * (np.log(p) - logsig(x)) + (1 - p) * (np.log(1 - p) - logsig(-x))).sum(-1).mean()
            hard = -(y * logsig(x * T) + (1 - y) * logsig(-x * T)).sum(-1).mean()
        else:
            logq = x - np.log(np.exp(x).sum(-1, keepdims=True))
            kl = (p * (np.log(p) - logq)).sum(-1).mean()
            hard = -(y * (x * T - np.log(np.exp(x * T).sum(-1, keepdims=True)))).sum(-1).mean()
        assert np.isclose(out[f"loss.{h}"], hard, rtol=1e-4)
        total += alpha * T * T * kl + (1 - alpha) * hard
    assert np.isclose(out["loss"], total, rtol=1e-4)


def test_settings_that_would_be_ignored_are_errors():
    for bad, message in [(dict(online_robust=True, frame_delay=2), "instead of frame-delay"),
                         (dict(delay_max=3), "only with online-robust"),
                         (dict(val_split=1.0), "val-split"), (dict(mirror_prob=2), "mirror-prob"),
                         (dict(own_inputs=1.5), "own-inputs")]:
        with pytest.raises(exphil.ExphilError, match=message):
            exphil.TrainConfig(**bad)
    assert exphil.TrainConfig(online_robust=True, delay_min=1, delay_max=4).delays == (1, 4)


def test_online_robust_training_records_its_delays(tmp_path):
    run = exphil.train(SPEC / "mlp.toml", REPLAYS, online_robust=True, delay_min=1, delay_max=3, max_steps=20,
                       batch_size=512, out=tmp_path / "run", quiet=True)
    assert run.info["delay_range"] == [1, 3] and run.info["frame_delay"] == 1
    assert exphil.Agent(tmp_path / "run").frame_delay == 1


def test_split_seed_keeps_the_games_while_the_seed_changes(tmp_path):
    """--split-seed fixes the validation games; --seed alone also moves them."""
    val = {}
    for name, kw in (("s0", {"seed": 0}), ("s1", {"seed": 1}), ("s1_split0", {"seed": 1, "split_seed": 0})):
        run = exphil.train(SPEC / "mlp.toml", REPLAYS, max_steps=1, batch_size=512, out=tmp_path / name, quiet=True,
                           **kw)
        val[name] = run.info["replays"]["val"]
    assert val["s1_split0"] == val["s0"] != val["s1"]


def test_distillation_scores_each_group_of_validation_views_with_its_own_teacher_logits(tmp_path, mlp_run):
    """The per-character report at the end of a distillation pairs each validation view with the
    teacher's logits of that view (two validation games of other lengths and characters)."""
    res = subprocess.run([sys.executable, "-m", "exphil", "distill", "--teacher", str(mlp_run.path), "--student",
                          str(SPEC / "mlp.toml"), "--hidden", "32", "--replays", str(REPLAYS), "--val-split", "0.67",
                          "--max-steps", "2", "--batch-size", "512", "--out", str(tmp_path / "student"), "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "student" / "run.json").read_text())
    groups = info["val_by"]["character"]
    assert len(groups) > 1 and sum(g["frames"] for g in groups.values()) == info["exported_metrics"]["val_frames"]


def test_own_inputs_put_the_models_decisions_where_play_reads_them(episodes):
    """--own-inputs: a frame's controller columns (and its current classes) hold the action
    sampled from the model's outputs 1 + delay frames earlier in the same window, read back as
    play reads a controller; nothing else changes. Outputs that are certain of a known action
    per frame make the sample that action."""
    wins = exphil.windows(episodes, 60)[30:46]
    delays = np.arange(len(wins)) % 3
    batch = exphil.make_batch(episodes, wins, 60, delay=delays)
    B, L = batch["mask"].shape
    want = np.random.default_rng(0).integers(0, exphil._CLASS_SIZES.min(), (B, L, exphil.UNIFORMS))
    want[..., :8] %= 2
    out = {"buttons": np.where(want[..., :8] == 1, 40.0, -40.0)}
    for i, h in enumerate(exphil._CLASS_HEADS):
        out[h] = np.where(np.arange(exphil.HEADS[h]) == want[..., 8 + i, None], 40.0, -40.0)
    mine = exphil.with_own_inputs(batch, out, 1.0, np.random.default_rng(1))
    ctrl = slice(exphil._CTRL, exphil._CTRL + 13)
    for b, d in enumerate(delays):
        lag = 1 + d
        assert np.array_equal(mine["num"][b, :lag], batch["num"][b, :lag])
        assert np.allclose(mine["num"][b, lag:, ctrl], exphil.controller_features(want[b, :L - lag]))
        assert np.array_equal(mine["current.buttons"][b, lag:], want[b, :L - lag, :8])
        for i, h in enumerate(exphil._CLASS_HEADS):
            assert np.array_equal(mine[f"current.{h}"][b, lag:], want[b, :L - lag, 8 + i])
    others = np.ones(batch["num"].shape[-1], bool)
    others[ctrl] = False
    assert np.array_equal(mine["num"][..., others], batch["num"][..., others])
    assert all(np.array_equal(mine[k], batch[k]) for k in batch if k.startswith("target.") or k == "mask")
    # a share: about that many frames, the rest untouched; none: the batch as it was
    half = exphil.with_own_inputs(batch, out, 0.5, np.random.default_rng(2))
    moved = (half["num"][..., ctrl] != batch["num"][..., ctrl]).any(-1)
    could = (mine["num"][..., ctrl] != batch["num"][..., ctrl]).any(-1)
    assert not (moved & ~could).any() and 0.4 < moved.sum() / could.sum() < 0.6
    none = exphil.with_own_inputs(batch, out, 0.0, np.random.default_rng(3))
    assert all(np.array_equal(none[k], batch[k]) for k in batch)


def test_training_on_own_inputs_is_reproducible_and_changes_the_model(tmp_path):
    """The decisions fed back are drawn from seeded numbers: the same settings give the same
    weights; without them, others. With the Markov heads and autoregressive heads. A spec whose
    windows hold no earlier frame is refused in one line."""
    spec = tmp_path / "gru_ar.toml"
    spec.write_text(spec_text("gru", "autoregressive", name="gru_ar", hidden=32))

    def weights(name, **kw):
        exphil.train(spec, REPLAYS, max_steps=3, batch_size=16, out=tmp_path / name, quiet=True, **kw)
        return exphil.load_run(tmp_path / name)[0].params
    a, b, plain = weights("a", own_inputs=0.5), weights("b", own_inputs=0.5), weights("plain")
    assert exphil.load_run(tmp_path / "a")[1]["config"]["own_inputs"] == 0.5
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert any(not np.array_equal(a[n], plain[n]) for n in a)
    with pytest.raises(exphil.UsageError, match="windows of 1 frame"):
        exphil.train(SPEC / "mlp.toml", REPLAYS, max_steps=1, own_inputs=0.5, out=tmp_path / "mlp", quiet=True)
