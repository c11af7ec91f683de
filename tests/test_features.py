"""The train/serve contract: features and labels computed from a replay with peppi-py equal
what libmelee's GameState gives at play time, frame by frame."""

import os
from pathlib import Path

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


def test_items_and_randall_are_seen_on_a_real_falco_ditto_on_yoshis_story():
    """Layout v2 on a real game: Falco's lasers fill the item slots, nearest first, owned by the
    port that fired them; Randall moves on Yoshi's Story; there is no Nana."""
    game = exphil.read_replay(REPLAYS / "hohav-peppi__duplicate_game_end.slp", finalized=True)
    p, q = game.ports
    cat, num = exphil.game_features(game, p, q)
    col = {n: num[:, i] for i, n in enumerate(exphil.NUM_FIELDS)}
    laser = exphil.enums.ProjectileType.FALCO_LASER.value + 1
    assert (cat[:, 7] == laser).mean() > 0.05 and (col["item0_exists"] == (cat[:, 7] > 0)).all()
    both = (col["item0_exists"] == 1) & (col["item1_exists"] == 1)
    d = lambda k: np.hypot(col[f"item{k}_dx"], col[f"item{k}_dy"])
    assert both.sum() > 100 and (d(0)[both] <= d(1)[both] + 1e-6).all()
    mine, theirs = col["item0_mine"] == 1, col["item0_theirs"] == 1
    assert mine.any() and theirs.any() and not (mine & theirs).any()
    assert (col["randall_exists"] == 1).all() and np.ptp(col["randall_x"]) > 3 and np.ptp(col["randall_y"]) > 0.3
    nana = [i for i, n in enumerate(exphil.NUM_FIELDS) if "_nana_" in n]
    assert not num[:, nana].any() and (cat[:, 5:7] == exphil.UNKNOWN_ACTION).all()
    other = exphil.read_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp", finalized=True)  # Battlefield
    assert not exphil.game_features(other, *other.ports)[1][:, exphil.NUM_FIELDS.index("randall_exists")].any()


def test_item_slots_hold_the_nearest_items_padded_and_in_the_games_order_on_ties():
    # frame 0: five items (one more than the slots), two at the same distance; frame 1: none; frame 2: one
    rows = [(0, 55, 1, 30, 0, 1, 0, 10), (0, 55, 2, -5, 0, -1, 0, 20), (0, 75, 2, 5, 0, 0, 0, 30),
            (0, 57, 0, 0, 40, 0, 0, 40), (0, 300, 1, 100, 0, 0, 0, 50), (2, 55, 2, 0, -3, 0, 2.5, 7.9)]
    items = exphil._items_from(rows)
    cat, raw = exphil._item_raw(items, 3, 1, 2, np.zeros(3, np.float32), np.zeros(3, np.float32))
    raw = raw.reshape(3, exphil.ITEM_SLOTS, -1)
    assert cat.tolist() == [[56, 76, 56, 58], [0, 0, 0, 0], [56, 0, 0, 0]]  # -5 before +5: the game's order
    assert raw[0, :, 3].tolist() == [-5, 5, 30, 0] and raw[0, :, 1].tolist() == [0, 0, 1, 0]
    assert raw[0, :, 2].tolist() == [1, 1, 0, 0] and not raw[1].any() and not raw[2, 1:].any()
    assert raw[2, 0].tolist() == [1, 0, 1, 0, -3, 0, 2.5, 7]  # timer whole frames, as libmelee reads it
    assert exphil._item_raw(exphil._items_from([(0, 400, -1, 0, 0, 0, 0, 0)]), 1, 1, 2, *np.zeros((2, 1), np.float32))[0][0, 0] == 255


COLLECTION = os.environ.get("EXPHIL_COLLECTION")  # an unpacked ../shared/collection (it holds Ice Climbers games)


@pytest.mark.skipif(not COLLECTION, reason="set EXPHIL_COLLECTION to an unpacked replay collection")
def test_nana_features_equal_libmelee_on_ice_climbers_games():
    games = sorted(Path(COLLECTION).glob("*Ice_Climbers*.slp"))
    assert games
    for path in games:
        game = exphil.read_replay(path)
        assert game.nana and compare_with_libmelee(path) <= 1e-5, path


def test_finalized_frames_drop_rollback_duplicates():
    """Netplay replays re-send rolled-back frames; each frame id is kept once, in order."""
    import peppi_py

    path = REPLAYS / "hohav-peppi__duplicate_game_end.slp"
    raw_ids = peppi_py.read_slippi(str(path)).frames.id.to_numpy()
    assert len(raw_ids) > len(np.unique(raw_ids))  # this replay has rollbacks
    for finalized in (False, True):
        ids = exphil.read_replay(path, finalized=finalized).frame_ids
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))) and ids[0] == -123
