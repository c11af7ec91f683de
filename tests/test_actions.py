"""Controller <-> action classes, and the Agent pressing buttons on a real libmelee Controller."""

import math
import os
import threading

import melee
import numpy as np
import pytest

import exphil
from conftest import REPLAYS, cpu_only, stand_in_dolphin

BUTTON_NAMES = dict(zip(exphil.BUTTONS, ["A", "B", "X", "Y", "Z", "L", "R", "D_UP"]))


def controller_state(main=(0.5, 0.5), c=(0.5, 0.5), shoulder=0.0, buttons=()):
    cs = melee.ControllerState()
    cs.main_stick, cs.c_stick, cs.l_shoulder, cs.r_shoulder = main, c, shoulder, shoulder
    for b in buttons:
        cs.button[melee.Button["BUTTON_" + b]] = True
    return cs


def test_encode_every_class():
    for k in range(exphil.STICK_CLASSES):
        v = k / 16
        a = exphil.encode_controller(controller_state(main=(v, 1 - v), c=(1 - v, v)))
        assert (a["main_x"], a["main_y"], a["c_x"], a["c_y"]) == (k, 16 - k, 16 - k, k)
    for k in range(exphil.SHOULDER_CLASSES):
        assert exphil.encode_controller(controller_state(shoulder=k / 4))["shoulder"] == k
    for b in exphil.BUTTONS:
        a = exphil.encode_controller(controller_state(buttons=[b]))
        assert a["buttons"].tolist() == [int(x == b) for x in exphil.BUTTONS]


class Pipe:
    """A libmelee Controller on port 1 whose named pipe (a real FIFO) is read back by a thread."""

    def __init__(self, tmp_path):
        self.console = stand_in_dolphin(tmp_path)
        self.controller = melee.Controller(self.console, 1)
        assert os.path.exists(self.controller.pipe_path)
        self.lines, self.batches = [], []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.controller.connect()

    def _read(self):
        with open(self.controller.pipe_path) as f:
            batch = []
            for line in f:
                batch.append(line.strip())
                if line.strip() == "FLUSH":
                    self.batches.append(batch)
                    batch = []

    def close(self):
        self.controller.disconnect()
        self.thread.join(5)


def sent(batch):
    """The pipe commands of one flushed batch as: buttons pressed/released, sticks, shoulder."""
    out = {"press": set(), "release": set()}
    for line in batch:
        words = line.split()
        if words[0] in ("PRESS", "RELEASE"):
            out[words[0].lower()].add(words[1])
        elif words[0] == "SET":
            out[words[1]] = tuple(float(w) for w in words[2:])
    return out


def game_class(value, axis_range=160):
    """The stick class the game ends up with for a pipe value: Dolphin's raw stick value is
    floor((v - 0.5) * 254); Melee's processed value raw / 80 maps to libmelee's raw / 160 + 0.5."""
    raw = math.floor((value - 0.5) * 254)
    return round((raw / axis_range + 0.5) * 16)


def test_every_class_round_trips_through_the_pipe(tmp_path):
    """Decode every class to Controller calls; the values written to the pipe come back, after
    the game's own stick/trigger quantisation, as the same class."""
    pipe = Pipe(tmp_path)
    try:
        for k in range(exphil.STICK_CLASSES):
            action = {"buttons": np.zeros(8, np.uint8), "main_x": k, "main_y": 16 - k, "c_x": 16 - k, "c_y": k,
                      "shoulder": k % 5}
            exphil.press_action(pipe.controller, action)
            pipe.controller.flush()
    finally:
        pipe.close()
    assert len(pipe.batches) == exphil.STICK_CLASSES
    for k, batch in enumerate(pipe.batches):
        s = sent(batch)
        assert [game_class(v) for v in s["MAIN"] + s["C"]] == [k, 16 - k, 16 - k, k]
        assert round(math.floor(s["L"][0] * 255) / 140 * 4) == k % 5


