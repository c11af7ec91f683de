"""Bad settings, bad data and interruptions: refused or stopped with one clear line, nothing
garbage exported (real processes and real files)."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import bench
import exphil
from conftest import REPLAYS, ROOT


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "exphil", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, **kw)


@pytest.mark.parametrize("flags, expected, code", [  # 2: invalid settings; 1: settings that do not fit the data
    (["--lr", "1e3"], "lr must be in (0, 1], not 1000.0", 2),
    (["--lr", "inf"], "lr must be a finite number", 2),
    (["--weight-decay", "inf"], "weight-decay must be a finite number", 2),
    (["--weight-decay", "5"], "weight-decay must be in [0, 1]", 2),
    (["--change-weight", "nan"], "change-weight must be a finite number", 2),
    (["--online-robust"], "online-robust needs a delay range", 2),
    (["--frame-delay", "100000"], "no training frame has a target at frame delay 100000", 1),
    (["--hidden", "100000000"], "spec 'mlp' is too large: about 20,000,", 1),
    (["--controller-dropout", "0.2"], "hides the current controller that the Markov heads of spec 'mlp' read", 2),
    (["--hidden", "20000"], "GiB in a graph file (ONNX holds at most 2 GiB)", 1),
])
def test_bad_settings_are_refused_before_training(tmp_path, flags, expected, code):
    res = cli("train", "mlp", "--replays", REPLAYS, "--out", tmp_path / "run", *flags)
    assert res.returncode == code and expected in res.stderr, res.stderr
    errors = [l for l in res.stderr.splitlines() if l.startswith("exphil: error")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def _with_nan_position(src, dst, event=2000):
    """A copy of a real replay with one post-frame x position overwritten by NaN."""
    data = bytearray(src.read_bytes())
    start = data.index(b"raw[$U#l") + 12
    raw_len = struct.unpack(">I", data[start - 4:start])[0]
    assert data[start] == 0x35  # Event Payloads: the size of every event kind
    sizes = {data[start + 2 + 3 * k]: struct.unpack(">H", data[start + 3 + 3 * k:start + 5 + 3 * k])[0]
             for k in range((data[start + 1] - 1) // 3)}
    pos, seen = start, 0
    while pos < start + raw_len:
        kind = data[pos]
        if kind == 0x38:  # Post-Frame Update: x position at offset 0x0A
            if seen == event:
                data[pos + 0x0A:pos + 0x0E] = struct.pack(">f", float("nan"))
                break
            seen += 1
        pos += 1 + (data[start + 1] if kind == 0x35 else sizes[kind])
    dst.write_bytes(bytes(data))


def test_replay_with_nan_is_skipped_and_never_cached_as_good(tmp_path, monkeypatch):
    folder = tmp_path / "replays"
    folder.mkdir()
    for f in REPLAYS.glob("*.slp"):
        shutil.copy(f, folder)
    bad = folder / "nan.slp"
    _with_nan_position(REPLAYS / "hohav-py-slippi__nintendont.slp", bad)
    monkeypatch.setenv("EXPHIL_CACHE", str(tmp_path / "cache"))
    lines = []
    for _ in range(2):  # the second time from the cache: still skipped
        games, skipped = exphil.load_games(folder, log=lines.append)
        assert len(games) == 3 and [s["path"] for s in skipped] == [str(bad)]
        assert "non-finite x values" in skipped[0]["reason"]
    assert sum(str(bad) in l for l in lines) == 2 and all("\n" not in l for l in lines)


def test_nan_teacher_stops_the_run_without_export(tmp_path, mlp_run):
    """A loss that is not finite stops training at once: exit non-zero with one line naming the
    step, run.json marked diverged, no graph exported."""
    teacher = tmp_path / "teacher"
    shutil.copytree(mlp_run.path, teacher)
    model, _ = exphil.load_run(teacher)
    model.params["heads.out.bias"] = np.full_like(model.params["heads.out.bias"], np.nan)
    model.save(teacher)
    res = cli("distill", "--teacher", teacher, "--student", "mlp", "--replays", REPLAYS, "--out", tmp_path / "s")
    assert res.returncode == 1 and "training diverged: the loss is nan at step 1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    info = json.loads((tmp_path / "s" / "run.json").read_text())
    assert info["status"] == "diverged" and not (tmp_path / "s" / "step.onnx").exists()


def test_temperature_zero_is_deterministic_and_bad_temperatures_are_refused(mlp_run):
    assert exphil.Agent(mlp_run.path, temperature=0).deterministic
    assert not exphil.Agent(mlp_run.path, temperature=0.5).deterministic
    for t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(exphil.ExphilError, match="temperature must be"):
            exphil.Agent(mlp_run.path, temperature=t)


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "exphil", "train", "mlp", "--replays", REPLAYS, "--epochs", "500",
                             "--out", tmp_path / "run"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # (a busy machine can take minutes to get there)
    while not exphil.has_checkpoint(tmp_path / "run" / "train") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("exphil: interrupted; continue the run with: exphil train "
                                                      "--resume --out")


def test_second_training_into_a_busy_folder_is_refused_and_a_killed_owner_leaves_no_lock(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "exphil", "train", "mlp", "--replays", REPLAYS, "--epochs", "500",
                              "--save-every", "5", "--out", out], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "train" / "checkpoint").exists() and time.time() < deadline:
            time.sleep(0.2)
        spec_before = (out / "spec.toml").read_text()
        res = cli("train", "gru", "--replays", REPLAYS, "--out", out)
        assert res.returncode == 1 and f"is in use by another training (process {first.pid})" in res.stderr
        assert (out / "spec.toml").read_text() == spec_before and first.poll() is None
    finally:
        first.kill()
        first.wait()
    with exphil.RunLock(out):  # the killed owner's lock is gone with its process
        assert (out / ".lock").read_text() == str(__import__("os").getpid())


def test_resume_repeats_the_command_refuses_what_differs_and_extends(tmp_path):
    out = tmp_path / "run"
    cmd = ["train", "mlp", "--replays", REPLAYS, "--epochs", "1", "--batch-size", "512", "--hidden", "64", "--out", out]
    assert cli(*cmd).returncode == 0
    info = lambda: json.loads((out / "run.json").read_text())
    steps = info()["steps"]
    res = cli(*cmd, "--resume")  # the same command again (as a job queue would): accepted
    assert res.returncode == 0 and info()["steps"] == steps, res.stderr
    res = cli(*cmd, "--lr", "0.01", "--resume")
    assert res.returncode == 2 and "these differ: --lr 0.01 (the run has 0.001)" in res.stderr
    res = cli("train", "gru", "--replays", REPLAYS, "--out", out, "--resume")
    assert res.returncode == 2 and "the spec (" in res.stderr and "name: 'mlp' -> 'gru'" in res.stderr
    res = cli(*[a if a != "1" else "2" for a in cmd], "--resume")  # more epochs: the finished run goes on
    assert res.returncode == 0 and info()["steps"] == 2 * steps, res.stderr
    rows = [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]
    spec = out / "spec.toml"
    spec.write_text(spec.read_text().replace("hidden = 64", "hidden = 256"))
    res = cli("train", "--resume", "--out", out)
    assert res.returncode == 1 and "spec.toml was edited since the run started (hidden: 64 -> 256)" in res.stderr


def _run_copy(run, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for f in ("step.onnx", "run.json", "spec.toml"):
        shutil.copy(run / f, out / f)
    return out


def test_graph_files_are_checked_before_onnxruntime_reads_them(tmp_path, mlp_run):
    """Random bytes, an empty or truncated file, another run's graph, a graph with other inputs,
    and weights pointing outside the run: each refused with one line naming the file."""
    import onnx

    run = _run_copy(mlp_run.path, tmp_path)
    good = (run / "step.onnx").read_bytes()
    info = json.loads((run / "run.json").read_text())
    for data, expected in [(np.random.default_rng(0).bytes(5000), "not the graph this run wrote"),
                           (b"", "not the graph this run wrote"), (good[:len(good) // 2], "not the graph this run wrote")]:
        (run / "step.onnx").write_bytes(data)
        with pytest.raises(exphil.ExphilError, match=expected):
            exphil.Agent(run)
    del info["graphs"]  # without the recorded hash, the content itself is checked
    (run / "run.json").write_text(json.dumps(info))
    for data in (np.random.default_rng(0).bytes(5000), good[:len(good) // 2]):
        (run / "step.onnx").write_bytes(data)
        with pytest.raises(exphil.ExphilError, match="not a valid ONNX model"):
            exphil.Agent(run)
    gru = exphil.Model(exphil.load_spec(ROOT / "specs" / "gru.toml"))
    (run / "step.onnx").write_bytes(gru.build(step=True).SerializeToString())
    with pytest.raises(exphil.ExphilError, match="do not match the run's spec 'mlp': state_in.layers.0.mixer.h"):
        exphil.Agent(run)
    proto = onnx.load_from_string(good)
    weight = proto.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../../etc/passwd")
    (run / "step.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(exphil.ExphilError, match="refers to external weight files"):
        exphil.Agent(run)
    (run / "step.onnx").write_bytes(good)
    assert exphil.Agent(run).step.session is not None


def test_a_step_graph_is_checked_against_its_spec_without_building_the_model(tmp_path, monkeypatch):
    """The state names and shapes come from the spec's mixer declarations: no model is built."""
    path = tmp_path / "step.onnx"
    path.write_bytes(exphil.Model(exphil.load_spec(ROOT / "specs" / "gru.toml")).build(step=True).SerializeToString())
    monkeypatch.setattr(exphil, "Model", None)
    (tmp_path / "spec.toml").write_text((ROOT / "specs" / "gru.toml").read_text())
    assert exphil.checked_step_graph(tmp_path, path, {}) == path.read_bytes()
    (tmp_path / "spec.toml").write_text((ROOT / "specs" / "lstm.toml").read_text())
    with pytest.raises(exphil.ExphilError, match="do not match the run's spec 'lstm'"):
        exphil.checked_step_graph(tmp_path, path, {})


