"""The compiled graphs: step == window, independent oracles, format limits."""

import numpy as np
import onnx
import pytest

from pathlib import Path

import msgspec

import exphil
from conftest import REPLAYS, ROOT, SPECS, needs_training, spec_text

# ops that have gradients in onnxruntime-training 1.19 (measured; see the project notes)
GRADIENT_OPS = {"Shape", "Sigmoid", "Tanh", "Relu", "Exp", "Log", "Erf", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Sin",
                "Clip", "Min", "Max", "Add", "Mul", "Div", "Sub", "MatMul", "Gemm", "Softmax", "LogSoftmax",
                "Where", "Slice", "Split", "Concat", "Gather", "Transpose", "Reshape", "Flatten", "Unsqueeze",
                "Squeeze", "Expand", "Tile", "Pad", "ReduceSum", "ReduceMean", "Cast", "Conv",
                "LayerNormalization", "Identity", "Constant"}
# ops without a gradient that only read the inputs (nothing to differentiate): Round, in the
# Markov heads' lookup of the current controller class; OneHot, the trained graph's table lookups
INPUT_OPS = {"Round", "OneHot"}


@pytest.fixture(scope="module")
def real_frames():
    """Inputs from a real replay: both players' views of frames 2000-2239, with the
    return-to-go of each frame (the input of return-conditioned specs)."""
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    return (np.stack([e.cat[2000:2240] for e in eps]), np.stack([e.num[2000:2240] for e in eps]),
            np.stack([e.rtg(exphil.Returns())[2000:2240] for e in eps]))


def inputs(model, cat, num, rtg, state, **extra):
    return {"cat": cat, "num": num, **({"rtg": rtg} if model.spec.returns.input else {}),
            **{f"state_in.{k}": v for k, v in state.items()}, **extra}


def run_window(model, length, cat, num, rtg, state, **extra):
    sess = exphil.session(model.build(length).SerializeToString())
    out = sess.run(None, inputs(model, cat, num, rtg, state, **extra))
    return dict(zip([o.name for o in sess.get_outputs()], out))


def run_steps(model, cat, num, rtg, state, noise=None, temperature=1.0):
    """The step graph over the frames of cat [B, T, C] (a graph that samples: with the numbers
    noise [B, T, UNIFORMS])."""
    step = exphil.session(model.build(step=True).SerializeToString())
    names = [o.name for o in step.get_outputs()]
    heads = {h: [] for h in names if not h.startswith("state_out.")}
    for t in range(cat.shape[1]):
        extra = {} if noise is None else {"noise": noise[:, t], "temperature": np.array(temperature, np.float32)}
        out = dict(zip(names, step.run(None, inputs(model, cat[:, t], num[:, t], rtg[:, t], state, **extra))))
        state = {k: out[f"state_out.{k}"] for k in state}
        for h in heads:
            heads[h].append(out[h])
    return {h: np.stack(v, 1) for h, v in heads.items()}, state


def with_value_head(path):
    spec = exphil.load_spec(path)
    return msgspec.structs.replace(spec, returns=exphil.Returns(value=True))


AUTOREGRESSIVE_ORDER = ("main_x", "main_y", "buttons", "shoulder", "c_x", "c_y")  # (not the default)


def autoregressive(path, order=AUTOREGRESSIVE_ORDER):
    spec = exphil.load_spec(path)
    return msgspec.structs.replace(spec, heads=msgspec.structs.replace(spec.heads, sampling="autoregressive",
                                                                        order=order))


def seeing_only_items(path):
    return msgspec.structs.replace(exphil.load_spec(path), sees=["items"])


VARIANTS = {"gru with a value head": lambda: with_value_head(ROOT / "specs" / "gru.toml"),
            "gru with autoregressive heads": lambda: autoregressive(ROOT / "specs" / "gru.toml"),
            "gru seeing only items": lambda: seeing_only_items(ROOT / "specs" / "gru.toml")}


def variant(spec):
    """A shipped spec (path) or one of VARIANTS (name)."""
    return exphil.load_spec(spec) if isinstance(spec, Path) else VARIANTS[spec]()


def conditioned(model, seed=0):
    """The model, its autoregressive conditioning moved off its start (zero: independent heads)."""
    rng = np.random.default_rng(seed)
    for k, v in model.params.items():
        if k.startswith("heads.ar.") and k.endswith(".out"):
            model.params[k] = rng.normal(0, 0.5, v.shape).astype(np.float32)
    return model


@pytest.mark.parametrize("spec", [*SPECS, *VARIANTS], ids=lambda p: getattr(p, "stem", p))
def test_step_graph_reproduces_window_graph(spec, real_frames):
    """120 frames fed one at a time to the step graph == the window graph over those frames,
    from a zero state and from the non-zero state left by 60 earlier frames (every head, and
    the value head where there is one). Autoregressive heads: the step graph samples each
    frame's action, and the window graph fed those actions (teacher forcing) gives the logits
    the step graph sampled them from."""
    spec = variant(spec)
    model = conditioned(exphil.Model(spec, seed=1))
    cat, num, rtg = real_frames
    noise = np.random.default_rng(2).random((2, 180, exphil.UNIFORMS)).astype(np.float32) \
        if spec.heads.sampling == "autoregressive" else None
    zero = model.zero_state(2)
    _, warm = run_steps(model, cat[:, :60], num[:, :60], rtg[:, :60], zero, noise)
    if model.states:
        assert any(np.abs(v).max() > 1e-3 for v in warm.values())
    for state in (zero, warm):
        steps, final = run_steps(model, cat[:, 60:180], num[:, 60:180], rtg[:, 60:180], state,
                                 None if noise is None else noise[:, 60:180])
        teacher = {} if noise is None else {"target.action": steps.pop("action")}
        window = run_window(model, 120, cat[:, 60:180], num[:, 60:180], rtg[:, 60:180], state, **teacher)
        assert set(steps) == set(exphil.HEADS) | ({"value"} if spec.returns.value else set())
        for h in steps:
            assert window[h].shape == steps[h].shape == (2, 120, *([exphil.HEADS[h]] if h in exphil.HEADS else []))
            assert np.abs(window[h] - steps[h]).max() <= 1e-4, h
        for k in final:
            assert np.abs(window[f"state_out.{k}"] - final[k]).max() <= 1e-4, k


