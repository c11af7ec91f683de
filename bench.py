"""Can I run this? Step latency of every spec on this machine, and the architecture table.

    python bench.py                      # every spec in specs/: each provider and precision here
    python bench.py --markdown           # the same table in Markdown (for a README)
    python bench.py --runs runs/lstm     # trained runs instead of random weights
    python bench.py --specs specs/mamba.toml --hidden 256 1024
                                         # one spec at several widths (where INT4 starts to pay)
    python bench.py --loop               # the full decision loop through libmelee (replay + FIFO)
    python bench.py --loop --specs specs/mlp.toml specs/mamba.toml --heads independent autoregressive
                                         # the same (or the latency table) with both kinds of heads
                                         # (autoregressive: the step graph samples the action)
    python bench.py --heads-cost         # step latency with each kind of heads (Markov tables,
                                         # autoregressive), called in turn
    python bench.py --throughput         # training frames/s per spec (batch 64, window 60) and
                                         # % of this machine's MatMul peak
    python bench.py --throughput --vs-torch
                                         # the same, beside the same models written in PyTorch
                                         # (same weights, loss, optimizer; first loss checked)
    python bench.py --scale --work DIR --sizes 1 10 100
                                         # data at scale: collections of distinct copies of
                                         # ../shared/replays, ingested, described and trained on
                                         # (time to the first step, frames/s, peak RSS)
    python bench.py --parsers            # replay reading speed: peppi-py, the libmelee fallback
                                         # and libmelee's replay console alone (frames/s)
    python bench.py --train --replays DIR --max-steps 600
                                         # train every spec on the same games for the same number
                                         # of steps (or --budget-seconds), then rank them by their
                                         # margin under the Markov baseline (the architecture table)
    python bench.py --train --data DATASET --max-steps 600 --split-by player
                                         # the same on a dataset, validated on players never trained on
    python bench.py --learning-curve --data DATASET --games 25 100 300 all --max-steps 3000
                                         # one spec (--specs, default mamba) on more and more of the
                                         # training games, the same steps and validation games
    python bench.py --train --replays DIR --max-steps 600 --ray auto
                                         # the same, the specs trained as parallel Ray tasks
    python bench.py --warm-start RUN     # the first seconds of unseen games from a zero state (as
                                         # trained) or a mean state of training games per matchup
    python bench.py --data-parallel      # data-parallel training on 2 Ray workers: per step, compute
                                         # versus gradient exchange, and the modelled scaling

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
from collections.abc import Sequence
from pathlib import Path

import msgspec
import numpy as np

import exphil

FRAME_MS = 1000 / 60
ROOT = Path(__file__).resolve().parent
REPLAY = ROOT / "tests" / "replays" / "hohav-py-slippi__netplay_name.slp"
GPU_PROVIDERS = ("cuda", "rocm", "coreml")


def distinct_copy(src: Path, dst: Path, k: int) -> bool:
    """Copy a replay with copy number `k` (0-999) written into the year of its recorded start
    date (metadata only: the frames are unchanged), so its content hash differs from the
    original's and from the other copies'. False (nothing written) for a replay without a date."""
    data = bytearray(src.read_bytes())
    at = data.rfind(b"startAtSU")
    if at < 0 or not 0 <= k < 1000:
        return False
    year = at + len(b"startAtSU") + 1  # after the string's one-byte length
    data[year:year + 4] = f"9{k:03d}".encode()
    dst.write_bytes(bytes(data))
    return True


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
    feed = {"cat": cats[None, :L], "num": nums[None, :L], **{f"state_in.{k}": v for k, v in model.zero_state(1).items()},
            **({"rtg": np.zeros((1, L), np.float32)} if model.spec.returns.input else {})}
    return exphil.timed(lambda: sess.run(None, feed), seconds=0.4)


def graphs_for(source: str, hidden: int | None = None, sampling: str | None = None
               ) -> tuple[str, exphil.Model, dict[str, bytes]]:
    """(name, model, {precision: step graph}) for a spec file (random weights; `hidden`: at that
    width; `sampling`: with those heads instead of the spec's, see exphil.Heads) or a run folder."""
    import onnx

    if Path(source).is_dir():
        model, _ = exphil.load_run(source)
        fp32 = (Path(source) / "step.onnx").read_bytes()
        name = Path(source).name
    else:
        model = exphil.Model(exphil.override_spec(exphil.load_spec(source), hidden=hidden, sampling=sampling))
        fp32 = model.build(step=True).SerializeToString()
        name = model.spec.name + (f" ({hidden} wide)" if hidden else "") + (f" {sampling}" if sampling else "")
    out = {"fp32": fp32}
    for precision, mode in (("int8", "dynamic"), ("int4", "int4")):
        path = Path(source) / exphil.PRECISIONS[precision]
        out[precision] = path.read_bytes() if path.exists() else \
            exphil.quantize_step(onnx.ModelProto.FromString(fp32), mode).SerializeToString()
    return name, model, out


def latency_table(sources: list[str], providers: list[str], widths: list[int | None] = (None,),
                  kinds: Sequence[str | None] = (None,)) -> dict:
    """Every source x provider x precision: FP32, INT8 and INT4 on the CPU, FP32 and FP16 on a GPU;
    a provider not installed here is reported as absent. kinds: the heads' sampling ("independent",
    "autoregressive"; None: the spec's)."""
    import onnx

    available = exphil.select_providers  # raises for a provider that is not installed
    cats, nums = frames()
    rows = {}
    for source, hidden, sampling in ((s, h, k) for s in sources for h in widths for k in kinds):
        name, model, graphs = graphs_for(source, hidden, sampling)
        row = {"params": int(sum(v.size for v in model.params.values())), "window": model.spec.window, "cells": {},
               "bytes": {p: len(g) for p, g in graphs.items()}}
        for provider in providers:
            try:
                available(provider)
            except exphil.ExphilError:
                row["cells"][provider] = {"absent": True}
                continue
            precisions = ["fp32", "int8", "int4"] if provider == "cpu" else ["fp32", "fp16"]
            for precision in precisions:
                graph = graphs.get(precision) or exphil.quantize_step(onnx.ModelProto.FromString(graphs["fp32"]),
                                                                      "fp16").SerializeToString()
                row["cells"][f"{provider}/{precision}"] = exphil.step_latency(graph, provider, frames=(cats, nums))
            if model.spec.window > 1 and model.spec.heads.sampling == "independent":  # (a window graph
                # cannot sample: it is teacher-forced)
                row["cells"][f"{provider}/fp32 re-run"] = rerun_cell(model, provider, cats, nums)
        print(f"  measured {name}", file=sys.stderr, flush=True)
        rows[name] = row
    return rows


HEAD_KINDS = {"independent, no Markov": dict(markov=False, sampling="independent"),
              "independent, Markov": dict(markov=True, sampling="independent"),
              "autoregressive, Markov": dict(markov=True, sampling="autoregressive")}


def heads_cost(source: str, min_steps: int = 3000, seconds: float = 10.0) -> dict:
    """A spec's step graph with each kind of heads (HEAD_KINDS; random weights), called in turn on
    the same real frames (batch 1, one thread, CPU): p50/p99 ms each, and each p50 over the first's."""
    spec, (cats, nums) = exphil.load_spec(source), frames()
    numbers = exphil.fixed_uniforms(np.arange(len(cats)))
    calls, counter = {}, iter(range(1 << 62))
    for name, heads in HEAD_KINDS.items():
        model = exphil.Model(msgspec.structs.replace(spec, heads=msgspec.structs.replace(spec.heads, **heads)))
        stepper = exphil.Stepper(model.build(step=True).SerializeToString(), "cpu")

        def call(stepper=stepper):
            k = next(counter) % len(cats)
            stepper(cats[k], nums[k], noise=numbers[k] if stepper.samples else None)
        calls[name] = call
    for call in calls.values():  # warm-up
        for _ in range(50):
            call()
    times = {n: np.array(t) * 1e3 for n, t in interleaved(calls, min_steps, seconds).items()}
    first = float(np.median(next(iter(times.values()))))
    return {n: {"p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)), "calls": len(t),
                "p50_ratio": float(np.median(t)) / first} for n, t in times.items()}


ORDER = ["fp32", "int8", "int4", "fp16"]  # the precision columns, left to right


def print_table(rows: dict, markdown: bool) -> None:
    columns = sorted({c for r in rows.values() for c, v in r["cells"].items() if "absent" not in v},
                     key=lambda c: (c.split("/")[0] != "cpu", "re-run" in c, ORDER.index(c.split("/")[-1].split()[0])
                                    if "/" in c else 0, c))
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


def loop_latency(source: str, frames_: int = 1800, fps: float | None = None, precision: str = "fp32",
                 sampling: str | None = None) -> dict:
    """The sync Runner's per-frame work: libmelee GameState -> features -> step -> sample ->
    controller commands flushed into a FIFO that another process drains, as Dolphin would.
    libmelee's Console streams a real replay as the game (back to back, or paced at `fps`)."""
    import melee
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name, model, graphs = graphs_for(source, sampling=sampling)
        model.save(tmp / "run")
        (tmp / "run" / "spec.toml").write_bytes(msgspec.toml.encode(model.spec))
        onnx.save(onnx.ModelProto.FromString(graphs["int8"]), tmp / "run" / "step.int8.onnx")
        agent = exphil.Agent(tmp / "run", provider="cpu", precision=precision, seed=0,
                             target_return=0.0 if model.spec.returns.input else None)
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


def throughput_setup(spec: exphil.Spec, batch_size: int, window: int) -> tuple[exphil.Model, dict[str, np.ndarray]]:
    """The model, started as training starts it (at the Markov baseline, so a first-loss check
    covers the tables), and a batch of `batch_size` real replay windows of `window` frames,
    spread from the replay's first window to its last (which may be partly padding)."""
    episodes = exphil.load_replay(REPLAY)
    model = exphil.Model(spec)
    model.start_from_baselines(exphil.label_frequencies(episodes), exphil.markov_tables(episodes))
    wins = exphil.windows(episodes, window)
    picks = np.linspace(0, len(wins) - 1, batch_size).round().astype(int)
    return model, exphil.make_batch(episodes, [wins[i] for i in picks], window, returns=spec.returns_used)


def matmul_peak(n: int = 1024, calls: int = 8) -> dict:
    """This machine's float32 MatMul rate on onnxruntime with every core: the ceiling a
    training step could approach. Best of `calls` [n, n] x [n, n] products, after a warm-up
    (measured more than once in a run: see `best_peak`)."""
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", io[:2], io[2:])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", exphil.OPSET)],
                              ir_version=exphil.IR_VERSION)
    threads = os.cpu_count() or 1
    sess = exphil.session(proto.SerializeToString(), "cpu", threads=threads)
    feed = {name: np.random.default_rng(0).standard_normal((n, n), np.float32) for name in "ab"}
    sess.run(None, feed)
    best = min(timed_call(lambda: sess.run(None, feed)) for _ in range(calls))
    return {"gflops": 2 * n ** 3 / best / 1e9, "n": n, "threads": threads}


