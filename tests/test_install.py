"""Installs and runtimes: a normal (non-editable) install ships the built-in specs and bench.py;
play, eval and compile never need onnxruntime-training, and training without it says what to
install; the replay cache follows each platform's conventions."""

import site
import subprocess
import sys
from pathlib import Path

import pytest

import exphil
from conftest import REPLAYS, ROOT


def run(*args, **kw):
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert res.returncode == 0, res.stderr
    return res.stdout


def outer_packages() -> list[str]:
    """The folders this interpreter imports installed packages from: a virtual environment's own
    site-packages, the system's, or the user's (whichever the tests run in)."""
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    return [f for f in folders if Path(f).is_dir()]


def test_a_normal_install_resolves_built_in_specs_from_any_directory(tmp_path):
    """`pip install .` into a fresh virtual environment that sees the dependencies installed where
    the tests run (appended after its own site-packages, their .pth files not read, so the outer
    editable install stays invisible), then the built-in names from another directory: nothing is
    read from the source tree."""
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    own = run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()
    (Path(own) / "outer-packages.pth").write_text("".join(f + "\n" for f in outer_packages()))
    if subprocess.run([py, "-c", "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"]
                      ).returncode:
        run(py, "-m", "pip", "install", "-q", "setuptools>=77")  # the build backend pyproject.toml needs
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", ROOT)
    elsewhere.mkdir()
    where = run(py, "-c", "import exphil; print(exphil.__file__, exphil.SPECS_DIR)", cwd=elsewhere).split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    exe = venv / "bin" / "exphil"
    names = [line.split()[0] for line in run(exe, "specs", cwd=elsewhere).splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "specs").glob("*.toml"))
    assert run(exe, "specs", "show", "mamba", cwd=elsewhere) == (ROOT / "specs" / "mamba.toml").read_text()
    run(exe, "compile", "mamba", "--out", "build", "--window", "4", cwd=elsewhere)
    assert (elsewhere / "build" / "step.onnx").stat().st_size > 100_000
    out = run(exe, "bench", "--specs", Path(where[1]) / "mlp.toml", "--providers", "cpu", cwd=elsewhere)
    assert "cpu/int8 p50 ms" in out and "mlp" in out  # bench.py, installed beside exphil.py, on random inputs


BLOCKED = "import sys; sys.modules['onnxruntime.training'] = None  # as if onnxruntime-training were absent\n"


def test_play_eval_and_compile_never_import_onnxruntime_training(tmp_path, mlp_run):
    script = BLOCKED + f"""
import exphil
assert exphil.main(["compile", "lstm", "--out", {str(tmp_path / 'lstm')!r}]) == 0
res = exphil.evaluate({str(mlp_run.path)!r}, {str(REPLAYS / 'hohav-py-slippi__netplay_name.slp')!r})
agent, game = exphil.Agent({str(mlp_run.path)!r}), exphil.ReplayGame({str(REPLAYS / 'hohav-py-slippi__netplay_name.slp')!r}, fps=None, frames=200)
while (gs := game.step()) is not None:
    agent.act(gs, 1, 2)
print(res["frames"])
"""
    assert int(run(sys.executable, "-c", script, cwd=ROOT).split()[-1]) > 1000


def test_training_without_its_runtime_says_what_to_install(tmp_path):
    script = BLOCKED + "import exphil; sys.exit(exphil.main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", script, "train", "mlp", "--replays", str(REPLAYS), "--max-steps", "1",
                          "--out", str(tmp_path / "run"), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "exphil: error: training needs onnxruntime-training, which this environment lacks: pip install "
        "'exphil[train]' (Python 3.10-3.12, in an environment without another onnxruntime)"], res.stderr


@pytest.mark.parametrize("platform, env, expected", [
    ("linux", {"XDG_CACHE_HOME": "/xdg"}, "/xdg/exphil"),
    ("linux", {}, "~/.cache/exphil"),
    ("darwin", {"XDG_CACHE_HOME": "/xdg"}, "~/Library/Caches/exphil"),
    ("win32", {"LOCALAPPDATA": "/local"}, "/local/exphil"),
    ("win32", {"EXPHIL_CACHE": "/mine"}, "/mine"),
])
def test_cache_folder_follows_the_platform(monkeypatch, platform, env, expected):
    for name in ("EXPHIL_CACHE", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert exphil.cache_dir() == Path(expected).expanduser()
