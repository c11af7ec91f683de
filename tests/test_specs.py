import pytest

import exphil
from conftest import ROOT, SPECS


def test_shipped_specs_load():
    names = {exphil.load_spec(p).name for p in SPECS}
    assert {"mlp", "lstm", "mamba"} <= names


def test_reference_configurations():
    mlp, lstm, mamba = (exphil.load_spec(ROOT / "specs" / f"{n}.toml") for n in ("mlp", "lstm", "mamba"))
    assert (mlp.window, mlp.hidden, len(mlp.layers)) == (1, 512, 2)
    assert (lstm.window, lstm.hidden, len(lstm.layers)) == (60, 256, 2)
    assert all(isinstance(b.mixer, exphil.LSTM) for b in lstm.layers)
    m = mamba.layers[0].mixer
    assert (mamba.window, mamba.hidden, len(mamba.layers)) == (60, 256, 2)
    assert (m.state, m.expand, m.conv) == (16, 2, 4)


def edited(tmp_path, old, new, name="lstm"):
    text = (ROOT / "specs" / f"{name}.toml").read_text()
    assert old in text
    path = tmp_path / "edited.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, field", [
    ("hidden = 256", "hiden = 256", "hiden"),                          # typo at top level
    ("repeat = 2", "repaet = 2", "blocks[0]"),                         # typo inside a block
    ('forget_bias = 1.0', 'forget_biass = 1.0', "blocks[0].mixer"),    # typo inside the mixer
    ("window = 60", 'window = "sixty"', "window"),                     # wrong type
    ("repeat = 2", "repeat = 0", "blocks[0].repeat"),                  # out of range
    ('kind = "lstm"', 'kind = "lstmm"', "blocks[0].mixer.kind"),       # unknown layer kind
    ('sampling = "autoregressive"', 'sampling = "autoregresive"', "heads.sampling"),  # not a kind of heads
    ("[heads]", '[heads]\norder = ["buttons", "main_x"]', "`order` must name each head once"),  # a head missing
    ("window = 60", 'window = 60\nsees = ["nana", "item"]', "sees[1]"),  # no such group of features
    ("window = 60", "window = 60\nlayout = 1", "`layout`: replaced by `sees` (layout = 1 is sees = [],"),
])
def test_spec_errors_name_file_and_field(tmp_path, old, new, field):
    path = edited(tmp_path, old, new)
    with pytest.raises(exphil.SpecError) as e:
        exphil.load_spec(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg


@pytest.mark.parametrize("old, new, field", [
    ("rope = 0.5", "rope = 1.5", "blocks[0].mixer.rope"),              # out of range (a share of the state)
    ("head_dim = 64", "head_dim = 0", "blocks[0].mixer.head_dim"),     # out of range
    ("chunk = 64", "chunck = 64", "blocks[0].mixer"),                  # typo inside the mixer
    ("state = 64", 'state = "64"', "blocks[0].mixer.state"),           # wrong type
])
def test_mamba3_spec_errors_name_file_and_field(tmp_path, old, new, field):
    path = edited(tmp_path, old, new, name="mamba3")
    with pytest.raises(exphil.SpecError) as e:
        exphil.load_spec(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_mamba3_heads_must_divide_the_inner_width(tmp_path):
    spec = exphil.load_spec(edited(tmp_path, "head_dim = 64", "head_dim = 48", name="mamba3"))
    with pytest.raises(exphil.SpecError, match=r"mamba3: expand x hidden = 512 is not divisible by head_dim = 48"):
        exphil.Model(spec)


def test_missing_field_and_bad_toml(tmp_path):
    with pytest.raises(exphil.SpecError, match=r"missing required field `window`"):
        exphil.load_spec(edited(tmp_path, "window = 60", ""))
    with pytest.raises(exphil.SpecError, match="not valid TOML"):
        exphil.load_spec(edited(tmp_path, "[embed]", "[embed"))
    with pytest.raises(exphil.SpecError, match="cannot read spec"):
        exphil.load_spec(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_edited_spec_compiles_and_runs(tmp_path, path):
    """Other width, depth and window in a copy of every shipped spec just work, and the step
    graph still reproduces the window graph (autoregressive heads: fed the actions the step
    graph sampled)."""
    import re

    import numpy as np

    text = re.sub(r"(?m)^hidden = \d+", "hidden = 64", path.read_text())
    text = re.sub(r"(?m)^repeat = \d+", "repeat = 3", text)
    text = re.sub(r"(?m)^window = \d+", "window = 12", text)
    edited = tmp_path / path.name
    edited.write_text(text)
    spec = exphil.load_spec(edited)
    assert spec.hidden == 64 and spec.window == 12
    model = exphil.Model(spec)
    rng = np.random.default_rng(0)
    cat = np.stack([rng.integers(0, exphil.EMBED_TABLES[t], (1, 12)) for _, t in exphil.CAT_FIELDS], -1)
    num = rng.normal(size=(1, 12, len(exphil.NUM_FIELDS))).astype(np.float32)
    window = exphil.session(model.build().SerializeToString())
    feeds = {"cat": cat, "num": num, **{f"state_in.{k}": v for k, v in model.zero_state(1).items()},
             **({"rtg": np.zeros((1, 12), np.float32)} if spec.returns.input else {})}
    step = exphil.Stepper(model.build(step=True).SerializeToString())
    noise = rng.random((12, exphil.UNIFORMS)).astype(np.float32) if step.samples else [None] * 12
    outs = [{k: v.copy() for k, v in step(cat[0, t], num[0, t], noise=noise[t]).items()} for t in range(12)]
    if step.samples:
        feeds["target.action"] = np.stack([o["action"] for o in outs])[None]
    expected = window.run(["main_x"], feeds)[0][0]
    assert np.abs(np.stack([o["main_x"] for o in outs]) - expected).max() <= 1e-4


def test_a_shared_block_is_one_set_of_weights_with_a_state_per_position():
    """zamba.toml applies one attention block at two positions: its weights are one tensor each
    in the model and in the training graph (whose gradient check, in test_graphs, perturbs that
    one tensor: the gradients of both positions summed), each position has its own input
    projection and key/value cache."""
    model = exphil.Model(exphil.load_spec(ROOT / "specs" / "zamba.toml"))
    shared = sorted(k for k in model.params if k.startswith("shared.attention."))
    assert shared and not [k for k in model.params if ".mixer.qkv" in k and not k.startswith("shared.")]
    trained = model.build(training=True)
    names = [t.name for t in trained.graph.initializer]
    assert all(names.count(k) == 1 for k in shared)
    assert {"layers.2.site.weight", "layers.5.site.weight"} <= set(model.params)
    assert {"layers.2.mixer.k", "layers.5.mixer.k"} <= {n for n, _ in model.states}


def test_blocks_sharing_a_name_must_agree(tmp_path):
    text = (ROOT / "specs" / "zamba.toml").read_text()
    last = text.rindex("heads = 4")
    path = tmp_path / "zamba.toml"
    path.write_text(text[:last] + "heads = 8" + text[last + len("heads = 4"):])
    with pytest.raises(exphil.SpecError, match=r"field `blocks\[3\].share`: 'attention' names blocks\[1\]"):
        exphil.load_spec(path)