# the columns of each optional group (categorical, numeric), as the feature layout documents them
GROUP_COLUMNS = {"nana": (slice(5, 7), slice(49, 87)), "items": (slice(7, 11), slice(87, 119)),
                 "randall": (slice(0, 0), slice(119, 122))}


@pytest.mark.parametrize("sees", [[], ["items"], ["nana", "randall"]], ids=str)
def test_a_model_reads_only_the_groups_it_sees(real_frames, sees):
    """A spec's `sees` decides which optional groups of columns (each Nana, the items, Randall) the
    model reads: its outputs move when a group it sees is scrambled and stay put, to the bit, when
    one it does not see is; its input projection and tables are only as wide as what it reads
    (with `sees = []`, 133 inputs for gru's tables: layout 1's)."""
    cat, num, rtg = real_frames
    spec = exphil.parse_spec(f"sees = {sees}\n" + spec_text("gru", "independent"))  # (no target action needed)
    model = exphil.Model(spec)
    widths = {"nana": 2 * 32 + 38, "items": 4 * 8 + 32, "randall": 3}  # gru's tables: action 32, item 8
    assert model.params["in_proj.weight"].shape[0] == 133 + sum(widths[g] for g in sees)
    assert ("embed.item" in model.params) == ("items" in sees)
    state = model.zero_state(2)
    before = run_window(model, 60, cat[:, :60], num[:, :60], rtg[:, :60], state)
    rng = np.random.default_rng(0)
    for group, (c, n) in GROUP_COLUMNS.items():
        scrambled_cat, scrambled_num = cat.copy(), num.copy()
        scrambled_cat[..., c] = rng.integers(0, 256, scrambled_cat[..., c].shape)
        scrambled_num[..., n] = rng.normal(0, 1, scrambled_num[..., n].shape)
        after = run_window(model, 60, scrambled_cat[:, :60], scrambled_num[:, :60], rtg[:, :60], state)
        change = max(np.abs(before[h] - after[h]).max() for h in exphil.HEADS)
        assert (change > 1e-3) if group in sees else (change == 0), (group, change)


def test_autoregressive_step_graph_samples_like_the_numpy_rule(real_frames):
    """With autoregressive heads the step graph samples the action itself: over 120 real frames
    (state carried) its action equals `sample_actions` fed the same numbers and the logits the
    graph returns (each head's given the values sampled before it), at temperatures 1 and 0.6;
    at temperature 0 it is the most likely value of each head given those before it."""
    model = conditioned(exphil.Model(autoregressive(ROOT / "specs" / "gru.toml"), seed=3))
    cat, num, rtg = real_frames
    noise = np.random.default_rng(5).random((2, 120, exphil.UNIFORMS)).astype(np.float32)
    for temperature in (1.0, 0.6, 0.0):
        steps, _ = run_steps(model, cat[:, :120], num[:, :120], rtg[:, :120], model.zero_state(2), noise, temperature)
        logits = {h: steps[h].reshape(240, -1) for h in exphil.HEADS}
        if temperature:
            want = exphil.sample_actions(logits, noise.reshape(240, -1).astype(np.float64), temperature)
        else:
            want = np.concatenate([logits["buttons"] > 0, *(logits[h].argmax(-1)[:, None] for h in exphil.HEADS
                                                            if h != "buttons")], 1)
        assert (steps["action"].reshape(240, -1) == want).all(), temperature
    assert len({tuple(a) for a in steps["action"].reshape(240, -1)}) > 10  # (the frames differ)


def test_autoregressive_samples_follow_the_joint_distribution():
    """20,000 samples of one frame from a small model with strongly conditioned heads: the
    frequencies of (main_x, main_y), sampled in that order, match p(main_x) p(main_y | main_x),
    the conditional read from the window graph fed each main_x value (teacher forcing)."""
    spec = exphil.override_spec(autoregressive(ROOT / "specs" / "mlp.toml"), hidden=16)
    model = conditioned(exphil.Model(spec, seed=4), seed=1)
    model.params["heads.ar.main_y.out"] *= 6  # main_y leans hard on main_x
    n, rng = 20000, np.random.default_rng(6)
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    cat, num = np.repeat(eps[0].cat[3000:3001], n, 0), np.repeat(eps[0].num[3000:3001], n, 0)
    step = exphil.session(model.build(step=True).SerializeToString())
    names = [o.name for o in step.get_outputs()]
    out = dict(zip(names, step.run(None, {"cat": cat, "num": num, "noise": rng.random((n, exphil.UNIFORMS), np.float32),
                                         "temperature": np.array(1.0, np.float32)})))
    x, y = out["action"][:, 8], out["action"][:, 9]
    window = exphil.session(model.build(1).SerializeToString())
    action = np.zeros((17, 1, exphil.UNIFORMS), np.int64)
    action[:, 0, 8] = np.arange(17)  # each main_x value, teacher-forced
    wout = dict(zip([o.name for o in window.get_outputs()],
                    window.run(None, {"cat": cat[:17, None], "num": num[:17, None], "target.action": action})))
    softmax = lambda v: np.exp(v - v.max(-1, keepdims=True)) / np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True)
    joint = softmax(wout["main_x"][0, 0].astype(np.float64))[:, None] * softmax(wout["main_y"][:, 0].astype(np.float64))
    counts = np.zeros((17, 17))
    np.add.at(counts, (x, y), 1)
    conditionals = softmax(wout["main_y"][:, 0].astype(np.float64))
    assert np.abs(conditionals - conditionals[:1]).max() > 0.2  # main_y does depend on main_x
    sigma = np.sqrt(joint * (1 - joint) / n)
    assert (np.abs(counts / n - joint) <= 5 * sigma + 1e-4).all()


