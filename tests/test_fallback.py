"""Replays peppi-py cannot read (it panics on Slippi 3.3-3.6 games) are read by libmelee's replay
console instead, to the same columns, features and labels."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import exphil
from conftest import BROKEN, REPLAYS, ROOT, SHARED
from test_features import compare_with_libmelee

ODD = ROOT.parent / "shared" / "collection" / "odd"
# games of the shared collection that make peppi-py 0.8.6 panic: Slippi version, frames
PANICKING = {"EGuan-Onion-melee-tools__Fox_vs_Falco_DODO_YS_Game_001AE98EF2CE_20200307T184536__0d83924d.slp": ("3.3.0", 3808),
             "EGuan-Onion-slippi_db__Game_20200630T004615__14d5001c.slp": ("3.6.0", 7167),
             "slprank-Froggi-Launcher__Replay_4_W___9ed3a323.slp": ("3.16.0", 10073)}
needs_odd = pytest.mark.skipif(not ODD.is_dir() or not (SHARED / "odd").is_dir(),
                               reason="the shared replay collections are not beside the repository")

# libmelee's values where peppi-py's differ without changing a feature: integers for its floats,
# a flag for the hurtbox state, 0..1 sticks (the same float32 once mapped by the features)
AS_LIBMELEE = {"state_age": exphil._trunc_int, "misc_as": exphil._trunc_int, "hitlag": exphil._trunc_int,
               "direction": lambda a: a > 0, "hurtbox": lambda a: a != 0,
               **{k: exphil._stick for k in ("joy_x", "joy_y", "c_x", "c_y")}}


@pytest.mark.parametrize("finalized", [False, True])
@pytest.mark.parametrize("name", sorted(p.name for p in REPLAYS.glob("*.slp")))
def test_fallback_equals_peppi_on_every_frame(name, finalized):
    """Both parsers read the shipped replays (Slippi 1.7, 2.0 and 3.15 with rollbacks): the
    fallback gives the same frames, columns, features and labels."""
    peppi = exphil.read_replay(REPLAYS / name, finalized=finalized)
    melee = exphil.read_replay_libmelee(REPLAYS / name, finalized=finalized)
    assert (peppi.info.pop("parser"), melee.info.pop("parser")) == ("peppi-py", "libmelee")
    assert peppi.info == melee.info and peppi.stage == melee.stage and peppi.ports == melee.ports
    assert np.array_equal(peppi.frame_ids, melee.frame_ids)
    for port, other in (peppi.ports, peppi.ports[::-1]):
        a, b = peppi.players[port], melee.players[port]
        assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
        for k in a:
            same = AS_LIBMELEE.get(k, lambda v: v)
            assert np.array_equal(same(a[k]), same(b[k])), (port, k)
        for x, y in zip(exphil.game_features(peppi, port, other), exphil.game_features(melee, port, other)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        la, lb = exphil.game_labels(peppi, port), exphil.game_labels(melee, port)
        assert all(np.array_equal(la[h], lb[h]) for h in exphil.HEADS)


@needs_odd
@pytest.mark.parametrize("path", [ODD / n for n in PANICKING] + [SHARED / "odd" / "altf4-libmelee__test_game_1.slp"],
                         ids=lambda p: p.name[:24])
def test_panicking_replays_read_through_libmelee(path):
    """read_replay of a game peppi-py panics on: features and labels equal those of libmelee's
    GameStates on every frame, both ports."""
    import peppi_py

    with pytest.raises(BaseException, match="StructArray must contain at least one field|equal number of values"), \
            exphil._quiet_fd2():
        peppi_py.read_slippi(str(path))
    assert compare_with_libmelee(path) == 0.0  # (read_replay's columns come from libmelee's values)


@needs_odd
def test_ingest_counts_the_games_read_through_libmelee(tmp_path):
    """`exphil ingest` keeps the panicking games (their frames in the dataset are the fallback's),
    says how many came through libmelee, and still skips what neither parser reads or what is no
    1v1 of two humans, each with one line."""
    folder = tmp_path / "replays"
    folder.mkdir()
    for name in PANICKING:
        shutil.copy(ODD / name, folder)
    for path in (REPLAYS / "hohav-py-slippi__netplay_name.slp", BROKEN / "hohav-peppi__corrupt.slp",
                 SHARED / "odd" / "project-slippi-slippi-js__homeRun_positive.slp"):
        shutil.copy(path, folder)
    env = {**exphil.os.environ, "EXPHIL_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "exphil", "ingest", str(folder), "--out", str(tmp_path / "data"),
                          "--workers", "1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "parsed 6 new replays (" in out.stderr and ", 3 read by libmelee (peppi-py cannot read them, or their Nana))" in out.stderr
    assert out.stdout.startswith(f"{tmp_path / 'data'}: 6 replays found, 6 distinct, 2 skipped; the dataset holds 4 games")
    skipped = sorted(line for line in out.stderr.splitlines() if line.startswith("skipped "))
    assert len(skipped) == 2
    assert "corrupt.slp: unreadable (peppi-py OSError" in skipped[0] and "; libmelee " in skipped[0]
    assert "homeRun_positive.slp: not two human players: port 1 is HUMAN, port 2 is CPU" in skipped[1]

    games, _ = exphil.load_games(data=tmp_path / "data")
    by_name = {g[0].source.rsplit("/", 1)[1]: g for g in games}
    rows = {r["path"].rsplit("/", 1)[1]: r for r in exphil.Dataset(tmp_path / "data").rows()}
    for name, (version, frames) in PANICKING.items():
        assert (rows[name]["slippi"], rows[name]["frames"]) == (version, frames)
        game = exphil.read_replay_libmelee(ODD / name, finalized=True)
        for ep in by_name[name]:
            cat, num = exphil.game_features(game, ep.port, [p for p in game.ports if p != ep.port][0])
            assert np.array_equal(ep.cat, cat) and np.array_equal(ep.num, num)
            assert np.array_equal(ep.labels["main_x"], exphil.game_labels(game, ep.port)["main_x"])


def test_bench_times_the_parsers(tmp_path):
    """`bench.py --parsers`: frames/s of each way to read each replay (peppi-py only where it reads
    the file), and the fallback beside libmelee's console alone."""
    panicking = SHARED / "odd" / "altf4-libmelee__test_game_1.slp"
    paths = [REPLAYS / "hohav-py-slippi__netplay_name.slp"] + [panicking] * panicking.is_file()
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--parsers", *map(str, paths), "--rounds", "1",
                          "--json", str(tmp_path / "p.json")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "p.json").read_text())["parsers"]
    assert [r["replay"] for r in rows] == [p.name for p in paths]
    for path, row in zip(paths, rows):
        assert row["frames"] == len(exphil.read_replay(path, finalized=True).frame_ids)
        assert set(row["fps"]) == ({"fallback", "console"} if path == panicking else {"peppi", "fallback", "console"})
        assert all(v > 0 for v in row["fps"].values()) and row["fallback_vs_console"] > 0
    assert ("cannot" in out.stdout) == (len(paths) == 2) and f"all {len(paths)} replays" in out.stdout


