"""Training plans that hold nothing per window, runs whose length --max-steps decides, and
validation on a fixed sample of the validation windows (every frame at the end)."""

import json
import time
import tracemalloc
import types

import numpy as np
import pytest

import exphil
from conftest import REPLAYS, ROOT

ONE = REPLAYS / "hohav-py-slippi__netplay_name.slp"


def small_gru():
    return exphil.override_spec(exphil.load_spec(ROOT / "specs" / "gru.toml"), hidden=32)


@pytest.fixture(scope="module")
def episodes():
    return [ep for p in sorted(REPLAYS.glob("*.slp")) for ep in exphil.load_replay(p)]


@pytest.mark.parametrize("length, delay", [(1, 0), (8, 2), (60, 0), (60, 18)])
def test_windows_are_those_of_the_list_they_replace(episodes, length, delay):
    """The windows, numbered, are the list of (episode, first frame) pairs that training used to hold."""
    listed = [(i, s) for i, ep in enumerate(episodes) for s in range(0, ep.frames - 1 - delay, length)]
    wins = exphil.windows(episodes, length, delay)
    assert len(wins) == len(listed) and wins[:].tolist() == [list(w) for w in listed]
    assert wins[len(listed) - 1].tolist() == list(listed[-1]) and wins[-1].tolist() == list(listed[-1])


def frames(n: int) -> list:
    """Stand-ins for episodes whose windows of 1 frame number n in all."""
    return [types.SimpleNamespace(frames=n + 1)]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 63, 64, 65, 1000, 1024, 4096, 4097, 100_003])
def test_an_epoch_takes_each_window_exactly_once(n):
    """An epoch's batches (64 windows, the last one shorter) hold every window once, whatever the number of windows."""
    batches = exphil.Batches(exphil.Windows(frames(n), 1), 64, np.random.default_rng([0, 1]))
    assert len(batches) == len(range(0, n, 64))
    taken = [batches[k] for k in range(len(batches))]
    assert all(len(b) == 64 for b in taken[:-1])
    assert sorted(np.concatenate(taken)[:, 1].tolist() if taken else []) == list(range(n))


def test_the_order_is_a_function_of_seed_and_epoch_and_looks_random(episodes):
    """The same (seed, epoch) gives the same batches (so a resumed run takes the batches it would
    have taken); another seed or epoch another order, with no trace of the windows' own order."""
    wins = exphil.windows(episodes, 1)
    order = lambda seed, epoch: exphil.Batches(wins, 64, np.random.default_rng([seed, epoch])).order(np.arange(len(wins)))
    first = order(0, 1)
    assert np.array_equal(first, order(0, 1)) and np.array_equal(np.sort(first), np.arange(len(wins)))
    for other in (order(0, 2), order(1, 1)):
        assert np.mean(first == other) < 0.01 and abs(np.corrcoef(first, other)[0, 1]) < 0.02
    assert abs(np.corrcoef(np.arange(len(wins)), first)[0, 1]) < 0.02
    batch = exphil.Batches(wins, 64, np.random.default_rng([0, 1]))[1]
    assert batch.tolist() == wins[first[64:128]].tolist()


def test_a_plan_holds_nothing_per_window():
    """A plan over 10^9 windows is made, and its first, last and any batch read, at once and in a few kilobytes."""
    wins = exphil.Windows(frames(10**6) * 1000, 1)
    tracemalloc.start()
    t0 = time.perf_counter()
    batches = exphil.Batches(wins, 64, np.random.default_rng([0, 1]))
    taken = [batches[k] for k in (0, 12_345_678, len(batches) - 1)]
    seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(wins) == 10**9 and len(batches) == 15_625_000 and all(b.shape == (64, 2) for b in taken)
    assert seconds < 1 and peak < 1 << 20
    assert ((0 <= np.concatenate(taken)) & (np.concatenate(taken) < [1000, 10**6])).all()


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_max_steps_past_one_epoch_trains_exactly_that_many_steps(tmp_path, schedule):
    """On a real dataset, --max-steps larger than an epoch runs as many epochs as it takes (the
    default --epochs 1 does not stop it) and stops at that step; a cosine schedule ends at 0."""
    exphil.ingest(ONE, tmp_path / "data")
    per_epoch = -(-len(exphil.windows(exphil.load_replay(ONE), 60)) // 16)
    steps = 2 * per_epoch + 3
    run = exphil.train(small_gru(), data=tmp_path / "data", val_split=0, batch_size=16, max_steps=steps,
                       lr_schedule=schedule, out=tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert run.info["steps"] == steps and [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [per_epoch, 2 * per_epoch, steps]
    assert rows[-1]["lr"] == (pytest.approx(0, abs=1e-12) if schedule == "cosine" else 1e-3)
    assert run.info["stopped"] == "step or time budget reached"


def test_validation_scores_a_fixed_sample_each_epoch_and_every_frame_at_the_end(tmp_path):
    """With more validation frames than --val-sample, each epoch scores the same seeded sample of
    validation windows; the exported weights are then scored on every validation frame (whole
    games, the state carried): the numbers `exphil eval` gives on those games."""
    run = exphil.train(small_gru(), REPLAYS, val_split=0.3, batch_size=16, epochs=2, max_files=2, val_sample=3000,
                       out=tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_sampled"] for r in rows) and 2000 < rows[0]["val_frames"] == rows[1]["val_frames"] <= 3000
    exported = run.info["exported_metrics"]
    again = exphil.evaluate(run.path, run.info["replays"]["val"])
    assert not exported["val_sampled"] and exported["val_frames"] == again["frames"] > 10_000
    assert exported["val_loss"] == pytest.approx(again["loss"], rel=1e-4)
    assert exported["val_markov"]["loss"] == pytest.approx(again["markov"]["loss"], rel=1e-6)
