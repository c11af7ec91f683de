"""Playing: INT8 / FP16 step graphs, and the sync and async runners.

Dolphin and a Melee ISO cannot run here, so the runners play against real libmelee objects
standing in for them: libmelee's Console streams a real replay (exphil.ReplayGame) as the source
of game states, and a libmelee Controller writes into a real FIFO that the test reads back
(test_actions.Pipe). The only mock is the Dolphin executable libmelee asks for its version
(conftest.stand_in_dolphin). Runner semantics are checked with an untrained LSTM (random weights:
its deterministic actions change almost every frame and depend on every frame it was shown)."""

import json
import re
import shutil
import time

import numpy as np
import onnx
import pytest
from melee.controller import fix_analog_stick, fix_analog_trigger

import exphil
from conftest import GPU_PROVIDERS, REPLAYS, ROOT, SHARED, spec_text
from test_actions import BUTTON_NAMES, Pipe, sent

REPLAY = REPLAYS / "hohav-py-slippi__netplay_name.slp"  # Falco (port 1) vs Falco (port 2), 6,233 frames
RELEASE_ALL = ["RELEASE " + b for b in ("A", "B", "X", "Y", "Z", "L", "R", "START", "D_UP", "D_DOWN", "D_LEFT",
                                        "D_RIGHT")] + ["SET MAIN .5 .5", "SET C .5 .5", "SET L 0", "SET R 0"]


@pytest.fixture(scope="module")
def lstm_folder(tmp_path_factory):
    """A run folder holding an untrained LSTM's graphs, trained (as run.json says) with delay 1."""
    out = tmp_path_factory.mktemp("runs") / "lstm"
    exphil.Model(exphil.load_spec(ROOT / "specs" / "lstm.toml"), seed=3).save(out)
    (out / "run.json").write_text(json.dumps({"feature_version": exphil.FEATURE_VERSION, "frame_delay": 1}))
    return out


@pytest.fixture
def mlp_copy(mlp_run, tmp_path):
    """The trained MLP run's step graph and run.json, in a folder the test may write into."""
    out = tmp_path / "mlp"
    out.mkdir()
    for f in ("step.onnx", "run.json", "spec.toml"):
        shutil.copy(mlp_run.path / f, out / f)
    return out


def dir_in(parent, name):
    (parent / name).mkdir()
    return parent / name


def is_release_all(batch):
    return batch[:-1] == RELEASE_ALL and batch[-1] == "FLUSH"


def check_commands(batches, actions):
    """Each flushed batch carries exactly the commands press_action writes for its action:
    buttons pressed/released where they change, both sticks and the shoulder every frame."""
    held = set()
    for i, (batch, action) in enumerate(zip(batches, actions)):
        assert batch[-1] == "FLUSH" and batch.count("FLUSH") == 1, i
        s = sent(batch)
        want = {BUTTON_NAMES[b] for b, on in zip(exphil.BUTTONS, action["buttons"]) if on}
        assert (s["press"], s["release"]) == (want - held, held - want), i
        held = want
        assert s["MAIN"] == (fix_analog_stick(action["main_x"] / 16), fix_analog_stick(action["main_y"] / 16)), i
        assert s["C"] == (fix_analog_stick(action["c_x"] / 16), fix_analog_stick(action["c_y"] / 16)), i
        assert s["L"] == (fix_analog_trigger(action["shoulder"] / 4),), i


def reference(folder, frames, every=1):
    """The actions a fresh deterministic Agent picks when shown every `every`-th frame of the
    replay, the game states themselves, and the replay's stock losses (port, stocks left)."""
    agent, game = exphil.Agent(folder, deterministic=True), exphil.ReplayGame(REPLAY, fps=None, frames=frames)
    actions, states, losses, stocks = [], [], [], {}
    while (gs := game.step()) is not None:
        if len(states) % every == 0:
            actions.append(agent.act(gs, 1, 2))
        for p, ps in gs.players.items():
            if ps.stock < stocks.get(p, ps.stock):
                losses.append((p, ps.stock))
            stocks[p] = ps.stock
        states.append(gs)
    return actions, states, losses


