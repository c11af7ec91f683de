"""Hardware check and architecture table.

    python bench.py                      # step latency of every spec in specs/ (batch 1, FP32, CPU)
    python bench.py --throughput         # ... and training frames/s (batch 64, window 60)
    python bench.py --train --replays DIR --budget-seconds 120
                                         # train every spec on the same games for the same time,
                                         # then rank them (the architecture table)

Specs are compiled with random weights for latency (it does not depend on the values). Latency
is reported as median (p50) and p99 over many calls after a warm-up, with the verdict against
the 60 FPS frame budget (16.67 ms, minus ~2 ms for reading the game and sending inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import exphil

FRAME_MS = 1000 / 60
ROOT = Path(__file__).resolve().parent


def verdict(p99_ms: float) -> str:
    return "yes" if p99_ms < FRAME_MS - 2 else ("with action repeat" if p99_ms < 3 * FRAME_MS else "no")


def train_throughput(spec: exphil.Spec, batch_size: int = 64, window: int = 60, steps: int = 5) -> dict:
    """Training frames per second on onnxruntime-training: AdamW steps on real replay windows."""
    model = exphil.Model(spec)
    episodes = exphil.load_replay(ROOT / "tests" / "replays" / "hohav-py-slippi__netplay_name.slp")
    wins = exphil.windows(episodes, window)
    batch = exphil.make_batch(episodes, [wins[i % len(wins)] for i in range(batch_size)], window)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = exphil.Trainer(model, Path(tmp) / "t", length=window)
        trainer.step(dict(batch))  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.step(dict(batch))
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {"step_s": step, "frames_per_s": batch_size * window / step, "batch_size": batch_size, "window": window}


def architecture_table(paths: list[str], replays: str, budget_seconds: float, seed: int, batch_size: int) -> list[dict]:
    """Train every spec on the same games with the same seed and time budget; rank by
    validation loss."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            spec = exphil.load_spec(path)
            print(f"training {spec.name} for {budget_seconds:.0f} s ...", file=sys.stderr, flush=True)
            run = exphil.train(spec, replays, out=Path(tmp) / spec.name, epochs=10_000, seed=seed,
                               batch_size=batch_size, budget_seconds=budget_seconds, quiet=True)
            history = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
            best = min(history, key=lambda r: r["val_loss"])
            frames = sum(r["frames_per_s"] * r["seconds"] for r in history)
            latency = exphil.step_latency(exphil.load_run(run.path)[0], calls=1000)
            rows.append({"spec": spec.name, "val_loss": best["val_loss"], "val_stream_loss": best.get("val_stream_loss"),
                         "button_f1": best["val_button_f1"], "accuracy": best["val_accuracy"],
                         "baseline_loss": run.info["baseline_loss"]["total"], "steps": run.info["steps"],
                         "train_frames_per_s": frames / sum(r["seconds"] for r in history),
                         "step_p50_ms": latency["p50_ms"], "step_p99_ms": latency["p99_ms"]})
    rows.sort(key=lambda r: r["val_loss"])
    return rows


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
    parser.add_argument("--train", action="store_true", help="the architecture table (needs --replays)")
    parser.add_argument("--replays", help="replays for --train")
    parser.add_argument("--budget-seconds", type=float, default=60, help="training time per spec for --train")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for --train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    paths = args.specs or sorted(str(p) for p in (ROOT / "specs").glob("*.toml"))
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), {info['os']}, Python {info['python']}, "
          f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info['providers'])}")
    result = {"machine": info}
    if args.train:
        if not args.replays:
            parser.error("--train needs --replays")
        rows = architecture_table(paths, args.replays, args.budget_seconds, args.seed, args.batch_size)
        print(f"\nsame games, seed {args.seed}, {args.budget_seconds:.0f} s of training each "
              f"(frequency baseline {rows[0]['baseline_loss']:.3f})\n")
        print("| rank | spec | val loss | button F1 | train frames/s | step p50 ms | 60 FPS |")
        print("|---|---|---|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            print(f"| {i} | {r['spec']} | {r['val_loss']:.3f} | {r['button_f1']:.3f} | {r['train_frames_per_s']:,.0f} "
                  f"| {r['step_p50_ms']:.3f} | {verdict(r['step_p99_ms'])} |")
        result["architectures"] = rows
    else:
        print(f"step latency, batch 1, FP32, CPU, {args.threads} thread(s), {args.calls} calls after warm-up\n")
        print(f"{'spec':<12}{'params':>10}{'p50 ms':>10}{'p99 ms':>10}  60 FPS"
              + ("  train frames/s" if args.throughput else ""))
        rows = {}
        for path in paths:
            spec = exphil.load_spec(path)
            model = exphil.Model(spec)
            r = exphil.step_latency(model, args.calls, threads=args.threads)
            r["params"] = int(sum(v.size for v in model.params.values()))
            line = f"{spec.name:<12}{r['params']:>10,}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}  {verdict(r['p99_ms']):<6}"
            if args.throughput:
                r["train"] = train_throughput(spec)
                line += f"  {r['train']['frames_per_s']:>15,.0f}"
            print(line, flush=True)
            rows[spec.name] = r
        result["step"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
