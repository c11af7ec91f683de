"""Shared fixtures. Tests run on the replays shipped in tests/replays (see its README) and, when
present, on the wider set in ../shared/replays beside the repository."""

import os
import re
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent
REPLAYS = HERE / "replays"
BROKEN = HERE / "broken"
SHARED = ROOT.parent / "shared" / "replays"
SPECS = sorted((ROOT / "specs").glob("*.toml"))


def spec_text(shipped: str, sampling: str, **renamed) -> str:
    """A shipped spec's text with its heads sampled `sampling` ("independent" or "autoregressive")
    whatever the shipped file chose, and fields replaced: renamed={"name": "mlp_ar"} etc."""
    text = re.sub(r'^sampling = .*\n(?:\s+#.*\n)*', "", (ROOT / "specs" / f"{shipped}.toml").read_text(), flags=re.M)
    for field, value in renamed.items():
        text = re.sub(rf"^{field} = \S+", f"{field} = {value!r}".replace("'", '"'), text, count=1, flags=re.M)
    return text.replace("[heads]\n", f'[heads]\nsampling = "{sampling}"\n')


def _gpu_providers() -> list[str]:
    import onnxruntime

    import exphil

    gpus = set(exphil.PROVIDERS.values()) - {"CPUExecutionProvider"}
    return sorted(gpus & set(onnxruntime.get_available_providers()))


GPU_PROVIDERS = _gpu_providers()  # GPU execution providers of the onnxruntime installed here
cpu_only = pytest.mark.skipif(bool(GPU_PROVIDERS), reason=f"expects no GPU provider; here: {GPU_PROVIDERS}")


def _can_train() -> bool:
    import exphil

    try:
        exphil._ort_training()
        return True
    except exphil.ExphilError:
        return False


needs_training = pytest.mark.skipif(not _can_train(), reason="needs onnxruntime-training (pip install 'exphil[train]')")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Each test session builds its own replay cache (never the user's ~/.cache/exphil)."""
    os.environ["EXPHIL_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory):
    """A small model trained on the shipped replays (shared by the tests that need a run)."""
    import exphil

    out = tmp_path_factory.mktemp("runs") / "mlp"
    return exphil.train(ROOT / "specs" / "mlp.toml", REPLAYS, epochs=1, out=out, quiet=True)


@pytest.fixture(scope="session")
def mlp_independent_run(tmp_path_factory):
    """The same with independent heads (each sampled on its own, by the Agent in NumPy)."""
    import exphil

    folder = tmp_path_factory.mktemp("runs")
    (folder / "mlp_ind.toml").write_text(spec_text("mlp", "independent", name="mlp_ind"))
    return exphil.train(folder / "mlp_ind.toml", REPLAYS, epochs=1, out=folder / "mlp_ind", quiet=True)


def stand_in_dolphin(tmp_path: Path):
    """A libmelee Console/Controller pair whose controller pipe is a real FIFO in tmp_path.

    Dolphin and a Melee ISO cannot run here: libmelee's Console asks the Dolphin executable for
    its version, so a two-line shell script answers in its place and is never run otherwise."""
    import melee

    exe = tmp_path / "dolphin"
    exe.write_text("#!/bin/sh\necho 'Slippi Dolphin mainline (stand-in for tests)'\n")
    exe.chmod(0o755)
    console = melee.Console(path=str(exe), is_dolphin=True, dolphin_home_path=str(tmp_path / "home"),
                            tmp_home_directory=False)
    return console
