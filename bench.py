"""Can I run this? Step latency of every spec on this machine, and the architecture table.

    python bench.py                      # every spec in specs/: each provider and precision here
    python bench.py --markdown           # the same table in Markdown (for a README)
    python bench.py --runs runs/lstm     # trained runs instead of random weights
    python bench.py --loop               # the full decision loop through libmelee (replay + FIFO)
    python bench.py --throughput         # training frames/s per spec (batch 64, window 60)
    python bench.py --train --replays DIR --max-steps 600
                                         # train every spec on the same games for the same number
                                         # of steps (or --budget-seconds), then rank them by their
                                         # margin under the Markov baseline (the architecture table)

Latency is the wall time of one step-graph call (batch 1, recurrent state carried), median (p50)
and p99 over at least 300 calls after a warm-up (more when calls are fast). Verdicts against the
60 FPS frame (16.67 ms, minus ~2 ms for reading the game and sending inputs):
  ✅ p99 under 14.7 ms   ⚠️ playable with action repeat (p99 under 3 frames)   ❌ too slow.
The "re-run" column is the other way to run a temporal model: the whole window graph over the
last `window` frames, every frame. Specs are compiled with random weights (latency does not
depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import exphil

FRAME_MS = 1000 / 60
ROOT = Path(__file__).resolve().parent
REPLAY = ROOT / "tests" / "replays" / "hohav-py-slippi__netplay_name.slp"
GPU_PROVIDERS = ("cuda", "rocm", "coreml")


def verdict(p99_ms: float) -> str:
    return "✅" if p99_ms < FRAME_MS - 2 else ("⚠️" if p99_ms < 3 * FRAME_MS else "❌")


def frames(n: int = 512):
    """Real inputs: frames of a shipped replay (installed, without the clone's tests/replays:
    random inputs in range, as latency does not depend on the values)."""
    if not REPLAY.exists():
        rng = np.random.default_rng(0)
        cat = np.stack([rng.integers(0, exphil.EMBED_TABLES[t], n) for _, t in exphil.CAT_FIELDS], -1)
        return cat, rng.normal(size=(n, len(exphil.NUM_FIELDS))).astype(np.float32)
    ep = exphil.load_replay(REPLAY)[0]
    return ep.cat[1000:1000 + n], ep.num[1000:1000 + n]


def rerun_cell(model: exphil.Model, provider: str, cats, nums) -> dict:
    """The window graph over the last `window` frames, re-run for every frame."""
    L = model.spec.window
    sess = exphil.session(model.build().SerializeToString(), provider)
    feed = {"cat": cats[None, :L], "num": nums[None, :L], **{f"state_in.{k}": v for k, v in model.zero_state(1).items()}}
    return exphil.timed(lambda: sess.run(None, feed), seconds=0.4)


def graphs_for(source: str) -> tuple[str, exphil.Model, dict[str, bytes]]:
    """(name, model, {precision: step graph}) for a spec file (random weights) or a run folder."""
    import onnx

    if Path(source).is_dir():
        model, _ = exphil.load_run(source)
        fp32 = (Path(source) / "step.onnx").read_bytes()
        name = Path(source).name
    else:
        model = exphil.Model(exphil.load_spec(source))
        fp32 = model.build(step=True).SerializeToString()
        name = model.spec.name
    out = {"fp32": fp32}
    int8 = Path(source) / "step.int8.onnx"
    out["int8"] = int8.read_bytes() if int8.exists() else exphil.quantize_step(onnx.ModelProto.FromString(fp32)).SerializeToString()
    return name, model, out


def latency_table(sources: list[str], providers: list[str]) -> dict:
    """Every source x provider x precision: FP32 and INT8 on the CPU, FP32 and FP16 on a GPU;
    a provider not installed here is reported as absent."""
    import onnx

    available = exphil.select_providers  # raises for a provider that is not installed
    cats, nums = frames()
    rows = {}
    for source in sources:
        name, model, graphs = graphs_for(source)
        row = {"params": int(sum(v.size for v in model.params.values())), "window": model.spec.window, "cells": {}}
        for provider in providers:
            try:
                available(provider)
            except exphil.ExphilError:
                row["cells"][provider] = {"absent": True}
                continue
            precisions = ["fp32", "int8"] if provider == "cpu" else ["fp32", "fp16"]
            for precision in precisions:
                graph = graphs.get(precision) or exphil.quantize_step(onnx.ModelProto.FromString(graphs["fp32"]),
                                                                      "fp16").SerializeToString()
                row["cells"][f"{provider}/{precision}"] = exphil.step_latency(graph, provider, frames=(cats, nums))
            if model.spec.window > 1:
                row["cells"][f"{provider}/fp32 re-run"] = rerun_cell(model, provider, cats, nums)
        print(f"  measured {name}", file=sys.stderr, flush=True)
        rows[name] = row
    return rows


def print_table(rows: dict, markdown: bool) -> None:
    columns = sorted({c for r in rows.values() for c, v in r["cells"].items() if "absent" not in v},
                     key=lambda c: (c.split("/")[0] != "cpu", "re-run" in c, c))
    absent = sorted({c for r in rows.values() for c, v in r["cells"].items() if "absent" in v})
    head = ["spec", "params", *[f"{c} p50 ms" for c in columns], "headroom"]
    lines = []
    for name, r in rows.items():
        cells = [f"{r['cells'][c]['p50_ms']:.3f} {verdict(r['cells'][c]['p99_ms'])}" if c in r["cells"] else "-"
                 for c in columns]
        best = min(v["p99_ms"] for c, v in r["cells"].items() if "absent" not in v and "re-run" not in c)
        lines.append([name, f"{r['params']:,}", *cells, f"{FRAME_MS / best:,.0f}x"])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for line in lines:
            print("  ".join(v.ljust(w) for v, w in zip(line, widths)))
    print(f"\n✅ p99 < {FRAME_MS - 2:.1f} ms   ⚠️ p99 < {3 * FRAME_MS:.0f} ms (use action repeat)   ❌ slower.  "
          "headroom = frame budget / best step p99."
          + (f"  Not available here: {', '.join(absent)}." if absent else ""))


def loop_latency(source: str, frames_: int = 1800, fps: float | None = None, precision: str = "fp32") -> dict:
    """The sync Runner's per-frame work: libmelee GameState -> features -> step -> sample ->
    controller commands flushed into a FIFO that another process drains, as Dolphin would.
    libmelee's Console streams a real replay as the game (back to back, or paced at `fps`)."""
    import melee
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name, model, graphs = graphs_for(source)
        model.save(tmp / "run")
        onnx.save(onnx.ModelProto.FromString(graphs["int8"]), tmp / "run" / "step.int8.onnx")
        agent = exphil.Agent(tmp / "run", provider="cpu", precision=precision, seed=0)
        exe = tmp / "dolphin"  # Dolphin cannot run here; libmelee only asks this stand-in for a version
        exe.write_text("#!/bin/sh\necho 'Slippi Dolphin mainline (stand-in)'\n")
        exe.chmod(0o755)
        console = melee.Console(path=str(exe), is_dolphin=True, dolphin_home_path=str(tmp / "home"),
                                tmp_home_directory=False)
        controller = melee.Controller(console, 1)
        drain = subprocess.Popen(["cat", controller.pipe_path], stdout=subprocess.DEVNULL)
        try:
            controller.connect()
            game = exphil.ReplayGame(REPLAY, fps, frames_)
            summary = exphil.Runner(agent, game, controller, 1, 2, stats_every=0, log=lambda m: None).run()
        finally:
            controller.disconnect()
            drain.wait(5)
    return {"p50_ms": summary["frame_ms"]["p50"], "p99_ms": summary["frame_ms"]["p99"], "frames": summary["frames"]}