@needs_odd
def test_games_an_older_exphil_could_not_read_are_parsed_again(tmp_path):
    """A dataset that recorded a panicking game as unreadable (peppi-py's reason alone, as exphil
    did before the fallback) reads it at the next ingestion; a reason that names libmelee stays."""
    folder = tmp_path / "replays"
    folder.mkdir()
    shutil.copy(SHARED / "odd" / "altf4-libmelee__test_game_1.slp", folder)
    shutil.copy(BROKEN / "hohav-peppi__corrupt.slp", folder)
    exphil.ingest(folder, tmp_path / "data", workers=1)
    dataset = exphil.Dataset(tmp_path / "data", create=True)  # (opened for writing: edited below)
    old = "unreadable (PanicException: called `Result::unwrap()` on an `Err` value: OutOfSpec(...))"
    dataset.db.execute("UPDATE games SET skipped = ?, shard = NULL, start = NULL, frames = NULL WHERE path LIKE "
                       "'%test_game_1.slp'", (old,))
    lines = []
    exphil.ingest(folder, tmp_path / "data", log=lines.append, workers=1)
    rows = {r["path"].rsplit("/", 1)[1]: r for r in dataset.rows()}
    assert rows["altf4-libmelee__test_game_1.slp"]["skipped"] is None
    assert rows["altf4-libmelee__test_game_1.slp"]["frames"] == 1038
    assert "libmelee" in rows["hohav-peppi__corrupt.slp"]["skipped"]
    assert any(line.startswith("parsed 1 new replays (1,038 frames, 1 read by libmelee") for line in lines), lines
