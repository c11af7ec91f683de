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
])
def test_spec_errors_name_file_and_field(tmp_path, old, new, field):
    path = edited(tmp_path, old, new)
    with pytest.raises(exphil.SpecError) as e:
        exphil.load_spec(path)
    msg = str(e.value)
    assert str(path) in msg and field in msg


def test_missing_field_and_bad_toml(tmp_path):
    with pytest.raises(exphil.SpecError, match=r"missing required field `window`"):
        exphil.load_spec(edited(tmp_path, "window = 60", ""))
    with pytest.raises(exphil.SpecError, match="not valid TOML"):
        exphil.load_spec(edited(tmp_path, "[embed]", "[embed"))
    with pytest.raises(exphil.SpecError, match="cannot read spec"):
        exphil.load_spec(tmp_path / "nope.toml")


def test_edited_spec_compiles_and_runs(tmp_path):
    """Other width, depth and window in a copy of a shipped spec just work."""
    import numpy as np

    path = tmp_path / "small.toml"
    text = (ROOT / "specs" / "mamba.toml").read_text()
    path.write_text(text.replace("hidden = 256", "hidden = 64").replace("repeat = 2", "repeat = 3")
                    .replace("window = 60", "window = 12"))
    spec = exphil.load_spec(path)
    model = exphil.Model(spec)
    assert (spec.hidden, len(spec.layers), spec.window) == (64, 3, 12)
    step = exphil.Stepper(model.build(step=True).SerializeToString())
    out = step(np.zeros(len(exphil.CAT_FIELDS), np.int64), np.zeros(len(exphil.NUM_FIELDS), np.float32))
    assert out["main_x"].shape == (17,) and np.isfinite(out["buttons"]).all()
