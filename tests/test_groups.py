"""Quality per group of player views (character, opponent character, player): in `exphil eval
--by`, its JSON, and run.json at the end of training."""

import json
import subprocess
import sys

import pytest

import exphil
from conftest import REPLAYS, ROOT

FALCO = [REPLAYS / "hohav-peppi__duplicate_game_end.slp", REPLAYS / "hohav-py-slippi__netplay_name.slp"]


def test_one_group_is_the_whole_set(mlp_run):
    """Two games where every player view is Falco against Falco: the one group of each grouping
    has exactly the metrics of the whole set."""
    whole = exphil.evaluate(mlp_run.path, FALCO)
    for by, name in (("character", "falco"), ("opponent", "falco"), ("player", "(no code)")):
        res = exphil.evaluate(mlp_run.path, FALCO, by=by)
        (group_name, group), = res["by"][by].items()
        assert group_name == name and group["games"] == 2 and group["views"] == 4
        assert group["frames"] == whole["frames"] and group["loss"] == pytest.approx(whole["loss"], rel=1e-12)
        assert group["markov_loss"] == pytest.approx(whole["markov"]["loss"], rel=1e-12)
        assert group["accuracy"] == whole["accuracy"] and group["copy_accuracy"] == whole["copy"]["accuracy"]
        assert group["button_f1"] == whole["button_f1"] and group["copy_button_f1"] == whole["copy"]["button_f1"]
        assert group["change_accuracy"] == whole["change"]["accuracy"]
        assert res["loss"] == pytest.approx(whole["loss"], rel=1e-12)


def test_groups_sum_to_the_whole_set_frame_weighted(mlp_run):
    """Falco, Marth and Sheik views, the top 2 groups by name and the rest pooled: frames add up,
    and the frame-weighted means of loss, Markov loss and stick top-1 (model and copy) are the
    whole set's."""
    whole = exphil.evaluate(mlp_run.path, REPLAYS)
    res = exphil.evaluate(mlp_run.path, REPLAYS, by="character", top=2)
    groups = res["by"]["character"]
    assert list(groups) == ["falco", "marth", "(others)"] and groups["falco"]["games"] == 2
    frames = sum(g["frames"] for g in groups.values())
    assert frames == whole["frames"] == res["frames"]
    mean = lambda get: sum(get(g) * g["frames"] for g in groups.values()) / frames
    assert mean(lambda g: g["loss"]) == pytest.approx(whole["loss"], rel=1e-6)
    assert mean(lambda g: g["markov_loss"]) == pytest.approx(whole["markov"]["loss"], rel=1e-5)
    for h in ("main_x", "main_y", "c_x", "shoulder"):
        assert mean(lambda g: g["accuracy"][h]) == pytest.approx(whole["accuracy"][h], abs=2e-5)
        assert mean(lambda g: g["copy_accuracy"][h]) == pytest.approx(whole["copy"]["accuracy"][h], abs=2e-5)


def test_eval_by_on_the_command_line_and_in_run_json(mlp_run):
    res = subprocess.run([sys.executable, "-m", "exphil", "eval", mlp_run.path, "--replays", REPLAYS, "--by", "opponent",
                          "--json"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    groups = json.loads(res.stdout)["by"]["opponent"]
    assert set(groups) == {"falco", "marth", "sheik"} and groups["marth"]["views"] == 1
    text = subprocess.run([sys.executable, "-m", "exphil", "eval", mlp_run.path, "--replays", REPLAYS, "--by", "player"],
                          capture_output=True, text=True, cwd=ROOT)
    assert text.returncode == 0 and "(no code)" in text.stdout and "main_x (copy)" in text.stdout, text.stderr
    bad = subprocess.run([sys.executable, "-m", "exphil", "eval", mlp_run.path, "--replays", REPLAYS, "--by", "stage"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "invalid choice: 'stage'" in bad.stderr
    # training scored its validation games per group with the exported weights
    val = mlp_run.info["val_by"]
    assert set(val) == {"character", "opponent", "player"}
    for report in val.values():
        assert sum(g["frames"] for g in report.values()) == mlp_run.info["exported_metrics"]["val_frames"]
