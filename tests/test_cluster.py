"""Data-parallel training and the architecture table on a local Ray cluster (2 CPUs), started
once for the module."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import exphil
from conftest import BROKEN, REPLAYS, ROOT, needs_training

pytestmark = needs_training


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'exphil[cluster]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _batches(eps, spec, count: int, size: int):
    """Random windows plus a game's last (partly masked) one, with change-weighted masks: the
    workers' slices hold different numbers of loss-weighted frames."""
    wins, rng = exphil.windows(eps, spec.window), np.random.default_rng(0)
    return [exphil.make_batch(eps, [wins[i] for i in rng.choice(len(wins), size - 1)] + [wins[-1]], spec.window,
                              change_weight=3.0, returns=spec.returns) for _ in range(count)]


def test_two_workers_follow_one_process(ray, tmp_path):
    """2 workers with half a batch each take the same 20 steps as one process with the whole
    batch (global-norm clipping on: it must see the summed gradient), to 1e-5; so do the
    outputs each step returns (the value head's too), and the two workers hold the same
    parameters."""
    spec = exphil.override_spec(exphil.load_spec(ROOT / "specs" / "gru.toml"), window_size=8, hidden=32)
    spec = exphil.msgspec.structs.replace(spec, returns=exphil.Returns(input=True, value=True))
    model = exphil.Model(spec)
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    settings = dict(lr=3e-3, max_grad_norm=0.5)
    one = exphil.Trainer(model, tmp_path / "one", **settings)
    two = exphil.RayTrainer(model, tmp_path / "two", ray="auto", workers=2, **settings)
    for batch in _batches(eps, spec, 20, 15):
        a, b = one.step(dict(batch)), two.step(dict(batch))
        assert a.keys() == b.keys()
        assert all(np.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert not any(np.array_equal(one.params()[n], model.params[n]) for n in model.params)  # it trained
    replicas = [ray.get(w.params.remote()) for w in two.workers]
    for n, v in one.params().items():
        assert np.abs(replicas[0][n] - v).max() <= 1e-5 and np.abs(replicas[1][n] - v).max() <= 1e-5, n
    assert {"value", "loss.value"} <= set(a)
    batch = _batches(eps, spec, 1, 1)[0]  # evaluation, and a batch smaller than the workers' count
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(one.evaluate(batch).values(),
                                                            two.evaluate(batch).values()))
    assert len(two.timings) == 20 and all(t["total"] >= t["compute"] > 0 for t in two.timings)
    two.close()