@pytest.mark.parametrize("path", [*SPECS, *VARIANTS], ids=lambda p: getattr(p, "stem", p))
def test_graph_format_limits(path):
    model = exphil.Model(variant(path))
    window, step, trained = model.build(), model.build(step=True), model.build(training=True)
    for proto in (window, step, trained):
        onnx.checker.check_model(proto)
        assert proto.ir_version <= 10
        assert all(o.version <= 21 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        # the same parameters, by name, in both graphs, and nothing else stored
        assert {t.name for t in proto.graph.initializer} == set(model.params)
        assert len({n.name for n in proto.graph.node}) == len(proto.graph.node)
    assert {n.op_type for n in trained.graph.node} <= GRADIENT_OPS | INPUT_OPS
    assert [i.name for i in step.graph.input][:2] == ["cat", "num"]
    assert [o.name for o in step.graph.output][:6] == list(exphil.HEADS)
    assert ({i.name[9:] for i in step.graph.input if i.name.startswith("state_in.")}
            == {o.name[10:] for o in step.graph.output if o.name.startswith("state_out.")}
            == {n for n, _ in model.states})


def mixer_graph(layer_cls, cfg, width, length, seed=0, params=None, **kw):
    """One mixer layer alone as a window graph: x [B, L, width] -> y, with its states (and
    `params` instead of the initial weights when given)."""
    init = {}
    layer = layer_cls("m", cfg, width, exphil._Init(init, np.random.default_rng(seed)), exphil.LayerAt(0, 1, True), **kw)
    params = init if params is None else params
    g = exphil.Graph(params, length, "mixer")
    x = g.input("x", "FLOAT", ["B", length, width])
    state = {s: g.input(f"state_in.{s}", "FLOAT", ["B", *shape]) for s, shape in layer.states}
    y, new = layer(g, x, state)
    g.output(y, "y", ["B", length, width])
    for s, shape in layer.states:
        g.output(new[s], f"state_out.{s}", ["B", *shape])
    return exphil.session(g.to_proto().SerializeToString()), params, layer


def test_lstm_matches_onnx_lstm_operator():
    """Our LSTM (MatMul/Sigmoid/Tanh) == ONNX's own LSTM operator run by onnxruntime."""
    H, L, B = 32, 50, 3
    sess, p, _ = mixer_graph(exphil.LSTMLayer, exphil.LSTM(forget_bias=1.0), H, L)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, L, H)).astype(np.float32)
    h0, c0 = (rng.normal(size=(B, 1, H)).astype(np.float32) for _ in range(2))
    y, h, c = sess.run(None, {"x": x, "state_in.h": h0, "state_in.c": c0})

    def onnx_order(w):  # ours: rows i, f, g, o (stored [in, 4H]); ONNX: i, o, f, c as [4H, in]
        i, f, g, o = np.split(w.T if w.ndim == 2 else w, 4)
        return np.concatenate([i, o, f, g])

    from onnx import TensorProto, helper
    node = helper.make_node("LSTM", ["X", "W", "R", "Bias", "", "H0", "C0"], ["Y", "Yh", "Yc"], hidden_size=H)
    graph = helper.make_graph([node], "ref", [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("X", "H0", "C0")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Yh", "Yc")],
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in [
            ("W", onnx_order(p["m.w_ih"])[None]), ("R", onnx_order(p["m.w_hh"])[None]),
            ("Bias", np.concatenate([onnx_order(p["m.bias"]), np.zeros(4 * H, np.float32)])[None])]])
    ref = exphil.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                                           ir_version=8).SerializeToString())
    Y, Yh, Yc = ref.run(None, {"X": x.transpose(1, 0, 2), "H0": h0.transpose(1, 0, 2),
                               "C0": c0.transpose(1, 0, 2)})
    assert np.abs(y - Y[:, 0].transpose(1, 0, 2)).max() < 1e-5
    assert np.abs(h[:, 0] - Yh[0]).max() < 1e-5 and np.abs(c[:, 0] - Yc[0]).max() < 1e-5


def test_mamba_matches_sequential_recurrence():
    """Our Mamba layer == the paper's recurrence written out in float64 NumPy, frame by frame:
    conv over the last K inputs, SiLU, dt = softplus(.), h = exp(dt A) h + dt u B, y = C h + D u."""
    d, L, B = 24, 40, 2
    cfg = exphil.Mamba(state=8, expand=2, conv=4)
    sess, p, layer = mixer_graph(exphil.MambaLayer, cfg, d, L, seed=3)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    conv0 = rng.normal(size=(B, cfg.conv - 1, layer.D)).astype(np.float32)
    ssm0 = rng.normal(size=(B, 1, layer.D, cfg.state)).astype(np.float32) * 0.1
    y, conv_out, ssm_out = sess.run(None, {"x": x, "state_in.conv": conv0, "state_in.ssm": ssm0})

    q = {k: v.astype(np.float64) for k, v in p.items()}
    silu = lambda v: v / (1 + np.exp(-v))
    A = -np.exp(q["m.A_log"])                                   # [D, N]
    for b in range(B):
        hist, h = list(conv0[b].astype(np.float64)), ssm0[b, 0].astype(np.float64)
        for t in range(L):
            uz = x[b, t] @ q["m.in_proj.weight"]
            u, z = uz[:layer.D], uz[layer.D:]
            hist.append(u)
            window = np.stack(hist[-cfg.conv:])                  # [K, D], oldest first
            u = silu((window * q["m.conv.weight"]).sum(0) + q["m.conv.bias"])
            proj = u @ q["m.x_proj.weight"]
            dt_in, Bt, Ct = proj[:layer.R], proj[layer.R:layer.R + cfg.state], proj[layer.R + cfg.state:]
            dt = np.log1p(np.exp(dt_in @ q["m.dt_proj.weight"] + q["m.dt_proj.bias"]))
            h = np.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            out = ((h @ Ct) + q["m.D"] * u) * silu(z)
            assert np.abs(out @ q["m.out_proj.weight"] - y[b, t]).max() < 1e-4, (b, t)
        assert np.abs(h - ssm_out[b, 0]).max() < 1e-4
        assert np.abs(np.stack(hist[-(cfg.conv - 1):]) - conv_out[b]).max() < 1e-5


