"""bench.py runs end to end and writes honest numbers (no timing is asserted beyond sanity)."""

import json
import subprocess
import sys

import exphil
from conftest import REPLAYS, ROOT


def bench(*args):
    res = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_latency_table(tmp_path):
    """A cell for every spec x available provider x precision (and the window re-run); numbers
    positive, p99 >= p50; providers not installed are reported as absent, not a crash."""
    out = bench("--specs", "specs/mlp.toml", "specs/lstm.toml", "--providers", "cpu", "cuda", "coreml",
                "--json", tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert set(data["step"]) == {"mlp", "lstm"} and "CPUExecutionProvider" in data["machine"]["providers"]
    assert set(data["step"]["lstm"]["cells"]) == {"cpu/fp32", "cpu/int8", "cpu/fp32 re-run", "cuda", "coreml"}
    assert set(data["step"]["mlp"]["cells"]) == {"cpu/fp32", "cpu/int8", "cuda", "coreml"}  # window 1: no re-run
    absent = {p for p in ("cuda", "coreml") if exphil.PROVIDERS[p] not in data["machine"]["providers"]}
    for row in data["step"].values():
        assert {p for p in ("cuda", "coreml") if row["cells"][p] == {"absent": True}} == absent
        for name, cell in row["cells"].items():
            if "absent" not in cell:
                assert 0 < cell["p50_ms"] <= cell["p99_ms"] and cell["calls"] >= 300, name
    assert f"Not available here: {', '.join(sorted(absent))}" in out if absent else "Not available here" not in out
    assert "cpu/int8 p50 ms" in out and "headroom" in out
    md = bench("--specs", "specs/mlp.toml", "--providers", "cpu", "--markdown")
    assert "| spec | params | cpu/fp32 p50 ms | cpu/int8 p50 ms | headroom |" in md


def test_architecture_table(tmp_path):
    """A fixed number of optimizer steps per spec; ranked by the margin under the Markov
    baseline, with the copy baseline beside each accuracy."""
    out = bench("--train", "--replays", REPLAYS, "--max-steps", "3", "--specs", "specs/mlp.toml",
                "specs/gated_ssm.toml", "--json", tmp_path / "a.json")
    rows = json.loads((tmp_path / "a.json").read_text())["architectures"]
    assert {r["spec"] for r in rows} == {"mlp", "gated_ssm"} and all(r["steps"] == 3 for r in rows)
    assert rows[0]["margin"] >= rows[1]["margin"]
    for r in rows:
        assert abs(r["margin"] - (1 - r["val_loss"] / r["markov_loss"])) < 1e-9
        assert 0.5 < r["copy_accuracy"]["main_x"] < 1 and 0.5 < r["copy_button_f1"] < 1
    assert "| rank | spec | val loss | markov | vs markov |" in out and "3 optimizer steps" in out
