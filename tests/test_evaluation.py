"""Judging play: closed-controller rollouts, skill checks mined from replays, field scores, and
the deterministic decision rule that must not freeze when the bot reads back its own inputs.

Hand-built runs hold real ONNX step graphs run by onnxruntime: one copies the controller columns
of its input into its logits, one ignores them."""

import json
import shutil

import msgspec
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import exphil
from conftest import REPLAYS, ROOT, spec_text

REPLAY = REPLAYS / "hohav-py-slippi__netplay_name.slp"  # Falco (port 1) vs Falco (port 2), 6,233 frames
C = exphil._CTRL  # first controller column of `num`


def const(name, value):
    return helper.make_tensor(name, TensorProto.FLOAT if np.asarray(value).dtype.kind == "f" else TensorProto.INT64,
                              np.shape(value), np.asarray(value).ravel().tolist())


def step_graph(nodes, initializers):
    """A step graph with exphil's interface (cat, num -> the six heads) and no state."""
    inputs = [helper.make_tensor_value_info("cat", TensorProto.INT64, ["B", len(exphil.CAT_FIELDS)]),
              helper.make_tensor_value_info("num", TensorProto.FLOAT, ["B", len(exphil.NUM_FIELDS)])]
    outputs = [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["B", k]) for h, k in exphil.HEADS.items()]
    graph = helper.make_graph(nodes, "hand_built", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", exphil.OPSET)])
    model.ir_version = exphil.IR_VERSION
    onnx.checker.check_model(model)
    return model.SerializeToString()


def copying_graph():
    """Logits that pick, with probability ~1, exactly the controller classes its input holds
    (rounded as the labels are), except button A, which it always presses."""
    nodes, inits = [], [const("c0", np.array([C], np.int64)), const("c13", np.array([C + 13], np.int64)),
                        const("ax1", np.array([1], np.int64)), const("two", np.float32(2)), const("one", np.float32(1)),
                        const("big", np.float32(40)), const("sharp", np.float32(-50)), const("half", np.float32(0.5)),
                        const("a_on", np.array([80] + [0] * 7, np.float32))]
    nodes.append(helper.make_node("Slice", ["num", "c0", "c13", "ax1"], ["ctrl"]))
    inits += [const("b0", np.array([0], np.int64)), const("b8", np.array([8], np.int64))]
    nodes += [helper.make_node("Slice", ["ctrl", "b0", "b8", "ax1"], ["btn"]),
              helper.make_node("Mul", ["btn", "two"], ["b2"]), helper.make_node("Sub", ["b2", "one"], ["b3"]),
              helper.make_node("Mul", ["b3", "big"], ["b4"]), helper.make_node("Add", ["b4", "a_on"], ["buttons"])]
    for i, (h, k) in enumerate(list(exphil.HEADS.items())[1:]):
        col = 8 + i
        inits += [const(f"s{i}", np.array([col], np.int64)), const(f"e{i}", np.array([col + 1], np.int64)),
                  const(f"range{i}", np.arange(k, dtype=np.float32)[None]), const(f"k{i}", np.float32(k - 1))]
        nodes.append(helper.make_node("Slice", ["ctrl", f"s{i}", f"e{i}", "ax1"], [f"v{i}"]))
        v = f"v{i}"
        if h != "shoulder":  # the feature is (value - 0.5) * 2: back to 0..1
            nodes += [helper.make_node("Mul", [v, "half"], [f"h{i}"]), helper.make_node("Add", [f"h{i}", "half"], [f"u{i}"])]
            v = f"u{i}"
        nodes += [helper.make_node("Mul", [v, f"k{i}"], [f"x{i}"]), helper.make_node("Round", [f"x{i}"], [f"cls{i}"]),
                  helper.make_node("Sub", [f"range{i}", f"cls{i}"], [f"d{i}"]),
                  helper.make_node("Mul", [f"d{i}", f"d{i}"], [f"q{i}"]),
                  helper.make_node("Mul", [f"q{i}", "sharp"], [h])]
    return step_graph(nodes, inits)


def ignoring_graph():
    """Logits from the game-state columns alone (a fixed random linear map of num[:, :36])."""
    width = sum(exphil.HEADS.values())
    w = np.random.default_rng(0).normal(0, 0.5, (C, width)).astype(np.float32)
    inits = [const("z", np.array([0], np.int64)), const("c0", np.array([C], np.int64)), const("ax1", np.array([1], np.int64)),
             const("w", w), const("sizes", np.array(list(exphil.HEADS.values()), np.int64))]
    nodes = [helper.make_node("Slice", ["num", "z", "c0", "ax1"], ["game"]), helper.make_node("MatMul", ["game", "w"], ["all"]),
             helper.make_node("Split", ["all", "sizes"], list(exphil.HEADS), axis=1)]
    return step_graph(nodes, inits)


def run_folder(tmp_path, graph, name):
    out = tmp_path / name
    out.mkdir()
    (out / "step.onnx").write_bytes(graph)
    (out / "spec.toml").write_text(spec_text("mlp", "independent"))  # (the graphs here sample nothing)
    (out / "run.json").write_text(json.dumps({"feature_version": exphil.FEATURE_VERSION, "frame_delay": 0}))
    return out


@pytest.fixture(scope="module")
def views():
    return exphil.load_replay(REPLAY)


def test_closed_controller_with_a_copying_graph_repeats_its_first_action_forever(views):
    """Teacher-forced, the copying graph's input at t + 1 is the player's at t (A held); reading
    back its own inputs, it holds its first action (A, the rest neutral) for the whole game."""
    graph = copying_graph()
    for deterministic in (False, True):
        forced = exphil.rollout(exphil._graph_step(graph, 2), views, deterministic=deterministic)
        own = exphil.rollout(exphil._graph_step(graph, 2), views, closed=True, deterministic=deterministic)
        for ep, tf, cc in zip(views, forced, own):
            player = exphil.episode_inputs(ep)
            assert np.array_equal(tf["inputs"][1:, 1:], player[:-1, 1:]) and (tf["inputs"][1:, 0] == 1).all()
            first = exphil.action_codes({**exphil.NEUTRAL, "buttons": np.eye(8, dtype=np.uint8)[0]})
            assert (cc["inputs"][1:] == first).all() and len(cc["inputs"]) == ep.frames
    stats = exphil.input_stats([r["inputs"] for r in own])
    assert stats["button_changes_per_s"] == stats["main_changes_per_s"] == 0
    assert stats["longest_s_max"] == pytest.approx((views[0].frames - 123) / 60)


def test_a_graph_that_ignores_the_controller_plays_the_same_with_its_own_inputs(tmp_path, views):
    graph = ignoring_graph()
    for deterministic in (False, True):
        forced = exphil.rollout(exphil._graph_step(graph, 2), views, deterministic=deterministic, seed=4)
        own = exphil.rollout(exphil._graph_step(graph, 2), views, closed=True, deterministic=deterministic, seed=4)
        for a, b in zip(forced, own):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    rows = exphil.judge(run_folder(tmp_path, graph, "ignoring"), REPLAY, skills=False, field=False,
                        quiet=True)["closed_controller"]
    assert rows["bot, sampling, teacher-forced"] == rows["bot, sampling, own inputs"]
    assert rows["bot, deterministic, teacher-forced"] == rows["bot, deterministic, own inputs"]
    assert rows["bot, sampling, own inputs"] != rows["bot, deterministic, own inputs"]  # other numbers, same rates
    assert rows["bot, sampling, own inputs"]["button_changes_per_s"] > 1


def test_the_deterministic_rule_does_not_freeze_with_its_own_inputs(mlp_run, mlp_independent_run, views,
                                                                    monkeypatch):
    """A trained model reading back its own inputs (autoregressive heads sampled in the graph,
    and independent heads sampled in NumPy): the deterministic rule changes buttons and the main
    stick at least half as often as the players do. The most likely class of every head (the
    rule before) never changes anything: the Markov heads make "keep" the argmax."""
    players = exphil.input_stats([exphil.episode_inputs(ep) for ep in views])
    for run in (mlp_run, mlp_independent_run):
        step = lambda: exphil._graph_step((run.path / "step.onnx").read_bytes(), 2)
        once = [r["inputs"] for r in exphil.rollout(step(), views, closed=True, deterministic=True)]
        moving = exphil.input_stats(once)
        for k in ("button_changes_per_s", "main_changes_per_s"):
            assert moving[k] >= players[k] / 2, (run.path.name, k, moving[k], players[k])
        again = exphil.rollout(step(), views, closed=True, deterministic=True, seed=9)
        assert all(np.array_equal(a, b["inputs"]) for a, b in zip(once, again))  # reproducible
    assert exphil.load_spec(mlp_run.path / "spec.toml").heads.sampling == "autoregressive"

    def most_likely(logits, u, temperature=1.0):
        heads = [logits[h].argmax(-1)[:, None] for h in list(exphil.HEADS)[1:]]
        return np.concatenate([logits["buttons"] > 0, *heads], 1).astype(np.int64)
    monkeypatch.setattr(exphil, "sample_actions", most_likely)  # (heads sampled in NumPy)
    step = exphil._graph_step((mlp_independent_run.path / "step.onnx").read_bytes(), 2)
    frozen = exphil.input_stats([r["inputs"] for r in exphil.rollout(step, views, closed=True, deterministic=True)])
    assert frozen["button_changes_per_s"] == frozen["main_changes_per_s"] == 0


def test_the_hold_is_chosen_so_the_bot_changes_its_inputs_as_often_as_the_players(mlp_independent_run, tmp_path):
    """`exphil hold` on a real game: for each group the bot (reading back its own inputs) changes
    more often than the player does, it keeps its numbers from frame to frame just enough to come
    down to the player's rate (within the bisection's step); the Agent and `eval` use it."""
    run = tmp_path / "run"
    shutil.copytree(mlp_independent_run.path, run)
    exphil.main(["hold", str(run), "--replays", str(REPLAY), "--quiet"])
    info = exphil.read_run_info(run)
    report, hold = info["hold_report"], info["hold"]
    assert report["games"] == 1 and report["views"] == 2
    for g in exphil.HOLD_GROUPS:
        target, without, tuned = report["players"][g], report["without"][g], report["with"][g]
        if without > target:
            assert 0 < hold[g] < 1 and abs(tuned - target) < abs(without - target), (g, report)
            assert abs(tuned - target) < 0.25 * target, (g, report)
        else:
            assert hold[g] == 0
    assert any(hold.values())  # (this model twitches on this game: the test would not test anything otherwise)
    assert exphil.Agent(run).rule.keep.tolist() == exphil.hold_vector(hold).tolist()
    judged = exphil.judge(run, REPLAY, skills=False, field=False, quiet=True)
    assert judged["hold"] == hold
    info["hold"] = {"sticks": 1.5}
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(exphil.ExphilError, match=r"run.json: not a valid run.json: .*\$.hold.sticks"):
        exphil.Agent(run)


# ---- skill checks ---------------------------------------------------------------------------------

# Situations marked by hand from the action states of the replay (frame: what happens):
#   port 2, frames 1200-2250: aerial landings (DAIR/FAIR/UAIR -> its landing lag) at 1237, 1287,
#   1358, 1405, 1709, 1971 (the DAIR at 1769 and the BAIR at 2042 end before landing: plain
#   LANDING); jump squats into an airdodge or a special landing at 1305 (AIRDODGE 1311), 1730
#   (LANDING_SPECIAL 1735), 2101 (AIRDODGE 2107), the other nine jump squats jump; ledge grabs
#   (EDGE_CATCHING) at 2158 and 2210; no tech.
#   port 1, frames 1400-1800: a DAIR landing at 1440; ground hits in tumble at 1494 (missed tech,
#   face down), 1600 (tech forward), 1703 (missed tech, face up), 1789 (tech in place).
MARKED = {2: (1200, 2250, {"l_cancel": [1237, 1287, 1358, 1405, 1709, 1971], "tech": [],
                           "wavedash": [1305, 1730, 2101], "ledge_option": [2158, 2210]}),
          1: (1400, 1800, {"l_cancel": [1440], "tech": [1494, 1600, 1703, 1789], "wavedash": [], "ledge_option": []})}


def stretch(ep, first, end):
    return exphil.Episode(ep.source, ep.port, ep.cat[first:end], ep.num[first:end],
                          {h: v[first:end] for h, v in ep.labels.items()})


def test_each_skill_check_finds_the_marked_situations_and_no_others(views):
    for ep in views:
        first, end, marked = MARKED[ep.port]
        found = exphil.skill_situations(stretch(ep, first, end))
        assert {k: [first + t for t, _, _ in v] for k, v in found.items()} == marked, ep.port


def test_skill_checks_score_a_scripted_input_sequence(views):
    """Neutral inputs with presses placed by hand, in and out of each window."""
    port2, port1 = (stretch(ep, *MARKED[ep.port][:2]) for ep in sorted(views, key=lambda e: -e.port))
    x2, x1 = (np.tile(exphil.action_codes(exphil.NEUTRAL), (ep.frames, 1)) for ep in (port2, port1))
    at = lambda t, port: t - MARKED[port][0]
    L, R, Z = 5, 6, 4
    x2[at(1237, 2), L] = 1          # touchdown frame: counts
    x2[at(1287, 2) - 6, Z] = 1      # the first frame of the window: counts
    x2[at(1358, 2) - 7, R] = 1      # one frame early: no (early)
    x2[at(1405, 2) - 9:at(1405, 2), L] = 1  # held since before the window, not a new press: no (early)
    x2[at(1709, 2) - 2, 12] = 2     # the analog trigger: counts (23 frames before 1730's jump
                                    # squat, it is not early there: a shield before a wavedash)
    x2[at(1311, 2), R] = 1          # the airdodge frame: counts
    x2[at(1735, 2) + 1, R] = 1      # a frame after the special landing: no
    x2[at(2158, 2) + 36, 8] = 16    # main stick right on the last frame of the ledge window: counts
    x2[at(2210, 2) + 37, 2] = 1     # X one frame too late: no
    x1[at(1494, 1) - 1, L] = 1      # tech: the frame before the ground: counts
    x1[at(1600, 1) - 21, L] = 1     # 21 frames before: no (early)
    x1[at(1703, 1) - 20, R] = 1     # 20 frames before: counts
    found = [exphil.skill_situations(ep) for ep in (port2, port1)]
    assert exphil.skill_scores(found, [x2, x1]) == {"l_cancel": (7, 3, 2), "tech": (4, 2, 1), "wavedash": (3, 1, 0),
                                                    "ledge_option": (2, 1, 0)}
    assert exphil.skill_scores(found, [x2, x1], lead=0)["tech"] == (4, 2, 0)
    # the players' own inputs on the same stretches
    own = exphil.skill_scores(found, [exphil.episode_inputs(ep) for ep in (port2, port1)])
    assert own["wavedash"] == (3, 3, 0) and own["ledge_option"][0] == 2


def test_from_each_situation_a_copying_graph_holds_the_players_input_of_the_frame_before(views):
    """Up to a situation's window (`SKILL_LEAD` frames before it for L-cancel and tech) the
    controller is the player's; from there on the copying graph reads back its own first decision (the player's input of the frame before, A held): never
    a new press, and A, a ledge option, on every frame."""
    found = [exphil.skill_situations(ep) for ep in views]
    players = [exphil.episode_inputs(ep) for ep in views]
    graph = copying_graph()
    got = exphil.situated_skills(lambda n: exphil._graph_step(graph, n), views, found, players)
    counts = {name: n for name, (n, _, _) in exphil.skill_scores(found, players).items()}
    assert got == {"l_cancel": (counts["l_cancel"], 0, 0), "tech": (counts["tech"], 0, 0),
                   "wavedash": (counts["wavedash"], 0, 0),
                   "ledge_option": (counts["ledge_option"], counts["ledge_option"], 0)}
    assert min(counts.values()) > 0


def test_from_each_situation_the_bot_starts_from_its_teacher_forced_state(views, monkeypatch):
    """A GRU (random weights, independent heads) walked teacher-forced through a game: each
    situation's own-input walk starts from the state carried to its first decision, so its first
    logits are those of the teacher-forced walk at that frame, and not those of a fresh state."""
    spec = exphil.load_spec(ROOT / "specs" / "gru.toml")
    spec = msgspec.structs.replace(spec, heads=msgspec.structs.replace(spec.heads, sampling="independent"))
    graph = exphil.Model(spec).build(step=True).SerializeToString()
    ep = views[0].part(0, 3000)
    forced, starts = [], []  # the teacher-forced logits per frame; (frame, inputs, first logits) per situation

    def make(n):
        step = exphil._graph_step(graph, n)
        reached, teacher_forced = len(forced), not forced and not starts

        def recorded(*args):
            out = step(*args)
            if teacher_forced:
                forced.append(out)
            elif recorded.first:
                starts.append((reached, args, out))
                recorded.first = False
            return out
        recorded.state, recorded.first = step.state, True
        return recorded
    monkeypatch.setattr(exphil, "SITUATIONS_AT_ONCE", 1)
    found = [exphil.skill_situations(ep)]
    got = exphil.situated_skills(make, [ep], found, [exphil.episode_inputs(ep)])
    assert len(starts) == sum(n for n, _, _ in got.values()) > 10 and len(forced) == ep.frames
    # each walk's first decision takes effect SKILL_LEAD frames before the window where a press
    # can come too early (L-cancel, tech), at the window elsewhere (or on frame 1)
    lead = {name: exphil.SKILL_LEAD if early else 0 for name, (*_, early) in exphil.SKILLS.items()}
    assert sorted(t for t, _, _ in starts) == sorted(max(a - lead[name], 1) - 1
                                                     for f in found for name, w in f.items() for _, a, _ in w)
    fresh = exphil._graph_step(graph, 1)
    zero = {n: np.zeros_like(v) for n, v in fresh.state.items()}
    for t, args, out in starts:
        assert all(np.allclose(out[h], forced[t][h], atol=1e-5) for h in exphil.HEADS), t
        fresh.state.update(zero)
        assert not np.allclose(fresh(*args)["main_x"], out["main_x"], atol=1e-4), t


def test_the_l_cancel_check_agrees_with_the_games_own_flag():
    """On the shipped replays that record it, Melee's L-cancel flag of each aerial landing
    (peppi's post.l_cancel: 1 done, 2 missed) matches the check on the players' inputs."""
    import peppi_py

    agree = total = 0
    for path in (REPLAYS / "hohav-peppi__duplicate_game_end.slp", REPLAY):
        game, raw = exphil.read_replay(path), peppi_py.read_slippi(str(path))
        where = {int(f): k for k, f in enumerate(raw.frames.id.to_numpy())}  # (the last version of a frame)
        for ep in exphil.load_replay(path):
            port = [p.port.value + 1 for p in raw.start.players].index(ep.port)
            flag = raw.frames.ports[port].leader.post.l_cancel.to_numpy(zero_copy_only=False)
            inputs = exphil.episode_inputs(ep)
            for t, a, b in exphil.skill_situations(ep)["l_cancel"]:
                done = flag[where[int(game.frame_ids[t])]]
                if done:
                    only = {**dict.fromkeys(exphil.SKILLS, []), "l_cancel": [(t, a, b)]}
                    hit = exphil.skill_scores([only], [inputs])["l_cancel"][1]
                    agree, total = agree + (hit == (done == 1)), total + 1
    assert total >= 70 and agree / total >= 0.95, (agree, total)


# ---- field scores ---------------------------------------------------------------------------------

def frames(*rows):
    """Inputs from (buttons pressed, main_x, main_y) rows."""
    x = np.tile(exphil.action_codes(exphil.NEUTRAL), (len(rows), 1))
    for i, (pressed, mx, my) in enumerate(rows):
        for b in pressed:
            x[i, exphil.BUTTONS.index(b)] = 1
        x[i, 8:10] = mx, my
    return x


def test_field_classes_of_hand_made_frames():
    x = frames(((), 8, 8), (("A",), 16, 8), (("A", "B"), 0, 8), (("A", "B"), 8, 16), (("A",), 8, 0),
               (("X",), 15, 3), ((), 12, 12), (("Y", "Z"), 8, 8), (("L",), 8, 8), (("L", "A"), 3, 15),
               (("R", "Z"), 9, 7), (("D_UP",), 8, 8))
    got = exphil.field_labels(x)
    A, B, JUMP, Z, NONE = range(5)
    # B is pressed after A (newest wins, also while both stay held); X and Y are jump; Y and Z
    # pressed together: the first in order; L alone is no HAL class; R (held since L) with a new
    # Z is Z; D_UP is no class
    assert got["hal_buttons"].tolist() == [NONE, A, B, B, A, JUMP, NONE, JUMP, NONE, A, Z, NONE]
    # MIMIC: L alone is the trigger; the trigger held with A is shield-grab
    assert got["mimic_buttons"].tolist() == [6, 0, 1, 1, 0, 2, 6, 2, 4, 5, 3, 6]
    # neutral; right, left, up, down (full); (0.875, -0.625) is nearest (0.85, -0.5); (0.5, 0.5);
    # (-0.625, 0.875) is nearest (-0.5, 0.85); classes 9 and 7 are inside the neutral cluster
    assert got["main_stick"].tolist() == [0, 9, 11, 10, 12, 17, 25, 0, 0, 30, 0, 0]
    assert exphil.STICK_CLUSTERS.shape == (37, 2) and len(set(exphil.GRID_CLUSTER.ravel())) == 37


def test_field_guesses_are_read_against_the_players_earlier_inputs():
    """A guess of A and B on a frame after the player held A is B (the new press); the most
    likely main-stick cluster comes from the joint of the x and y heads."""
    player = frames((("A",), 8, 8), (("A", "B"), 8, 8))
    guess = exphil.field_labels(player, np.array([[0] * 8, [1, 1, 0, 0, 0, 0, 0, 0]], bool), np.array([0, 9]))
    assert guess["hal_buttons"].tolist() == [4, 1] and guess["main_stick"].tolist() == [0, 9]
    x = np.full((1, 17), -9.0)
    x[0, [15, 16]] = 0.0  # main_x: 15 or 16, equally likely
    y = np.full((1, 17), -9.0)
    y[0, [7, 8, 9]], y[0, 5] = 0.0, 0.1  # main_y: 5 the most likely class, but 7, 8 and 9 share one cluster
    assert exphil._main_cluster_guess({"main_x": x, "main_y": y}).tolist() == [9]  # (1, 0), not (0.95, -0.3)
    assert exphil.GRID_CLUSTER[15, 5] == 13
    scores = exphil.classification_scores(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert scores["top1"] == 0.5 and scores["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)  # F1 of 0, 1 and 2


def test_eval_command_prints_the_three_evaluations(tmp_path, capsys):
    run = run_folder(tmp_path, copying_graph(), "copying")
    assert exphil.main(["eval", str(run), "--replays", str(REPLAY), "--closed-controller", "--skills",
                        "--field-scores", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["views"] == 2 and res["closed_controller"]["bot, sampling, own inputs"]["button_changes_per_s"] == 0
    assert set(res["skills"]["players"]) == set(exphil.SKILLS) and "bot" in res["field_scores"]["rows"]
    assert exphil.main(["eval", str(run), "--replays", str(REPLAY), "--skills"]) == 0
    text = capsys.readouterr().out
    assert "l_cancel" in text and "players" in text and "field scores" not in text
    assert exphil.main(["eval", str(run), "--replays", str(REPLAY), "--skills", "--temperature", "0"]) == 2