def run_over_replay(runner_class, folder, frames, fps=None, pipe=None, **kwargs):
    """Run a runner over the replay into a FIFO; the flushed batches, the log and the summary."""
    agent = kwargs.pop("agent", None) or exphil.Agent(folder, deterministic=True)
    game = kwargs.pop("game", None) or exphil.ReplayGame(REPLAY, fps=fps, frames=frames)
    logs = []
    try:
        runner = runner_class(agent, game, pipe.controller, 1, 2, log=logs.append, **{"stats_every": 0, **kwargs})
        summary = runner.run()
    finally:
        pipe.close()
    return pipe.batches, logs, summary


class Flaky:
    """A Stepper whose `fail_at`-th call raises, or returns NaN logits ('nan'); `sleep` slows every call."""

    def __init__(self, stepper, fail_at=0, how="raise", sleep=0.0):
        self.stepper, self.fail_at, self.how, self.sleep, self.calls = stepper, fail_at, how, sleep, 0

    def __call__(self, *frame):
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        out = self.stepper(*frame)
        if self.calls == self.fail_at:
            if self.how == "raise":
                raise RuntimeError("injected failure")
            out = {h: np.full_like(v, np.nan) for h, v in out.items()}
        return out

    def __getattr__(self, name):
        return getattr(self.stepper, name)


# ---- precision -----------------------------------------------------------------------------------

