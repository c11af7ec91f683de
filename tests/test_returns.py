"""Rewards, the return-to-go, return-conditioned policies and value heads, on real replays."""

import msgspec
import numpy as np
import pytest

import exphil
from conftest import REPLAYS, ROOT, needs_training

REPLAY = REPLAYS / "hohav-py-slippi__netplay_name.slp"  # Falco vs Falco, 6,233 frames: port 2 takes 3 stocks


def looped_returns(percent, stock, returns: exphil.Returns) -> np.ndarray:
    """The return-to-go from a player's and the opponent's raw percent and stocks, one frame at
    a time from the definition: damage dealt minus taken (a drop in percent is a new stock, not
    healing), stocks taken minus lost, each reward k frames ahead weighted by discount^k."""
    (mine, theirs), (my_stock, their_stock) = percent, stock
    T = len(mine)
    rewards = [0.0] * T
    for t in range(T - 1):
        dealt, taken = max(theirs[t + 1] - theirs[t], 0), max(mine[t + 1] - mine[t], 0)
        taken_stocks, lost = max(their_stock[t] - their_stock[t + 1], 0), max(my_stock[t] - my_stock[t + 1], 0)
        rewards[t] = returns.damage * (float(dealt) - float(taken)) + returns.stock * float(taken_stocks - lost)
    out, acc = [0.0] * T, 0.0
    for t in reversed(range(T)):
        acc = rewards[t] + returns.discount * acc
        out[t] = acc
    return np.array(out)


@pytest.mark.parametrize("returns", [exphil.Returns(), exphil.Returns(damage=0.02, stock=3.0, discount=1.0)],
                         ids=["default", "edited"])
def test_returns_to_go_follow_their_definition_on_a_real_game(returns):
    game = exphil.read_replay(REPLAY, finalized=True)
    episodes = exphil.load_replay(REPLAY)
    assert [e.port for e in episodes] == list(game.ports)
    for ep, other in zip(episodes, reversed(game.ports)):
        me, them = game.players[ep.port], game.players[other]
        expected = looped_returns((me["percent"], them["percent"]), (me["stock"].astype(int), them["stock"].astype(int)),
                                  returns)
        assert np.abs(ep.rtg(returns) - expected).max() < 1e-3
    # port 2 took three stocks more than it lost; each view's return is the other's negated
    assert [ep.rtg(exphil.Returns(damage=0.0, discount=1.0))[0] for ep in episodes] == [-3.0, 3.0]
    if returns.discount == 1:
        assert abs(episodes[0].rtg(returns)[0] + episodes[1].rtg(returns)[0]) < 1e-4


@pytest.mark.parametrize("old, new, field", [
    ("input = true ", "input = true\nvalue = true", "returns.value"),  # the value would read its target
    ("discount = 1.0 ", "discount = 0.99", "returns.discount"),  # play divides the rest by it every frame
])
def test_return_settings_that_cannot_work_are_spec_errors(tmp_path, old, new, field):
    path = tmp_path / "dt.toml"
    text = (ROOT / "specs" / "decision_transformer.toml").read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(exphil.SpecError, match=rf"{path}: field `{field}`"):
        exphil.load_spec(path)


@pytest.fixture(scope="module")
def dt_run(tmp_path_factory):
    """A Decision Transformer trained briefly on the shipped replays."""
    out = tmp_path_factory.mktemp("runs") / "dt"
    return exphil.train(ROOT / "specs" / "decision_transformer.toml", REPLAYS, epochs=1, max_steps=12,
                        batch_size=16, out=out, quiet=True)


@needs_training
def test_a_target_return_needs_a_return_conditioned_run(mlp_run):
    with pytest.raises(exphil.UsageError, match="not return-conditioned"):
        exphil.Agent(mlp_run.path, target_return=1.0)


@needs_training
def test_a_return_conditioned_run_records_its_returns_and_plays_to_a_target(dt_run):
    """run.json holds the training games' returns; the Agent starts each game at the target
    return and lowers it by every reward it observes in the game states (percent and stocks as
    libmelee reports them, computed here independently), as the Decision Transformer does."""
    start = dt_run.info["returns"]["start"]
    assert start["min"] <= start["p10"] <= start["p50"] <= start["p90"] <= start["max"] and start["max"] > 0
    agent = exphil.Agent(dt_run.path, deterministic=True, target_return=3.5)
    assert exphil.Agent(dt_run.path).target_return == start["p50"]  # the default
    game, expected, previous, seen = exphil.ReplayGame(REPLAY, fps=None, frames=2500), 3.5, None, []
    while (gs := game.step()) is not None:
        me, them = gs.players[1], gs.players[2]
        if previous is not None:
            (pm, pt) = previous
            expected -= (0.01 * (max(them.percent - pt.percent, 0) - max(me.percent - pm.percent, 0))
                         + max(pt.stock - them.stock, 0) - max(pm.stock - me.stock, 0))
        previous = _copy(me), _copy(them)
        agent.act(gs, 1, 2)
        seen.append((agent.rtg, expected))
    got, want = np.array(seen).T
    assert np.abs(got - want).max() < 1e-4
    assert want.min() < 3.5 and want.max() > 3.5 + 1  # damage dealt lowers it; a stock lost raises it


def _copy(player):
    return type("P", (), {"percent": float(player.percent), "stock": int(player.stock)})()


