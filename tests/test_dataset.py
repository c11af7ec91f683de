"""Datasets on disk: incremental, deduplicated ingestion into memory-mapped shards, a manifest
that filters and describes without reading them, and ingestion that can be killed at any moment."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

import bench
import exphil
from conftest import BROKEN, REPLAYS, ROOT, SHARED

NETPLAY, NINTENDONT = REPLAYS / "hohav-py-slippi__netplay_name.slp", REPLAYS / "hohav-py-slippi__nintendont.slp"


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "exphil", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_ingest_reads_only_new_files_and_parses_each_content_once(tmp_path, monkeypatch):
    folder, data = tmp_path / "replays", tmp_path / "data"
    shutil.copytree(REPLAYS, folder)
    shutil.copy(NETPLAY, folder / "same-content.slp")
    shutil.copy(BROKEN / "hohav-peppi__corrupt.slp", folder)
    col = exphil.ingest(folder, data, workers=1)
    rows = {r["path"].rsplit("/", 1)[1]: r for r in col.dataset.rows()}
    assert len(col.paths) == 5 and len(set(col.hashes.values())) == 4 and len(rows) == 4  # the copy: parsed once
    assert rows["hohav-peppi__corrupt.slp"]["skipped"].startswith("unreadable")
    game = rows[NETPLAY.name]  # Falco vs Falco on Battlefield, 6,233 frames, Slippi 2.0.1, no player codes
    assert (game["frames"], game["slippi"], game["date"]) == (6233, "2.0.1", "2019-12-04T04:34:40Z")
    assert [exphil.enums.Character(game[f"character_{i}"]).name for i in (1, 2)] == ["FALCO", "FALCO"]
    assert game["code_1"] is None and exphil.enums.Stage(game["stage"]).name == "BATTLEFIELD"

    parsed, hashed, real_read, real_content = [], [], exphil.read_replay, exphil._content
    monkeypatch.setattr(exphil, "read_replay", lambda path, **kw: parsed.append(path) or real_read(path, **kw))
    monkeypatch.setattr(exphil, "_content", lambda path: hashed.append(os.path.basename(path)) or real_content(path))
    exphil.ingest(folder, data, workers=1)
    assert parsed == [] and hashed == []  # unchanged paths, sizes and times: nothing is read
    assert bench.distinct_copy(NINTENDONT, folder / "new.slp", 1)
    exphil.ingest(folder, data, workers=1)
    assert [p.name for p in parsed] == ["new.slp"] and hashed == ["new.slp"] * 2  # when found, and after parsing


def test_a_dataset_of_the_first_feature_layout_is_refused_in_one_line(tmp_path):
    """A dataset ingested by an exphil of feature layout v1 holds 49 numbers a frame: reading it
    and adding to it are both refused, naming the folder; nothing in it is changed."""
    data = tmp_path / "data"
    exphil.ingest(NETPLAY, data, workers=1)
    with sqlite3.connect(data / "manifest.sqlite") as db:
        db.execute("UPDATE meta SET value = '1.1' WHERE key = 'layout'")
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and "manifest" not in p.name}
    for args in (("ingest", REPLAYS, "--out", data), ("train", "mlp", "--data", data, "--out", tmp_path / "run")):
        res = cli(*args)
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert f"{data}: a dataset of layout 1.1; this exphil reads layout {exphil.FEATURE_VERSION}." in res.stderr
        assert "ingest the replays into a new folder" in res.stderr
    assert before == {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and "manifest" not in p.name}


def test_filters_and_descriptions_come_from_the_manifest(tmp_path, monkeypatch):
    data = tmp_path / "data"
    exphil.ingest(REPLAYS, data, workers=1)
    monkeypatch.setattr(exphil, "_mapped", lambda path: pytest.fail(f"{path} opened"))
    res = exphil.describe(data=data)
    assert (res["games"], res["frames"], res["versions"]) == (3, 23292, {"3.15.0": 1, "2.0.1": 1, "1.7.1": 1})
    left_out = []
    games, _ = exphil.load_games(data=data, keep=exphil._game_filter(stage="final_destination"), left_out=left_out)
    assert games == [] and len(left_out) == 3


def test_episodes_are_views_of_the_shards(tmp_path):
    """Training reads a dataset's windows from memory-mapped shards: the same numbers as parsing
    the replay, in smaller integer types on disk (cast in batches)."""
    data = tmp_path / "data"
    exphil.ingest(NETPLAY, data, workers=1)
    (game,), _ = exphil.load_games(data=data)
    fresh = exphil._episodes_from_replay(NETPLAY)
    for ep, ref in zip(game, fresh):
        assert isinstance(ep.num.base, np.ndarray) or ep.num.base is not None  # a view, not a copy
        assert ep.cat.dtype == np.uint16 and np.array_equal(ep.cat, ref.cat) and np.array_equal(ep.num, ref.num)
        assert all(np.array_equal(ep.labels[h], ref.labels[h]) for h in exphil.HEADS)
    a, b = exphil.make_batch(game, [(0, 100), (1, 6200)], 60), exphil.make_batch(fresh, [(0, 100), (1, 6200)], 60)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_killed_ingestion_leaves_the_dataset_usable_and_the_next_one_continues(tmp_path):
    data, more = tmp_path / "data", tmp_path / "more"
    exphil.ingest(REPLAYS, data, workers=1)
    before = [[ep.num.sum() for ep in g] for g in exphil.load_games(data=data)[0]]
    more.mkdir()
    for k in range(24):
        assert bench.distinct_copy((NETPLAY, NINTENDONT)[k % 2], more / f"{k:02d}.slp", k)
    proc = subprocess.Popen([sys.executable, "-m", "exphil", "ingest", more, "--out", data, "--workers", "1", "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db, deadline, games = sqlite3.connect(data / "manifest.sqlite", timeout=60), time.time() + 120, 3
    while games == 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
        games = db.execute("SELECT count(*) FROM games").fetchone()[0]
    proc.send_signal(signal.SIGKILL)  # right after a shard was committed: the next one is being parsed
    proc.wait()
    assert 3 < games < 27, "the kill came too late"

    games_now, skipped = exphil.load_games(data=data)  # what was committed is whole and usable
    assert len(games_now) >= games and not skipped
    assert [[ep.num.sum() for ep in g] for g in games_now if "/more/" not in g[0].source] == before
    assert all(np.isfinite(ep.num).all() and ep.frames > 0 for g in games_now for ep in g)
    lines = []
    exphil.ingest(more, data, log=lines.append, workers=1)
    done = len(games_now) - 3
    assert any(l.startswith(f"parsed {24 - done} new replays") for l in lines), lines  # only those not in yet
    dataset = exphil.Dataset(data)
    assert len(dataset.rows()) == 27
    assert {d.name for d in (data / "shards").iterdir()} == {r["shard"] for r in dataset.rows()}  # no leftovers


def test_train_and_describe_a_dataset_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    res = cli("ingest", REPLAYS, "--out", data)
    assert res.returncode == 0 and res.stdout.startswith(f"{data}: 3 replays found, 3 distinct, 0 skipped"), res.stderr
    res = cli("data", data, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["characters"] == {"falco": 4, "sheik": 1, "marth": 1}
    res = cli("train", "mlp", "--data", data, "--character", "falco", "--max-steps", "2", "--batch-size", "512",
              "--out", tmp_path / "run", "--quiet")
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["replays"]["data"] == str(data) and info["replays"]["source"] == []
    assert sorted(info["replays"]["train"] + info["replays"]["val"]) == sorted(
        os.path.abspath(REPLAYS / n) for n in ("hohav-peppi__duplicate_game_end.slp", NETPLAY.name))
    res = cli("eval", tmp_path / "run", "--data", data, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["game_frames"] == 2 * 23292, res.stderr
    res = cli("train", "mlp", "--data", data, "--replays", REPLAYS, "--out", tmp_path / "other")
    assert res.returncode == 2 and "one of them" in res.stderr
    res = cli("train", "mlp", "--data", REPLAYS, "--out", tmp_path / "other")
    assert res.returncode == 1 and res.stderr.strip() == (f"exphil: error: {REPLAYS}: not a dataset (no manifest.sqlite); "
                                                          f"build one with `exphil ingest REPLAYS --out {REPLAYS}`")


def test_a_run_on_a_dataset_reads_its_games_from_the_dataset_once_the_replays_are_gone(tmp_path):
    """quantize (and bench --conditioning) take a --data run's recorded games from its dataset."""
    folder = tmp_path / "replays"
    shutil.copytree(REPLAYS, folder)
    exphil.ingest(folder, tmp_path / "data", workers=1)
    run = exphil.train(ROOT / "specs" / "mlp.toml", data=tmp_path / "data", out=tmp_path / "run", max_steps=2,
                       batch_size=512, quiet=True)
    shutil.rmtree(folder)
    val = exphil.recorded_games(run.info, "val")
    assert [g[0].source for g in val] == run.info["replays"]["val"]
    report = exphil.quantize_run(run.path, "dynamic", min_agreement=0.0, max_frames=300, quiet=True)
    assert report["frames"] > 0


