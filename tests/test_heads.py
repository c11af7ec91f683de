"""Autoregressive controller heads end to end: a run trains with them (beside a value head, as
a distillation student and teacher, on Ray), the Agent plays its step graph's sampled actions,
the own-input rollouts and quantization read them, and the README's onnxruntime-only example
reproduces the Agent."""

import shutil

import numpy as np
import pytest

import exphil
from conftest import REPLAYS, ROOT, needs_training, spec_text

pytestmark = needs_training
REPLAY = REPLAYS / "hohav-py-slippi__netplay_name.slp"


def autoregressive_spec(folder, extra: str = "") -> str:
    path = folder / "mlp_ar.toml"
    path.write_text(spec_text("mlp", "autoregressive", name="mlp_ar") + extra)
    return path


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ar")
    return exphil.train(autoregressive_spec(folder), REPLAYS, out=folder / "run", max_steps=60, batch_size=32,
                        quiet=True)


def agent_actions(agent, frames: int = 300) -> np.ndarray:
    game = exphil.ReplayGame(REPLAY, fps=None, frames=frames)
    return np.array([exphil.action_codes(agent.act(gs, 1, 2)) for gs in iter(game.step, None)])


def test_a_run_learns_its_conditioning_and_the_agent_plays_the_sampled_actions(ar_run):
    """Training moves the conditioning off its start (zero: independent heads); the Agent's
    actions are the step graph's samples: reproducible with a seed, others with another seed,
    the deterministic rule's the same for every agent."""
    params = exphil.load_params(ar_run.path / "window.onnx")
    assert all(np.abs(params[f"heads.ar.{h}.out"]).max() > 1e-3 for h in exphil.HEADS if h != "buttons")
    assert ar_run.info["final"]["val_loss"] < ar_run.info["final"]["val_frequency"]["loss"]
    one, again, other = (agent_actions(exphil.Agent(ar_run.path, seed=s)) for s in (1, 1, 2))
    assert np.array_equal(one, again) and not np.array_equal(one, other)
    assert len({tuple(a) for a in one}) > 5  # it moves
    det = [agent_actions(exphil.Agent(ar_run.path, deterministic=True, seed=s)) for s in (1, 2)]
    assert np.array_equal(*det)


def test_the_readme_example_reproduces_the_agent_with_autoregressive_heads(ar_run):
    """The README's onnxruntime-only example, run as written on a step graph that samples and
    fed the deterministic rule's numbers, gives the deterministic Agent's actions and logits."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("<!-- onnx-example -->\n```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(code.replace("runs/gru/step.onnx", str(ar_run.path / "step.onnx")), scope)
    agent, game = exphil.Agent(ar_run.path, deterministic=True), exphil.ReplayGame(REPLAY, fps=None, frames=200)
    with pytest.raises(exphil.UsageError, match="samples its action .* give it the frame's numbers"):
        exphil.Stepper(ar_run.path / "step.onnx")(*exphil.features_from_gamestate(game.step(), 1, 2))
    game = exphil.ReplayGame(REPLAY, fps=None, frames=200)
    for t, gs in enumerate(iter(game.step, None)):
        want = agent.logits(gs, 1, 2)
        got = scope["step"](*exphil.features_from_gamestate(gs, 1, 2), noise=exphil.fixed_uniforms(t).astype(np.float32))
        assert np.array_equal(got["action"], want["action"]), t
        for h in exphil.HEADS:
            np.testing.assert_allclose(got[h], want[h], atol=1e-4, err_msg=h)


def test_own_input_rollouts_and_quantization_read_the_sampled_actions(ar_run, tmp_path):
    """Reading back its own inputs, the deterministic bot keeps moving and repeats itself; INT8
    agrees with FP32 on the sampled actions under the deterministic rule's numbers."""
    views = exphil.load_replay(REPLAY)
    graph = (ar_run.path / "step.onnx").read_bytes()
    once = exphil.rollout(exphil._graph_step(graph, 2), views, closed=True, deterministic=True)
    again = exphil.rollout(exphil._graph_step(graph, 2), views, closed=True, deterministic=True, seed=5)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(once, again))
    stats = exphil.input_stats([r["inputs"] for r in once])
    assert stats["button_changes_per_s"] > 0.5 and stats["main_changes_per_s"] > 0.5
    held = exphil.rollout(exphil._graph_step(graph, 2), views, closed=True, seed=5,  # the rule's numbers held
                          keep=exphil.hold_vector({"buttons": 0.95, "sticks": 0.95}))
    fresh = exphil.rollout(exphil._graph_step(graph, 2), views, closed=True, seed=5)
    held, fresh = (exphil.input_stats([r["inputs"] for r in x]) for x in (held, fresh))
    assert held["main_changes_per_s"] < fresh["main_changes_per_s"]
    run = tmp_path / "run"
    shutil.copytree(ar_run.path, run, ignore=shutil.ignore_patterns("train"))
    report = exphil.quantize_run(run, "dynamic", replays=[REPLAY], max_frames=2000, quiet=True)
    assert min(report["agreement"].values()) >= 0.98 and (run / "step.int8.onnx").exists()
    assert len(agent_actions(exphil.Agent(run, precision="int8", seed=1), 60)) == 60


def test_value_head_and_distillation_train_with_autoregressive_heads(ar_run, tmp_path):
    """A value head beside autoregressive heads, and distillation with them as teacher and as
    student: each trains, its losses finite and its graphs playable."""
    spec = autoregressive_spec(tmp_path, "\n[returns]\nvalue = true\n")
    valued = exphil.train(spec, REPLAYS, out=tmp_path / "valued", max_steps=8, batch_size=16, quiet=True)
    student = exphil.train(spec, REPLAYS, out=tmp_path / "student", max_steps=8, batch_size=16, quiet=True,
                           teacher=str(ar_run.path))
    for run in (valued, student):
        final = run.info["final"]
        assert np.isfinite(final["train_loss"]) and np.isfinite(final["val_loss"]) and final["val_value_mse"] > 0
        assert len(agent_actions(exphil.Agent(run.path, seed=0), 30)) == 30
        assert np.isfinite(float(exphil.Agent(run.path).logits(exphil.ReplayGame(REPLAY, fps=None).step(), 1, 2)["value"]))
    assert np.isfinite(student.info["final"]["val_kl"]) and min(student.info["distillation"]["agreement"].values()) > 0.5


def test_two_ray_workers_follow_one_process_with_autoregressive_heads(tmp_path):
    """Data-parallel training slices the teacher-forced actions with the rest of each batch:
    2 Ray workers take the steps one process takes."""
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'exphil[cluster]'")
    spec, settings = autoregressive_spec(tmp_path), dict(max_steps=10, batch_size=32, seed=1, quiet=True)
    alone = exphil.train(spec, REPLAYS, out=tmp_path / "alone", **settings)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = exphil.train(spec, REPLAYS, out=tmp_path / "ray", ray="auto", workers=2, **settings)
    finally:
        ray.shutdown()
    a, b = (exphil.load_params(r.path / "window.onnx") for r in (alone, on_ray))
    assert max(np.abs(a[n] - b[n]).max() for n in a) <= 1e-5
    assert np.abs(a["heads.ar.main_y.out"]).max() > 1e-3