def train_flops_per_frame(model: exphil.Model) -> int:
    """Training FLOPs per frame, counted from the parameter shapes the usual way: every 2-D
    weight applied to each frame (projections, recurrent weights, feed-forward, heads) costs 2
    FLOPs per element in the forward pass; each attention layer adds its score and value
    products, 2 x 2 x width FLOPs per key for the W keys of its band (the steady state); the
    backward pass costs about twice the forward, so training = 3 x forward. Table lookups
    (embeddings, Markov heads), depthwise convs, norms and elementwise recurrences are left
    out: they are few FLOPs, not MatMuls, so the count (and the % of peak) is a lower bound."""
    not_matmul = ("embed.", "heads.markov.", ".conv.", ".A_log")
    forward = sum(2 * v.size for k, v in model.params.items() if v.ndim == 2 and not any(s in k for s in not_matmul))
    spec = model.spec
    forward += sum(2 * 2 * spec.hidden * (b.mixer.window or spec.window)
                   for b in spec.layers if isinstance(b.mixer, exphil.Attention))
    return 3 * forward


def timed_call(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def interleaved(steps: dict, min_steps: int, seconds: float) -> dict[str, list[float]]:
    """Wall times of each step function, run in turn (the order flipped every round, so neither
    always follows the other) until each has run `min_steps` times and `seconds` have passed:
    load from other processes on a shared machine falls on all of them alike."""
    times = {name: [] for name in steps}
    order, t0 = list(steps), time.perf_counter()
    while len(times[order[0]]) < min_steps or time.perf_counter() - t0 < seconds:
        for name in order:
            times[name].append(timed_call(steps[name]))
        order.reverse()
    return times


def best_peak(peak: dict | None) -> dict:
    """The better of `peak` and a new measurement: on a shared machine one measurement can fall
    in a busy moment, and a peak is what the machine does at best."""
    new = matmul_peak()
    return new if peak is None or new["gflops"] > peak["gflops"] else peak


def step_stats(times: list[float], frames: int) -> dict:
    """Median step -> frames/s; p99 once there are 20 steps or more; the best step (what a
    quiet machine gives, when other processes load this one)."""
    step = float(np.median(times))
    return {"step_s": step, "step_p99_s": float(np.percentile(times, 99)) if len(times) >= 20 else None,
            "best_step_s": min(times), "steps": len(times), "frames_per_s": frames / step}


def add_percent_of_peak(row: dict, peak: dict) -> None:
    """The MatMul FLOP rate of each timed framework in `row`, as a share of the peak."""
    for r in (row, row.get("torch")):
        if r is not None:
            r["percent_of_peak"] = 100 * row["train_flops_per_frame"] * r["frames_per_s"] / (peak["gflops"] * 1e9)


def torch_reference():
    """The PyTorch reference models (bench_torch.py), or None when PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    import bench_torch

    torch.set_num_threads(os.cpu_count() or 1)  # as many as onnxruntime-training uses here (one per core)
    return bench_torch


def first_losses(trainer: exphil.Trainer, torch_trainer, batch: dict[str, np.ndarray], rtol: float = 1e-4) -> dict:
    """The loss of both models on `batch` as they stand (no step), and whether they agree."""
    first = {"exphil": float(trainer.evaluate(dict(batch))["loss"]),
             "torch": torch_trainer.evaluate(torch_trainer.tensors(batch))}
    return {**first, "agree": abs(first["exphil"] - first["torch"]) <= rtol * abs(first["exphil"])}


def train_throughput(spec: exphil.Spec, batch_size: int = 64, window: int = 60, min_steps: int = 5,
                     seconds: float = 4.0, reference=None) -> dict:
    """Training frames per second on onnxruntime-training: AdamW steps on real replay windows.
    With `reference` (bench_torch), the same model written in PyTorch from the same weights is
    checked to give the same first loss, then timed in turn with exphil on the same batch."""
    model, batch = throughput_setup(spec, batch_size, window)
    flops = train_flops_per_frame(model)
    row = {"batch_size": batch_size, "window": window, "train_flops_per_frame": flops}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = exphil.Trainer(model, Path(tmp) / "t", length=window)
        steps = {"exphil": lambda: trainer.step(dict(batch))}
        if reference is not None and not reference.supports(spec):
            row["first_loss"] = None  # no PyTorch counterpart for one of its mixers
        elif reference is not None:
            torch_trainer = reference.Trainer(model)
            tensors = torch_trainer.tensors(batch)
            row["first_loss"] = first_losses(trainer, torch_trainer, batch)
            if row["first_loss"]["agree"]:  # timing a different model would compare nothing
                steps["torch"] = lambda: torch_trainer.step(tensors)
        for step in steps.values():  # warm-up: first-call allocations, thread pools
            step()
        times = interleaved(steps, min_steps, seconds * len(steps))
    row.update(step_stats(times["exphil"], batch_size * window))
    if "torch" in times:
        row["torch"] = step_stats(times["torch"], batch_size * window)
        row["exphil_over_torch"] = row["frames_per_s"] / row["torch"]["frames_per_s"]
        row["exphil_over_torch_best"] = row["torch"]["best_step_s"] / row["best_step_s"]
    return row


def throughput_table(specs: list[str], reference, min_steps: int, seconds: float) -> dict:
    """Every spec's training throughput (beside PyTorch's, with `reference`), as a share of
    the run's best MatMul peak, and the load average around the measurements."""
    load, rows, peak = os.getloadavg()[0], {}, best_peak(None)
    for path in specs:
        spec, name = exphil.load_spec(path), exphil.load_spec(path).name
        if reference is not None and spec.heads.sampling != "independent":  # (the PyTorch models' heads are
            spec, name = exphil.override_spec(spec, sampling="independent"), f"{name} independent"  # independent)
        rows[name] = train_throughput(spec, min_steps=min_steps, seconds=seconds, reference=reference)
        peak = best_peak(peak)
        print(f"  measured {name}", file=sys.stderr, flush=True)
    for row in rows.values():
        add_percent_of_peak(row, peak)
    return {"matmul_peak": peak, "load_average": {"before": load, "after": os.getloadavg()[0]}, "throughput": rows}