def test_a_damaged_shard_is_one_clear_error_when_training_on_the_dataset(tmp_path):
    exphil.ingest(REPLAYS, tmp_path / "data", workers=1)
    shard = next((tmp_path / "data" / "shards").iterdir())
    num = shard / "num.npy"
    num.write_bytes(num.read_bytes()[:-4096])  # cut short, as a full disk or a killed copy leaves it
    with pytest.raises(exphil.ExphilError, match=rf"{tmp_path / 'data'}: shard {shard.name} is damaged .* `exphil ingest`"):
        exphil.load_games(data=tmp_path / "data")


@pytest.mark.parametrize("when", ["before parsing", "while parsing", "every time"])
def test_a_replay_replaced_after_hashing_is_recorded_as_what_was_parsed(tmp_path, monkeypatch, when):
    """A sync tool puts another game in place of a replay after ingestion hashed it: the game is
    recorded under the hash of the content parsed, and the first content, back again, is a new
    game. A file that changes at every reading is reported, never recorded."""
    folder, data, target = tmp_path / "replays", tmp_path / "data", tmp_path / "replays" / "game.slp"
    folder.mkdir()
    shutil.copy(NETPLAY, target)
    reads, real_read = [], exphil.read_replay

    def replace():
        shutil.copy(NINTENDONT if target.read_bytes() == NETPLAY.read_bytes() else NETPLAY, folder / "part")
        os.replace(folder / "part", target)

    def read(path, **kw):
        reads.append(path)
        if when == "before parsing" and len(reads) == 1:
            replace()
        game = real_read(path, **kw)
        if when != "before parsing" and (len(reads) == 1 or when == "every time"):
            replace()
        return game
    monkeypatch.setattr(exphil, "read_replay", read)
    col = exphil.ingest(folder, data, workers=1)
    if when == "every time":
        assert col.dataset.rows() == [] and target not in col.hashes and "changed while being read" in col.errors[target]
        return
    (row,) = col.dataset.rows()
    assert row["hash"] == exphil._file_hash(target)[0] == exphil._file_hash(NINTENDONT)[0] == col.hashes[target]
    assert row["frames"] == exphil.read_replay(NINTENDONT, finalized=True).frame_ids.size
    shutil.copy(NETPLAY, target)
    col = exphil.ingest(folder, data, workers=1)
    assert sorted(r["frames"] for r in col.dataset.rows()) == [6233, row["frames"]]
    assert col.hashes[target] == exphil._file_hash(NETPLAY)[0]