@pytest.mark.parametrize("chunk", [0, 20, 16, 1], ids=["whole", "divides", "does-not-divide", "one"])
def test_mamba2_matches_the_ssd_recurrence(chunk):
    """Our Mamba-2 layer == its recurrence written out in float64 NumPy, frame by frame, from a
    carried state: conv over the last K inputs of [x, B, C], SiLU, per head dt = softplus(. + b),
    h = exp(dt A) h + (dt x) B^T, y = h C + D x, out = RMSNorm(y SiLU(z)) W, for chunked windows
    whose chunk size divides the window, does not, is 1 frame, or is the whole window."""
    d, L, B = 16, 60, 2
    cfg = exphil.Mamba2(state=8, expand=2, head_dim=8, conv=4, chunk=chunk)
    sess, p, layer = mixer_graph(exphil.Mamba2Layer, cfg, d, L, seed=3)
    H, P, N, D = layer.H, layer.P, layer.N, layer.D
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    conv0 = rng.normal(size=(B, cfg.conv - 1, D + 2 * N)).astype(np.float32)
    ssm0 = rng.normal(size=(B, H, P, N)).astype(np.float32) * 0.1
    y, conv_out, ssm_out = sess.run(None, {"x": x, "state_in.conv": conv0, "state_in.ssm": ssm0})

    q = {k: v.astype(np.float64) for k, v in p.items()}
    silu = lambda v: v / (1 + np.exp(-v))
    A = -np.exp(q["m.A_log"])                                    # [H]
    for b in range(B):
        hist, h = list(conv0[b].astype(np.float64)), ssm0[b].astype(np.float64)
        for t in range(L):
            proj = x[b, t] @ q["m.in_proj.weight"]
            z, xbc, dt = proj[:D], proj[D:2 * D + 2 * N], proj[2 * D + 2 * N:]
            hist.append(xbc)
            xbc = silu((np.stack(hist[-cfg.conv:]) * q["m.conv.weight"]).sum(0) + q["m.conv.bias"])
            u, Bt, Ct = xbc[:D].reshape(H, P), xbc[D:D + N], xbc[D + N:]
            dt = np.log1p(np.exp(dt + q["m.dt_bias"]))            # [H]
            h = np.exp(dt * A)[:, None, None] * h + (dt[:, None] * u)[:, :, None] * Bt[None, None, :]
            out = ((h @ Ct) + q["m.D"][:, None] * u).reshape(D) * silu(z)
            out = out / np.sqrt((out ** 2).mean() + 1e-5) * q["m.norm.weight"]
            assert np.abs(out @ q["m.out_proj.weight"] - y[b, t]).max() < 1e-4, (b, t)
        assert np.abs(h - ssm_out[b]).max() < 1e-4
        assert np.abs(np.stack(hist[-(cfg.conv - 1):]) - conv_out[b]).max() < 1e-5


def _rms(v, w):
    return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-5) * w


def _rotate(v, theta):
    """v [..., N] with its channel pairs (2j, 2j + 1), j < theta.shape[-1], rotated by theta_j."""
    v, j = v.copy(), 2 * np.arange(theta.shape[-1])
    c, s, v0, v1 = np.cos(theta), np.sin(theta), v[..., j], v[..., j + 1]
    v[..., j], v[..., j + 1] = v0 * c - v1 * s, v0 * s + v1 * c
    return v


@pytest.mark.parametrize("chunk, rope", [(0, 0.5), (20, 0.5), (16, 1.0), (1, 0.5), (16, 0.0)],
                         ids=["whole", "divides", "does-not-divide-all-rotated", "one", "real-state"])
def test_mamba3_matches_the_trapezoidal_recurrence(chunk, rope):
    """Our Mamba-3 layer == the paper's recurrence written out in float64 NumPy, frame by frame,
    from a carried state (angles included): dt = softplus(. + b), A = -max(softplus(.), 1e-4),
    lambda = sigmoid(.), k = RMSNorm(B) + b_B, q = RMSNorm(C) + b_C, theta += pi tanh(.) dt,
    h = e^(dt A) h + (1 - lambda) dt e^(dt A) x_prev (R(theta_prev) k_prev)^T + lambda dt x (R(theta) k)^T,
    y = h R(theta) q + D x, out = (y SiLU(z)) W, for chunks that divide the window, do not, are
    one frame or the whole window, with half or all of the state rotated, or none."""
    d, L, B = 16, 60, 2
    cfg = exphil.Mamba3(state=8, expand=2, head_dim=8, rope=rope, chunk=chunk)
    _, p, layer = mixer_graph(exphil.Mamba3Layer, cfg, d, L, seed=3)
    H, P, N, D, A = layer.H, layer.P, layer.N, layer.D, layer.pairs
    rng = np.random.default_rng(7)
    for k in ("m.B_bias", "m.C_bias", "m.B_norm.weight", "m.C_norm.weight", "m.D"):  # off their start
        p[k] = (p[k] + rng.normal(0, 0.5, p[k].shape)).astype(np.float32)
    p["m.dt_bias"] = rng.uniform(-2, 0, H).astype(np.float32)  # larger steps: faster decay, wider angles
    sess, _, _ = mixer_graph(exphil.Mamba3Layer, cfg, d, L, params=p)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    theta0 = rng.uniform(-np.pi, np.pi, (B, H, A))
    state = {"ssm": rng.normal(size=(B, H, P, N)) * 0.1, "B": rng.normal(size=(B, 1, N)),
             "x": rng.normal(size=(B, 1, D)), **({"cos": np.cos(theta0) - 1, "sin": np.sin(theta0)} if A else {})}
    outs = sess.run(None, {"x": x, **{f"state_in.{k}": v.astype(np.float32) for k, v in state.items()}})
    y, final = outs[0], dict(zip([s for s, _ in layer.states], outs[1:]))

    q = {k: v.astype(np.float64) for k, v in p.items()}
    silu, softplus = (lambda v: v / (1 + np.exp(-v))), (lambda v: np.log1p(np.exp(v)))
    bias_b, bias_c = q["m.B_bias"][:, 0], q["m.C_bias"][:, 0]  # [H, N]
    cuts = np.cumsum([D, D, N, N, H, H, H])
    for b in range(B):
        h, theta = state["ssm"][b], theta0[b]
        k_prev, x_prev = _rotate(state["B"][b, 0] + bias_b, theta), state["x"][b, 0].reshape(H, P)
        for t in range(L):
            z, u, Bt, Ct, dt, a, lam, phi = np.split(x[b, t] @ q["m.in_proj.weight"], cuts)
            dt = softplus(dt + q["m.dt_bias"])
            alpha, lam = np.exp(dt * -np.maximum(softplus(a), 1e-4)), 1 / (1 + np.exp(-lam))
            theta = theta + np.pi * np.tanh(phi)[None, :] * dt[:, None]
            k = _rotate(_rms(Bt, q["m.B_norm.weight"]) + bias_b, theta)
            qt = _rotate(_rms(Ct, q["m.C_norm.weight"]) + bias_c, theta)
            u = u.reshape(H, P)
            h = (alpha[:, None, None] * h + ((1 - lam) * dt * alpha)[:, None, None] * u_outer(x_prev, k_prev)
                 + (lam * dt)[:, None, None] * u_outer(u, k))
            out = ((h @ qt[:, :, None])[..., 0] + q["m.D"][:, None] * u).reshape(D) * silu(z)
            assert np.abs(out @ q["m.out_proj.weight"] - y[b, t]).max() < 1e-4, (b, t)
            k_prev, x_prev = k, u
        assert np.abs(h - final["ssm"][b]).max() < 1e-4
        assert np.abs(_rms(Bt, q["m.B_norm.weight"]) - final["B"][b, 0]).max() < 1e-5
        assert np.abs(u.reshape(D) - final["x"][b, 0]).max() < 1e-5
        if A:  # the angles, as (cos - 1, sin)
            assert np.abs(np.cos(theta) - 1 - final["cos"][b]).max() < 1e-5
            assert np.abs(np.sin(theta) - final["sin"][b]).max() < 1e-5