def test_agent_names_missing_ports_and_recovers_from_a_nan_frame(tmp_path, caplog):
    """A recurrent agent fed one frame with a NaN returns non-finite logits for that frame only:
    its state is reset and the next frames are finite again (logged once)."""
    out = tmp_path / "gru"
    exphil.Model(exphil.load_spec(ROOT / "specs" / "gru.toml")).save(out)
    (out / "spec.toml").write_text((ROOT / "specs" / "gru.toml").read_text())
    agent = exphil.Agent(out)
    game = exphil.ReplayGame(REPLAYS / "hohav-py-slippi__netplay_name.slp", fps=None, frames=400)
    finite = []
    for i in range(300):
        gs = game.step()
        if i == 3:
            with pytest.raises(exphil.ExphilError, match=r"port 3 is not in the game \(ports present: \[1, 2\]\)"):
                agent.logits(gs, 3)
        if i in (200, 250):
            gs.players[1].percent = float("nan")
        logits = agent.logits(gs, 1, 2)
        finite.append(all(np.isfinite(v).all() for v in logits.values()))
    assert [i for i, ok in enumerate(finite) if not ok] == [200, 250]
    assert sum("non-finite logits" in r.message for r in caplog.records) == 1


def test_a_damaged_shard_is_parsed_again(tmp_path):
    """A shard whose columns no longer match the manifest (truncated here) is never trusted: its
    games are parsed again into a new shard, with one line saying so."""
    cache, good = tmp_path / "cache", REPLAYS / "hohav-py-slippi__netplay_name.slp"
    fresh = [(ep.port, np.array(ep.num)) for ep in exphil.load_replay(good, cache)]  # (copies: the shard changes)
    dataset = exphil.Dataset(exphil._cache_dataset(cache))
    (row,) = dataset.rows()
    column = dataset.folder / "shards" / row["shard"] / "num.npy"
    exphil._MAPS.clear()  # (as in a new process; a mapped file must not be cut short under its mapping)
    column.write_bytes(column.read_bytes()[:-4096])
    lines = []
    games, _ = exphil.load_games(good, cache, log=lines.append)
    assert any(l.startswith("parsing again the games of a damaged shard: ") and row["shard"] in l for l in lines)
    assert [(ep.port, ep.num.tolist()) for ep in games[0]] == [(port, num.tolist()) for port, num in fresh]
    assert dataset.rows()[0]["shard"] != row["shard"]


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path):
    out = tmp_path / "run"
    base = ["train", "mlp", "--replays", REPLAYS, "--epochs", "2", "--batch-size", "512", "--hidden", "64",
            "--save-every", "10", "--out", out]
    assert cli(*base).returncode == 0
    complete = json.loads((out / "run.json").read_text())["steps"]
    (out / "train" / "checkpoint").write_bytes((out / "train" / "checkpoint").read_bytes()[:100])
    res = cli(*[a if a != "2" else "3" for a in base], "--resume")
    assert res.returncode == 0, res.stderr
    assert "checkpoint is damaged (" in res.stderr and "continuing from the checkpoint saved before it" in res.stderr
    assert json.loads((out / "run.json").read_text())["steps"] > complete
    for f in ("checkpoint", "checkpoint.prev"):
        (out / "train" / f).write_bytes(b"")
    res = cli(*[a if a != "2" else "4" for a in base], "--resume")
    assert res.returncode == 1 and "no usable checkpoint:" in res.stderr and "Traceback" not in res.stderr


