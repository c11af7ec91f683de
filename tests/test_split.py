"""Train/validation splits that hold out players or sources, on real replays."""

import os
import subprocess
import sys

import pytest

import exphil
from conftest import REPLAYS, ROOT, SHARED

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared replays in {SHARED}")
WALNUT = sorted(SHARED.glob("Walnut356-SlippiStats__Game_*.slp"))  # netplay games, all of one player (NUT#356)


def codes(games) -> set[str]:
    return {ep.code for g in games for ep in g if ep.code}


def folders(games) -> set[str]:
    return {os.path.dirname(g[0].source) for g in games}


def names(games) -> list[str]:
    return [g[0].source for g in games]


@pytest.fixture(scope="module")
def shared_games():
    games, _ = exphil.load_games(SHARED)
    return games


@needs_shared
def test_player_split_keeps_every_code_on_one_side(shared_games):
    """The shared replays: 13 games of one player against 11 opponents, a few other netplay games,
    and games without codes. Split by game, that player lands on both sides; split by player,
    no connect code does, and the codeless games (one folder) stay together."""
    assert len(codes(shared_games)) > 15
    assert any(codes(t) & codes(v) for t, v in (exphil.split_games(shared_games, 0.2, s) for s in range(5)))
    for seed in range(5):
        train, val = exphil.split_games(shared_games, 0.2, seed, by="player")
        assert val and train and len(val) <= round(0.2 * len(shared_games))
        assert not codes(train) & codes(val)
        codeless = [g for g in shared_games if not any(ep.code for ep in g)]
        assert all(g in train for g in codeless) or all(g in val for g in codeless)
        assert sorted(names(train) + names(val)) == sorted(names(shared_games))
        again = exphil.split_games(shared_games, 0.2, seed, by="player")
        assert (names(again[0]), names(again[1])) == (names(train), names(val))


@needs_shared
def test_player_groups_are_the_games_that_share_players(shared_games):
    groups = exphil.split_groups(shared_games, "player")
    assert sorted(i for g in groups for i in g) == list(range(len(shared_games)))
    for a in groups:
        for b in groups:
            if a is not b:
                assert not codes([shared_games[i] for i in a]) & codes([shared_games[i] for i in b])
    walnut = next(g for g in groups if "NUT#356" in codes([shared_games[i] for i in g]))
    assert len(walnut) == len(WALNUT)


def test_source_split_keeps_folders_apart(tmp_path):
    for folder, replays in (("a", sorted(REPLAYS.glob("*.slp"))[:2]), ("b", sorted(REPLAYS.glob("*.slp"))[2:])):
        (tmp_path / folder).mkdir()
        for r in replays:
            (tmp_path / folder / r.name).symlink_to(r)
    games, _ = exphil.load_games(tmp_path)
    assert len(games) == 3
    for seed in range(3):
        train, val = exphil.split_games(games, 0.3, seed, by="source")
        assert folders(val) == {str(tmp_path / "b")} and folders(train) == {str(tmp_path / "a")}


@needs_shared
def test_a_split_that_leaves_validation_empty_is_one_line(tmp_path):
    """Games that all share one player cannot be split by player; one folder cannot be split by
    source: one line naming the replays, exit code 2, nothing trained."""
    walnut = tmp_path / "walnut"
    walnut.mkdir()
    for r in WALNUT[:3]:
        (walnut / r.name).symlink_to(r)
    for folder, by in ((walnut, "player"), (REPLAYS, "source")):
        res = subprocess.run([sys.executable, "-m", "exphil", "train", "mlp", "--replays", folder, "--split-by", by,
                              "--out", tmp_path / f"run-{by}", "--quiet"], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert f"{folder}: --split-by {by} leaves no validation game" in res.stderr
        assert not (tmp_path / f"run-{by}" / "train").exists()


@needs_shared
def test_training_on_a_dataset_validates_on_players_it_never_trained_on(tmp_path):
    folder = tmp_path / "replays"
    folder.mkdir()
    for r in WALNUT[:4] + sorted(SHARED.glob("project-slippi-slippi-js__*.slp")) + \
            [SHARED / "PMcca-go-slippi__metadata.slp", SHARED / "hohav-py-slippi__v2.0.slp"]:
        (folder / r.name).symlink_to(r)
    exphil.ingest(folder, tmp_path / "data")
    run = exphil.train(ROOT / "specs" / "mlp.toml", data=tmp_path / "data", split_by="player", val_split=0.3,
                       max_steps=1, batch_size=512, out=tmp_path / "run", quiet=True)
    rows = {r["path"]: {r["code_1"], r["code_2"]} - {None} for r in exphil.Dataset(tmp_path / "data").rows()}
    train, val = (set().union(*(rows[p] for p in run.info["replays"][k])) for k in ("train", "val"))
    assert run.info["replays"]["val"] and train and val and not train & val
    assert run.info["config"]["split_by"] == "player"
