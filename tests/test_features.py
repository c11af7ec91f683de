"""The train/serve contract: features and labels computed from a replay with peppi-py equal
what libmelee's GameState gives at play time, frame by frame."""

import melee
import numpy as np
import pytest

import exphil
from conftest import REPLAYS, SHARED


def compare_with_libmelee(path):
    """Stream the replay through libmelee's Console and compare every frame, both ports."""
    game = exphil.read_replay(path)  # first version of rolled-back frames, as libmelee yields
    ports = game.ports
    other = {ports[0]: ports[1], ports[1]: ports[0]}
    feats = {p: exphil.game_features(game, p, other[p]) for p in ports}
    labels = {p: exphil.game_labels(game, p) for p in ports}
    console = melee.Console(path=str(path), is_dolphin=False, allow_old_version=True)
    console.connect()
    i, worst = 0, 0.0
    while (gs := console.step()) is not None:
        assert gs.frame == game.frame_ids[i]
        for p in ports:
            cat, num = exphil.features_from_gamestate(gs, p, other[p])
            assert np.array_equal(cat, feats[p][0][i]), (gs.frame, p, cat, feats[p][0][i])
            diff = np.abs(num - feats[p][1][i])
            assert diff.max() <= 1e-5, (gs.frame, p, [exphil.NUM_FIELDS[k] for k in np.flatnonzero(diff > 1e-5)])
            worst = max(worst, float(diff.max()))
            enc = exphil.encode_controller(gs.players[p].controller_state)
            assert np.array_equal(enc["buttons"], labels[p]["buttons"][i]), (gs.frame, p)
            assert all(enc[h] == labels[p][h][i] for h in exphil.HEADS if h != "buttons"), (gs.frame, p)
        i += 1
    assert i == len(game.frame_ids) > 1000
    return worst


@pytest.mark.parametrize("name", sorted(p.name for p in REPLAYS.glob("*.slp")))
def test_replay_features_equal_libmelee_features(name):
    assert compare_with_libmelee(REPLAYS / name) <= 1e-5


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared replay collection is not beside the repository")
def test_rollback_heavy_replay_matches_libmelee():
    assert compare_with_libmelee(SHARED / "project-slippi-slippi-js__rollbackFrameTest.slp") <= 1e-5


def test_feature_layout_is_documented_and_sane():
    game = exphil.read_replay(REPLAYS / "hohav-peppi__duplicate_game_end.slp", finalized=True)
    p, q = game.ports
    cat, num = exphil.game_features(game, p, q)
    assert cat.shape == (len(game.frame_ids), len(exphil.CAT_FIELDS))
    assert num.shape == (len(game.frame_ids), len(exphil.NUM_FIELDS)) and num.dtype == np.float32
    for j, (_, table) in enumerate(exphil.CAT_FIELDS):
        assert 0 <= cat[:, j].min() and cat[:, j].max() < exphil.EMBED_TABLES[table]
    assert np.isfinite(num).all() and np.abs(num).max() <= 10
    assert len(np.unique(cat[:, 0])) > 20  # a real game goes through many action states


def test_finalized_frames_drop_rollback_duplicates():
    """Netplay replays re-send rolled-back frames; each frame id is kept once, in order."""
    import peppi_py

    path = REPLAYS / "hohav-peppi__duplicate_game_end.slp"
    raw_ids = peppi_py.read_slippi(str(path)).frames.id.to_numpy()
    assert len(raw_ids) > len(np.unique(raw_ids))  # this replay has rollbacks
    for finalized in (False, True):
        ids = exphil.read_replay(path, finalized=finalized).frame_ids
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))) and ids[0] == -123