def _children(pid):
    import os
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
        except OSError:
            pass
    return out


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killing_the_main_process_while_parsing_stops_its_workers(tmp_path):
    import os

    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(15):
        for f in REPLAYS.glob("*.slp"):
            shutil.copy(f, folder / f"{k}-{f.name}")
    env = {**os.environ, "EXPHIL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "exphil", "train", "mlp", "--replays", folder, "--out",
                             tmp_path / "run"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers))
    dataset = exphil.Dataset(exphil._cache_dataset(tmp_path / "cache"))
    dataset.remove_unreferenced()  # what the next ingestion does first
    used = {r["shard"] for r in dataset.rows()}
    assert {d.name for d in (dataset.folder / "shards").iterdir()} <= used


def test_symlinked_replay_folders_are_followed_once(tmp_path):
    """A symbolic link to a folder of replays is followed; a link back up the tree does not loop."""
    import os

    real = tmp_path / "elsewhere"
    real.mkdir()
    shutil.copy(REPLAYS / "hohav-py-slippi__nintendont.slp", real)
    top = tmp_path / "top"
    top.mkdir()
    shutil.copy(REPLAYS / "hohav-py-slippi__netplay_name.slp", top)
    os.symlink(real, top / "linked")
    os.symlink(top, real / "loop")
    found = exphil.find_replays(top)
    assert [str(p.relative_to(top)) for p in found] == ["hohav-py-slippi__netplay_name.slp",
                                                        "linked/hohav-py-slippi__nintendont.slp"]