def u_outer(v, k):
    """Per head v k^T: v [H, P], k [H, N] -> [H, P, N]."""
    return v[:, :, None] * k[:, None, :]


@pytest.mark.parametrize("chunk", [0, 20, 16, 1], ids=["whole", "divides", "does-not-divide", "one"])
def test_gla_matches_its_recurrence(chunk):
    """GLA == its recurrence in float64 NumPy from a carried state: per head, log a =
    logsigmoid(x W_a W_b + b) / 16 per key channel, S = diag(a) S + k^T v, o = (q / sqrt(d_k)) S,
    RMSNorm per head, times SiLU(x W_g), out projection."""
    d, L, B = 16, 60, 2
    cfg = exphil.GLA(heads=2, expand_k=0.5, expand_v=1.0, gate_rank=4, chunk=chunk)
    _, p, layer = mixer_graph(exphil.GLALayer, cfg, d, L, seed=3)
    H, dk, dv = layer.H, layer.K // layer.H, layer.V // layer.H
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    for k in p:  # larger weights than the initialisation, so that decays and products matter
        p[k] *= 5 if k.endswith("weight") and "norm" not in k else 1
    sess, _, _ = mixer_graph(exphil.GLALayer, cfg, d, L, seed=3, params=p)
    ssm0 = rng.normal(size=(B, H, dv, dk)).astype(np.float32) * 0.3
    y, ssm_out = sess.run(None, {"x": x, "state_in.ssm": ssm0})
    q = {k: v.astype(np.float64) for k, v in p.items()}
    silu = lambda v: v / (1 + np.exp(-v))
    for b in range(B):
        S = ssm0[b].astype(np.float64).transpose(0, 2, 1)  # [H, d_k, d_v], the paper's layout
        for t in range(L):
            xt = x[b, t].astype(np.float64)
            qt, kt, vt = (xt @ q[f"m.{n}_proj.weight"] for n in "qkv")
            log_a = -np.log1p(np.exp(-(xt @ q["m.gk_a.weight"] @ q["m.gk_b.weight"] + q["m.gk_b.bias"]))) / 16
            o = []
            for h in range(H):
                ks, vs = slice(h * dk, (h + 1) * dk), slice(h * dv, (h + 1) * dv)
                S[h] = np.exp(log_a[ks])[:, None] * S[h] + np.outer(kt[ks], vt[vs])
                o.append(_rms(qt[ks] / np.sqrt(dk) @ S[h], q["m.norm.weight"]))
            out = np.concatenate(o) * silu(xt @ q["m.g_proj.weight"])
            assert np.abs(out @ q["m.o_proj.weight"] - y[b, t]).max() < 1e-4, (b, t)
        assert np.abs(S.transpose(0, 2, 1) - ssm_out[b]).max() < 1e-4


@pytest.mark.parametrize("chunk", [0, 20, 16, 1], ids=["whole", "divides", "does-not-divide", "one"])
@pytest.mark.parametrize("lower_bound", [0.0, 0.5])
def test_hgrn2_matches_its_recurrence(chunk, lower_bound):
    """HGRN-2 == its recurrence in float64 NumPy from a carried state: per head, forget gate
    f = lb + (1 - lb) sigmoid(x W_f), S = diag(f) S + (1 - f)^T (x W_i), o = (SiLU(x W_q) /
    sqrt(key width)) S; RMSNorm; out projection."""
    d, L, B = 16, 60, 2
    cfg = exphil.HGRN2(heads=2, lower_bound=lower_bound, chunk=chunk)
    sess, p, layer = mixer_graph(exphil.HGRN2Layer, cfg, d, L, seed=3)
    H, e, dv = layer.H, layer.E, layer.E
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    ssm0 = rng.normal(size=(B, H, dv, e)).astype(np.float32) * 0.3
    y, ssm_out = sess.run(None, {"x": x, "state_in.ssm": ssm0})
    q = {k: v.astype(np.float64) for k, v in p.items()}
    silu, sigmoid = (lambda v: v / (1 + np.exp(-v))), (lambda v: 1 / (1 + np.exp(-v)))
    for b in range(B):
        S = ssm0[b].astype(np.float64).transpose(0, 2, 1)  # [H, key, value]
        for t in range(L):
            xt = x[b, t].astype(np.float64)
            f = lower_bound + (1 - lower_bound) * sigmoid(xt @ q["m.f_proj.weight"])
            qt, vt = silu(xt @ q["m.q_proj.weight"]), xt @ q["m.i_proj.weight"]
            o = []
            for h in range(H):
                ks, vs = slice(h * e, (h + 1) * e), slice(h * dv, (h + 1) * dv)
                S[h] = f[ks][:, None] * S[h] + np.outer(1 - f[ks], vt[vs])
                o.append(qt[ks] / np.sqrt(e) @ S[h])
            out = _rms(np.concatenate(o), q["m.norm.weight"]) @ q["m.o_proj.weight"]
            assert np.abs(out - y[b, t]).max() < 1e-4, (b, t)
        assert np.abs(S.transpose(0, 2, 1) - ssm_out[b]).max() < 1e-4