@needs_training
def test_int8_graphs_of_a_return_conditioned_run_are_calibrated_and_checked_with_returns(dt_run, tmp_path):
    """Static calibration feeds and the agreement check give the step graph each frame's
    return-to-go (a graph that reads one cannot run without it)."""
    returns, episodes = exphil.load_spec(dt_run.path / "spec.toml").returns, exphil.load_replay(REPLAY)
    feeds = list(exphil.calibration_feeds(dt_run.path / "step.onnx", episodes, 4, returns))
    assert len(feeds) >= 4 and len({float(f["rtg"][0]) for f in feeds}) > 1
    assert all(float(f["rtg"][0]) in {float(v) for ep in episodes for v in ep.rtg(returns)} for f in feeds)
    report = exphil.quantize_run(dt_run.path, "static", calibration_frames=40, max_frames=600, min_agreement=0.0,
                                 replays=REPLAY, calibration_replays=REPLAY, quiet=True)
    assert report["frames"] > 500 and min(report["agreement"].values()) > 0.5


def _value_model(value_weight=0.1):
    """An untrained MLP with a value head (the spec's `value_weight` as given) and the two views of REPLAY."""
    spec = exphil.load_spec(ROOT / "specs" / "mlp.toml")
    spec = msgspec.structs.replace(spec, returns=exphil.Returns(value=True, value_weight=value_weight))
    return exphil.Model(spec), exphil.load_replay(REPLAY)


def test_the_loss_weighs_the_value_error_by_the_spec():
    """`add_loss` adds the value head's squared error times the spec's `value_weight`."""
    model, episodes = _value_model(value_weight=0.5)
    batch = exphil.make_batch(episodes, [(0, 0), (1, 500)], model.spec.window, returns=model.spec.returns)
    out = exphil._window_runner(model, exphil.add_loss)(batch)
    heads = sum(float(out[f"loss.{h}"]) for h in exphil.HEADS)
    assert float(out["loss"]) == pytest.approx(heads + 0.5 * float(out["loss.value"]), rel=1e-5)


def test_a_value_head_at_the_mean_return_scores_its_baseline_with_change_weights():
    """A value head that always predicts the mean return has exactly the mean-return baseline's
    squared error, also on change-weighted frames (both weighted as the loss weighs frames)."""
    model, episodes = _value_model()
    mean_return = 0.25
    model.params["heads.value.weight"][:] = 0
    model.params["heads.value.bias"][:] = mean_return
    wins = [(e, s) for e in (0, 1) for s in range(0, 6000, 10)]
    batch = exphil.make_batch(episodes, wins, model.spec.window, change_weight=3.0, returns=model.spec.returns)
    assert set(batch["mask"].ravel().tolist()) == {1.0, 3.0}
    baselines = {"frequency": exphil.label_frequencies(episodes), "mean_return": mean_return}
    metrics = exphil.Metrics(baselines)
    metrics.add(exphil._window_runner(model, exphil.add_loss)(batch), batch)
    r = metrics.result("val")
    assert r["val_value_mse"] == pytest.approx(r["val_value_mse_mean_return"], abs=2e-5)  # (both rounded)


@needs_training
def test_a_value_head_trains_beside_the_policy_and_is_reported_beside_its_baseline(tmp_path):
    """A value head's squared error is in the run's metrics and in `evaluate`, next to always
    predicting the training frames' mean return; the step graph outputs the value."""
    spec = tmp_path / "mlp_value.toml"
    spec.write_text((ROOT / "specs" / "mlp.toml").read_text() + "\n[returns]\nvalue = true\n")
    run = exphil.train(spec, REPLAYS, epochs=1, max_steps=30, out=tmp_path / "run", quiet=True)
    final = run.info["final"]
    assert final["val_value_mse"] > 0 and final["val_value_mse_mean_return"] > 0
    assert np.isfinite(run.info["returns"]["mean_return"])
    assert "value mse" in exphil.summary_line(final, "val")
    report = exphil.evaluate(run.path, REPLAYS, quiet=True)
    assert report["value_mse"] > 0 and report["value_mse_mean_return"] > 0
    agent = exphil.Agent(run.path)
    game = exphil.ReplayGame(REPLAY, fps=None, frames=5)
    assert np.isfinite(float(agent.logits(game.step(), 1, 2)["value"]))


@needs_training
def test_the_conditioning_benchmark_shifts_the_return_input(dt_run, mlp_run):
    """`bench.py --conditioning`: the run's loss and action probabilities with the recorded
    return-to-go, shifted and constant, beside the players' own rates in thirds of it."""
    import bench

    result = bench.conditioning(dt_run.path, REPLAYS, shifts=(-3.0, 3.0))
    rows = result["model"]
    assert list(rows)[:3] == ["recorded", "recorded -3", "recorded +3"] and len(rows) == 4
    assert rows["recorded +3"]["attack"] != rows["recorded"]["attack"]  # the input reaches the model
    assert all(0 < r["attack"] < 1 and 0 < r["shield"] < 1 and np.isfinite(r["val_loss"]) for r in rows.values())
    thirds = result["players_by_return_third"]
    assert len(thirds) == 3 and all(0 <= t["A"] <= t["attack"] <= 1 for t in thirds)
    with pytest.raises(exphil.UsageError, match="not return-conditioned"):
        bench.conditioning(mlp_run.path, REPLAYS)