def test_agent_drives_a_controller_through_a_fifo(tmp_path, mlp_run):
    """A trained Agent reads real game states (a replay streamed by libmelee's Console) and
    presses a real libmelee Controller; the FIFO shows exactly the chosen actions."""
    agent = exphil.Agent(mlp_run.path, seed=0)
    replay = melee.Console(path=str(REPLAYS / "hohav-py-slippi__netplay_name.slp"), is_dolphin=False,
                           allow_old_version=True)
    replay.connect()
    pipe = Pipe(tmp_path)
    actions, held = [], set()
    try:
        while len(actions) < 300 and (gs := replay.step()) is not None:
            port = sorted(gs.players)[0]
            action = agent.act(gs, port=port)
            agent.press(pipe.controller, action)
            pipe.controller.flush()
            actions.append(action)
    finally:
        pipe.close()
    assert len(pipe.batches) == len(actions) == 300  # one command batch per frame
    pressed_any = False
    for action, batch in zip(actions, pipe.batches):
        s = sent(batch)
        want = {BUTTON_NAMES[b] for b, on in zip(exphil.BUTTONS, action["buttons"]) if on}
        assert s["press"] == want - held and s["release"] == held - want
        held = want
        pressed_any |= bool(want)
        assert [game_class(v) for v in s["MAIN"] + s["C"]] == [action[h] for h in ("main_x", "main_y", "c_x", "c_y")] \
            or any(action[h] in (7, 9) for h in ("main_x", "main_y", "c_x", "c_y"))  # inside the dead zone
        assert round(math.floor(s["L"][0] * 255) / 140 * 4) == action["shoulder"]
    assert pressed_any


def test_agent_resets_state_on_a_new_game(mlp_run):
    agent = exphil.Agent(mlp_run.path, deterministic=True)
    replay = melee.Console(path=str(REPLAYS / "hohav-py-slippi__netplay_name.slp"), is_dolphin=False,
                           allow_old_version=True)
    replay.connect()
    states = [replay.step() for _ in range(5)]
    first = [agent.act(gs, port=sorted(gs.players)[0]) for gs in states]
    again = [agent.act(gs, port=sorted(gs.players)[0]) for gs in states]  # frame counter went back
    for a, b in zip(first, again):
        assert a["buttons"].tolist() == b["buttons"].tolist() and all(a[h] == b[h] for h in exphil.HEADS if h != "buttons")


def test_provider_selection():
    cpu = "CPUExecutionProvider"
    assert exphil.select_providers("auto", [cpu]) == [cpu]
    assert exphil.select_providers("auto", ["CoreMLExecutionProvider", cpu]) == ["CoreMLExecutionProvider", cpu]
    assert exphil.select_providers("auto", [cpu, "ROCMExecutionProvider", "CUDAExecutionProvider"])[0] == \
        "CUDAExecutionProvider"
    assert exphil.select_providers("cpu", [cpu]) == [cpu]
    with pytest.raises(exphil.ExphilError, match="'cuda' is not available here; available: cpu"):
        exphil.select_providers("cuda", [cpu])


@cpu_only
def test_auto_provider_is_the_cpu_without_a_gpu_provider():
    assert exphil.select_providers("auto") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("hold", [0.0, 0.8])
def test_sampling_follows_the_model_distribution(deterministic, hold):
    """Sampled actions follow softmax(x / T) per stick/shoulder head and sigmoid(b / T) per
    button (seeded draws), and so do the deterministic rule's actions over 40,000 frames of a
    game (the same action for the same frame index and logits, whatever the rng), whether or not
    the rule holds its numbers from frame to frame; held numbers change the action less often."""
    rng = np.random.default_rng(1)
    logits = {h: rng.normal(0, 2, k).astype(np.float32) for h, k in exphil.HEADS.items()}
    T, views = 1.5, 1 if deterministic else 10
    keep = exphil.hold_vector({"buttons": hold, "sticks": hold})
    rule = exphil.DecisionRule(keep, deterministic, rng, T, views)
    batch = {h: np.broadcast_to(v, (views, len(v))) for h, v in logits.items()}
    codes = np.stack([rule(batch) for _ in range(40_000 // views)], 1).reshape(-1, exphil.UNIFORMS)
    assert np.abs(codes[:, :8].mean(0) - 1 / (1 + np.exp(-logits["buttons"] / T))).max() < 0.015
    for i, h in enumerate(list(exphil.HEADS)[1:], 8):
        p = np.exp(logits[h] / T)
        assert np.abs(np.bincount(codes[:, i], minlength=len(p)) / len(codes) - p / p.sum()).max() < 0.015, h
    changes = (np.diff(codes.reshape(views, -1, exphil.UNIFORMS)[..., 8:], axis=1) != 0).mean()
    probs = [np.exp(v / T) / np.exp(v / T).sum() for h, v in logits.items() if h != "buttons"]
    fresh = np.mean([1 - p @ p for p in probs])  # how often an independent draw differs from the last
    assert changes < 0.5 * fresh if hold else changes > 0.3 * fresh
    once, again = (exphil.DecisionRule(keep, True, np.random.default_rng(s))({h: v[None] for h, v in logits.items()})
                   for s in (2, 3))
    assert once.tolist() == again.tolist()
