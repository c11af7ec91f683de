"""Hardware check: step latency of every spec on this machine (batch 1, FP32).

    python bench.py                 # all specs in specs/, CPU, one intra-op thread
    python bench.py --specs specs/lstm.toml --calls 5000 --json bench.json
    python bench.py --throughput    # also training frames/s on onnxruntime-training

Each spec is compiled with random weights (latency does not depend on the values). Reported:
median (p50) and p99 over many calls after a warm-up, and the verdict against the 60 FPS
frame budget of 16.67 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import exphil

FRAME_MS = 1000 / 60


def step_latency(spec: exphil.Spec, calls: int = 2000, warmup: int = 200, provider: str = "cpu",
                 threads: int = 1) -> dict:
    """Per-call wall time of the step graph fed real-shaped inputs, carrying its state."""
    model = exphil.Model(spec)
    stepper = exphil.Stepper(model.build(step=True).SerializeToString(), provider, threads)
    rng = np.random.default_rng(0)
    vocab = [exphil.EMBED_TABLES[table] for _, table in exphil.CAT_FIELDS]
    cats = np.stack([rng.integers(0, v, 256) for v in vocab], 1).astype(np.int64)
    nums = rng.normal(0, 1, (256, len(exphil.NUM_FIELDS))).astype(np.float32)
    for i in range(warmup):
        stepper(cats[i % 256], nums[i % 256])
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        stepper(cats[i % 256], nums[i % 256])
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "calls": calls,
            "params": int(sum(v.size for v in model.params.values()))}


def train_throughput(spec: exphil.Spec, batch_size: int = 64, window: int = 60, steps: int = 5) -> dict:
    """Training frames per second on onnxruntime-training: AdamW steps on real replay windows."""
    import tempfile

    model = exphil.Model(spec)
    episodes = exphil.load_replay(Path(__file__).parent / "tests" / "replays" / "hohav-py-slippi__netplay_name.slp")
    wins = exphil.windows(episodes, window)
    batch = exphil.make_batch(episodes, [wins[i % len(wins)] for i in range(batch_size)], window)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = exphil.Trainer(model, Path(tmp), length=window)
        trainer.step(dict(batch))  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step(dict(batch))
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {"step_s": step, "frames_per_s": batch_size * window / step, "batch_size": batch_size, "window": window}


def machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="*", help="spec files (default: specs/*.toml)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per spec (after warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--throughput", action="store_true",
                        help="also measure training frames/s (batch 64, window 60) per spec")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    paths = args.specs or sorted(str(p) for p in (Path(__file__).parent / "specs").glob("*.toml"))
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), {info['os']}, Python {info['python']}, "
          f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info['providers'])}")
    print(f"step latency, batch 1, FP32, CPU, {args.threads} thread(s), {args.calls} calls after warm-up\n")
    print(f"{'spec':<12}{'params':>10}{'p50 ms':>10}{'p99 ms':>10}  60 FPS"
          + ("  train frames/s" if args.throughput else ""))
    rows = {}
    for path in paths:
        spec = exphil.load_spec(path)
        r = step_latency(spec, args.calls, threads=args.threads)
        verdict = "yes" if r["p99_ms"] < FRAME_MS - 2 else "no"
        line = f"{spec.name:<12}{r['params']:>10,}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}  {verdict:<6}"
        if args.throughput:
            r["train"] = train_throughput(spec)
            line += f"  {r['train']['frames_per_s']:>15,.0f}"
        print(line, flush=True)
        rows[spec.name] = r
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "step": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