def print_throughput(result: dict, reference) -> None:
    peak, load = result["matmul_peak"], result["load_average"]
    print(f"\ntraining frames/s, batch 64 x window 60, AdamW; median (p50) and p99 step times; % of this machine's "
          f"MatMul peak, {peak['gflops']:,.0f} GFLOP/s (onnxruntime, {peak['n']}^3, {peak['threads']} threads, best of "
          "the run)")
    if reference:
        torch = reference.torch
        print(f"PyTorch {torch.__version__} eager: same weights, loss, AdamW and threads ({torch.get_num_threads()}), "
              "its steps interleaved with exphil's; other processes' load slows its many small parallel regions "
              "the most")
    print(f"load average {load['before']:.1f} before, {load['after']:.1f} after (other processes on these "
          f"{os.cpu_count()} cores slow every number)\n")
    for i, (name, row) in enumerate(result["throughput"].items()):
        print_throughput_row(name, row, header=i == 0, compared=bool(reference))


def print_throughput_row(name: str, row: dict, header: bool, compared: bool = False) -> None:
    """One spec's line of the --throughput table (with the PyTorch columns when measured)."""
    def cells(r):
        p99 = f"{1e3 * r['step_p99_s']:.0f}" if r["step_p99_s"] is not None else "-"
        return [f"{r['frames_per_s']:,.0f}", f"{1e3 * r['step_s']:.0f}", p99, f"{r['percent_of_peak']:.1f}"]

    head = ["spec", "MFLOP/frame", "frames/s", "p50 ms", "p99 ms", "% peak"]
    line = [name, f"{row['train_flops_per_frame'] / 1e6:.1f}", *cells(row)]
    first = row.get("first_loss")
    if compared:
        head += ["torch frames/s", "p50 ms", "p99 ms", "% peak", "exphil/torch", "(best steps)", "first loss"]
        if first is None:
            line += ["-"] * 6 + ["no PyTorch reference for this spec"]
        elif first["agree"]:
            line += [*cells(row["torch"]), f"{row['exphil_over_torch']:.2f}x", f"({row['exphil_over_torch_best']:.2f}x)",
                     f"{first['exphil']:.5f} (same)"]
        else:
            line += ["-"] * 6 + [f"models differ: exphil {first['exphil']:.6f}, torch {first['torch']:.6f}"]
    widths = [12, 12, 9, 7, 7, 7, 15, 7, 7, 7, 13, 12, 0]
    if header:
        print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))), flush=True)


def architecture_table(paths: list[str], replays: str | None, budget_seconds: float, seed: int, batch_size: int,
                       max_steps: int = 0, frame_delay: int = 0, ray: str | None = None, data: str | None = None,
                       split_by: str = "game", **more) -> list[dict]:
    """Train every spec on the same games with the same seed and the same number of optimizer
    steps (or time budget); rank by the margin of the exported model's validation loss under
    the Markov baseline. Copy and Markov are scored on the same validation frames.
    ray: a Ray cluster's address; the specs then train as parallel Ray tasks (one CPU each),
    which gives the same numbers but the timings."""
    settings = dict(replays=replays, budget_seconds=budget_seconds, seed=seed, batch_size=batch_size,
                    max_steps=max_steps, frame_delay=frame_delay, data=data, split_by=split_by, **more)
    for path in paths:
        print(f"training {Path(path).stem} ({max_steps or 'unlimited'} steps, {budget_seconds or 'no'} s budget)"
              + (" on Ray" if ray else "") + " ...", file=sys.stderr, flush=True)
    if ray:
        cluster = exphil.connect_ray(ray)
        task = cluster.remote(num_cpus=1)(architecture_row)
        rows = cluster.get([task.remote(path, **settings) for path in paths])
    else:
        rows = []
        for path in paths:
            rows.append(architecture_row(path, **settings))
            print(f"  {rows[-1]['spec']}: val loss {rows[-1]['val_loss']:.3f}, {-100 * rows[-1]['margin']:+.1f}% vs Markov",
                  file=sys.stderr, flush=True)
    rows.sort(key=lambda r: -r["margin"])
    return rows


def learning_curve(path: str, data: str, sizes: list[int], max_steps: int, seed: int, batch_size: int,
                   frame_delay: int = 0, split_by: str = "player", **settings) -> list[dict]:
    """One spec trained for the same steps on more and more of a dataset's training games (`sizes`,
    0 for all: nested seeded choices, see --train-games), each scored on the same validation
    games (the split of the whole dataset) beside every baseline. settings: more of exphil.train's."""
    rows = []
    for n in sizes:
        print(f"training {Path(path).stem} on {n or 'all'} training games ({max_steps} steps) ...", file=sys.stderr,
              flush=True)
        rows.append(architecture_row(path, None, 0, seed, batch_size, max_steps, frame_delay, data, split_by, n,
                                     **settings))
    return rows


def architecture_row(path: str, replays: str | None, budget_seconds: float, seed: int, batch_size: int, max_steps: int,
                     frame_delay: int, data: str | None = None, split_by: str = "game", train_games: int = 0,
                     **settings) -> dict:
    """One spec of the architecture table (or of the learning curve), trained in a temporary run folder;
    settings: more of exphil.train's (val_split, lr_schedule)."""
    spec = exphil.load_spec(path)
    with tempfile.TemporaryDirectory() as tmp:
        run = exphil.train(spec, replays, out=Path(tmp) / spec.name, epochs=10_000, seed=seed,
                           batch_size=batch_size, budget_seconds=budget_seconds, max_steps=max_steps,
                           frame_delay=frame_delay, data=data, split_by=split_by, train_games=train_games, quiet=True,
                           **settings)
        history = [json.loads(l) for l in (run.path / "metrics.jsonl").read_text().splitlines()]
        best = run.info["exported_metrics"]
        frames_done = sum(r["frames_per_s"] * r["seconds"] for r in history)
        latency = exphil.step_latency(exphil.load_run(run.path)[0])
        field = exphil.judge(run.path, closed=False, skills=False, seed=seed, quiet=True)["field_scores"]
    return {"spec": spec.name, "train_games": len(run.info["replays"]["train"]), "val_games": len(run.info["replays"]["val"]),
            "train_frames": run.info["frames"]["train"], "val_frames": best["val_frames"], "val_loss": best["val_loss"],
            "markov_loss": best["val_markov"]["loss"],
            "margin": 1 - best["val_loss"] / best["val_markov"]["loss"],
            "button_f1": best["val_button_f1"], "copy_button_f1": best["val_copy"]["button_f1"],
            "accuracy": best["val_accuracy"], "copy_accuracy": best["val_copy"]["accuracy"],
            "change_accuracy": best["val_change"]["accuracy"], "common_accuracy": best["val_frequency"]["accuracy"],
            "baseline_loss": run.info["baseline_loss"]["total"], "steps": run.info["steps"],
            "train_frames_per_s": frames_done / sum(r["seconds"] for r in history),
            "step_p50_ms": latency["p50_ms"], "step_p99_ms": latency["p99_ms"], "field_scores": field}