@pytest.mark.parametrize("chunk", [0, 20, 16, 1], ids=["whole", "divides", "does-not-divide", "one"])
def test_retnet_matches_its_recurrence(chunk):
    """Retention == the recurrent form in float64 NumPy from a carried state: per head,
    S = gamma_h R^T S + k v^T (R rotating each pair of key channels by theta_j, gamma_h =
    1 - 2^(-5-h)), o = q S, with k scaled by 1/sqrt(key width); RMSNorm per head without
    weights, times SiLU(x W_g), out projection. No position counter anywhere."""
    d, L, B = 16, 60, 2
    cfg = exphil.RetNet(heads=2, value_factor=2, chunk=chunk)
    sess, p, layer = mixer_graph(exphil.RetNetLayer, cfg, d, L, seed=3)
    H, dk, dv = layer.H, layer.dk, layer.V // layer.H
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    ssm0 = rng.normal(size=(B, H, dv, dk)).astype(np.float32) * 0.3
    y, ssm_out = sess.run(None, {"x": x, "state_in.ssm": ssm0})
    q = {k: v.astype(np.float64) for k, v in p.items()}
    silu = lambda v: v / (1 + np.exp(-v))
    theta = 10000.0 ** (-np.arange(dk // 2) / (dk // 2 - 1))
    c, s_ = np.cos(theta)[:, None], np.sin(theta)[:, None]
    for b in range(B):
        S = ssm0[b].astype(np.float64).transpose(0, 2, 1)  # [H, key, value]
        for t in range(L):
            xt = x[b, t].astype(np.float64)
            qt, kt, vt = (xt @ q[f"m.{n}_proj.weight"] for n in "qkv")
            o = []
            for h in range(H):
                ks, vs = slice(h * dk, (h + 1) * dk), slice(h * dv, (h + 1) * dv)
                even, odd = S[h, 0::2].copy(), S[h, 1::2].copy()  # R^T: each key pair by -theta_j
                S[h, 0::2], S[h, 1::2] = even * c + odd * s_, odd * c - even * s_
                S[h] = (1 - 2.0 ** (-5 - h)) * S[h] + np.outer(kt[ks] / np.sqrt(dk), vt[vs])
                r = qt[ks] @ S[h]
                o.append(r / np.sqrt((r ** 2).mean() + 1e-5))
            out = np.concatenate(o) * silu(xt @ q["m.g_proj.weight"])
            assert np.abs(out @ q["m.out_proj.weight"] - y[b, t]).max() < 1e-4, (b, t)
        assert np.abs(S.transpose(0, 2, 1) - ssm_out[b]).max() < 1e-4


def test_rwkv7_matches_its_recurrence():
    """Two RWKV-7 time-mixing layers (the second mixes in the first's values) == the x070
    equations in float64 NumPy, frame by frame from carried states: token shift, decay w =
    exp(-e^-0.5 sigmoid(w0 + tanh(x_w W1) W2)), a = sigmoid(a0 + x_a A1 A2), kk = L2-normalised
    k k_k per head, k (1 + (a - 1) k_a), S = S diag(w) - (S kk)(a kk)^T + v k^T, y = S r,
    GroupNorm per head, + (r k r_k) v, times the gate, out projection."""
    d, L, B, N = 16, 30, 2, 8
    cfg = exphil.RWKV7(head_size=N, lora=4, gate_lora=6)
    params, rng = {}, np.random.default_rng(3)
    init = exphil._Init(params, rng)
    layers = [exphil.RWKV7Layer(f"m{i}", cfg, d, init, exphil.LayerAt(i, 2, first=i == 0)) for i in range(2)]
    for k in params:  # away from the initialisation's zeros, so that every term matters
        params[k] = params[k] + rng.normal(0, 0.3, params[k].shape).astype(np.float32)
    g = exphil.Graph(params, L, "rwkv7")
    x = g.input("x", "FLOAT", ["B", L, d])
    states = {(i, s): g.input(f"state_in.{i}.{s}", "FLOAT", ["B", *shape])
              for i, layer in enumerate(layers) for s, shape in layer.states}
    y = x
    for i, layer in enumerate(layers):
        y, new = layer(g, y, {s: states[i, s] for s, _ in layer.states})
        for s, shape in layer.states:
            g.output(new[s], f"state_out.{i}.{s}", ["B", *shape])
    g.output(y, "y", ["B", L, d])
    sess = exphil.session(g.to_proto().SerializeToString())
    feeds = {"x": rng.normal(size=(B, L, d)).astype(np.float32)}
    for (i, s), _ in states.items():
        shape = dict(layers[i].states)[s]
        feeds[f"state_in.{i}.{s}"] = (rng.normal(size=(B, *shape)) * 0.3).astype(np.float32)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    q = {k: v.astype(np.float64) for k, v in params.items()}
    sig = lambda v: 1 / (1 + np.exp(-v))
    H = d // N
    for b in range(B):
        xs, v_first = feeds["x"][b].astype(np.float64), {}  # the first layer's values, per frame
        for i in range(2):
            p = lambda name: q[f"m{i}.{name}"]
            prev = feeds[f"state_in.{i}.shift"][b, 0].astype(np.float64)
            S = feeds[f"state_in.{i}.wkv"][b].astype(np.float64)  # [H, N(v), N(k)]
            ys = []
            for t in range(L):
                xt = xs[t]
                mix = {m: xt + (prev - xt) * p(f"mu_{m}") for m in "rwkvag"}
                prev = xt
                r, k, v = (mix[m] @ p(f"{m}_proj.weight") for m in "rkv")
                w = np.exp(-np.exp(-0.5) * sig(p("w0") + np.tanh(mix["w"] @ p("w1")) @ p("w2")))
                if i == 0:
                    v_first[t] = v
                else:
                    v = v + (v_first[t] - v) * sig(p("v0") + mix["v"] @ p("v1") @ p("v2"))
                a = sig(p("a0") + mix["a"] @ p("a1") @ p("a2"))
                gate = sig(mix["g"] @ p("g1")) @ p("g2")
                kk = (k * p("k_k")).reshape(H, N)
                kk = kk / np.sqrt((kk ** 2).sum(-1, keepdims=True) + 1e-12)
                k = k * (1 + (a - 1) * p("k_a"))
                rh, kh, vh, ah = (z.reshape(H, N) for z in (r, k, v, a))
                y = np.empty((H, N))
                for h in range(H):
                    S[h] = S[h] * w.reshape(H, N)[h][None, :] - np.outer(S[h] @ kk[h], ah[h] * kk[h]) \
                        + np.outer(vh[h], kh[h])
                    y[h] = S[h] @ rh[h]
                y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 64e-5)
                y = y.reshape(d) * p("ln_x.weight") + p("ln_x.bias")
                y = y + (((rh * kh * p("r_k")).sum(-1, keepdims=True)) * vh).reshape(d)
                ys.append((y * gate) @ p("o_proj.weight"))
            xs = np.stack(ys)
            assert np.abs(S - out[f"state_out.{i}.wkv"][b]).max() < 1e-4, (b, i)
        assert np.abs(xs - out["y"][b]).max() < 1e-4, b



def test_cfc_matches_the_closed_form_cell():
    """CfC == the cell in float64 NumPy from a carried state, frame by frame: z = 1.7159
    tanh(0.666 ([x, h] W_bb + b)), f1 = tanh(ff1(z)), f2 = tanh(ff2(z)), tau = sigmoid(time(z)),
    h = f1 (1 - tau) + tau f2 (the "default" mode with a time step of one frame)."""
    d, L, B = 16, 40, 2
    sess, p, layer = mixer_graph(exphil.CfCLayer, exphil.CfC(backbone=12), d, L, seed=3)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    h0 = rng.normal(size=(B, 1, d)).astype(np.float32) * 0.5
    y, h_out = sess.run(None, {"x": x, "state_in.h": h0})
    q = {k: v.astype(np.float64) for k, v in p.items()}
    head = lambda z, n: z @ q[f"m.{n}.weight"] + q[f"m.{n}.bias"]
    w_bb = np.concatenate([q["m.backbone_x.weight"], q["m.backbone_h.weight"]])  # [x, h] W_bb
    for b in range(B):
        h = h0[b, 0].astype(np.float64)
        for t in range(L):
            z = 1.7159 * np.tanh(0.666 * (np.concatenate([x[b, t], h]) @ w_bb + q["m.backbone.bias"]))
            f1, f2, tau = np.tanh(head(z, "ff1")), np.tanh(head(z, "ff2")), 1 / (1 + np.exp(-head(z, "time")))
            h = f1 * (1 - tau) + tau * f2
            assert np.abs(h - y[b, t]).max() < 1e-5, (b, t)
        assert np.abs(h - h_out[b, 0]).max() < 1e-5


def test_s5_matches_the_complex_recurrence():
    """S5 == its recurrence in complex float64 NumPy from a carried state: lambda = exp(-exp(nu))
    e^(i angle(rho)), x = lambda x + u (B_re + i B_im), y = 2 Re(x (C_re + i C_im)) + D u, then
    g = GELU(y), out = g sigmoid(g W + b); and the initial eigenvalues are HiPPO-N's (real part
    -1/2 before discretisation)."""
    from math import erf

    d, L, B = 16, 40, 2
    sess, p, layer = mixer_graph(exphil.S5Layer, exphil.S5(state=6), d, L, seed=3)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, L, d)).astype(np.float32)
    x0 = (rng.normal(size=(B, 1, 6)) + 1j * rng.normal(size=(B, 1, 6))) * 0.5
    y, re, im = sess.run(None, {"x": x, "state_in.re": x0.real.astype(np.float32),
                                "state_in.im": x0.imag.astype(np.float32)})
    q = {k: v.astype(np.float64) for k, v in p.items()}
    lam = np.exp(-np.exp(q["m.nu"])) * (q["m.rho"][:, 0] + 1j * q["m.rho"][:, 1]) / np.linalg.norm(q["m.rho"], axis=-1)
    Bc, Cc = q["m.B_re"] + 1j * q["m.B_im"], q["m.C_re"] + 1j * q["m.C_im"]
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))
    for b in range(B):
        state = x0[b, 0].astype(np.complex128)
        for t in range(L):
            state = lam * state + x[b, t] @ Bc
            gy = gelu(2 * (state @ Cc).real + q["m.D"] * x[b, t])
            out = gy / (1 + np.exp(-(gy @ q["m.glu.weight"] + q["m.glu.bias"])))
            assert np.abs(out - y[b, t]).max() < 1e-4, (b, t)
        assert np.abs(state.real - re[b, 0]).max() < 1e-4 and np.abs(state.imag - im[b, 0]).max() < 1e-4
    assert np.allclose(exphil._hippo_n(6).real, -0.5) and (exphil._hippo_n(6).imag > 0).all()