def test_parsing_holds_no_game_after_its_task_even_with_unusable_replays(tmp_path):
    """A parsing task's games are freed when it returns, with the garbage collector off: an
    unusable replay's error keeps no reference to the task's games (through its traceback), so a
    worker's memory does not grow with the tasks it has parsed."""
    import gc

    unusable = [p for p in sorted((SHARED / "odd").glob("*.slp")) if "corrupt" not in p.name][:4] or \
        sorted(BROKEN.glob("*.slp"))
    items = [(str(k), p) for k, p in enumerate([*sorted(REPLAYS.glob("*.slp")), *unusable])]
    (tmp_path / "shards").mkdir()
    gc.collect()
    gc.disable()
    try:
        rows, _ = exphil.parse_replays((str(tmp_path), "task", items))
        alive = sum(isinstance(o, exphil.Episode) for o in gc.get_objects())
    finally:
        gc.enable()
    assert any(r.get("skipped") for r in rows) and sum(r.get("frames") is not None for r in rows) >= 2
    assert alive == 0


def test_hashing_reads_a_file_in_blocks(tmp_path):
    """A 512 MiB junk .slp is hashed in a process whose peak memory grows by far less than it."""
    junk = tmp_path / "junk.slp"
    with open(junk, "wb") as f:
        f.truncate(512 << 20)
    code = ("import resource, sys, exphil; peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "before = peak(); digest, error = exphil._file_hash(sys.argv[1]); print(peak() - before, digest, error)")
    res = subprocess.run([sys.executable, "-c", code, junk], cwd=ROOT, capture_output=True, text=True, timeout=300)
    grown_kib, digest, error = res.stdout.split()
    assert int(grown_kib) < 32 << 10 and len(digest) == 24 and error == "None", res.stdout + res.stderr


def test_ingestions_in_another_pid_namespace_keep_each_others_shards(tmp_path):
    """An ingestion in another PID namespace (`unshare`, as on another host of a Ray cluster or in
    another container) sees no process of this one: it keeps this process's shard that is written
    but not yet committed, and removes only leftovers untouched for a day."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here")
    data, more = tmp_path / "data", tmp_path / "more"
    more.mkdir()
    for k in range(2):
        assert bench.distinct_copy(NINTENDONT, more / f"{k}.slp", k)
    dataset = exphil.Dataset(data, create=True)
    digest = exphil._file_hash(NETPLAY)[0]
    task = exphil._tasks(data, [(digest, NETPLAY)], {digest: NETPLAY.stat().st_size}, 1)[0]
    rows, _ = exphil.parse_replays(task)  # this process's shard, in place, its row not committed yet
    old = data / "shards" / ".tmp-0badc0de-1-0-0"
    old.mkdir()  # another host's leftover from two days ago
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "exphil", "ingest", more,
                          "--out", data, "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (data / "shards" / task[1]).is_dir() and not old.exists()
    dataset.commit(rows)
    games, skipped = exphil.load_games(data=data)
    assert len(games) == 3 and not skipped
    exphil.ingest(more, data, workers=1)  # (nothing new: every shard left is one the manifest uses)
    assert {d.name for d in (data / "shards").iterdir()} == {r["shard"] for r in dataset.rows()}


def test_a_run_records_its_dataset_as_an_absolute_path(tmp_path):
    """A run trained on `--data data` (relative) is quantized from another folder."""
    exphil.ingest(REPLAYS, tmp_path / "data", workers=1)
    res = subprocess.run([sys.executable, "-m", "exphil", "train", "mlp", "--data", "data", "--max-steps", "2",
                          "--batch-size", "512", "--out", "run", "--quiet"], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["replays"]["data"] == str(tmp_path / "data")
    res = cli("quantize", tmp_path / "run", "--min-agreement", "0", "--max-frames", "300", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["frames"] > 0, res.stderr


def test_unusable_names_and_links_are_skipped_and_reported(tmp_path):
    """A replay and a folder whose names are not UTF-8, a link to nowhere and a link loop, beside
    good replays: each is one `skipped` line; ingest, data and train --replays go on."""
    folder = tmp_path / "replays"
    shutil.copytree(REPLAYS, folder)
    shutil.copy(NINTENDONT, os.fsdecode(os.fsencode(folder) + b"/bad\xff.slp"))
    os.mkdir(os.fsencode(folder) + b"/dir\xfe")
    shutil.copy(NETPLAY, os.fsdecode(os.fsencode(folder) + b"/dir\xfe/in.slp"))
    os.symlink(tmp_path / "gone.slp", folder / "dangling.slp")
    os.symlink("loop.slp", folder / "loop.slp")
    expected = {f"{folder}/bad\\xff.slp: the file name is not valid UTF-8: rename it",
                f"{folder}/dir\\xfe/in.slp: the file name is not valid UTF-8: rename it",
                f"{folder}/dangling.slp: a broken symbolic link",
                f"{folder}/loop.slp: cannot read file: Too many levels of symbolic links"}
    res = cli("ingest", folder, "--out", tmp_path / "data")
    assert res.returncode == 0 and f"{tmp_path / 'data'}: 3 replays found, 3 distinct, 4 skipped" in res.stdout, res.stderr
    assert {l.removeprefix("skipped ") for l in res.stderr.splitlines() if l.startswith("skipped ")} == expected
    res = cli("data", folder, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["games"] == 3, res.stderr
    res = cli("train", "mlp", "--replays", folder, "--max-steps", "1", "--batch-size", "512", "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    skipped = json.loads((tmp_path / "run" / "run.json").read_text())["replays"]["skipped"]
    assert {f"{s['path']}: {s['reason']}" for s in skipped} == expected


def _small_dataset(tmp_path):
    """A real dataset of two games, written by another process (its manifest closed and whole)."""
    data, folder = tmp_path / "data", tmp_path / "replays"
    folder.mkdir()
    for replay in (NETPLAY, NINTENDONT):
        shutil.copy(replay, folder)
    res = cli("ingest", folder, "--out", data, "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    return data


def _one_error_line(res, start):
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"exphil: error: {start}"), res.stderr


@pytest.mark.parametrize("sql, problem", [
    ("UPDATE games SET shard = '{outside}/' || shard", "shard '/"),  # an absolute path
    ("UPDATE games SET shard = '../../outside/shards/' || shard", "shard '../../outside"),
    ("UPDATE games SET shard = '..'", "shard '..'"),
    ("UPDATE games SET start = -1", "start -1 is not valid"),
    ("UPDATE games SET start = 'zero'", "start 'zero' is not valid"),
    ("UPDATE games SET frames = 'many'", "frames 'many' is not valid"),
    ("UPDATE games SET character_1 = 200", "character_1 200 is not valid"),
    ("UPDATE games SET stage = 999", "stage 999 is not valid"),
    ("UPDATE games SET port_2 = 2.5", "port_2 2.5 is not valid"),
    ("UPDATE games SET path = x'2f746d70'", "hash, path and skipped must be text"),
    ("ALTER TABLE games DROP COLUMN code_2", "its games table has no column code_2"),
])
def test_tampered_manifest_rows_are_refused_naming_the_dataset_and_the_row(tmp_path, sql, problem):
    """Manifest rows are input: a shard outside the dataset is never opened (another real dataset
    lies beside it), and wrong values or types are one line naming the dataset and the row."""
    import re

    data = _small_dataset(tmp_path)
    shutil.copytree(data, tmp_path / "outside")
    with sqlite3.connect(data / "manifest.sqlite") as db:
        db.execute(sql.format(outside=tmp_path / "outside" / "shards"))
    db.close()
    row = "" if "column" in problem else r"manifest row of game '\w+' \(.*\): "
    with pytest.raises(exphil.ExphilError, match=rf"^{re.escape(str(data))}: (manifest.sqlite: )?{row}{re.escape(problem)}"):
        exphil.load_games(data=data)
    res = cli("train", "mlp", "--data", data, "--max-steps", "1", "--out", tmp_path / "run")
    _one_error_line(res, f"{data}: ")
    assert problem in res.stderr and not (tmp_path / "run").exists()


def test_a_shard_linked_outside_the_dataset_is_refused(tmp_path):
    data = _small_dataset(tmp_path)
    shard = next((data / "shards").iterdir())
    shutil.move(shard, tmp_path / "elsewhere")
    shard.symlink_to(tmp_path / "elsewhere")  # the same files, reached through a link that leaves the dataset
    with pytest.raises(exphil.ExphilError, match=rf"^{data}: shard {shard.name}: \w+\.npy leads outside the dataset"):
        exphil.load_games(data=data)
    res = cli("train", "mlp", "--data", data, "--max-steps", "1", "--out", tmp_path / "run")
    _one_error_line(res, f"{data}: shard {shard.name}: ")


def test_a_damaged_manifest_is_one_line_naming_the_dataset(tmp_path):
    """A truncated or overwritten manifest.sqlite, of a dataset folder and of the replay cache's
    dataset behind --replays (named as such)."""
    data = _small_dataset(tmp_path)
    env = {**os.environ, "EXPHIL_CACHE": str(tmp_path / "cache")}
    assert cli("data", NETPLAY, env=env).returncode == 0
    cached = exphil._cache_dataset(tmp_path / "cache")
    remedy, rebuild = "ingest the replays into a new dataset folder", "delete that folder to rebuild it from the replays"
    for folder, name, args, fix in ((data, str(data), ["data", data], remedy),
                                    (data, str(data), ["train", "mlp", "--data", data], remedy),
                                    (cached, f"the replay cache's dataset {cached}", ["data", NETPLAY], rebuild)):
        manifest = folder / "manifest.sqlite"
        good = manifest.read_bytes()
        for damaged in (good[:len(good) // 2], b"not a database, a note " * 400):
            manifest.write_bytes(damaged)
            res = cli(*args, "--out", tmp_path / "run", env=env) if args[0] == "train" else cli(*args, env=env)
            _one_error_line(res, f"{name}: manifest.sqlite: ")
            assert f"(damaged: {fix})" in res.stderr
        manifest.write_bytes(good)
    assert not (tmp_path / "run").exists()


def _mounted(tmp_path, *mount):
    """A folder of tmp_path with a file system mounted on it (root only; skips the test otherwise)."""
    folder = tmp_path / "mnt"
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", *mount, folder], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a file system here")
    return folder


def test_a_read_only_dataset_can_be_read_trained_on_and_evaluated_on(tmp_path):
    data = _small_dataset(tmp_path)
    ro = _mounted(tmp_path, "--bind", data)
    try:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", ro]).returncode == 0
        before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*"))
        res = cli("data", ro, "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["games"] == 2, res.stderr
        res = cli("train", "mlp", "--data", ro, "--max-steps", "2", "--batch-size", "512", "--out", tmp_path / "run",
                  "--quiet")
        assert res.returncode == 0, res.stderr
        res = cli("eval", tmp_path / "run", "--data", ro, "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["games"] == 2, res.stderr
        assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")) == before
    finally:
        subprocess.run(["umount", ro])


def test_a_full_disk_while_ingesting_is_one_line_naming_the_dataset_and_leaves_no_temporaries(tmp_path):
    """A dataset on a 24 MB file system, filled up: first with room for the manifest but not for
    the new shard, then with no room at all (a new dataset's manifest cannot be written)."""
    disk = _mounted(tmp_path, "-t", "tmpfs", "-o", "size=24m", "tmpfs")
    data = disk / "data"
    try:
        res = cli("ingest", NETPLAY, "--out", data, "--quiet")
        assert res.returncode == 0, res.stderr
        for room in (256 << 10, 0):
            with open(disk / "filler", "ab") as f:  # fill the disk, leaving `room` bytes
                try:
                    while (free := shutil.disk_usage(disk).free) > room:
                        f.write(b"\0" * min(1 << 20, max(4096, free - room)))
                        f.flush()
                except OSError:  # full
                    pass
            res = cli("ingest", NINTENDONT, "--out", data if room else disk / "new", "--quiet")
            _one_error_line(res, f"{data}: cannot write shard " if room else f"{disk / 'new'}: manifest.sqlite: ")
            assert not [p for p in (data / "shards").iterdir() if p.name.startswith(".tmp")]
            (disk / "filler").unlink()
            res = cli("data", data, "--json")  # the dataset as it was
            assert res.returncode == 0 and json.loads(res.stdout)["games"] == 1, res.stderr
    finally:
        subprocess.run(["umount", disk])


def test_a_shard_cut_short_under_a_running_training_stops_it_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """A real training on a dataset; once it has a checkpoint, one of its shard's files is cut
    short in place. The cut is smaller than the file's last page, so no read can fault before the
    check sees it (a deeper cut landing during the read of a batch itself still ends the process
    with SIGBUS, as the README says)."""
    data, out = _small_dataset(tmp_path), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "exphil", "train", "mlp", "--data", data, "--epochs", "1000",
                             "--out", out, "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "train" / "checkpoint").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None and (out / "train" / "checkpoint").exists(), "no checkpoint"
        cut = next(f for f in sorted((data / "shards").glob("*/*.npy")) if f.stat().st_size % 4096 > 1)
        os.truncate(cut, cut.stat().st_size - 1)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"exphil: error: {data}: shard {cut.parent.name} was cut short while in use ({cut.name}: "), err
    assert err.rstrip().endswith(f"its last checkpoint is kept: once `exphil ingest` has parsed the shard's replays "
                                 f"into the dataset again, continue with `exphil train --resume --out {out}`"), err
    assert exphil.has_checkpoint(out / "train")