NETWORK_GBPS, MESSAGE_LATENCY_S = 10.0, 50e-6  # the modelled cluster: 10 Gb/s links, 50 us per message


def data_parallel_row(spec: exphil.Spec, ray: str, workers: int, batch_size: int, min_steps: int,
                      seconds: float) -> dict:
    """One spec on `workers` Ray workers (one CPU each) beside one process with the same batch of
    the spec's windows and as many threads, steps interleaved: per step, the slowest worker's
    forward and backward on its slice (compute), its optimizer step (update), and the rest of the
    wall time (Ray overhead: the gradient all-reduce, the batch slices sent to the workers, the
    scheduling of the calls); medians, and bytes per worker."""
    model, batch = throughput_setup(spec, batch_size, spec.window)
    with tempfile.TemporaryDirectory() as tmp:
        one = exphil.Trainer(model, Path(tmp) / "one", threads=workers)
        par = exphil.RayTrainer(model, Path(tmp) / "ray", ray=ray, workers=workers)
        for _ in range(2):  # warm-up
            one.step(dict(batch)), par.step(dict(batch))
        par.timings.clear()
        times = interleaved({"one": lambda: one.step(dict(batch)), "ray": lambda: par.step(dict(batch))},
                            min_steps, seconds)
        par.close()
    t = {k: np.array([s[k] for s in par.timings]) for k in ("compute", "update", "total")}
    overhead = t["total"] - t["compute"] - t["update"]
    params = sum(v.size for v in model.params.values())
    frames_per_worker = batch_size * spec.window / workers  # padding included: it is computed too
    return {"spec": spec.name, "params": params, "workers": workers, "batch": batch_size, "window": spec.window,
            "gradient_bytes": 4 * params, "sent_bytes_per_worker": 2 * (workers - 1) / workers * 4 * params,
            "batch_bytes_per_worker": sum(v.nbytes for v in batch.values()) / workers,
            "one_process_step_s": float(np.median(times["one"])), "ray_step_s": float(np.median(times["ray"])),
            "compute_s": float(np.median(t["compute"])), "update_s": float(np.median(t["update"])),
            "overhead_s": float(np.median(overhead)), "overhead_worst_s": float(overhead.max()),
            "steps": len(overhead), "compute_s_per_frame": float(np.median(t["compute"])) / frames_per_worker}


def ring_allreduce_s(params: int, workers: int, gbps: float = NETWORK_GBPS, latency: float = MESSAGE_LATENCY_S):
    """A ring all-reduce of 4-byte gradients: 2 (n - 1) messages of 4 params / n bytes each, in turn."""
    return 2 * (workers - 1) * (4 * params / workers / (gbps * 1e9 / 8) + latency)


def scaling(row: dict, workers: int, overhead_s: float = 0.0) -> dict:
    """Modelled efficiency of `workers` workers at this row's batch per worker (compute time per
    frame as measured), with a ring all-reduce not overlapped with compute, plus a fixed
    `overhead_s` per step; and the frames per worker at which the all-reduce costs 5%."""
    compute = row["compute_s_per_frame"] * row["batch"] * row["window"] / row["workers"]
    exchange = ring_allreduce_s(row["params"], workers) + overhead_s
    return {"efficiency": compute / (compute + exchange),
            "frames_for_95": 19 * exchange / row["compute_s_per_frame"]}