def test_dynamic_int8_agrees_with_fp32_and_is_written(mlp_copy):
    report = exphil.quantize_run(mlp_copy, "dynamic", max_frames=3000, quiet=True)
    assert 2700 <= report["frames"] <= 3000 and report["precision"] == "int8"
    assert set(report["agreement"]) == set(exphil.HEADS)
    assert min(report["agreement"].values()) >= 0.98  # the default threshold; the target is 99%
    assert {"fp32", "int8"} == set(report["latency_ms"]) and report["latency_ms"]["int8"]["p50"] > 0
    graph = onnx.load(mlp_copy / "step.int8.onnx")
    assert graph.ir_version <= exphil.IR_VERSION
    assert all(o.version <= exphil.OPSET for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    assert "MatMulInteger" in {n.op_type for n in graph.graph.node}
    assert json.loads({p.key: p.value for p in graph.metadata_props}["exphil.quantize"])["agreement"] == \
        report["agreement"]
    # the Agent plays the INT8 graph on a real game state
    agent = exphil.Agent(mlp_copy, precision="int8", deterministic=True)
    assert set(agent.act(exphil.ReplayGame(REPLAY, fps=None).step(), 1, 2)) == set(exphil.HEADS)


def test_agreement_measures_disagreement(mlp_copy, lstm_folder):
    """A graph agrees fully with itself, and far less with another model of other weights."""
    eps = exphil.load_replay(REPLAY)
    step = lambda folder: exphil.Stepper(folder / "step.onnx")
    same, times, counted = exphil.agreement(step(mlp_copy), step(mlp_copy), exphil.replay_frames(eps, 600))
    assert set(same.values()) == {1.0} and times.shape == (sum(e.frames for e in eps), 2)
    assert 540 <= counted <= 600  # spread over both whole games
    other = exphil.Model(exphil.load_spec(ROOT / "specs" / "mlp.toml"), seed=5).save(lstm_folder.parent / "mlp0")
    differ, _, _ = exphil.agreement(step(mlp_copy), exphil.Stepper(other[1]), exphil.replay_frames(eps, 600))
    assert min(differ.values()) < 0.9


def test_quantize_refuses_a_graph_below_the_threshold(mlp_copy):
    with pytest.raises(exphil.ExphilError, match=r"dynamic graph not written: head '\w+' agrees with FP32 on"):
        exphil.quantize_run(mlp_copy, "dynamic", min_agreement=1.01, max_frames=500, replays=REPLAY, quiet=True)
    assert not (mlp_copy / "step.int8.onnx").exists()


def test_static_int8_and_fp16_graphs(mlp_copy):
    # (checked on REPLAY, half as long as the run's validation game: agreement steps through every
    # frame of the games; the dynamic test above checks on the default games)
    static = exphil.quantize_run(mlp_copy, "static", max_frames=1000, calibration_frames=300, replays=REPLAY,
                                 quiet=True)
    graph = onnx.load(mlp_copy / "step.int8.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.graph.node}
    assert static["mode"] == "static" and min(static["agreement"].values()) >= 0.98

    fp16 = exphil.quantize_run(mlp_copy, "fp16", max_frames=1000, replays=REPLAY, quiet=True)
    graph = onnx.load(mlp_copy / "step.fp16.onnx")
    assert {t.data_type for t in graph.graph.initializer if t.name.endswith("weight")} == {onnx.TensorProto.FLOAT16}
    assert {i.type.tensor_type.elem_type for i in graph.graph.input if i.name != "cat"} == {onnx.TensorProto.FLOAT}
    assert min(fp16["agreement"].values()) >= 0.98
    if GPU_PROVIDERS:
        pytest.skip(f"the rest expects no GPU provider; here: {GPU_PROVIDERS}")
    assert "no GPU here" in fp16["note"]
    assert exphil.Agent(mlp_copy, precision="fp16").step.session.get_providers() == ["CPUExecutionProvider"]


def test_int4_blocks_round_trip_through_onnxruntime(monkeypatch):
    """A MatMul by a [K, N] weight (K not a multiple of the block) rewritten as MatMulNBits: with
    accuracy level 0 (float activations) onnxruntime computes exactly x @ the weight dequantized
    from `_int4_blocks`' layout by hand, which is within half a step of the original weight."""
    from onnx import TensorProto, helper, numpy_helper

    monkeypatch.setattr(exphil, "INT4_ACCURACY", 0)
    rng = np.random.default_rng(0)
    K, N = 70, 33
    w, x = rng.normal(0, 1, (K, N)).astype(np.float32), rng.normal(0, 1, (5, K)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", exphil.OPSET)])
    model.ir_version = exphil.IR_VERSION
    sess = exphil.session(exphil._int4(model).SerializeToString(), "cpu")
    assert [n.op_type for n in onnx.ModelProto.FromString(exphil._int4(model).SerializeToString()).graph.node] == \
        ["MatMulNBits"]
    packed, scales, zeros = exphil._int4_blocks(w)
    blocks = -(-K // exphil.INT4_BLOCK)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(N, blocks, exphil.INT4_BLOCK).astype(np.float32)
    z = np.stack([zeros.reshape(N, -1) & 15, zeros.reshape(N, -1) >> 4], -1).reshape(N, -1)[:, :blocks]
    step = scales.reshape(N, blocks)
    back = ((q - z[..., None]) * step[..., None]).reshape(N, -1)[:, :K].T
    assert np.abs(back - w).max() <= step.max() / 2 + 1e-6
    assert np.allclose(sess.run(None, {"x": x})[0], x @ back, atol=1e-4)


def test_int4_graph_is_checked_like_int8(mlp_copy):
    """`exphil quantize --int4` on a real run: written with its agreement when every head agrees
    with FP32 on enough frames (MatMulNBits in place of the weight MatMuls; the Agent plays it),
    refused with one line otherwise."""
    with pytest.raises(exphil.ExphilError, match=r"int4 graph not written: head '\w+' agrees with FP32 on"):
        exphil.quantize_run(mlp_copy, "int4", min_agreement=1.01, max_frames=500, replays=REPLAY, quiet=True)
    assert not (mlp_copy / "step.int4.onnx").exists()
    report = exphil.quantize_run(mlp_copy, "int4", min_agreement=0.9, max_frames=1000, replays=REPLAY, quiet=True)
    graph = onnx.load(mlp_copy / "step.int4.onnx")
    assert "MatMulNBits" in {n.op_type for n in graph.graph.node}
    weights = {t.name for t in graph.graph.initializer}
    assert not [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert report["precision"] == "int4" and min(report["agreement"].values()) >= 0.9
    agent = exphil.Agent(mlp_copy, precision="int4", deterministic=True)
    assert set(agent.act(exphil.ReplayGame(REPLAY, fps=None).step(), 1, 2)) == set(exphil.HEADS)


def test_static_calibration_carries_the_recurrent_state(lstm_folder):
    """Calibration feeds are real frames spread over whole games (after the countdown), each
    with the state the FP32 graph carries into it from stepping through every frame before it."""
    eps = exphil.load_replay(REPLAY)
    feeds = list(exphil.calibration_feeds(lstm_folder / "step.onnx", eps, 6))
    marks = [(i, t) for i, ep in enumerate(eps) for t, _, _, _, counted in exphil.replay_frames([ep], 3) if counted]
    assert len(feeds) == len(marks) >= 6 and all(t >= 123 for _, t in marks)
    assert max(t for _, t in marks) > eps[0].frames * 0.6  # not only the openings
    i, t = marks[len(marks) // 2 + 1]  # a frame in the second game, after its first mark
    feed = feeds[len(marks) // 2 + 1]
    assert i == 1 and np.array_equal(feed["num"][0], eps[1].num[t])
    stepper = exphil.Stepper(lstm_folder / "step.onnx")
    for k in range(t):  # (a graph that samples: the deterministic rule's numbers, as calibration feeds them)
        stepper(eps[1].cat[k], eps[1].num[k], noise=exphil.fixed_uniforms(k) if stepper.samples else None)
    assert all(np.allclose(feed[f"state_in.{n}"], v, atol=1e-5) for n, v in stepper.state.items())


def test_precision_and_provider_errors(mlp_copy):
    with pytest.raises(exphil.ExphilError, match=r"no int8 step graph \(step.int8.onnx\); write it with "
                                                 r"`exphil quantize .*`; this folder has: fp32"):
        exphil.Agent(mlp_copy, precision="int8")
    with pytest.raises(exphil.ExphilError, match="precision 'int2': choose one of fp32, int8, int4, fp16"):
        exphil.Agent(mlp_copy, precision="int2")
    with pytest.raises(exphil.ExphilError, match="no fp32 step graph .* none"):
        exphil.Agent(mlp_copy.parent, precision="fp32")
    if GPU_PROVIDERS:
        pytest.skip(f"the rest expects no GPU provider; here: {GPU_PROVIDERS}")
    with pytest.raises(exphil.ExphilError, match="'cuda' is not available here; available: cpu"):
        exphil.Agent(mlp_copy, provider="cuda")


# ---- runners -------------------------------------------------------------------------------------

def test_sync_runner_plays_a_whole_game(tmp_path, lstm_folder):
    """Every frame of the replay: one flushed batch carrying the Agent's action for that frame,
    delayed by the run's trained delay (1); stock-loss and end-of-game lines; all released at the end."""
    actions, states, losses = reference(lstm_folder, None)
    batches, logs, summary = run_over_replay(exphil.Runner, lstm_folder, None, pipe=Pipe(tmp_path), frame_delay=0)
    assert summary["frames"] == len(states) == 6233 and summary["inferences"] == 6233 and summary["games"] == 1
    assert len(batches) == len(states) + 1 and is_release_all(batches[-1])  # + the release on the way out
    check_commands(batches[:-1], [exphil.NEUTRAL] + actions[:-1])
    assert [l for l in logs if "lost a stock" in l] == [
        f"{'bot (port 1)' if p == 1 else 'port 2'} lost a stock: {n} left" for p, n in losses]
    assert logs[0] == "game 1: bot (port 1) falco, port 2 falco on battlefield"
    assert logs[-2:] == ["game 1 over after 103.9s: lost (stocks: bot (port 1) 0, port 2 3)",
                         "stopped: the console sent no more frames"]


def test_action_repeat_and_frame_delay(tmp_path, lstm_folder):
    """action_repeat 3: the model sees frames 0, 3, 6, ... only, each action held 3 frames; delay
    = trained 1 + extra 2: the action chosen at frame t is sent at frame t + 3."""
    actions, states, _ = reference(lstm_folder, 300, every=3)
    batches, _, summary = run_over_replay(exphil.Runner, lstm_folder, 300, pipe=Pipe(tmp_path), action_repeat=3,
                                          frame_delay=2)
    assert summary["inferences"] == 100 and len(batches) == 301
    chosen = [actions[t // 3] for t in range(300)]
    check_commands(batches[:300], [exphil.NEUTRAL] * 3 + chosen[:-3])


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("kind", ["Runner", "AsyncRunner"])
def test_a_failed_inference_releases_every_button(tmp_path, lstm_folder, kind, how):
    agent = exphil.Agent(lstm_folder, deterministic=True)
    agent.step = Flaky(agent.step, fail_at=40, how=how)
    # paced at 10x game speed, so that the async worker gets the processor between frames
    batches, logs, summary = run_over_replay(getattr(exphil, kind), lstm_folder, 200, fps=600, pipe=Pipe(tmp_path),
                                             agent=agent)
    assert len(batches) == 201 and summary["errors"] == 1
    failed = [i for i, b in enumerate(batches[:-1]) if is_release_all(b)]
    assert len(failed) == 1 and (kind == "AsyncRunner" or failed == [40 - 1])
    assert not sent(batches[failed[0] + 1])["release"]  # nothing was held any more
    assert sum("inference failed" in l for l in logs) == 1
    assert ("NaN or infinite" if how == "nan" else "RuntimeError: injected failure") in logs[1]
    assert agent.step.calls > 60  # the game went on, and the model with it
    assert is_release_all(batches[-1])


def test_async_runner_never_waits_for_a_slow_model(tmp_path, lstm_folder):
    """A model call slowed to 50 ms (3 frames): the game, paced at 60 FPS like Dolphin by
    ReplayGame, still gets one batch per frame, the last action repeated while inference runs,
    and the stats lines show 60 fps with about 20 inferences per second."""
    agent = exphil.Agent(lstm_folder, deterministic=True)
    agent.step = Flaky(agent.step, sleep=0.05)
    batches, logs, summary = run_over_replay(exphil.AsyncRunner, lstm_folder, 150, fps=60, pipe=Pipe(tmp_path),
                                             agent=agent, stats_every=0.8)
    assert len(batches) == 151 and summary["frames"] == 150
    sets = [[line for line in b if line.startswith("SET")] for b in batches[:-1]]
    assert all(len(s) == 3 for s in sets)  # both sticks and the shoulder, every frame
    changes = sum(a != b for a, b in zip(sets, sets[1:]))  # the action sent changed
    assert 15 <= summary["inferences"] <= 150 / 3 + 1 and changes <= summary["inferences"] + 1
    assert summary["frame_ms"]["p99"] < 50  # the loop never waited for an inference
    stats = [l for l in logs if l.startswith("[Stats]")]
    assert stats, logs
    for line in stats:
        m = re.fullmatch(r"\[Stats\] (\d+\.\d)s \| (\d+\.\d)/60 fps \| Inferences: (\d+) \| Conf: (\d\.\d\d) \| "
                         r"p99 (\d+\.\d\d) ms", line)
        assert m, line
        seconds, fps, inferences, conf, p99 = map(float, m.groups())
        assert fps > 45 and inferences / seconds < 25 and 0 < conf <= 1 and p99 >= 50


def test_ctrl_c_and_a_broken_pipe_stop_cleanly(tmp_path, lstm_folder):
    class Interrupted(exphil.ReplayGame):
        def step(self):
            if self.count == 30:
                raise KeyboardInterrupt
            return super().step()

    batches, logs, summary = run_over_replay(exphil.Runner, lstm_folder, None, pipe=Pipe(dir_in(tmp_path, "a")),
                                             game=Interrupted(REPLAY, fps=None))
    assert len(batches) == 31 and is_release_all(batches[-1])
    assert logs[-2:] == ["game 1 over after 0.5s: no result (stocks: bot (port 1) 4, port 2 4)",
                         "stopped: interrupted (Ctrl-C)"]

    class Closing(Pipe):  # Dolphin goes away after reading 20 frames
        def _read(self):
            with open(self.controller.pipe_path) as f:
                for line in f:
                    if line.strip() == "FLUSH" and len(self.batches) == 19:
                        break
                    self.batches += [[]] if line.strip() == "FLUSH" else []

    pipe = Closing(dir_in(tmp_path, "b"))
    _, logs, summary = run_over_replay(exphil.Runner, lstm_folder, 3000, pipe=pipe)
    assert logs[-1] == "stopped: Dolphin closed or the controller pipe broke (BrokenPipeError)"
    assert 20 <= summary["frames"] < 3000


def test_menus_between_games(tmp_path, lstm_folder):
    """After a game, libmelee's MenuHelper takes the frames (it mashes START on the score screen);
    the next game is played on restart, and the run ends at the first game's end on stop."""
    import melee

    class TwoGames(exphil.ReplayGame):
        """60 frames of the replay, 10 score-screen frames, then the replay again (a new game)."""

        def step(self):
            self.count += 1
            if self.count == 61:
                self.console = melee.Console(path=str(REPLAY), is_dolphin=False, allow_old_version=True)
                self.console.connect()
            if 60 < self.count <= 70:
                gs = melee.GameState()
                gs.menu_state = melee.Menu.POSTGAME_SCORES
                return gs
            return self.console.step() if self.count <= 130 else None

    for on_game_end, games, frames in (("restart", 2, 130), ("stop", 1, 61)):
        pipe = Pipe(dir_in(tmp_path, on_game_end))
        menus = exphil.Menus(pipe.controller, "falco", "battlefield")
        batches, logs, summary = run_over_replay(exphil.Runner, lstm_folder, None, pipe=pipe, menus=menus,
                                                 on_game_end=on_game_end, game=TwoGames(REPLAY, fps=None))
        assert (summary["games"], summary["frames"]) == (games, frames)
        assert sum(l.startswith("game ") and " over after " in l for l in logs) == games
        assert logs[-1] == "stopped: " + ("game over" if on_game_end == "stop" else "the console sent no more frames")
        if on_game_end == "restart":
            assert [sent(b)["press"] for b in batches[60:70:2]] == [{"START"}] * 5
    with pytest.raises(exphil.ExphilError, match="unknown character 'foxx'"):
        exphil.Menus(None, "foxx", "battlefield")


# ---- command line --------------------------------------------------------------------------------

def test_cli(mlp_copy, capsys):
    iso = mlp_copy.parent / "melee.iso"
    assert exphil.main(["play", str(mlp_copy), "--dolphin", "/nowhere/dolphin", "--iso", str(iso)]) == 1
    assert f"{iso}: no such ISO file" in capsys.readouterr().err
    iso.write_bytes(b"stand-in")  # never read: the run stops before Dolphin would start
    assert exphil.main(["quantize", str(mlp_copy), "--max-frames", "1000", "--min-agreement", "1.01"]) == 1
    assert "graph not written" in capsys.readouterr().err
    assert exphil.main(["play", str(mlp_copy), "--dolphin", "/nowhere/dolphin", "--iso", str(iso),
                 "--precision", "int8"]) == 1  # fails on the missing graph, before starting anything
    assert "no int8 step graph" in capsys.readouterr().err
    assert exphil.main(["play", str(mlp_copy), "--dolphin", "/nowhere/dolphin", "--iso", str(iso)]) == 1
    assert "/nowhere/dolphin: Unknown path" in capsys.readouterr().err
    assert exphil.main(["quantize", str(mlp_copy), "--max-frames", "1000"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step.int8.onnx: dynamic INT8, checked on 9\d\d validation frames", out) and "agreement with FP32" in out
    with pytest.raises(SystemExit):
        exphil.main(["play", str(mlp_copy), "--dolphin", "d", "--iso", "i", "--temperature", "0.5", "--deterministic"])


def test_readme_onnx_example_reproduces_the_agent(tmp_path):
    """The README's onnxruntime-only example (run as written, with the path replaced) gives the
    Agent's logits on real replay frames, state carried, for a graph with independent heads
    (test_heads runs it on autoregressive ones); the graphs carry their metadata."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- onnx-example -->\n```python\n", 1)[1].split("```", 1)[0]
    out, text = tmp_path / "gru", spec_text("gru", "independent")
    exphil.Model(exphil.parse_spec(text), seed=1).save(out)
    (out / "spec.toml").write_text(text)
    scope = {}
    exec(code.replace("runs/gru/step.onnx", str(out / "step.onnx")), scope)
    meta = exphil.graph_metadata(out / "step.onnx")
    assert json.loads(meta["exphil.num_fields"]) == exphil.NUM_FIELDS and meta["exphil.feature_version"] == str(exphil.FEATURE_VERSION)
    assert exphil.parse_spec(meta["exphil.spec"]) == exphil.parse_spec(text)
    agent, game = exphil.Agent(out), exphil.ReplayGame(REPLAY, fps=None, frames=300)
    while (gs := game.step()) is not None:
        want = agent.logits(gs, 1, 2)
        got = scope["step"](*exphil.features_from_gamestate(gs, 1, 2))
        for h in exphil.HEADS:
            np.testing.assert_allclose(got[h], want[h], atol=1e-4, err_msg=h)


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared replay collection is not beside the repository")
def test_our_port_online_is_found_by_connect_code_then_by_character_and_costume(tmp_path):
    """Real netplay replays: a Falco ditto whose two players are given the same display name (by
    editing a copy's game start), and a ranked game whose players are both "Platinum Player"
    with no codes. The port comes from our code, else the opponent's, else character and costume."""
    copy = tmp_path / "same_names.slp"
    data = bytearray((SHARED / "Walnut356-SlippiStats__Game_20221227T202334.slp").read_bytes())
    start = len(exphil._SLP_HEADER) + 4
    names = start + data[start + 1] + 1 + 0x1A5  # the game start event's display names, 0x1F bytes each
    data[names + 0x1F:names + 0x3E] = data[names:names + 0x1F]
    copy.write_bytes(bytes(data))
    gs = exphil.ReplayGame(copy, fps=None, frames=3).step()
    assert gs.players[1].displayName == gs.players[2].displayName == "Doug M Levison"
    falco = exphil.enums.Character.FALCO
    assert exphil.own_port(gs, "NUT#356", "SCHU#432", falco, 0) == (2, "port 2: our connect code NUT#356")
    assert exphil.own_port(gs, "nut＃356", None, falco, 0)[0] == 2  # case and the full-width # of the menus
    assert exphil.own_port(gs, None, "SCHU#432", falco, 0) == (2, "port 2: the opponent SCHU#432 is on port 1")
    port, why = exphil.own_port(gs, "ZZZZ#1", "YYYY#2", falco, 0)
    assert port == 1 and "the only falco in costume 0" in why
    gs = exphil.ReplayGame(REPLAYS / "hohav-peppi__duplicate_game_end.slp", fps=None, frames=3).step()
    assert gs.players[1].displayName == gs.players[2].displayName and not gs.players[1].connectCode
    assert exphil.own_port(gs, "NUT#356", "SCHU#432", falco, 1)[0] == 2
    assert exphil.own_port(gs, "NUT#356", "SCHU#432", falco, 4) == (
        None, "no port has our connect code (NUT#356) or the opponent's, and 0 players are falco in costume 4")
    menus = exphil.Menus(None, "falco", "battlefield", connect_code="SCHU#432", costume=4, own_code="NUT#356")
    assert menus.port(gs, 1) == 1 and menus.chose.endswith(": playing port 1")