@pytest.mark.parametrize("name", ["mamba", "decision_transformer", "gru with a value head"])
def test_stepper_carries_state_like_the_window_graph(name, real_frames):
    """The Agent's Stepper (IO binding, alternating state buffers; the return-to-go input and
    the value output where the spec has them; the numbers of a graph that samples) == the
    window graph (fed the sampled actions, for autoregressive heads)."""
    spec = (with_value_head(ROOT / "specs" / "gru.toml") if name.endswith("value head")
            else exphil.load_spec(ROOT / "specs" / f"{name}.toml"))
    model = conditioned(exphil.Model(spec, seed=2))
    cat, num, rtg = real_frames
    stepper = exphil.Stepper(model.build(step=True).SerializeToString())
    noise = np.random.default_rng(3).random((90, exphil.UNIFORMS)).astype(np.float32) if stepper.samples \
        else [None] * 90
    outputs = ["main_x", *(["value"] if spec.returns.value else [])]
    for rep in range(2):  # the second pass starts after reset()
        got = [{h: v.copy() for h, v in stepper(cat[0, t], num[0, t], rtg[0, t], noise=noise[t]).items()}
               for t in range(90)]
        teacher = {"target.action": np.stack([g["action"] for g in got])[None]} if stepper.samples else {}
        window = run_window(model, 90, cat[:1, :90], num[:1, :90], rtg[:1, :90], model.zero_state(1), **teacher)
        for h in outputs:
            assert np.abs(np.stack([g[h] for g in got]) - window[h][0]).max() <= 1e-4
        stepper.reset()
    if spec.returns.input:  # the return-to-go reaches the model
        other = stepper(cat[0, 0], num[0, 0], rtg[0, 0] + 5.0, noise=noise[0])["main_x"].copy()
        assert np.abs(other - window["main_x"][0, 0]).max() > 1e-4