def test_no_validation_set_is_said_plainly(tmp_path):
    res = cli("train", "mlp", "--replays", REPLAYS, "--val-split", "0", "--max-steps", "3", "--out", tmp_path / "r")
    assert res.returncode == 0, res.stderr
    assert "no validation games" in res.stderr and "exported the last step (no validation games)" in res.stdout
    assert "nan" not in res.stdout + res.stderr


def test_a_full_disk_is_one_line_naming_the_run_and_leaves_no_temporaries(tmp_path):
    """The run folder on a 3 MB file system (mounted for the test; skipped where mounting is not
    allowed)."""
    import os

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", disk],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small file system here")
    try:
        res = cli("train", "mlp", "--replays", REPLAYS, "--out", disk / "run")
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1] == \
            f"exphil: error: {disk / 'run'}: No space left on device (while writing the run folder)"
        assert not [p for p in (disk / "run").rglob("*") if ".tmp" in p.name]
    finally:
        subprocess.run(["umount", disk])


def test_an_empty_batch_is_an_error_not_a_crash(tmp_path):
    """onnxruntime-training dies with SIGFPE on a batch of zero windows; the Trainer refuses it."""
    spec = exphil.override_spec(exphil.load_spec(ROOT / "specs" / "mlp.toml"), window_size=8, hidden=16)
    trainer = exphil.Trainer(exphil.Model(spec), tmp_path / "t", length=8)
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    with pytest.raises(exphil.ExphilError, match="no windows"):
        trainer.step(exphil.make_batch(eps, [], 8))