def train_throughput(spec: exphil.Spec, batch_size: int = 64, window: int = 60, steps: int = 5) -> dict:
    """Training frames per second on onnxruntime-training: AdamW steps on real replay windows."""
    model = exphil.Model(spec)
    episodes = exphil.load_replay(REPLAY)
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


def architecture_table(paths: list[str], replays: str, budget_seconds: float, seed: int, batch_size: int,
                       max_steps: int = 0, frame_delay: int = 0) -> list[dict]:
    """Train every spec on the same games with the same seed and the same number of optimizer
    steps (or time budget); rank by the margin of the exported model's validation loss under
    the Markov baseline. Copy and Markov are scored on the same validation frames."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            spec = exphil.load_spec(path)
            print(f"training {spec.name} ({max_steps or 'unlimited'} steps, {budget_seconds or 'no'} s budget) ...",
                  file=sys.stderr, flush=True)
            run = exphil.train(spec, replays, out=Path(tmp) / spec.name, epochs=10_000, seed=seed,
                               batch_size=batch_size, budget_seconds=budget_seconds, max_steps=max_steps,
                               frame_delay=frame_delay, quiet=True)
            history = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
            best = run.info["exported_metrics"]
            frames_done = sum(r["frames_per_s"] * r["seconds"] for r in history)
            latency = exphil.step_latency(exphil.load_run(run.path)[0])
            rows.append({"spec": spec.name, "val_loss": best["val_loss"],
                         "markov_loss": best["val_markov"]["loss"],
                         "margin": 1 - best["val_loss"] / best["val_markov"]["loss"],
                         "button_f1": best["val_button_f1"], "copy_button_f1": best["val_copy"]["button_f1"],
                         "accuracy": best["val_accuracy"], "copy_accuracy": best["val_copy"]["accuracy"],
                         "change_accuracy": best["val_change"]["accuracy"],
                         "baseline_loss": run.info["baseline_loss"]["total"], "steps": run.info["steps"],
                         "train_frames_per_s": frames_done / sum(r["seconds"] for r in history),
                         "step_p50_ms": latency["p50_ms"], "step_p99_ms": latency["p99_ms"]})
    rows.sort(key=lambda r: -r["margin"])
    return rows


def print_architectures(rows: list[dict]) -> None:
    print("| rank | spec | val loss | markov | vs markov | main_x (copy) | main_y (copy) | "
          "button F1 (copy) | main_x on changes | steps | train frames/s | step p50 ms | 60 FPS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        acc, copy = r["accuracy"], r["copy_accuracy"]
        print(f"| {i} | {r['spec']} | {r['val_loss']:.3f} | {r['markov_loss']:.3f} | {-100 * r['margin']:+.1f}% | "
              f"{acc['main_x']:.3f} ({copy['main_x']:.3f}) | {acc['main_y']:.3f} ({copy['main_y']:.3f}) | "
              f"{r['button_f1']:.3f} ({r['copy_button_f1']:.3f}) | {r['change_accuracy']['main_x']:.3f} | {r['steps']} | "
              f"{r['train_frames_per_s']:,.0f} | {r['step_p50_ms']:.3f} | {verdict(r['step_p99_ms'])} |")


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
    global REPLAY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--specs", nargs="*", help="spec files (default: every built-in spec)")
    parser.add_argument("--runs", nargs="*", help="trained run folders instead of specs")
    parser.add_argument("--providers", nargs="*", default=["cpu", *GPU_PROVIDERS],
                        help="providers to try; those not installed are reported as absent")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    parser.add_argument("--loop", action="store_true", help="the full decision loop (lstm and mamba by default)")
    parser.add_argument("--throughput", action="store_true", help="training frames/s (batch 64, window 60)")
    parser.add_argument("--train", action="store_true", help="the architecture table (needs --replays)")
    parser.add_argument("--replays", help="replays for --train")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="optimizer steps per spec for --train (comparable across machines)")
    parser.add_argument("--budget-seconds", type=float, default=0,
                        help="training time per spec for --train (0: no limit; one of the two is needed)")
    parser.add_argument("--frame-delay", type=int, default=0, help="--train: frame t predicts frame t + 1 + D")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for --train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", type=Path, default=REPLAY, help="the replay whose frames --loop, --throughput "
                        "and the latency table use (latency alone runs without one, on random inputs)")
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    REPLAY = args.replay
    if (args.loop or args.throughput) and not REPLAY.is_file():
        parser.error(f"--loop and --throughput need a replay: {REPLAY} is not a file (give --replay FILE)")
    specs = args.specs or sorted(str(p) for p in exphil.SPECS_DIR.glob("*.toml"))
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), {info['os']}, Python {info['python']}, "
          f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info['providers'])}")
    result, t0 = {"machine": info}, time.perf_counter()
    if args.train:
        if not args.replays:
            parser.error("--train needs --replays")
        if not (args.max_steps or args.budget_seconds):
            parser.error("--train needs --max-steps or --budget-seconds")
        rows = architecture_table(specs, args.replays, args.budget_seconds, args.seed, args.batch_size,
                                  args.max_steps, args.frame_delay)
        print(f"\nsame games, seed {args.seed}, batch {args.batch_size}, "
              + (f"{args.max_steps} optimizer steps" if args.max_steps else f"{args.budget_seconds:.0f} s")
              + f" each, frame delay {args.frame_delay}; ranked by the margin of the validation loss under the "
              f"Markov baseline (frequency baseline {rows[0]['baseline_loss']:.3f})\n")
        print_architectures(rows)
        result["architectures"] = rows
    elif args.loop:
        sources = args.runs or (args.specs or [str(exphil.SPECS_DIR / f"{n}.toml") for n in ("lstm", "mamba")])
        print("\nfull decision loop: GameState -> features -> step -> sample -> commands flushed to a FIFO "
              "(p50/p99 ms per frame, 1800 frames)\n")
        rows = {}
        for source in sources:
            cells = {f"{p} {'back to back' if fps is None else 'at 60 FPS'}": loop_latency(source, fps=fps, precision=p)
                     for fps in (None, 60) for p in ("fp32", "int8")}
            rows[source] = cells
            print(f"{Path(source).stem:<10}" + "  ".join(f"{k}: {v['p50_ms']:.3f}/{v['p99_ms']:.3f}"
                                                         for k, v in cells.items()), flush=True)
        result["loop"] = rows
    elif args.throughput:
        rows = {}
        for path in specs:
            spec = exphil.load_spec(path)
            rows[spec.name] = train_throughput(spec)
            print(f"{spec.name:<12}{rows[spec.name]['frames_per_s']:>10,.0f} training frames/s", flush=True)
        result["throughput"] = rows
    else:
        rows = latency_table(args.runs or specs, [p.lower() for p in args.providers])
        print("\nstep latency, batch 1, one intra-op thread; cells: p50 ms and verdict from p99\n")
        print_table(rows, args.markdown)
        result["step"] = rows
    result["seconds"] = time.perf_counter() - t0
    print(f"\n({result['seconds']:.0f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
