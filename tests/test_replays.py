"""Bad input never stops a run: each unusable replay is skipped with one line naming it."""

import os
import shutil

import numpy as np
import pytest

import exphil
from conftest import BROKEN, REPLAYS, SHARED

GOOD = REPLAYS / "hohav-py-slippi__netplay_name.slp"


def broken_folder(tmp_path):
    folder = tmp_path / "replays"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(GOOD, folder / "nested" / "good.slp")
    data = GOOD.read_bytes()
    (folder / "truncated.slp").write_bytes(data[: len(data) // 3])
    (folder / "header_only.slp").write_bytes(data[:100])
    (folder / "empty.slp").write_bytes(b"")
    (folder / "notes.slp").write_text("This is not a replay, just a text file named .slp\n")
    shutil.copy(BROKEN / "hohav-peppi__corrupt.slp", folder / "corrupt.slp")
    (folder / "readme.txt").write_text("ignored: not a .slp file")
    return folder


def test_broken_replays_are_skipped_with_a_reason(tmp_path):
    lines = []
    games, skipped = exphil.load_games(broken_folder(tmp_path), log=lines.append)
    assert len(games) == 1 and games[0][0].source.endswith("good.slp")
    names = {s["path"].rsplit("/", 1)[1] for s in skipped}
    assert names >= {"header_only.slp", "empty.slp", "notes.slp", "corrupt.slp"}
    lines = [l for l in lines if l.startswith("skipped ")]  # (a "parsed ..." line when the cache is new)
    assert len(lines) == len(skipped)
    for s, line in zip(skipped, lines):
        assert s["path"] in line and s["reason"] and "\n" not in line


@pytest.mark.skipif(not (SHARED / "odd").is_dir(), reason="the shared replay collection is not beside the repository")
def test_odd_cases_from_the_shared_collection(tmp_path):
    """Corrupt, truncated, renamed text/PNG, Slippi 0.1, unknown events, single-player modes, CPU
    opponents: each either reads as a 1v1 of two humans or is skipped, never a crash."""
    games, skipped = exphil.load_games(SHARED / "odd")
    assert len(games) + len(skipped) == len(list((SHARED / "odd").glob("*.slp")))
    assert len(skipped) >= 10 and all(s["reason"] for s in skipped)


def test_training_goes_on_past_broken_replays(tmp_path):
    folder = broken_folder(tmp_path)
    shutil.copy(REPLAYS / "hohav-peppi__duplicate_game_end.slp", folder / "second.slp")
    run = exphil.train(exphil.load_spec(REPLAYS.parent.parent / "specs" / "mlp.toml"), folder, epochs=1,
                       out=tmp_path / "run", quiet=True)
    assert len(run.info["replays"]["skipped"]) >= 4
    assert len(run.info["replays"]["train"]) + len(run.info["replays"]["val"]) == 2


def test_no_usable_replay_is_one_clear_error(tmp_path):
    (tmp_path / "empty.slp").write_bytes(b"")
    with pytest.raises(exphil.ExphilError, match="no usable replay"):
        exphil.train(REPLAYS.parent.parent / "specs" / "mlp.toml", tmp_path, out=tmp_path / "run", quiet=True)


def test_filters_that_match_no_game_say_so(tmp_path):
    with pytest.raises(exphil.ExphilError, match="no game matches the filters .character peach"):
        exphil.train(REPLAYS.parent.parent / "specs" / "mlp.toml", REPLAYS, out=tmp_path / "run", quiet=True,
                     character="peach")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    first = exphil.load_replay(GOOD)
    monkeypatch.setattr(exphil, "read_replay", lambda *a, **k: pytest.fail("parsed again"))
    copy = tmp_path / "renamed.slp"
    shutil.copy(GOOD, copy)
    again = exphil.load_replay(copy)  # same content, other name: still a cache hit
    for a, b in zip(first, again):
        assert a.port == b.port and np.array_equal(a.cat, b.cat) and np.array_equal(a.num, b.num)
        assert all(np.array_equal(a.labels[h], b.labels[h]) for h in exphil.HEADS)


def test_split_is_by_game_and_reproducible():
    games = [[f"g{i}a", f"g{i}b"] for i in range(10)]
    train, val = exphil.split_games(games, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not {g[0] for g in train} & {g[0] for g in val}
    assert exphil.split_games(games, 0.2, seed=3) == (train, val)


def test_only_new_and_changed_files_are_read_again(tmp_path, monkeypatch):
    """The manifest remembers each file's content hash at its size and modification time: a
    second load reads no replay; a touched file is hashed again (and is still a cache hit); a
    renamed copy is hashed once and not parsed."""
    folder = tmp_path / "replays"
    shutil.copytree(REPLAYS, folder)
    cache = tmp_path / "cache"
    first, _ = exphil.load_games(folder, cache)
    hashed, real_content = [], exphil._content
    monkeypatch.setattr(exphil, "_content", lambda path: hashed.append(os.path.basename(path)) or real_content(path))
    monkeypatch.setattr(exphil, "read_replay", lambda *a, **k: pytest.fail("parsed again"))
    again, _ = exphil.load_games(folder, cache)
    assert hashed == [] and [[e.frames for e in g] for g in again] == [[e.frames for e in g] for g in first]
    touched = folder / "hohav-py-slippi__nintendont.slp"
    os_stat = touched.stat()
    exphil.os.utime(touched, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 10**9))
    shutil.copy(GOOD, folder / "copy.slp")
    exphil.load_games(folder, cache)
    assert sorted(hashed) == ["copy.slp", "hohav-py-slippi__nintendont.slp"]


def test_data_describes_a_collection_from_the_manifest(tmp_path, monkeypatch):
    """`exphil data`: the shipped replays are (per their README) Falco vs Falco, Sheik vs Marth
    and Falco vs Falco, 6,233 + 12,036 + 5,023 frames; the corrupt one is skipped. A second
    description comes from the manifest: no replay array is loaded."""
    folder = tmp_path / "replays"
    shutil.copytree(REPLAYS, folder)
    shutil.copy(BROKEN / "hohav-peppi__corrupt.slp", folder)
    monkeypatch.setenv("EXPHIL_CACHE", str(tmp_path / "cache"))
    res = exphil.describe(folder)
    assert res["replays"] == 4 and res["games"] == 3 and res["frames"] == 6233 + 12036 + 5023
    assert res["characters"] == {"falco": 4, "sheik": 1, "marth": 1}
    assert sum(res["skipped"].values()) == 1 and list(res["skipped"]) == ["unreadable"]
    monkeypatch.setattr(exphil, "load_replay", lambda *a, **k: pytest.fail("arrays loaded"))
    assert exphil.describe(folder) == res


def test_data_command_prints_the_summary(tmp_path):
    import subprocess
    import sys

    env = {**exphil.os.environ, "EXPHIL_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "exphil", "data", str(REPLAYS)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{REPLAYS}: 3 games, 23,292 frames (0.1 hours of play), 0 of 3 replays skipped"
    assert lines[1] == "  characters (player views): falco 4, sheik 1, marth 1"


def test_runs_sharing_a_cache_can_load_at_once(tmp_path):
    """Three processes load the same new collection into one cache at the same time (as runs
    started together do): each one gets every game, none fails on the manifest's lock."""
    import subprocess
    import sys

    source = SHARED if SHARED.is_dir() else REPLAYS
    code = ("import sys, exphil\n"
            "if __name__ == '__main__':\n"
            "    games, skipped = exphil.load_games(sys.argv[1], workers=1)\n"
            "    print(len(games), len(skipped))\n")
    env = {**exphil.os.environ, "EXPHIL_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(source)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-300:] for _, err in results]
    assert len({out for out, _ in results}) == 1