def test_a_failed_training_removes_only_the_temporaries_it_wrote(tmp_path, mlp_run):
    """Files of a user and of other runs survive a training that fails after taking its run lock:
    a mistyped --replays (into a new folder, into a folder of the user's, into the current one)
    and a folder that already holds a run."""
    proj, other = tmp_path / "proj", tmp_path / "proj" / "other"
    (proj / "templates").mkdir(parents=True)
    shutil.copytree(mlp_run.path, other)
    kept = {proj / "templates" / "page.tmpl": "keep", proj / "data.tmp": "keep", proj / "run.json.tmp": "a user's",
            other / "train" / "checkpoint.tmp": "another run's", other / "train.tmp" / "part": "another run's"}
    for path, text in kept.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # (this exphil, run from another folder)
    for out, cwd in (("proj", tmp_path), (".", tmp_path), (".", proj), ("proj/new", tmp_path)):
        res = subprocess.run([sys.executable, "-m", "exphil", "train", "mlp", "--replays", tmp_path / "nonexistent",
                              "--out", out], cwd=cwd, env=env, capture_output=True, text=True)
        assert res.returncode == 1 and "nonexistent: no such replay file or directory" in res.stderr, res.stderr
    assert not (proj / "new").exists()  # (the folder the failed training created is gone again)
    res = cli("train", "mlp", "--replays", REPLAYS, "--out", other)
    assert res.returncode == 2 and "already holds a run" in res.stderr, res.stderr
    with exphil.RunLock(other):  # (as a training in progress holds it)
        res = cli("train", "mlp", "--replays", REPLAYS, "--out", other, "--resume")
        assert res.returncode == 1 and "is in use by another training" in res.stderr, res.stderr
    assert {path: path.read_text() for path in kept} == kept


def test_resume_and_recorded_games_refuse_a_replay_whose_content_changed(tmp_path):
    """A replay replaced under the same path: --resume refuses (naming it) for --replays and for
    --data (the dataset ingested again); a --data run's recorded games are exactly those it
    trained on, not the new content the dataset gained."""
    folder, data, target = tmp_path / "replays", tmp_path / "data", tmp_path / "replays" / "b.slp"
    folder.mkdir()
    for name, src in (("a.slp", "hohav-py-slippi__nintendont.slp"), ("b.slp", "hohav-py-slippi__netplay_name.slp"),
                      ("c.slp", "hohav-peppi__duplicate_game_end.slp")):
        shutil.copy(REPLAYS / src, folder / name)
    exphil.ingest(folder, data, workers=1)
    common = ["--max-steps", "2", "--batch-size", "512", "--val-split", "0.34"]
    runs = {"replays": ["--replays", folder, "--out", tmp_path / "r"], "data": ["--data", data, "--out", tmp_path / "d"]}
    for args in runs.values():
        res = cli("train", "mlp", *args, *common)
        assert res.returncode == 0, res.stderr
    before = json.loads((tmp_path / "d" / "run.json").read_text())
    bench.distinct_copy(REPLAYS / "hohav-py-slippi__netplay_name.slp", target, 7)  # the same game, another content
    exphil.ingest(folder, data, workers=1)
    for args in runs.values():
        res = cli("train", "mlp", *args, *common, "--resume")
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith(f"exphil: error: {target}: not the content of the run's ")
    games = [g for which in ("train", "val") for g in exphil.recorded_games(before, which)]
    assert sorted(g[0].digest for g in games) == sorted(sum(before["replays"]["hashes"].values(), []))
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    which = "train" if str(target) in info["replays"]["train"] else "val"
    with pytest.raises(exphil.ExphilError, match=f"{target}: not the content of the run's {which} game"):
        exphil.recorded_games(info, which)