def print_data_parallel(rows: list[dict]) -> None:
    print(f"| spec | params | gradient MB (4 x params) | compute ms | update ms | Ray overhead ms (worst) | ray step ms | "
          f"one process ms | compute us/frame | 8 workers | 64 workers | 64 w. + Ray overhead | "
          f"frames/worker for 95% at 64 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e8, e64, e64r = scaling(r, 8), scaling(r, 64), scaling(r, 64, r["overhead_s"])
        print(f"| {r['spec']} | {r['params']:,} | {r['gradient_bytes'] / 1e6:.2f} | {1e3 * r['compute_s']:.1f} | "
              f"{1e3 * r['update_s']:.1f} | {1e3 * r['overhead_s']:.1f} ({1e3 * r['overhead_worst_s']:.1f}) | "
              f"{1e3 * r['ray_step_s']:.1f} | {1e3 * r['one_process_step_s']:.1f} | "
              f"{1e6 * r['compute_s_per_frame']:.2f} | {100 * e8['efficiency']:.0f}% | {100 * e64['efficiency']:.0f}% | "
              f"{100 * e64r['efficiency']:.0f}% | {e64['frames_for_95']:,.0f} |")


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


def print_field_scores(rows: list[dict], key: str = "spec", label: str = "spec") -> None:
    """The rows' field scores (the bot sampling, teacher-forced) under the baselines of the same
    frames: copy, most common class and the Markov table (sampling) of the first row."""
    first = rows[0]["field_scores"]
    print(f"\nfield scores (macro-F1 / top-1) on {first['frames']:,} validation frames")
    print(f"| {label} | " + " | ".join(exphil.FIELD_CLASSES) + " |")
    print("|---|" + "---|" * len(exphil.FIELD_CLASSES))
    named = [(who, first["rows"][who]) for who in ("copy", "most common class", "Markov") if who in first["rows"]]
    for who, r in named + [(row[key], row["field_scores"]["rows"]["bot"]) for row in rows]:
        print(f"| {who} | " + " | ".join(f"{r[k]['macro_f1']:.3f} / {r[k]['top1']:.3f}" for k in exphil.FIELD_CLASSES)
              + " |")


def print_learning_curve(rows: list[dict]) -> None:
    print("| training games | training frames | val loss | markov | vs markov | main_x (copy) | main_y (copy) | "
          "button F1 (copy) | main_x on changes | most common main_x / main_y |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc, copy, common = r["accuracy"], r["copy_accuracy"], r["common_accuracy"]
        print(f"| {r['train_games']} | {r['train_frames']:,} | {r['val_loss']:.3f} | {r['markov_loss']:.3f} | "
              f"{-100 * r['margin']:+.1f}% | {acc['main_x']:.3f} ({copy['main_x']:.3f}) | "
              f"{acc['main_y']:.3f} ({copy['main_y']:.3f}) | {r['button_f1']:.3f} ({r['copy_button_f1']:.3f}) | "
              f"{r['change_accuracy']['main_x']:.3f} | {common['main_x']:.3f} / {common['main_y']:.3f} |")


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def action_rates(heads: dict, selected) -> dict:
    """Over the selected frames: the share (or, from logits, the mean probability) of attacking
    (A or B pressed, or the C-stick off centre), A, B, shielding (L or R, or the analog
    shoulder pressed) and jumping (X or Y). `heads`: per head, logits ("logits": True) or the
    recorded targets."""
    m, button = selected > 0, {b: i for i, b in enumerate(exphil.BUTTONS)}
    if heads.pop("logits", False):
        p, cls = _sigmoid(heads["buttons"][m]), {h: _softmax(heads[h][m]) for h in ("c_x", "c_y", "shoulder")}
        centre, released = cls["c_x"][:, 8] * cls["c_y"][:, 8], cls["shoulder"][:, 0]
    else:
        p = (heads["target.buttons"][m] > 0.5).astype(np.float64)
        cls = {h: heads[f"target.{h}"][m].argmax(-1) for h in ("c_x", "c_y", "shoulder")}
        centre, released = (cls["c_x"] == 8) & (cls["c_y"] == 8), cls["shoulder"] == 0
    no = lambda *bs: np.prod([1 - p[:, button[b]] for b in bs], axis=0)
    return {"frames": float(m.sum()), "attack": (1 - no("A", "B") * centre).sum(), "A": p[:, button["A"]].sum(),
            "B": p[:, button["B"]].sum(), "shield": (1 - no("L", "R") * released).sum(), "jump": (1 - no("X", "Y")).sum()}


def _window_session(model, length: int, loss: bool = False):
    """run(feeds) -> outputs of the model's window graph over `length` frames (with the loss)."""
    extra = exphil.add_loss if loss else None
    sess = exphil.session(model.build(length, extra=extra).SerializeToString(), "cpu", threads=0)
    names, inputs = [o.name for o in sess.get_outputs()], [i.name for i in sess.get_inputs()]
    return lambda feeds: dict(zip(names, sess.run(None, {n: feeds[n] for n in inputs})))


def warm_states(model, episodes, frames: int, min_views: int = 4) -> dict:
    """The mean carried state after the first `frames` frames of the episodes, per matchup (own
    and opponent character ids, "own/opp") with at least `min_views` views, and over all ("all")."""
    run, sums = _window_session(model, frames), {}
    for part in exphil.chunks([ep for ep in episodes if ep.frames >= frames], 32):
        batch = exphil.make_batch(part, [(i, 0) for i in range(len(part))], frames,
                                  returns=model.spec.returns_used)
        out = run(exphil.with_zero_state(batch, model))
        for v, ep in enumerate(part):
            for key in (f"{ep.cat[0, 2]}/{ep.cat[0, 3]}", "all"):
                n, acc = sums.get(key, (0, {}))
                sums[key] = (n + 1, {s: acc.get(s, 0) + out[f"state_out.{s}"][v] for s, _ in model.states})
    return {k: {s: x / n for s, x in acc.items()} for k, (n, acc) in sums.items() if n >= min_views or k == "all"}


def warm_start(run: str, seconds=(1, 3, 10), settle: float = 10.0, views: int = 256, seed: int = 0) -> dict:
    """Loss against Markov on the first seconds of play (after the countdown) of the run's
    validation games, every recurrent state started at zero (as in training) or at the mean state
    of `views` training player views after `settle` seconds of play (per matchup, else overall)."""
    model, info = exphil.load_run(run)
    if not model.states:
        raise SystemExit(f"{run}: spec {model.spec.name!r} carries no state")
    train = [ep for g in exphil.recorded_games(info, "train") for ep in g]
    chosen = [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:views]]
    states = warm_states(model, chosen, 123 + round(settle * exphil.FPS))
    delay, length = int(info.get("frame_delay", 0)), 123 + exphil.FPS * max(seconds)
    val = [ep for g in exphil.recorded_games(info, "val") for ep in g if g[0].frames > length + 1 + delay]
    baselines = {"frequency": info["label_frequencies"], "markov": info["markov_tables"]}
    run_ = _window_session(model, length, loss=True)
    metrics = {(start, s): exphil.Metrics(baselines) for start in ("zero", "warm") for s in seconds}
    for part in exphil.chunks(val, 32):
        batch = exphil.make_batch(part, [(i, 0) for i in range(len(part))], length, delay,
                                  returns=model.spec.returns_used)
        warm = {f"state_in.{s}": np.stack([states.get(f"{ep.cat[0, 2]}/{ep.cat[0, 3]}", states["all"])[s]
                                           for ep in part]) for s, _ in model.states}
        for start in ("zero", "warm"):
            for s in seconds:
                mask = batch["mask"].copy()
                mask[:, :123] = mask[:, 123 + exphil.FPS * s:] = 0
                feeds = exphil.with_zero_state({**batch, "mask": mask, **(warm if start == "warm" else {})}, model)
                metrics[start, s].add(run_(feeds), feeds)
    rows = {}
    for (start, s), m in metrics.items():
        r = m.result("v")
        rows.setdefault(start, {})[f"{s} s"] = {"loss": r["v_loss"], "markov": r["v_markov"]["loss"],
                                                "frames": r["v_frames"]}
    return {"run": str(run), "spec": model.spec.name, "views": len(val), "train_views": len(chosen),
            "matchups": len(states) - 1, "settle_s": settle, "rows": rows}


def print_warm_start(res: dict) -> None:
    print(f"{res['run']} ({res['spec']}): {res['views']} validation player views; warm states from "
          f"{res['train_views']} training views after {res['settle_s']:g} s of play ({res['matchups']} matchups)")
    secs = list(res["rows"]["zero"])
    print(f"{'start':<8}" + "".join(f"{'first ' + s:>26}" for s in secs))
    for start, row in res["rows"].items():
        print(f"{start:<8}" + "".join(f"{r['loss']:>12.3f} ({(r['loss'] / r['markov'] - 1):+.1%} vs Markov)"
                                      for r in row.values()))


def conditioning(run: str, replays=None, shifts=(-3.0, 3.0)) -> dict:
    """A return-conditioned run on its validation games (or `replays`), each walked whole with
    its state carried: the loss and mean action probabilities with each frame's recorded
    return-to-go as input, shifted by each of `shifts`, and constant at the median return of its
    training games; beside what the players did, on the frames in thirds of the return-to-go."""
    model, info = exphil.load_run(run)
    if not model.spec.returns.input:
        raise exphil.UsageError(f"{run}: spec {model.spec.name!r} is not return-conditioned (no `returns.input`)")
    games = exphil.load_games(replays)[0] if replays else exphil.recorded_games(info, "val")
    episodes, runner = [e for g in games for e in g], exphil._window_runner(model, exphil.add_loss)
    median = info["returns"]["start"]["p50"]
    inputs = {"recorded": lambda r: r, **{f"recorded {d:+g}": (lambda r, d=d: r + d) for d in shifts},
              f"constant {median:+.2f} (median)": lambda r: np.full_like(r, median)}
    cuts = np.quantile(np.concatenate([e.rtg(model.spec.returns) for e in episodes]), [1 / 3, 2 / 3])
    thirds = list(zip([-np.inf, *cuts], [*cuts, np.inf]))
    rows, data = {}, [{} for _ in thirds]
    for name, given in inputs.items():
        metrics, rates = exphil.Metrics(), {}
        run_shifted = lambda batch: runner({**batch, "rtg": given(batch["rtg"]).astype(np.float32)})
        for _, batch, out in exphil.stream_batches(model, episodes, model.spec.window, info.get("frame_delay", 0),
                                                   run_shifted):
            metrics.add(out, batch)
            _add(rates, action_rates({**out, "logits": True}, batch["mask"]))
            for k, (lo, hi) in enumerate(thirds if name == "recorded" else []):
                _add(data[k], action_rates(dict(batch), batch["mask"] * ((batch["rtg"] > lo) & (batch["rtg"] <= hi))))
        rows[name] = {"val_loss": metrics.result("val")["val_loss"], **_means(rates)}
    return {"model": rows, "players_by_return_third": [_means(d) for d in data], "thirds": cuts.tolist()}


def _add(sums: dict, more: dict) -> None:
    for k, v in more.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def _means(sums: dict) -> dict:
    return {k: v / max(sums["frames"], 1.0) for k, v in sums.items() if k != "frames"}


def print_conditioning(result: dict) -> None:
    keys = ("attack", "A", "B", "shield", "jump")
    print("| return-to-go input | val loss | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, row in result["model"].items():
        print(f"| {name} | {row['val_loss']:.4f} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    for k, row in enumerate(result["players_by_return_third"], 1):
        print(f"| players, third {k} of the return-to-go | | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")


def build_collection(source: Path, folder: Path, copies: int) -> int:
    """`copies` distinct copies (see distinct_copy) of each dated replay under `source`, in
    `folder` (kept when already complete); the number of files."""
    originals = [p for p in exphil.find_replays(source) if b"startAtSU" in p.read_bytes()[-4096:]]
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.slp"))) != copies * len(originals):
        for k in range(copies):
            for i, src in enumerate(originals):
                distinct_copy(src, folder / f"{k:03d}-{i:02d}-{src.name}", k)
    return copies * len(originals)


PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(f"peak-rss-kb {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def timed_process(args: list, env: dict | None = None) -> dict:
    """Run a command to its end: wall seconds, its stderr, and its peak resident memory in MB
    (of the largest of the process and the worker processes it waited for; through a wrapper
    process whose only child it is)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")
    err, _, last = proc.stderr.rstrip().rpartition("\n")
    return {"seconds": seconds, "stderr": err, "peak_rss_mb": int(last.split()[-1]) / 1024}


IN_MEMORY = """
import sys, exphil
real = exphil.load_games
def in_memory(*a, **k):  # every game copied into RAM as int64/float32 arrays (the layout before datasets)
    games, skipped = real(*a, **k)
    return [[e.in_memory() for e in g] for g in games], skipped
exphil.load_games = in_memory
if __name__ == "__main__":
    sys.exit(exphil.main(sys.argv[1:]))
"""


def train_run(data: Path, out: Path, spec: str, steps: int, in_memory: bool = False, replays: Path | None = None,
              cache: Path | None = None, val_split: float = 0.2) -> dict:
    """One training process on a dataset (or on a replay folder through the cache) as a user runs
    it (the spec's own window, batch 64, validation on `val_split` of the games): wall time,
    steady frames/s (its metrics row), peak RSS."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    head = [sys.executable, "-c", IN_MEMORY] if in_memory else [sys.executable, "-m", "exphil"]
    source = ["--replays", replays] if replays else ["--data", data]
    res = timed_process([*head, "train", spec, *source, "--val-split", val_split, "--max-steps", steps, "--batch-size",
                         64, "--out", out, "--quiet"], {"EXPHIL_CACHE": str(cache)} if cache else None)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"seconds": res["seconds"], "frames_per_s": row["frames_per_s"], "peak_rss_mb": res["peak_rss_mb"]}


def scale_table(source: Path, work: Path, sizes: list[int], spec: str, steps: int, in_memory_up_to: int,
                repeats: int) -> list[dict]:
    """Per collection size: ingestion (from scratch, every core), `exphil data`, a 1-step run from
    start to exit (time to first step, warm dataset: --data, and --replays on the unchanged
    folder), steady training frames/s and peak RSS (on shards, and on in-memory arrays)."""
    import re
    import shutil

    rows = []
    for n in sizes:
        replays, cache = work / f"replays-{n}x", work / f"cache-{n}x"
        files = build_collection(source, replays, n)
        data = exphil._cache_dataset(cache)  # the dataset --replays uses too: both paths warm
        shutil.rmtree(cache, ignore_errors=True)
        ing = timed_process([sys.executable, "-m", "exphil", "ingest", replays, "--out", data])
        parsed = re.search(r"parsed \d+ new replays \(([\d,]+) frames\) in [\d.]+ s on (\d+) core\(s\): "
                           r"([\d,]+) frames/s \(([\d,]+) per core", ing["stderr"])
        frames = int(parsed.group(1).replace(",", ""))
        described = timed_process([sys.executable, "-m", "exphil", "data", data])
        row = {"size": f"{n}x", "files": files, "game_frames": frames, "disk_gb": {
                   "replays": sum(f.stat().st_size for f in replays.iterdir()) / 1e9,
                   "dataset": sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) / 1e9},
               "ingest": {"seconds": ing["seconds"], "cores": int(parsed.group(2)),
                          "frames_per_s": frames / ing["seconds"],
                          "frames_per_s_per_core": int(parsed.group(4).replace(",", ""))},
               "data_seconds": described["seconds"]}
        row["first_step_s"] = {"data": train_run(data, work / "run", spec, 1, val_split=0)["seconds"],
                               "replays": train_run(data, work / "run", spec, 1, replays=replays, cache=cache,
                                                    val_split=0)["seconds"]}
        row["ingest"]["peak_rss_mb"] = ing["peak_rss_mb"]
        runs = {"shards": [], **({"in_memory": []} if n <= in_memory_up_to else {})}
        for _ in range(repeats):  # alternated, so both kinds see the same load on the machine
            for kind in runs:
                runs[kind].append(train_run(data, work / "run", spec, steps, in_memory=kind == "in_memory"))
        row["train"] = {kind: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for kind, rs in runs.items()}
        row["batch_ms"] = batch_cost(data, spec)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def batch_cost(data: Path, spec: str, batches: int = 40, seed: int = 0) -> dict:
    """Median ms to make a batch (64 x 60) from the dataset's shards and from in-memory arrays,
    and of a training step on it, interleaved in one process (so the machine's load hits all
    three alike). The in-memory batches draw their windows from the first 200 episodes (copying
    every game of a large dataset into memory is what datasets avoid); a batch's cost does not
    depend on how many games it is drawn from."""
    import tempfile

    games, _ = exphil.load_games(data=data)
    eps = [e for g in games for e in g]
    mem = [e.in_memory() for e in eps[:200]]
    rng = np.random.default_rng(seed)
    wins, mem_wins = exphil.windows(eps, 60), exphil.windows(mem, 60)
    model = exphil.Model(exphil.override_spec(exphil._spec_arg(spec), window_size=60))
    times = {"shards": [], "in_memory": [], "step": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = exphil.Trainer(model, Path(tmp), length=60)
        for _ in range(batches):
            t0 = time.perf_counter()
            batch = exphil.make_batch(eps, [wins[i] for i in rng.integers(len(wins), size=64)], 60)
            t1 = time.perf_counter()
            exphil.make_batch(mem, [mem_wins[i] for i in rng.integers(len(mem_wins), size=64)], 60)
            t2 = time.perf_counter()
            trainer.step(batch)
            times["shards"].append(t1 - t0)
            times["in_memory"].append(t2 - t1)
            times["step"].append(time.perf_counter() - t2)
    return {k: float(np.median(v)) * 1000 for k, v in times.items()}


def print_scale(rows: list[dict]) -> None:
    print("\n| collection | files | game frames | ingest frames/s (total / per core of CPU time) | `exphil data` | "
          "first step: --data / --replays | training frames/s: shards / in memory | peak RSS training: "
          "shards / in memory | ms per batch: made from shards / from memory / training step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["train"]
        mem = t.get("in_memory")
        print(f"| {r['size']} | {r['files']:,} | {r['game_frames']:,} | {r['ingest']['frames_per_s']:,.0f} / "
              f"{r['ingest']['frames_per_s_per_core']:,.0f} | {r['data_seconds']:.2f} s | "
              f"{r['first_step_s']['data']:.1f} s / {r['first_step_s']['replays']:.1f} s | "
              f"{t['shards']['frames_per_s']:,.0f} / " + (f"{mem['frames_per_s']:,.0f}" if mem else "-") + " | "
              f"{t['shards']['peak_rss_mb']:,.0f} MB / " + (f"{mem['peak_rss_mb']:,.0f} MB" if mem else "-") + " | "
              + " / ".join(f"{r['batch_ms'][k]:.1f}" for k in ("shards", "in_memory", "step")) + " |")


def parser_speed(paths: list[Path], rounds: int = 3) -> list[dict]:
    """Frames of a replay read per second of CPU time (this process's: what one core does, however
    busy the machine is), medians of `rounds` rounds that read each replay once in each way:
    peppi-py (read_replay, when peppi-py reads the file), the libmelee fallback
    (read_replay_libmelee) and libmelee's replay console alone (every frame stepped through,
    nothing kept). Frames are those read_replay keeps (finalized, as ingestion reads them)."""
    import melee
    import peppi_py

    def console_alone(path):
        console = melee.Console(path=str(path), is_dolphin=False, allow_old_version=True, skip_rollback_frames=False)
        console.connect()
        while console.step() is not None:
            pass

    def peppi_reads(path) -> bool:
        try:
            with exphil._quiet_fd2():
                peppi_py.read_slippi(str(path))
            return True
        except BaseException:  # (peppi-py's panics are BaseExceptions)
            return False

    rows = []
    for path in paths:
        try:
            game = exphil.read_replay_libmelee(path, finalized=True)
        except exphil.ReplayError as e:
            print(f"(not timed: {e})")
            continue
        ways = {"fallback": lambda: exphil.read_replay_libmelee(path, finalized=True),
                "console": lambda: console_alone(path)}
        if peppi_reads(path):
            ways["peppi"] = lambda: exphil.read_replay(path, finalized=True)
        seconds = {k: [] for k in ways}
        for _ in range(rounds):
            for k, read in ways.items():
                t0 = time.process_time()
                read()
                seconds[k].append(time.process_time() - t0)
        frames = len(game.frame_ids)
        row = {"replay": path.name, "slippi": game.info["slippi"], "frames": frames, "seconds": {}, "fps": {}}
        for k, times in seconds.items():
            row["seconds"][k] = float(np.median(times))
            row["fps"][k] = frames / row["seconds"][k]
        row["fallback_vs_console"] = row["seconds"]["console"] / row["seconds"]["fallback"]
        rows.append(row)
        print_parser_row(row, header=len(rows) == 1)
    if not rows:
        return rows
    total = {k: sum(r["seconds"][k] for r in rows) for k in ("fallback", "console")}
    frames = sum(r["frames"] for r in rows)
    print(f"{'all ' + str(len(rows)) + ' replays':<48}{frames:>8,}{'':>12}{frames / total['fallback']:>12,.0f}"
          f"{frames / total['console']:>12,.0f}{total['console'] / total['fallback']:>10.2f}")
    return rows


def print_parser_row(row: dict, header: bool) -> None:
    if header:
        print(f"{'replay':<40}{'Slippi':>8}{'frames':>8}{'peppi-py':>12}{'fallback':>12}{'console':>12}{'ratio':>10}")
    peppi = f"{row['fps']['peppi']:>12,.0f}" if "peppi" in row["fps"] else f"{'cannot':>12}"
    print(f"{row['replay'][:39]:<40}{row['slippi']:>8}{row['frames']:>8,}{peppi}{row['fps']['fallback']:>12,.0f}"
          f"{row['fps']['console']:>12,.0f}{row['fallback_vs_console']:>10.2f}", flush=True)


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


def _parser() -> argparse.ArgumentParser:
    """The command line, its options grouped by what they measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    hw = parser.add_argument_group("hardware check (the default: step latency of every spec)")
    hw.add_argument("--specs", nargs="*", help="spec files (default: every built-in spec)")
    hw.add_argument("--runs", nargs="*", help="trained run folders instead of specs")
    hw.add_argument("--providers", nargs="*", default=["cpu", *GPU_PROVIDERS],
                    help="providers to try; those not installed are reported as absent")
    hw.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    hw.add_argument("--hidden", type=int, nargs="*", help="the latency table at these widths of each spec "
                    "(e.g. --specs specs/mamba.toml --hidden 256 1024: where INT4 starts to pay)")
    hw.add_argument("--loop", action="store_true", help="the full decision loop (lstm and mamba by default)")
    hw.add_argument("--heads", nargs="*", choices=["independent", "autoregressive"], default=[None],
                    help="the latency table and --loop with these kinds of heads of each spec instead of the "
                         "spec's own (both: side by side)")
    hw.add_argument("--heads-cost", action="store_true", help="step latency of each spec (default mlp, gru, "
                    "mamba) with independent heads without and with Markov tables, and autoregressive ones, "
                    "called in turn")
    hw.add_argument("--replay", type=Path, default=REPLAY, help="the replay whose frames --loop, --throughput "
                    "and the latency table use (latency alone runs without one, on random inputs)")
    tp = parser.add_argument_group("training throughput")
    tp.add_argument("--throughput", action="store_true", help="training frames/s (batch 64, window 60)")
    tp.add_argument("--vs-torch", action="store_true",
                    help="--throughput: also the same models in PyTorch (when installed), checked and timed")
    tp.add_argument("--steps", type=int, default=5, help="--throughput: timed steps per spec, at least")
    tp.add_argument("--seconds", type=float, default=4.0,
                    help="--throughput: timing per spec and framework, at least (more steps when fast)")
    at = parser.add_argument_group("architecture table, learning curve and trained runs")
    at.add_argument("--train", action="store_true", help="the architecture table (needs --replays or --data)")
    at.add_argument("--learning-curve", action="store_true", help="the first of --specs (default mamba) trained "
                    "for --max-steps on --games of --data's training games, scored on the same validation games")
    at.add_argument("--games", nargs="*", default=["25", "100", "300", "all"],
                    help="--learning-curve: numbers of training games (all: every one)")
    at.add_argument("--replays", help="replays for --train")
    at.add_argument("--data", help="--train: a dataset folder (`exphil ingest`) instead of --replays")
    at.add_argument("--split-by", choices=exphil.SPLITS,
                    help="--train, --learning-curve: what validation holds out (see exphil train --split-by; "
                         "default: game for --train, player for --learning-curve)")
    at.add_argument("--val-split", type=float, help="--train, --learning-curve: the share of games validation "
                    "holds (default: exphil train's)")
    at.add_argument("--lr-schedule", choices=("constant", "cosine"),
                    help="--train, --learning-curve: see exphil train (default: exphil train's)")
    at.add_argument("--max-steps", type=int, default=0,
                    help="optimizer steps per spec for --train (comparable across machines)")
    at.add_argument("--budget-seconds", type=float, default=0,
                    help="training time per spec for --train (0: no limit; one of the two is needed)")
    at.add_argument("--frame-delay", type=int, default=0, help="--train: frame t predicts frame t + 1 + D")
    at.add_argument("--batch-size", type=int, default=32, help="batch size for --train")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--warm-start", metavar="RUN", help="loss against Markov on the first 1, 3 and 10 s of the "
                    "run's validation games, the state started at zero or at a mean state of training games")
    at.add_argument("--conditioning", metavar="RUN", help="a return-conditioned run: loss and action rates "
                    "on its validation games (or --replays) with the recorded return-to-go shifted")
    cl = parser.add_argument_group("cluster")
    cl.add_argument("--ray", metavar="ADDRESS", help="--train: train the specs as parallel tasks on this Ray "
                    "cluster (auto, local or an address; pip install 'exphil[cluster]')")
    cl.add_argument("--data-parallel", action="store_true", help="gradient exchange versus compute per step "
                    "on --workers Ray workers (--ray, default local), and the modelled scaling to 8 and 64")
    cl.add_argument("--workers", type=int, default=2, help="--data-parallel: Ray workers")
    sc = parser.add_argument_group("data at scale and replay reading")
    sc.add_argument("--scale", action="store_true",
                    help="data at scale: collections of --sizes times --source, ingested and trained on")
    sc.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "replays",
                    help="--scale: the replays the collections are copied from")
    sc.add_argument("--work", type=Path, help="--scale: where the collections, datasets and runs go")
    sc.add_argument("--sizes", type=int, nargs="*", default=[1, 10], help="--scale: copies of --source")
    sc.add_argument("--scale-steps", type=int, default=300, help="--scale: training steps timed per run")
    sc.add_argument("--in-memory-up-to", type=int, default=10,
                    help="--scale: also train on in-memory arrays up to this size")
    sc.add_argument("--repeats", type=int, default=2, help="--scale: training runs of each kind (medians)")
    sc.add_argument("--parsers", nargs="*", type=Path, metavar="REPLAY",
                    help="replay reading speed: peppi-py, the libmelee fallback and libmelee's console alone "
                         "(default: the shipped replays and the games of ../shared/collection/odd)")
    sc.add_argument("--rounds", type=int, default=3, help="--parsers: rounds of reads (medians)")
    parser.add_argument("--json", help="also write every number to this file")
    return parser


# ---- the modes: each prints its table and returns its numbers (error: argparse's, for bad options) --


def run_parsers(args, specs, error) -> dict:
    paths = [p for a in args.parsers for p in exphil.find_replays(a)] or sorted(
        [*(ROOT / "tests" / "replays").glob("*.slp"), *(ROOT.parent / "shared" / "collection" / "odd").glob("*.slp")])
    print(f"\nreplay reading: frames per second of CPU time, medians of {args.rounds} rounds (read_replay's "
          f"frames, finalized); ratio: console alone / fallback time\n")
    return {"parsers": parser_speed(paths, args.rounds)}


def run_warm_start(args, specs, error) -> dict:
    res = warm_start(args.warm_start)
    print_warm_start(res)
    return {"warm_start": res}


def run_conditioning(args, specs, error) -> dict:
    res = conditioning(args.conditioning, args.replays)
    print(f"\n{args.conditioning}: mean probabilities per frame (players: shares of frames)\n")
    print_conditioning(res)
    return {"conditioning": res}


def run_scale(args, specs, error) -> dict:
    if not args.work:
        error("--scale needs --work (a folder with room for the collections and their datasets)")
    rows = scale_table(args.source, args.work, args.sizes, (args.specs or ["mlp"])[0], args.scale_steps,
                       args.in_memory_up_to, args.repeats)
    print_scale(rows)
    return {"scale": rows}


def _settings(args) -> dict:
    """The training settings given on the command line that exphil.train would otherwise default."""
    given = {"val_split": args.val_split, "lr_schedule": args.lr_schedule}
    return {k: v for k, v in given.items() if v is not None}


def run_learning_curve(args, specs, error) -> dict:
    if not (args.data and args.max_steps):
        error("--learning-curve needs --data and --max-steps")
    if not all(g == "all" or g.isdigit() and int(g) > 0 for g in args.games):
        error(f"--games: numbers of games or all, not {' '.join(args.games)}")
    path = (args.specs or [str(exphil.SPECS_DIR / "mamba.toml")])[0]
    rows = learning_curve(path, args.data, [0 if g == "all" else int(g) for g in args.games], args.max_steps,
                          args.seed, args.batch_size, args.frame_delay, args.split_by or "player", **_settings(args))
    print(f"\n{Path(path).stem}, {args.max_steps} optimizer steps each, seed {args.seed}, batch {args.batch_size}, "
          f"frame delay {args.frame_delay}; the same {rows[0]['val_games']} validation games "
          f"({rows[0]['val_frames']:,} frames, split by {args.split_by or 'player'}); the Markov baseline is "
          "counted on each row's training games\n")
    print_learning_curve(rows)
    print_field_scores(rows, "train_games", "training games")
    return {"learning_curve": rows}


def run_architectures(args, specs, error) -> dict:
    if bool(args.replays) == bool(args.data):
        error("--train needs --replays or --data (one of them)")
    if not (args.max_steps or args.budget_seconds):
        error("--train needs --max-steps or --budget-seconds")
    rows = architecture_table(specs, args.replays, args.budget_seconds, args.seed, args.batch_size,
                              args.max_steps, args.frame_delay, args.ray, args.data, args.split_by or "game",
                              **_settings(args))
    print(f"\nsame games (validation split by {args.split_by or 'game'}), seed {args.seed}, batch {args.batch_size}, "
          + (f"{args.max_steps} optimizer steps" if args.max_steps else f"{args.budget_seconds:.0f} s")
          + f" each, frame delay {args.frame_delay}; ranked by the margin of the validation loss under the "
          f"Markov baseline (frequency baseline {rows[0]['baseline_loss']:.3f})\n")
    print_architectures(rows)
    print_field_scores(rows)
    return {"architectures": rows}


def run_data_parallel(args, specs, error) -> dict:
    rows = [data_parallel_row(exphil.load_spec(p), args.ray or "local", args.workers, args.batch_size, args.steps,
                              args.seconds) for p in specs]
    print(f"\ndata parallel on {args.workers} Ray workers of one CPU each, batch {args.batch_size} windows of "
          f"the spec's length, medians of {rows[0]['steps']}+ steps; one process: the same batch, "
          f"{args.workers} threads. Modelled: ring all-reduce on {NETWORK_GBPS:g} Gb/s, "
          f"{MESSAGE_LATENCY_S * 1e6:g} us per message, at this batch per worker\n")
    print_data_parallel(rows)
    return {"data_parallel": rows}


def run_loop(args, specs, error) -> dict:
    sources = args.runs or (args.specs or [str(exphil.SPECS_DIR / f"{n}.toml") for n in ("lstm", "mamba")])
    print("\nfull decision loop: GameState -> features -> step -> sample -> commands flushed to a FIFO "
          "(p50/p99 ms per frame, 1800 frames)\n")
    rows = {}
    for source, kind in ((s, k) for s in sources for k in args.heads):
        cells = {f"{p} {'back to back' if fps is None else 'at 60 FPS'}":
                 loop_latency(source, fps=fps, precision=p, sampling=kind)
                 for fps in (None, 60) for p in ("fp32", "int8")}
        name = Path(source).stem + (f" {kind}" if kind else "")
        rows[name] = cells
        print(f"{name:<22}" + "  ".join(f"{k}: {v['p50_ms']:.3f}/{v['p99_ms']:.3f}" for k, v in cells.items()),
              flush=True)
    return {"loop": rows}


def run_throughput(args, specs, error) -> dict:
    reference = torch_reference() if args.vs_torch else None
    if args.vs_torch and reference is None:
        print("--vs-torch: PyTorch is not installed here (pip install torch); measuring exphil alone")
    result = throughput_table(specs, reference, args.steps, args.seconds)
    print_throughput(result, reference)
    return result


def run_latency(args, specs, error) -> dict:
    if args.hidden and args.runs:
        raise SystemExit("--hidden applies to specs, not to trained runs")
    rows = latency_table(args.runs or specs, [p.lower() for p in args.providers], args.hidden or [None],
                         args.heads)
    print("\nstep latency, batch 1, one intra-op thread; cells: p50 ms and verdict from p99\n")
    print_table(rows, args.markdown)
    return {"step": rows}


def run_heads_cost(args, specs, error) -> dict:
    rows = {Path(p).stem: heads_cost(p, seconds=args.seconds * 2.5) for p in args.specs or
            [str(exphil.SPECS_DIR / f"{n}.toml") for n in ("mlp", "gru", "mamba")]}
    print("\nstep latency by kind of heads, called in turn on the same frames (batch 1, one thread, CPU): "
          "p50 / p99 ms, and p50 over the first kind's\n")
    print("| spec | " + " | ".join(HEAD_KINDS) + " |")
    print("|---|" + "---|" * len(HEAD_KINDS))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{c['p50_ms']:.3f} / {c['p99_ms']:.3f} ({c['p50_ratio']:.2f}x)"
                                         for c in row.values()) + " |")
    return {"heads_cost": rows}


# (is the mode asked for, the mode), first match wins; the latency table when none is
MODES = [(lambda a: a.parsers is not None, run_parsers), (lambda a: a.warm_start, run_warm_start),
         (lambda a: a.conditioning, run_conditioning), (lambda a: a.scale, run_scale),
         (lambda a: a.learning_curve, run_learning_curve), (lambda a: a.train, run_architectures),
         (lambda a: a.data_parallel, run_data_parallel), (lambda a: a.loop, run_loop),
         (lambda a: a.throughput, run_throughput), (lambda a: a.heads_cost, run_heads_cost),
         (lambda a: True, run_latency)]


def main(argv=None) -> int:
    global REPLAY
    parser = _parser()
    args = parser.parse_args(argv)
    REPLAY = args.replay
    if (args.loop or args.throughput) and not REPLAY.is_file():
        parser.error(f"--loop and --throughput need a replay: {REPLAY} is not a file (give --replay FILE)")
    specs = args.specs or sorted(str(p) for p in exphil.SPECS_DIR.glob("*.toml"))
    info = machine()
    print(f"{info['cpu']} ({info['cores']} cores), {info['os']}, Python {info['python']}, "
          f"onnxruntime {info['onnxruntime']}, providers: {', '.join(info['providers'])}")
    result, t0 = {"machine": info}, time.perf_counter()
    mode = next(run for asked, run in MODES if asked(args))
    result.update(mode(args, specs, parser.error))
    result["seconds"] = time.perf_counter() - t0
    print(f"\n({result['seconds']:.0f} s)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