def test_gru_matches_onnx_gru_operator():
    """Our GRU == ONNX's GRU operator with linear_before_reset=1 (PyTorch's variant)."""
    from onnx import TensorProto, helper
    H, L, B = 24, 40, 2
    sess, p, _ = mixer_graph(exphil.GRULayer, exphil.GRU(), H, L)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(B, L, H)).astype(np.float32)
    h0 = rng.normal(size=(B, 1, H)).astype(np.float32)
    y, h = sess.run(None, {"x": x, "state_in.h": h0})

    def onnx_order(w):  # ours: r, z, n (stored [in, 3H]); ONNX: z, r, h as [3H, in]
        r, z, n = np.split(w.T if w.ndim == 2 else w, 3)
        return np.concatenate([z, r, n])

    node = helper.make_node("GRU", ["X", "W", "R", "Bias", "", "H0"], ["Y", "Yh"], hidden_size=H,
                            linear_before_reset=1)
    graph = helper.make_graph([node], "ref", [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("X", "H0")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Yh")],
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in [
            ("W", onnx_order(p["m.w_ih"])[None]), ("R", onnx_order(p["m.w_hh"])[None]),
            ("Bias", np.concatenate([onnx_order(p["m.b_ih"]), onnx_order(p["m.b_hh"])])[None])]])
    ref = exphil.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                                           ir_version=8).SerializeToString())
    Y, Yh = ref.run(None, {"X": x.transpose(1, 0, 2), "H0": h0.transpose(1, 0, 2)})
    assert np.abs(y - Y[:, 0].transpose(1, 0, 2)).max() < 1e-5
    assert np.abs(h[:, 0] - Yh[0]).max() < 1e-5


@pytest.mark.parametrize("alibi", [False, True])
def test_attention_matches_numpy_band_attention(alibi):
    """Our attention == plain NumPy softmax attention with a causal band of W frames, over a
    sequence longer than the band (so the band, not just causality, is exercised)."""
    d, H, W, L, B = 32, 4, 8, 30, 2
    cfg = exphil.Attention(heads=H, window=W, alibi=alibi)
    sess, p, layer = mixer_graph(exphil.AttentionLayer, cfg, d, L, seed=4)
    x = np.random.default_rng(1).normal(size=(B, L, d)).astype(np.float32)
    zeros = {f"state_in.{n}": np.zeros((B, *s), np.float32) for n, s in layer.states}
    y = sess.run(None, {"x": x, **zeros})[0]

    qkv = x.astype(np.float64) @ p["m.qkv.weight"] + p["m.qkv.bias"]
    q, k, v = (a.reshape(B, L, H, d // H).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // H)  # [B, H, L, L]
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    if alibi:
        slopes = 2.0 ** (-8.0 * np.arange(1, H + 1) / H)
        s = s - slopes[:, None, None] * (i - j)
    s = np.where((j <= i) & (i - j < W), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    o = (a / a.sum(-1, keepdims=True)) @ v
    ref = o.transpose(0, 2, 1, 3).reshape(B, L, d) @ p["m.out.weight"] + p["m.out.bias"]
    assert np.abs(y - ref).max() < 1e-4


@needs_training
@pytest.mark.parametrize("spec", [*SPECS, *VARIANTS], ids=lambda p: getattr(p, "stem", p))
def test_gradients_match_finite_differences(spec, tmp_path):
    """The training graph's gradient (onnxruntime-training's, through every op we emit, e.g. the
    one-hot embeddings and the unrolled scans) equals central differences of the evaluated loss,
    for the largest gradient entry of every parameter tensor of a tiny copy of each spec (and
    of one with a value head, whose squared error joins the loss, and one with autoregressive
    heads, teacher-forced)."""
    spec = variant(spec)
    kinds = {type(b.mixer) for b in spec.blocks}  # sizes that fit a width of 16, chunks shorter than the window
    tiny = {"head_dim": 8} if kinds & {exphil.Mamba2, exphil.Mamba3} else {"head_size": 8} if exphil.RWKV7 in kinds else {}
    if kinds & {exphil.Mamba2, exphil.Mamba3, exphil.GLA, exphil.HGRN2}:
        tiny["chunk_size"] = 3
    model = conditioned(exphil.Model(exphil.override_spec(spec, window_size=8, hidden=16, **tiny)))
    trainer = exphil.Trainer(model, tmp_path / "t", length=8)
    eps = exphil.load_replay(REPLAYS / "hohav-py-slippi__netplay_name.slp")
    batch = exphil.make_batch(eps, exphil.windows(eps, 8)[1000:1002], 8, returns=spec.returns_used)
    trainer.module.train()
    trainer._run(batch, True)
    for name in model.params:
        param = trainer.state.parameters[name]
        grad, base = param.grad.copy(), param.data.copy()
        i = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
        def central_difference(step):
            losses = []
            for sign in (1, -1):
                moved = base.copy()
                moved[i] += sign * step
                param.data = moved
                losses.append(float(trainer.evaluate(batch)["loss"]))
            param.data = base
            return (losses[0] - losses[1]) / (2 * step)

        # a smaller step where the loss curves too much for the first; float32 losses (about
        # 18, resolution 2e-6) leave differences over a 2e-3 step uncertain by about 1e-3
        close = lambda numeric: abs(numeric - grad[i]) <= 0.05 * abs(grad[i]) + 1e-3
        assert close(central_difference(1e-2)) or close(central_difference(2e-3)), name