def refused_by_each(out, message: str, word: str) -> None:
    """Agent, eval, quantize and resume refuse the run folder `out` with `message` (a regex), and
    `exphil eval` with one line holding `word`."""
    for call in (lambda: exphil.Agent(out), lambda: exphil.evaluate(out, REPLAYS, quiet=True),
                 lambda: exphil.quantize_run(out, quiet=True), lambda: exphil.train(out=out, resume=True, quiet=True)):
        with pytest.raises(exphil.ExphilError, match=message):
            call()
    res = cli("eval", out, "--replays", REPLAYS)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and word in res.stderr, res.stderr


@pytest.mark.parametrize("edit, field", [
    (lambda text: text[:len(text) // 2], "Expecting"),
    (lambda text: "[]", "Expected `object`, got `array`"),
    ({"button_threshold": 5}, "`$.button_threshold`"),
    ({"button_threshold": 0.33}, "`$.button_threshold`"),
    ({"frame_delay": 10 ** 9}, "`$.frame_delay`"),
    ({"frame_delay": "2"}, "`$.frame_delay`"),
    ({"feature_version": None}, "`$.feature_version`"),
    ({"replays": {"source": [], "val": "x.slp"}}, "`$.replays.val`"),
    ({"frames": {"train": -5, "val": 0}}, "`$.frames.train`"),
    ({"graphs": {"step.onnx": 7}}, "`$.graphs[...]`"),
    ({"config": {"batch_size": -4}}, "batch-size must be >= 1"),
    ({"config": {"epochs": "many"}}, "`$.config.epochs`"),
    ({"config": {"surprise": 1}}, "unknown setting `$.config.surprise`"),
])
def test_a_tampered_run_json_is_one_line_naming_the_file_and_the_field(tmp_path, mlp_run, edit, field):
    """Agent, eval, quantize and resume read run.json as input: a copy of a run trained by this
    exphil loads; the same copy with a broken or edited run.json is refused by each of them."""
    out = tmp_path / "run"
    shutil.copytree(mlp_run.path, out)
    good = json.loads((out / "run.json").read_text())
    assert exphil.Agent(out).info == good  # as this exphil wrote it
    if callable(edit):
        (out / "run.json").write_text(edit((out / "run.json").read_text()))
    else:
        edited = {k: {**good[k], **v} if isinstance(v, dict) else v for k, v in edit.items()}
        (out / "run.json").write_text(json.dumps({**good, **edited}))
    message = rf"^{out / 'run.json'}: not a valid run.json: .*{__import__('re').escape(field)}"
    refused_by_each(out, message, field)


def test_a_run_of_the_first_feature_layout_is_refused_in_one_line(tmp_path, mlp_run):
    """A run trained on feature layout v1 (no items, Nana or Randall) cannot read this exphil's
    features: every command that would feed its graphs says so and names the run."""
    out = tmp_path / "run"
    shutil.copytree(mlp_run.path, out)
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "feature_version": 1}))
    message = rf"^{out}: trained with feature layout v1; this exphil reads v{exphil.FEATURE_VERSION} .*retrain"
    refused_by_each(out, message, "retrain")


@pytest.mark.parametrize("after", [0.0, 0.1, 0.3, 0.6])
def test_ctrl_c_while_parsing_workers_start_is_one_line(tmp_path, after):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) at moments from the
    first worker's start (still importing) to parsing: one line, exit 130, and no worker left."""
    import os

    import bench

    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(64):  # distinct contents: hashed and parsed on the workers (~2.5 s on 2 idle cores)
        assert bench.distinct_copy(REPLAYS / "hohav-py-slippi__netplay_name.slp", folder / f"{k}.slp", k)
    proc = subprocess.Popen([sys.executable, "-m", "exphil", "ingest", folder, "--out", tmp_path / "data",
                             "--workers", "2"], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, workers = time.time() + 60, []
    while not workers and time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.01)
    assert workers, "no worker started"
    time.sleep(after)
    assert proc.poll() is None, "ingestion ended before the interrupt: give it more replays"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "exphil: interrupted\n", err
    deadline = time.time() + 10
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, workers))