def _worker_pids() -> list[int]:
    """The processes of the Ray actors that hold a training replica (Ray names them so)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::_TrainWorker"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def _wait_for(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_killed_worker_stops_the_run_and_resume_is_exact(ray, tmp_path):
    """A Ray worker killed for real stops the run with a one-line message and the last
    checkpoint intact; the run resumed on Ray ends exactly where the same run on Ray, never
    stopped, ends. (Not where one process ends: summing the workers' slices rounds otherwise
    than one batch, and over 240 steps AdamW grows those 1e-7 differences; the test above
    holds the two to 1e-5 over 20 steps.)"""
    settings = dict(batch_size=32, max_steps=240, save_every=10, seed=3, quiet=True, ray="auto", workers=2)
    mlp = ROOT / "specs" / "mlp.toml"
    whole = exphil.train(mlp, REPLAYS, out=tmp_path / "whole", **settings)
    out, failure = tmp_path / "ray", []

    def run():
        try:
            exphil.train(mlp, REPLAYS, out=out, **settings)
        except exphil.ExphilError as e:
            failure.append(str(e))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 600  # (a busy machine can take minutes to get there)
    while not (out / "train" / "checkpoint.prev").exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # checkpoint.prev: the first save of the run has happened
    pids = _wait_for(lambda: len(_worker_pids()) == 2) and _worker_pids()  # (the last test's are gone)
    assert len(pids) == 2 and thread.is_alive()
    os.kill(pids[1], signal.SIGKILL)
    thread.join(60)
    assert len(failure) == 1 and "\n" not in failure[0], failure
    assert "Ray worker" in failure[0] and "checkpoint is kept" in failure[0] and "--resume" in failure[0]
    kept = exphil.Trainer(exphil.Model(exphil.load_spec(mlp)), out / "train")
    assert kept.progress["step"] % 10 == 0 and 0 < kept.progress["step"] < 240
    assert _wait_for(lambda: not _worker_pids())  # the other worker is stopped too
    resumed = exphil.train(out=out, resume=True, ray="auto", workers=2, quiet=True)
    assert resumed.info["steps"] == whole.info["steps"] == 240
    assert resumed.info["ray"]["workers"] == 2
    a, b = exphil.load_params(whole.path / "window.onnx"), exphil.load_params(out / "window.onnx")
    assert all(np.array_equal(a[n], b[n]) for n in a)
    rows = [[json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()] for p in (whole.path, out)]
    assert len(rows[0]) == len(rows[1]) == 1
    assert rows[0][0]["train_loss"] == rows[1][0]["train_loss"] and rows[0][0]["val_loss"] == rows[1][0]["val_loss"]


def test_architecture_table_on_ray_equals_the_sequential_one(ray, monkeypatch, tmp_path):
    """bench.py --train --ray: the specs (two, made small) train as parallel Ray tasks; every
    number but the timings is the one the sequential run gives."""
    monkeypatch.syspath_prepend(str(ROOT))
    import bench

    specs = []
    for name, sizes in (("mlp", dict(hidden=64)), ("gru", dict(hidden=32, window_size=20))):
        spec = exphil.override_spec(exphil.load_spec(ROOT / "specs" / f"{name}.toml"), **sizes)
        specs.append(tmp_path / f"{name}.toml")
        specs[-1].write_bytes(exphil.msgspec.toml.encode(spec))
    args = dict(paths=[str(p) for p in specs], replays=str(REPLAYS), budget_seconds=0, seed=0, batch_size=64, max_steps=3)
    timings = ("train_frames_per_s", "step_p50_ms", "step_p99_ms")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timings} for r in rows]
    assert strip(bench.architecture_table(**args, ray="auto")) == strip(bench.architecture_table(**args))


def test_cluster_usage_errors(monkeypatch, capsys, tmp_path):
    """Without Ray, --ray names the extra to install (one line, exit 2); --workers needs --ray."""
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    argv = ["train", "mlp", "--replays", str(REPLAYS), "--out", str(tmp_path / "run")]
    assert exphil.main(argv + ["--ray", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'exphil[cluster]'" in err
    assert exphil.main(argv + ["--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_command_on_ray(ray, tmp_path, capsys):
    """`exphil train ... --ray auto --workers 2` trains on the running Ray cluster."""
    out = tmp_path / "cli"
    assert exphil.main(["train", "mlp", "--replays", str(REPLAYS), "--ray", "auto", "--workers", "2",
                        "--batch-size", "512", "--max-steps", "4", "--out", str(out), "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 4 and info["ray"]["workers"] == 2


def test_ingesting_on_ray_equals_a_local_ingest(ray, tmp_path):
    """Replays (good and broken) ingested as Ray tasks give the dataset a local ingest gives: the
    same content hashes, manifest rows (games, skip reasons) and arrays; only where the arrays
    lie (which shard, which row) depends on how the work was cut."""
    sources = [REPLAYS, BROKEN]
    local = exphil.ingest(sources, tmp_path / "local", workers=1)
    on_ray = exphil.ingest(sources, tmp_path / "ray", ray="auto")
    assert local.hashes == on_ray.hashes and local.errors == on_ray.errors
    rows = [sorted(c.dataset.rows(), key=lambda r: r["hash"]) for c in (local, on_ray)]
    placed = lambda r: {k: v for k, v in r.items() if k not in ("shard", "start")}
    assert [placed(r) for r in rows[0]] == [placed(r) for r in rows[1]]
    assert any(r["skipped"] for r in rows[0]) and sum(not r["skipped"] for r in rows[0]) == 3
    for a, b in zip(*rows):
        if not a["skipped"]:
            for x, y in zip(local.dataset.episodes(a, a["path"]), on_ray.dataset.episodes(b, b["path"])):
                assert np.array_equal(x.cat, y.cat) and np.array_equal(x.num, y.num)
                assert all(np.array_equal(x.labels[h], y.labels[h]) for h in exphil.HEADS)
    assert exphil.load_games(sources, tmp_path / "cache", ray="auto")[1] == exphil.load_games(sources, tmp_path / "c2")[1]
