"""bench.py runs end to end and writes honest numbers (no timing is asserted beyond sanity)."""

import json
import subprocess
import sys

from conftest import REPLAYS, ROOT


def bench(*args):
    res = subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_latency_table(tmp_path):
    out = bench("--specs", "specs/mlp.toml", "specs/lstm.toml", "--calls", "300", "--json", tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    assert set(data["step"]) == {"mlp", "lstm"} and "CPUExecutionProvider" in data["machine"]["providers"]
    for row in data["step"].values():
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["calls"] == 300
    assert "lstm" in out and "p99 ms" in out


def test_architecture_table(tmp_path):
    out = bench("--train", "--replays", REPLAYS, "--budget-seconds", "2", "--specs", "specs/mlp.toml",
                "specs/gated_ssm.toml", "--json", tmp_path / "a.json")
    rows = json.loads((tmp_path / "a.json").read_text())["architectures"]
    assert [r["spec"] for r in rows] != [] and {r["spec"] for r in rows} == {"mlp", "gated_ssm"}
    assert rows[0]["val_loss"] <= rows[1]["val_loss"] and all(r["steps"] > 0 for r in rows)
    assert "| rank | spec | val loss |" in out
