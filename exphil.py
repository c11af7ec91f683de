"""exphil: Super Smash Bros. Melee bots that learn from Slippi replays and play through Dolphin.

One module, in the order data flows; each section starts with a banner line of "=":

    Specs              the TOML spec format (msgspec Structs) and its loader
    Compiler           spec -> ONNX window graph and step graph (onnxscript): Graph and its helpers
                       (the unrolled scan, the chunked decayed attention), one class per layer kind
    Features/actions   game state -> model inputs, controller <-> action classes (peppi-py and libmelee)
    Data               replays -> datasets (memory-mapped shards, a manifest) -> training windows and batches
    Training           onnxruntime-training: loss graph, Trainer, metrics, train(), evaluate(), distillation
    Inference          onnxruntime sessions, providers, the Stepper, sampling
    Agent              a trained run playing one frame at a time
    Precision          INT8 and FP16 step graphs, checked against FP32
    Play               the sync and async runners over libmelee's Console and Controller
    Judging play       closed-controller rollouts, skill checks mined from replays, field scores
    Command line       `python -m exphil ...`

* A backbone is a TOML spec (``specs/*.toml``) validated by msgspec.
* The compiler turns a spec into two ONNX graphs that share every parameter name: a *window*
  graph ``[B, L, ...]`` for training and a *step* graph ``[B, ...]`` plus carried state for play.
  Both are built by the same layer code: the step graph is the window graph at ``L = 1``.
* Training runs on onnxruntime-training, inference on onnxruntime.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, NamedTuple, Sequence, Union

if __name__ == "__main__":  # `python -m exphil`: Ctrl-C while it starts is one line too (then main() answers it)
    signal.signal(signal.SIGINT, lambda *_: os._exit(print("exphil: interrupted", file=sys.stderr) or 130))

import msgspec
import numpy as np

__version__ = "0.1.0"

OPSET = 21  # onnxruntime-training 1.19 reads up to opset 21 ...
IR_VERSION = 10  # ... and IR version 10.


logger = logging.getLogger("exphil")  # the library's messages; the command line prints them on stderr


class ExphilError(Exception):
    """Base class for errors that carry a message meant for the user (exit code 1)."""


class UsageError(ExphilError):
    """The command or call asks for something invalid: fix the arguments (exit code 2)."""


class _quiet_fd2:
    """Silence what native code writes to file descriptor 2 (onnxruntime-training's log lines,
    a replay parser's panic backtrace); Python exceptions still carry the errors."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved, self.null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)


# =================================================================================================
# Specs
# =================================================================================================

Pos = Annotated[int, msgspec.Meta(ge=1)]
Norm = Literal["layer", "rms", "none"]
Group = Literal["nana", "items", "randall"]  # the optional groups of feature columns (GROUPS)


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class Dense(_Strict, tag="dense", tag_field="kind"):
    """Per-frame Linear + activation: no memory across frames."""

    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


class LSTM(_Strict, tag="lstm", tag_field="kind"):
    """LSTM cell (PyTorch gate order i, f, g, o)."""

    forget_bias: float = 1.0


class Mamba(_Strict, tag="mamba", tag_field="kind"):
    """Mamba-1 selective state-space mixer."""

    state: Pos = 16  # N, the SSM state per channel
    expand: Pos = 2  # E, inner width = E * hidden
    conv: Pos = 4  # K, causal depthwise conv taps
    dt_rank: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0 = ceil(hidden / 16)


class GRU(_Strict, tag="gru", tag_field="kind"):
    """GRU cell (PyTorch gate order r, z, n; the reset gate applies after the hidden MatMul)."""


class Attention(_Strict, tag="attention", tag_field="kind"):
    """Sliding-window multi-head causal self-attention with a fixed-size key/value cache."""

    heads: Pos = 4
    window: Annotated[int, msgspec.Meta(ge=0)] = 0  # frames each query sees (0 = the spec's window)
    qk_norm: bool = False  # LayerNorm on queries and keys, per head
    alibi: bool = True  # linear distance penalty per head (positions without sin/cos tables)


class GatedSSM(_Strict, tag="gated_ssm", tag_field="kind"):
    """Diagonal gated recurrence h = a h + (1 - a) u, with a = sigmoid(u W_a + b_a) per channel."""

    expand: Pos = 1  # inner width = expand * hidden
    conv: Annotated[int, msgspec.Meta(ge=0)] = 4  # causal depthwise conv taps before the gate (0 = none)


class Mamba2(_Strict, tag="mamba2", tag_field="kind"):
    """Mamba-2 (SSD): one scalar decay per head over a [head_dim, state] matrix state; the
    window is computed in chunks as masked MatMuls, the step as the recurrence."""

    state: Pos = 64  # N, the state width shared by the heads (B and C)
    expand: Pos = 2  # inner width = expand * hidden = heads * head_dim
    head_dim: Pos = 64  # P
    conv: Pos = 4  # causal depthwise conv taps over x, B and C
    chunk: Annotated[int, msgspec.Meta(ge=0)] = 64  # frames per chunk of the window form (0 = the whole window)


class Mamba3(_Strict, tag="mamba3", tag_field="kind"):
    """Mamba-3 (SISO): Mamba-2's heads with a trapezoidal update (the previous frame's input
    mixed in by a data-dependent weight), data-dependent rotations of B and C (a complex-valued
    state), normalised B and C with biases, and no convolution; chunked in the window."""

    state: Pos = 64  # N, the state width shared by the heads (B and C)
    expand: Pos = 2  # inner width = expand * hidden = heads * head_dim
    head_dim: Pos = 64  # P
    rope: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5  # share of the N state channels rotated (in pairs)
    chunk: Annotated[int, msgspec.Meta(ge=0)] = 64  # frames per chunk of the window form (0 = the whole window)


class GLA(_Strict, tag="gla", tag_field="kind"):
    """Gated linear attention: a [key, value] matrix state per head whose key channels decay by
    data-dependent gates; chunked in the window, the recurrence in the step."""

    heads: Pos = 4
    expand_k: Annotated[float, msgspec.Meta(gt=0)] = 0.5  # key width = expand_k * hidden
    expand_v: Annotated[float, msgspec.Meta(gt=0)] = 1.0  # value width = expand_v * hidden
    gate_rank: Pos = 16  # the decay gate's low-rank projection
    normalizer: Annotated[float, msgspec.Meta(gt=0)] = 16.0  # log decay = logsigmoid(.) / normalizer
    chunk: Annotated[int, msgspec.Meta(ge=0)] = 16  # frames per chunk of the window form (0 = the whole window)


class HGRN2(_Strict, tag="hgrn2", tag_field="kind"):
    """HGRN-2: a gated linear RNN whose forget gate f >= lower_bound decays the key channels of a
    [key, value] state per head, with input key 1 - f (state expansion by outer products)."""

    heads: Pos = 2  # each head's state is [hidden / heads, hidden / heads] (the state expansion)
    lower_bound: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0  # forget gates stay above it
    chunk: Annotated[int, msgspec.Meta(ge=0)] = 16  # frames per chunk of the window form (0 = the whole window)


class RetNet(_Strict, tag="retnet", tag_field="kind"):
    """RetNet's multi-scale retention: per head a fixed decay gamma_h = 1 - 2^(-5-h) over a
    [key, value] state, keys and queries rotated by their position (folded into the state in
    the step form); chunked in the window."""

    heads: Pos = 4
    value_factor: Pos = 2  # value width = value_factor * hidden
    chunk: Annotated[int, msgspec.Meta(ge=0)] = 64  # frames per chunk of the window form (0 = the whole window)


class RWKV7(_Strict, tag="rwkv7", tag_field="kind"):
    """RWKV-7 "Goose" time mixing: token shift, a [head, head] state per head updated by the
    generalized delta rule with data-dependent decays and in-context learning rates. The window
    unrolls the recurrence frame by frame (its transition is not diagonal)."""

    head_size: Pos = 64
    lora: Pos = 32  # rank of the low-rank decay, in-context-rate and value-mix projections
    gate_lora: Pos = 64  # rank of the output gate's


class RWKV7FFN(_Strict, tag="rwkv7_ffn", tag_field="kind"):
    """RWKV-7 channel mixing: token shift, then ReLU(. W_key)^2 W_value."""

    expand: Pos = 4


class CfC(_Strict, tag="cfc", tag_field="kind"):
    """Closed-form continuous-time cell (liquid network, CfC "default" mode): a gated interpolation
    between two heads by a time-constant gate, with a time step of one frame."""

    backbone: Pos = 128  # units of the backbone layer shared by the heads


class S5(_Strict, tag="s5", tag_field="kind"):
    """S5: a MIMO diagonal linear state-space layer with complex states (kept as real and
    imaginary parts), started from S5's HiPPO-N spectrum; the window is one Toeplitz product."""

    state: Pos = 128  # P, complex states


Mixer = Union[Dense, LSTM, GRU, Mamba, Attention, GatedSSM, Mamba2, Mamba3, GLA, HGRN2, RetNet, RWKV7, RWKV7FFN, CfC, S5]


class Block(_Strict):
    mixer: Mixer
    repeat: Pos = 1  # number of identical layers this entry stands for
    # a name: every block with this name is one set of weights (norm, mixer, feed-forward)
    # applied at each of its positions, each position with its own input projection and state
    share: str = ""
    norm: Norm = "none"  # normalisation before the mixer
    residual: bool = False  # x + mixer(norm(x))
    ffn: Annotated[int, msgspec.Meta(ge=0)] = 0  # feed-forward expansion after the mixer (0 = none)


class Embeddings(_Strict):
    action: Pos = 32  # learned table per action state id
    character: Pos = 8
    stage: Pos = 4
    item: Pos = 8  # per item and projectile type


# the controller's parts a model predicts: 8 buttons, each stick's axes in 17 classes, the trigger in 5
HEADS = {"buttons": 8, "main_x": 17, "main_y": 17, "c_x": 17, "c_y": 17, "shoulder": 5}


class Heads(_Strict):
    hidden: Annotated[int, msgspec.Meta(ge=0)] = 0  # width of a shared hidden layer (0 = none)
    # add to each head's logits a learned row picked by the current controller's class (a
    # "next input given current input" table, started at the training games' counts): the model
    # starts at the Markov baseline and learns what changes the input
    markov: bool = False
    # "independent": each head's distribution from the features alone. "autoregressive": each head
    # after the first in `order` also sees the values of the heads before it (a small MLP of the
    # features and their one-hot values, `conditioning` wide, added to its logits): training feeds
    # the true values (teacher forcing), the step graph samples the heads in order itself
    sampling: Literal["independent", "autoregressive"] = "independent"
    order: tuple[str, ...] = ("buttons", "main_x", "main_y", "c_x", "c_y", "shoulder")
    conditioning: Pos = 64

    def __post_init__(self):
        if sorted(self.order) != sorted(HEADS):
            raise ValueError(f"`order` must name each head once ({', '.join(HEADS)}), not {list(self.order)}")


class Returns(_Strict):
    """Rewards and the return-to-go (per player view), for return-conditioned policies and a
    value head. The reward of frame t (what follows from frame t to t + 1): `damage` per percent
    of damage dealt minus damage taken, plus `stock` per stock the opponent loses minus per stock
    the player loses. The return-to-go at frame t: the rewards from t to the end of the game,
    the reward k frames ahead weighted by discount^k."""
    damage: float = 0.01
    stock: float = 1.0
    # 0.99: rewards about 100 frames ahead and less count (what a value head can predict; see README)
    discount: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.99
    input: bool = False  # the return-to-go is an input (play sets a target return)
    value: bool = False  # a value head predicts the return-to-go (trained with the policy)
    value_weight: Annotated[float, msgspec.Meta(ge=0)] = 0.1  # its squared error's weight in the loss


class Spec(_Strict):
    name: str
    window: Pos  # frames per training window
    hidden: Pos  # model width
    blocks: Annotated[list[Block], msgspec.Meta(min_length=1)]
    description: str = ""
    embed: Embeddings = Embeddings()
    final_norm: Norm = "layer"
    heads: Heads = Heads()
    # in training only: zero this share of the input projection's and every block's outputs
    # (scaled up to keep the mean); play and evaluation use the whole model
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    returns: Returns = Returns()
    # what the model reads beyond the two players, their controller and the stage (which it always
    # reads): each Nana, the nearest items and projectiles, Randall. The graphs take every column of
    # the feature layout either way; the model has no parameters for a group it does not see.
    sees: list[Group] = msgspec.field(default_factory=lambda: ["nana", "items", "randall"])

    @property
    def columns(self) -> tuple[list[tuple[int, str]], list[int]]:
        """The categorical columns the model reads (index, embedding table) and its numeric columns."""
        groups = [g for g in GROUPS if g == "players" or g in self.sees]
        return ([(i, CAT_FIELDS[i][1]) for g in groups for i in GROUPS[g][0]],
                [i for g in groups for i in GROUPS[g][1]])

    @property
    def layers(self) -> list[Block]:
        """Blocks with ``repeat`` expanded: one entry per layer."""
        return [b for b in self.blocks for _ in range(b.repeat)]

    @property
    def returns_used(self) -> Returns | None:
        """The reward settings when the graphs read or predict the return-to-go, else None."""
        return self.returns if self.returns.input or self.returns.value else None


class SpecError(ExphilError):
    pass


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and validate a spec file. Errors name the file and the field path."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec: {e.strerror}") from None
    return parse_spec(data, source=str(path))


def parse_spec(text: str | bytes, source: str = "<spec>") -> Spec:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError(f"{source}: not a spec (a TOML text file in UTF-8); is it the right file?") from None
    try:
        spec = msgspec.toml.decode(text, type=Spec)
        first = {}
        for j, block in enumerate(spec.blocks):
            i = first.setdefault(block.share, j) if block.share else j
            if msgspec.structs.replace(block, repeat=1) != msgspec.structs.replace(spec.blocks[i], repeat=1):
                raise SpecError(f"{source}: field `blocks[{j}].share`: {block.share!r} names blocks[{i}], whose "
                                "settings differ (a shared block's mixer, norm, residual and ffn are one)")
        if spec.returns.input and spec.returns.value:
            raise SpecError(f"{source}: field `returns.value`: a value head beside `returns.input` would read its "
                            "target, the return-to-go, from its input; choose one")
        if spec.returns.input and spec.returns.discount != 1:
            raise SpecError(f"{source}: field `returns.discount`: a return-conditioned spec (`returns.input`) needs "
                            "discount = 1.0 (play lowers its target by each reward; a discount would divide what is "
                            "left by it every frame)")
        return spec
    except msgspec.ValidationError as e:
        msg = str(e)
        if " - at `$." in msg:  # "Expected `int`, got `str` - at `$.blocks[0].repeat`"
            problem, field = msg.rsplit(" - at `$.", 1)
            raise SpecError(f"{source}: field `{field.rstrip('`')}`: {problem}") from None
        if msg == "Object contains unknown field `layout`":  # the setting `sees` replaced
            msg = "field `layout`: replaced by `sees` (layout = 1 is sees = [], layout = 2 the default)"
        raise SpecError(f"{source}: {msg}") from None
    except msgspec.DecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None


# =================================================================================================
# Compiler: spec -> ONNX window graph and step graph (onnxscript's GraphBuilder)
# =================================================================================================
#
# Every layer is written once, over tensors shaped [B, L, ...]. Per-frame work (projections,
# gates, convolutions) runs on the whole window at once; true recurrences go through
# `Graph.scan`, which unrolls a per-frame function over the L frames. The step graph is the same
# code at L = 1 with the carried state as input, so a step reproduces a window frame by frame.
# Only ops with gradients in onnxruntime-training 1.19 are used (no CumSum, Softplus, LSTM, Scan),
# except in the step graph's sampler (`Sampler`), which is never trained.


class Graph:
    """A graph under construction: onnxscript's GraphBuilder plus parameters and helpers."""

    def __init__(self, params: dict[str, np.ndarray], length: int, name: str):
        import onnx_ir as ir
        from onnxscript import GraphBuilder

        self.ir = ir
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET}, name=name)
        self.builder = GraphBuilder(self.graph)
        self.op = self.builder.op
        self.params = params
        self.length = length  # frames per window (1 in the step graph)
        self.step = False  # the step graph: its heads work on [B, ...] (no frame axis)
        self.trained = False  # built for onnxruntime-training (gradients will be taken)
        self.shared: dict[str, Any] = {}  # values layers pass on within one frame (RWKV-7's first value)
        self.training = None  # the training graph's boolean input "training" (dropout on or off)
        self._values: dict[str, Any] = {}

    def param(self, name: str):
        """The graph value of a parameter, registered as an initializer on first use."""
        if name not in self._values:
            tensor = self.ir.tensor(self.params[name], name=name)
            self._values[name] = self.builder.initializer(tensor, name, qualify=False)
        return self._values[name]

    def const(self, array: np.ndarray | list, dtype=np.float32):
        array = np.asarray(array, dtype=dtype)
        name = f"const.{len(self.graph.initializers)}"
        return self.builder.initializer(self.ir.tensor(array, name=name), name, qualify=False)

    def input(self, name: str, dtype: str, shape: Sequence):
        return self.builder.input(name, getattr(self.ir.DataType, dtype), list(shape))

    def output(self, value, name: str, shape: Sequence, dtype: str = "FLOAT"):
        """A graph output with its type and declared shape (training tools require one)."""
        if value in self.graph.inputs or value in self.graph.outputs:
            value = self.op.Identity(value)
        value.dtype = getattr(self.ir.DataType, dtype)
        value.shape = self.ir.Shape(list(shape))
        self.builder.add_output(value, name)

    def to_proto(self):
        """Serialize; constants become Constant nodes so initializers are exactly the parameters."""
        ir = self.ir
        consts = [v for n, v in self.graph.initializers.items() if n not in self.params]
        nodes = []
        for v in consts:
            self.graph.initializers.pop(v.name)
            nodes.append(ir.Node("", "Constant", [], [ir.Attr("value", ir.AttributeType.TENSOR, v.const_value)],
                                 outputs=[v], name=f"Constant.{v.name}"))
        if nodes and self.graph.num_nodes():
            self.graph.insert_before(self.graph.node(0), nodes)
        return ir.to_proto(ir.Model(self.graph, ir_version=IR_VERSION, producer_name="exphil"))

    # ---- small building blocks -------------------------------------------------------------------
    def linear(self, x, name: str, bias: bool = True):
        y = self.op.MatMul(x, self.param(f"{name}.weight"))
        return self.op.Add(y, self.param(f"{name}.bias")) if bias else y

    def split(self, x, sizes: Sequence[int], axis: int = -1):
        return self.op.Split(x, self.const(list(sizes), np.int64), axis=axis, _outputs=len(sizes))

    def token_shift(self, x, carried):
        """The previous frame's x at every frame ([B, L, D]), and the last frame (the next carry)."""
        seq, carry = self.history(carried, x, 1)
        return self.op.Slice(seq, self.const([0], np.int64), self.const([self.length], np.int64),
                             self.const([1], np.int64)), carry

    def dropout(self, x, rate: float):
        """Dropout in the training graph (on in train steps, off in evaluation); elsewhere x."""
        if self.training is None or not rate:
            return x
        y, _ = self.op.Dropout(x, self.const(rate), self.training, _outputs=2)  # the mask output: for its gradient
        return y

    def lookup(self, table: str, ids):
        """Rows of a parameter table picked by integer ids (see `lookup_value`)."""
        return self.lookup_value(self.param(table), self.params[table].shape[0], ids)

    def lookup_value(self, weight, rows: int, ids):
        """Rows of a table (a graph value with `rows` rows) picked by integer ids. In a graph that
        is trained, a one-hot MatMul: its gradient is a GEMM, where Gather's is a serial scatter
        (the slowest kernel of a small model's training step). Elsewhere Gather, the fastest
        forward. Both are exact."""
        if not self.trained:
            return self.op.Gather(weight, ids, axis=0)
        return self.op.MatMul(self.op.OneHot(ids, self.const(rows, np.int64), self.const([0.0, 1.0]), axis=-1), weight)

    def silu(self, x):
        return self.op.Mul(x, self.op.Sigmoid(x))

    def rotate_pairs(self, x, cos, sin, swap: np.ndarray):
        """x rotated on pairs of channels of its last axis: x cos + (x swap) sin, where the
        constant `swap` (`_pair_swap`) maps each pair (x0, x1) to (-x1, x0); cos and sin hold
        each pair's cosine and sine on both of its channels (1 and 0 on channels left alone)."""
        op = self.op
        return op.Add(op.Mul(x, cos), op.Mul(op.MatMul(x, self.const(swap)), sin))

    def softplus(self, x):  # relu(x) + log(1 + exp(-|x|)): stable, and has a gradient in ORT
        op = self.op
        return op.Add(op.Relu(x), op.Log(op.Add(op.Exp(op.Neg(op.Abs(x))), 1.0)))

    def activation(self, kind: str, x):
        op = self.op
        if kind == "relu":
            return op.Relu(x)
        if kind == "tanh":
            return op.Tanh(x)
        if kind == "silu":
            return self.silu(x)
        if kind == "gelu":  # (onnxruntime-training has no gradient for the Gelu operator: spelled out there)
            return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, 1 / math.sqrt(2))), 1.0)) if self.trained \
                else op.Gelu(x)
        raise ValueError(kind)

    def norm(self, kind: str, x, name: str | None):
        """LayerNorm or RMSNorm over the last axis with the weights (and bias) under `name`;
        an RMSNorm without weights when name is None."""
        op = self.op
        if kind == "layer":  # bias input and all three outputs declared: needed for its gradient
            y, _, _ = op.LayerNormalization(x, self.param(f"{name}.weight"), self.param(f"{name}.bias"),
                                            axis=-1, epsilon=1e-5, _outputs=3)
            return y
        if kind == "rms":  # written in the pattern onnxruntime fuses into one kernel
            ms = op.ReduceMean(op.Pow(x, 2.0), self.const([-1], np.int64), keepdims=1)
            y = op.Div(x, op.Sqrt(op.Add(ms, 1e-5)))
            return y if name is None else op.Mul(y, self.param(f"{name}.weight"))
        return x

    def history(self, carried, x, keep: int, axis: int = 1):
        """Concat the carried last `keep` frames with this window along the time axis; returns
        the joined sequence (keep + L frames) and its last `keep` frames (the next carry)."""
        seq = self.op.Concat(carried, x, axis=axis)
        L = self.length
        return seq, self.op.Slice(seq, self.const([L], np.int64), self.const([L + keep], np.int64),
                                  self.const([axis], np.int64))

    def causal_conv(self, name: str, u, carried, taps: int):
        """Depthwise causal conv over time: y_t = b + sum_k w[k] u_{t-K+1+k}, with the previous
        K-1 inputs carried as state. K shifted products: same code for any L, and faster than
        Conv at L = 1. Weight [K, D] (tap K-1 is the current frame), bias [D]."""
        op, L = self.op, self.length
        seq, carry = self.history(carried, u, taps - 1)
        w, y = self.param(f"{name}.weight"), self.param(f"{name}.bias")
        for k in range(taps):
            tap = op.Slice(seq, self.const([k], np.int64), self.const([k + L], np.int64), self.const([1], np.int64))
            y = op.Add(y, op.Mul(tap, op.Gather(w, self.const(k, np.int64), axis=0)))
        return y, carry

    def decayed_attention(self, q, k, v, log_decay, h0, chunk: int, per_key: bool = False):
        """The linear recurrence h_t = diag(exp(a_t)) h_{t-1} + v_t k_t^T (decaying the key
        axis), y_t = h_t q_t, per head: log_decay a_t <= 0 is [B, H, L, 1] for one decay per head
        (Mamba-2, RetNet) or, with per_key, [B, H, L, N] for one per key channel (GLA, HGRN-2).

        q, k [B, H or 1, L, N]; v [B, H, L, P]; h0 [B, H, P, N]. Returns y [B, H, L, P] and the
        last state. Computed in chunks of `chunk` frames (the last may be shorter): inside a
        chunk, y_t = sum over s <= t of (q_t . (k_s * exp(c_t - c_s))) v_s, plus the carried
        state's share (q_t * exp(c_t)) h0^T, where c is the chunk's cumulative log-decay (a MatMul
        with a triangular matrix: CumSum has no gradient in onnxruntime-training). Only
        differences c_t - c_s <= 0 are exponentiated: stable for any decay. The step graph is
        the same code over one frame."""
        op, L = self.op, self.length
        chunk = min(chunk or L, L)
        i64, T = (lambda v: self.const(v, np.int64)), (lambda x: op.Transpose(x, perm=[0, 1, 3, 2]))
        ys = []
        for start in range(0, L, chunk):
            n = min(chunk, L - start)
            cut = lambda x: x if n == L else op.Slice(x, i64([start]), i64([start + n]), i64([2]))
            qc, kc, vc = cut(q), cut(k), cut(v)
            # cumulative log-decay c_t = sum of a_s for s <= t, keys first: [B, H, K, n]
            ct = op.MatMul(T(cut(log_decay)), self.const(np.triu(np.ones((n, n)))))
            c = T(ct)
            mask = np.where(np.tril(np.ones((n, n))) > 0, 0.0, -1e9)  # [t, s]: s <= t only
            if per_key:  # decay [B, H, t, N, s]; each frame's row of scores is a MatMul over the keys
                decay = op.Exp(op.Add(op.Sub(op.Unsqueeze(c, i64([-1])), op.Unsqueeze(ct, i64([2]))),
                                      self.const(mask[:, None, :])))
                keys = op.Mul(op.Unsqueeze(T(kc), i64([2])), decay)  # k_s[j] exp(c_t[j] - c_s[j])
                scores = op.Squeeze(op.MatMul(op.Unsqueeze(qc, i64([-2])), keys), i64([-2]))
            else:  # one decay per head: (q k^T) * decay
                decay = op.Exp(op.Add(op.Sub(c, ct), self.const(mask)))  # [B, H, t, s]
                scores = op.Mul(op.MatMul(qc, T(kc)), decay)
            ys.append(op.Add(op.MatMul(scores, vc), op.MatMul(op.Mul(qc, op.Exp(c)), T(h0))))
            total = op.Slice(c, i64([n - 1]), i64([n]), i64([2]))  # [B, H, 1, K]: the chunk's whole decay
            h0 = op.Add(op.Mul(op.Exp(total), h0), op.MatMul(T(vc), op.Mul(kc, op.Exp(op.Sub(total, c)))))
        return (ys[0] if len(ys) == 1 else op.Concat(*ys, axis=2)), h0

    def scan(self, fn, sequences: Sequence, state: dict):
        """Unroll ``y_t, state = fn(frames_t, state)`` over the time axis (axis 1) of each sequence.

        Frames keep a time axis of size 1 ([B, 1, ...]) and so do recurrent states, so the step
        graph (L = 1) needs no reshaping at all. Returns outputs stacked [B, L, ...], final state."""
        L = self.length
        frames = [[s] if L == 1 else self.split(s, [1] * L, axis=1) for s in sequences]
        ys = []
        for t in range(L):
            y, state = fn([f[t] for f in frames], state)
            ys.append(y)
        return (ys[0] if L == 1 else self.op.Concat(*ys, axis=1)), state


class _Init:
    """Creates named parameters with their initial values."""

    def __init__(self, params: dict[str, np.ndarray], rng: np.random.Generator):
        self.params, self.rng = params, rng

    def __call__(self, name: str, value) -> None:
        if name in self.params:
            raise ValueError(f"duplicate parameter {name}")
        self.params[name] = np.asarray(value, dtype=np.float32)

    def uniform(self, name: str, shape: Sequence[int], bound: float) -> None:
        self(name, self.rng.uniform(-bound, bound, size=shape))

    def linear(self, name: str, n_in: int, n_out: int, bias: bool = True, scale: float = 1.0) -> None:
        """Weight stored [in, out]; PyTorch's default U(+-1/sqrt(in)) initialisation."""
        bound = 1 / math.sqrt(n_in)
        self.uniform(f"{name}.weight", (n_in, n_out), bound * scale)
        if bias:
            self.uniform(f"{name}.bias", (n_out,), bound)

    def step_bias(self, name: str, n: int) -> None:
        """Mamba's time-step bias: softplus(bias) log-uniform in [1e-3, 1e-1] (at least 1e-4)."""
        dt = np.exp(self.rng.uniform(math.log(1e-3), math.log(1e-1), n)).clip(min=1e-4)
        self(name, dt + np.log(-np.expm1(-dt)))  # inverse softplus

    def norm(self, kind: str, name: str, width: int) -> None:
        if kind in ("layer", "rms"):
            self(f"{name}.weight", np.ones(width))
        if kind == "layer":
            self(f"{name}.bias", np.zeros(width))


# ---- mixers: one class per kind of layer ---------------------------------------------------------
# `state_shapes(cfg, width)` declares the tensors a mixer carries as (name, shape), without the
# batch axis, from its settings alone (`spec_states`); its `states` holds them.

class LayerAt(NamedTuple):
    """Where a mixer is built: its block's position among the spec's `layers` blocks, and
    whether it is the first mixer of its kind there."""
    index: int
    layers: int
    first: bool

    @property
    def depth(self) -> float:
        """0 at the first block, 1 at the last."""
        return self.index / max(self.layers - 1, 1)


class DenseLayer:
    state_shapes = staticmethod(lambda cfg, width: [])

    def __init__(self, name: str, cfg: Dense, width: int, init: _Init, at: LayerAt):
        self.name, self.cfg = name, cfg
        init.linear(f"{name}.linear", width, width)
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        return g.activation(self.cfg.activation, g.linear(x, f"{self.name}.linear")), state


class LSTMLayer:
    """h, c carried; input projection hoisted out of the recurrence (one MatMul per window)."""

    state_shapes = staticmethod(lambda cfg, width: [("h", (1, width)), ("c", (1, width))])

    def __init__(self, name: str, cfg: LSTM, width: int, init: _Init, at: LayerAt):
        self.name, H = name, width
        bound = 1 / math.sqrt(H)
        init.uniform(f"{name}.w_ih", (width, 4 * H), bound)
        init.uniform(f"{name}.w_hh", (H, 4 * H), bound)
        bias = init.rng.uniform(-bound, bound, 4 * H)
        bias[H:2 * H] += cfg.forget_bias
        init(f"{name}.bias", bias)
        self.H = H
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n = g.op, self.name
        xi = op.Add(op.MatMul(x, g.param(f"{n}.w_ih")), g.param(f"{n}.bias"))
        w_hh = g.param(f"{n}.w_hh")

        def cell(frame, s):
            z = op.Add(frame[0], op.MatMul(s["h"], w_hh))
            i, f, gg, o = g.split(z, [self.H] * 4)
            c = op.Add(op.Mul(op.Sigmoid(f), s["c"]), op.Mul(op.Sigmoid(i), op.Tanh(gg)))
            h = op.Mul(op.Sigmoid(o), op.Tanh(c))
            return h, {"h": h, "c": c}

        return g.scan(cell, [xi], state)


class MambaLayer:
    """Mamba-1: in_proj -> causal depthwise conv -> SiLU -> selective scan -> gate -> out_proj.

    Conv and projections run on the whole window; only h_t = exp(dt A) h_{t-1} + dt u_t B_t and
    its read-out y_t = C_t h_t are unrolled. States: the last K-1 conv inputs and h [D, N]."""

    @staticmethod
    def state_shapes(cfg: Mamba, width: int) -> list:
        D = cfg.expand * width
        return [("conv", (cfg.conv - 1, D)), ("ssm", (1, D, cfg.state))]

    def __init__(self, name: str, cfg: Mamba, width: int, init: _Init, at: LayerAt):
        self.name = name
        D, N, K = cfg.expand * width, cfg.state, cfg.conv
        R = cfg.dt_rank or math.ceil(width / 16)
        self.D, self.N, self.K, self.R = D, N, K, R
        init.linear(f"{name}.in_proj", width, 2 * D, bias=False)
        init.uniform(f"{name}.conv.weight", (K, D), 1 / math.sqrt(K))  # tap K-1: current frame
        init.uniform(f"{name}.conv.bias", (D,), 1 / math.sqrt(K))
        init.linear(f"{name}.x_proj", D, R + 2 * N, bias=False)
        init.uniform(f"{name}.dt_proj.weight", (R, D), R ** -0.5)
        init.step_bias(f"{name}.dt_proj.bias", D)
        init(f"{name}.A_log", np.log(np.tile(np.arange(1, N + 1, dtype=np.float64), (D, 1))))
        init(f"{name}.D", np.ones(D))
        init.linear(f"{name}.out_proj", D, width, bias=False, scale=1 / math.sqrt(at.layers))
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n = g.op, self.name
        u, z = g.split(g.linear(x, f"{n}.in_proj", bias=False), [self.D, self.D])
        conv, conv_state = g.causal_conv(f"{n}.conv", u, state["conv"], self.K)
        u = g.silu(conv)
        dt, b, c = g.split(g.linear(u, f"{n}.x_proj", bias=False), [self.R, self.N, self.N])
        dt = g.softplus(g.linear(dt, f"{n}.dt_proj"))  # [B, L, D]
        col, row = g.const([-1], np.int64), g.const([-2], np.int64)
        A, ones = op.Neg(op.Exp(g.param(f"{n}.A_log"))), g.const(np.ones((1, self.N)))  # [D, N], [1, N]
        # The [D, N]-wide terms are made frame by frame inside the recurrence, from [D]- and
        # [N]-wide inputs: each frame's tensors then stay in cache, where whole-window [B, L, D, N]
        # tensors would be written to memory and split. Outer products as MatMuls (faster than
        # broadcasting Muls in onnxruntime).
        def ssm(frame, s):
            dt, dtu, b, c = frame
            decay = op.Exp(op.Mul(op.MatMul(op.Unsqueeze(dt, col), ones), A))  # exp(dt A), [B, 1, D, N]
            h = op.Add(op.Mul(decay, s["ssm"]), op.MatMul(op.Unsqueeze(dtu, col), op.Unsqueeze(b, row)))
            return op.MatMul(h, op.Unsqueeze(c, col)), {"ssm": h}  # read-out h C: [B, 1, D, 1]

        y, s = g.scan(ssm, [dt, op.Mul(dt, u), b, c], {"ssm": state["ssm"]})
        y = op.Squeeze(y, col)
        y = op.Mul(op.Add(y, op.Mul(u, g.param(f"{n}.D"))), g.silu(z))
        return g.linear(y, f"{n}.out_proj", bias=False), {"conv": conv_state, "ssm": s["ssm"]}


class GRULayer:
    """h carried; input projection hoisted out of the recurrence. b_in and b_hn stay apart
    (ONNX GRU's linear_before_reset=1)."""

    state_shapes = staticmethod(lambda cfg, width: [("h", (1, width))])

    def __init__(self, name: str, cfg: GRU, width: int, init: _Init, at: LayerAt):
        self.name, H = name, width
        bound = 1 / math.sqrt(H)
        init.uniform(f"{name}.w_ih", (width, 3 * H), bound)
        init.uniform(f"{name}.w_hh", (H, 3 * H), bound)
        init.uniform(f"{name}.b_ih", (3 * H,), bound)
        init.uniform(f"{name}.b_hh", (3 * H,), bound)
        self.H = H
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n = g.op, self.name
        xi = g.split(op.Add(op.MatMul(x, g.param(f"{n}.w_ih")), g.param(f"{n}.b_ih")), [self.H] * 3)
        w_hh, b_hh = g.param(f"{n}.w_hh"), g.param(f"{n}.b_hh")

        def cell(frame, s):
            hr, hz, hn = g.split(op.Add(op.MatMul(s["h"], w_hh), b_hh), [self.H] * 3)
            r, z = op.Sigmoid(op.Add(frame[0], hr)), op.Sigmoid(op.Add(frame[1], hz))
            cand = op.Tanh(op.Add(frame[2], op.Mul(r, hn)))
            h = op.Add(cand, op.Mul(z, op.Sub(s["h"], cand)))  # (1 - z) n + z h
            return h, {"h": h}

        return g.scan(cell, xi, state)


class AttentionLayer:
    """Causal multi-head attention over a band of W frames (key j visible to query i iff
    i - W < j <= i). States: the last W-1 keys and values and which of them are real frames.

    The window graph attends over [carried W-1 frames, L new frames] with a constant band mask,
    so stepping frame by frame (L = 1, O(W) per step) reproduces it exactly, at any depth."""

    width_unit = staticmethod(lambda cfg: cfg.heads)  # widths it accepts are multiples of this

    @staticmethod
    def state_shapes(cfg: Attention, width: int, window: int = 1) -> list:
        H, dh, W = cfg.heads, width // cfg.heads, cfg.window or window
        return [("k", (H, dh, W - 1)), ("v", (H, W - 1, dh)), ("valid", (W - 1,))]

    def __init__(self, name: str, cfg: Attention, width: int, init: _Init, at: LayerAt, window: int = 1):
        if width % cfg.heads:
            raise SpecError(f"attention: hidden size {width} is not divisible by heads = {cfg.heads}")
        self.name, self.cfg, self.d = name, cfg, width
        self.H, self.dh, self.W = cfg.heads, width // cfg.heads, cfg.window or window
        init(f"{name}.qkv.weight", init.rng.normal(0, 0.02, (width, 3 * width)))
        init(f"{name}.qkv.bias", np.zeros(3 * width))
        init.linear(f"{name}.out", width, width, scale=1 / math.sqrt(2 * at.layers))
        if cfg.qk_norm:
            init.norm("layer", f"{name}.q_norm", self.dh)
            init.norm("layer", f"{name}.k_norm", self.dh)
        if self.W < 2:
            raise SpecError(f"attention: window must be at least 2 frames (got {self.W})")
        self.states = self.state_shapes(cfg, width, window)

    def bias(self, L: int) -> np.ndarray:
        """Constant [H, L, W-1+L] additive mask: 0 inside the band, -1e9 outside; ALiBi inside."""
        i, j = np.arange(L)[:, None], np.arange(self.W - 1 + L)[None, :]
        dist = (self.W - 1 + i) - j  # how many frames key j is older than query i
        band = (dist >= 0) & (dist < self.W)
        slopes = 2.0 ** (-8.0 * np.arange(1, self.H + 1) / self.H) if self.cfg.alibi else np.zeros(self.H)
        return np.where(band, -slopes[:, None, None] * dist, -1e9).astype(np.float32)

    def __call__(self, g: Graph, x, state: dict):
        op, n, L, H, dh = g.op, self.name, g.length, self.H, self.dh
        q, k, v = g.split(g.linear(x, f"{n}.qkv"), [self.d] * 3)
        heads = g.const([0, 0, H, dh], np.int64)  # [B, T, d] -> [B, T, H, dh]
        if self.cfg.qk_norm:
            q = op.Reshape(g.norm("layer", op.Reshape(q, heads), f"{n}.q_norm"), g.const([0, 0, self.d], np.int64))
            k = op.Reshape(g.norm("layer", op.Reshape(k, heads), f"{n}.k_norm"), g.const([0, 0, self.d], np.int64))
        # caches are kept head-major, keys transposed ([B, H, dh, W-1]) and values [B, H, W-1, dh],
        # so a step only reshapes its own new key and value
        q = op.Transpose(op.Reshape(q, heads), perm=[0, 2, 1, 3])  # [B, H, L, dh]
        kt, k_carry = g.history(state["k"], op.Transpose(op.Reshape(k, heads), perm=[0, 2, 3, 1]), self.W - 1, 3)
        vh, v_carry = g.history(state["v"], op.Transpose(op.Reshape(v, heads), perm=[0, 2, 1, 3]), self.W - 1, 2)
        batch = op.Shape(x, start=0, end=1)
        new = op.Expand(g.const(np.ones((1, L))), op.Concat(batch, g.const([L], np.int64), axis=0))
        valid, valid_carry = g.history(state["valid"], new, self.W - 1)  # [B, W-1+L]
        mask = op.Mul(op.Sub(op.Unsqueeze(valid, g.const([1, 2], np.int64)), 1.0), 1e9)  # [B, 1, 1, W-1+L]
        scores = op.Add(op.Add(op.Mul(op.MatMul(q, kt), 1 / math.sqrt(dh)), g.const(self.bias(L))), mask)
        o = op.MatMul(op.Softmax(scores, axis=-1), vh)  # [B, H, L, dh]
        o = op.Reshape(op.Transpose(o, perm=[0, 2, 1, 3]), g.const([0, 0, self.d], np.int64))
        return g.linear(o, f"{n}.out"), {"k": k_carry, "v": v_carry, "valid": valid_carry}


class GatedSSMLayer:
    """Per-channel gated linear recurrence (HGRN/minGRU-like) with a true step form:
    [u, z] = x W_in; u = SiLU(conv(u)); a = sigmoid(u W_a + b_a); h = a h + (1 - a) u;
    y = (h * SiLU(z)) W_out. Gates run on the whole window; only h is unrolled."""

    @staticmethod
    def state_shapes(cfg: GatedSSM, width: int) -> list:
        D = cfg.expand * width
        return [("h", (1, D))] + ([("conv", (cfg.conv - 1, D))] if cfg.conv else [])

    def __init__(self, name: str, cfg: GatedSSM, width: int, init: _Init, at: LayerAt):
        self.name, self.K = name, cfg.conv
        D = self.D = cfg.expand * width
        init.linear(f"{name}.in_proj", width, 2 * D, bias=False)
        if self.K:
            init.uniform(f"{name}.conv.weight", (self.K, D), 1 / math.sqrt(self.K))
            init.uniform(f"{name}.conv.bias", (D,), 1 / math.sqrt(self.K))
        init(f"{name}.gate.weight", init.rng.normal(0, 0.02, (D, D)))
        tau = np.exp(init.rng.uniform(math.log(4), math.log(256), D))  # memory of 4-256 frames
        init(f"{name}.gate.bias", np.log((1 - 1 / tau) / (1 / tau)))  # sigmoid(b) = 1 - 1/tau
        init.linear(f"{name}.out_proj", D, width, bias=False, scale=1 / math.sqrt(at.layers))
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n = g.op, self.name
        u, z = g.split(g.linear(x, f"{n}.in_proj", bias=False), [self.D, self.D])
        out = {}
        if self.K:
            u, out["conv"] = g.causal_conv(f"{n}.conv", u, state["conv"], self.K)
        u = g.silu(u)
        a = op.Sigmoid(g.linear(u, f"{n}.gate"))
        drive = op.Sub(u, op.Mul(a, u))  # (1 - a) u

        def step(frame, s):
            h = op.Add(op.Mul(frame[0], s["h"]), frame[1])
            return h, {"h": h}

        h, s = g.scan(step, [a, drive], {"h": state["h"]})
        out["h"] = s["h"]
        return g.linear(op.Mul(h, g.silu(z)), f"{n}.out_proj", bias=False), out


def _heads(g: Graph, x, heads: int):
    """[B, L, H * w] -> [B, H, L, w]."""
    return g.op.Transpose(g.op.Reshape(x, g.const([0, 0, heads, -1], np.int64)), perm=[0, 2, 1, 3])


def _merge_heads(g: Graph, y):
    """[B, H, L, w] -> [B, L, H * w]."""
    return g.op.Reshape(g.op.Transpose(y, perm=[0, 2, 1, 3]), g.const([0, 0, -1], np.int64))


def _pair_swap(width: int, pairs: int) -> np.ndarray:
    """[width, width]: x @ swap maps each of the first `pairs` channel pairs (x0, x1) to (-x1, x0)
    (and the other channels to 0); see `Graph.rotate_pairs`."""
    swap, j = np.zeros((width, width)), np.arange(pairs)
    swap[2 * j + 1, 2 * j], swap[2 * j, 2 * j + 1] = -1.0, 1.0
    return swap


class _SSMHeads:
    """What Mamba-2 and Mamba-3 share: the inner width expand x hidden in heads of head_dim
    (`heads`), a time step per head and frame (`time_steps`) and the skip D x per head (`skip`)."""

    width_unit = staticmethod(lambda cfg: cfg.head_dim)

    def heads(self, kind: str, cfg, width: int) -> None:
        D = cfg.expand * width
        if D % cfg.head_dim:
            raise SpecError(f"{kind}: expand x hidden = {D} is not divisible by head_dim = {cfg.head_dim}")
        self.D, self.N, self.H, self.P = D, cfg.state, D // cfg.head_dim, cfg.head_dim

    def time_steps(self, g: Graph, dt):
        """softplus(dt + dt_bias): [B, L, H] -> [B, H, L]."""
        return g.op.Transpose(g.softplus(g.op.Add(dt, g.param(f"{self.name}.dt_bias"))), perm=[0, 2, 1])

    def skip(self, g: Graph, y, x):
        """y + D_h x per head, both [B, H, L, P]."""
        op = g.op
        return op.Add(y, op.Mul(x, op.Reshape(g.param(f"{self.name}.D"), g.const([self.H, 1, 1], np.int64))))


class Mamba2Layer(_SSMHeads):
    """Mamba-2: in_proj -> [z, xBC, dt]; xBC through a causal depthwise conv and SiLU; per head
    a scalar decay exp(dt A) over a [P, N] state driven by (dt x) B^T and read by C
    (`Graph.decayed_attention`); plus D x; gated RMSNorm of y * SiLU(z); out_proj.
    States: the last K-1 conv inputs and h [H, P, N]."""

    @staticmethod
    def state_shapes(cfg: Mamba2, width: int) -> list:
        D = cfg.expand * width
        return [("conv", (cfg.conv - 1, D + 2 * cfg.state)), ("ssm", (D // cfg.head_dim, cfg.head_dim, cfg.state))]

    def __init__(self, name: str, cfg: Mamba2, width: int, init: _Init, at: LayerAt):
        self.heads("mamba2", cfg, width)
        self.name, self.cfg, D = name, cfg, self.D
        conv = D + 2 * self.N
        init.linear(f"{name}.in_proj", width, D + conv + self.H, bias=False)
        init.uniform(f"{name}.conv.weight", (cfg.conv, conv), 1 / math.sqrt(cfg.conv))
        init.uniform(f"{name}.conv.bias", (conv,), 1 / math.sqrt(cfg.conv))
        init.step_bias(f"{name}.dt_bias", self.H)
        init(f"{name}.A_log", np.log(init.rng.uniform(1, 16, self.H)))
        init(f"{name}.D", np.ones(self.H))
        init.norm("rms", f"{name}.norm", D)
        init.linear(f"{name}.out_proj", D, width, bias=False, scale=1 / math.sqrt(at.layers))
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n, H = g.op, self.name, self.H
        z, xbc, dt = g.split(g.linear(x, f"{n}.in_proj", bias=False), [self.D, self.D + 2 * self.N, H])
        xbc, conv_state = g.causal_conv(f"{n}.conv", xbc, state["conv"], self.cfg.conv)
        u, b, c = g.split(g.silu(xbc), [self.D, self.N, self.N])
        dt = self.time_steps(g, dt)  # [B, H, L]
        heads = _heads(g, u, H)  # [B, H, L, P]
        last, one = g.const([-1], np.int64), g.const([1], np.int64)
        log_decay = op.Unsqueeze(op.Mul(dt, op.Neg(op.Unsqueeze(op.Exp(g.param(f"{n}.A_log")), last))), last)
        y, h = g.decayed_attention(op.Unsqueeze(c, one), op.Unsqueeze(b, one), op.Mul(heads, op.Unsqueeze(dt, last)),
                                   log_decay, state["ssm"], self.cfg.chunk)  # decay exp(dt A) per head
        y = _merge_heads(g, self.skip(g, y, heads))
        y = g.norm("rms", op.Mul(y, g.silu(z)), f"{n}.norm")
        return g.linear(y, f"{n}.out_proj", bias=False), {"conv": conv_state, "ssm": h}


class Mamba3Layer(_SSMHeads):
    """Mamba-3, the SISO form of Lahoti, Li, Chen, Wang, Bick, Kolter, Dao and Gu, "Mamba-3:
    Improved Sequence Modeling using State Space Principles" (ICLR 2026, arXiv:2603.15569).

    Per frame t and head h (x_t [P] the head's slice of the inner input, B_t, C_t [N] shared):

        [z, x, B, C, d, a, l, phi] = input W_in                 (no convolution)
        dt_t  = softplus(d_t + dt_bias),  A_t = -max(softplus(a_t), 1e-4)     (A data-dependent)
        alpha_t = exp(dt_t A_t),  lambda_t = sigmoid(l_t)
        beta_t  = (1 - lambda_t) dt_t alpha_t,  gamma_t = lambda_t dt_t        (trapezoid weights)
        k_t = RMSNorm(B_t) w_B + b_B[h],  q_t = RMSNorm(C_t) w_C + b_C[h]      (BC norm, BC biases)
        theta_t = theta_{t-1} + pi tanh(phi_t) dt_t             (one angle per rotated pair j)
        h_t = alpha_t h_{t-1} + beta_t x_{t-1} (R(theta_{t-1}) k_{t-1})^T + gamma_t x_t (R(theta_t) k_t)^T
        y_t = h_t R(theta_t) q_t + D_h x_t,  out_t = (y_t * SiLU(z_t)) W_out

    R(theta) rotates the first 2 * floor(rope N / 2) channels in pairs (2j, 2j + 1) by theta_j
    and leaves the others: the data-dependent rotary form of a complex-valued state update.

    Window form: the trapezoid is a weight per source frame, gamma_s + (1 - lambda_{s+1}) dt_{s+1}
    (the next frame's share; 0 after the window's last frame), less that share at s = t, so
    `Graph.decayed_attention` with the rotated keys and queries computes it in chunks; the
    carried previous frame enters the initial state as (1 - lambda_1) dt_1 x_0 (R(theta_0) k_0)^T.
    The angles are carried as the unit vector (cos theta - 1, sin theta) per head and pair
    (zeros: angle 0), so no angle grows without bound; inside a window they add the window's
    own angles, a cumulative sum (a triangular MatMul), through the angle-sum formulas, and the
    cosine is sin(. + pi / 2). The step graph is the same code over one frame. States: h
    [H, P, N], the previous frame's RMSNorm(B) w_B [N] and x [inner width], and the angles.

    Left out: MIMO (rank-r inputs and outputs per head; it adds work per frame to use an
    accelerator's idle compute, and the SISO form is the paper's base model), B/C groups other
    than one shared by all heads, and the optional RMSNorm before out_proj."""

    @staticmethod
    def state_shapes(cfg: Mamba3, width: int) -> list:
        D, N, H, pairs = cfg.expand * width, cfg.state, cfg.expand * width // cfg.head_dim, int(cfg.rope * cfg.state) // 2
        return [("ssm", (H, cfg.head_dim, N)), ("B", (1, N)), ("x", (1, D))] + \
            ([("cos", (H, pairs)), ("sin", (H, pairs))] if pairs else [])

    def __init__(self, name: str, cfg: Mamba3, width: int, init: _Init, at: LayerAt):
        self.heads("mamba3", cfg, width)
        self.name, self.cfg, N, H = name, cfg, self.N, self.H
        self.pairs = int(cfg.rope * N) // 2  # rotated channel pairs, one angle each
        self.sizes = [self.D, self.D, N, N, H, H, H] + ([self.pairs] if self.pairs else [])
        init.linear(f"{name}.in_proj", width, sum(self.sizes), bias=False)
        init.step_bias(f"{name}.dt_bias", H)
        for bc in ("B", "C"):
            init.norm("rms", f"{name}.{bc}_norm", N)
            init(f"{name}.{bc}_bias", np.ones((H, 1, N)))
        init(f"{name}.D", np.ones(H))
        init.linear(f"{name}.out_proj", self.D, width, bias=False, scale=1 / math.sqrt(at.layers))
        self.swap = _pair_swap(N, self.pairs)
        self.spread = np.zeros((max(self.pairs, 1), N))  # an angle per pair -> on both its channels
        self.spread[np.arange(self.pairs).repeat(2), np.arange(2 * self.pairs)] = 1.0
        self.states = self.state_shapes(cfg, width)

    def angles(self, g: Graph, phi, dt, state: dict):
        """cos and sin [B, H, L, pairs] of theta_t (t = 1..L) and of theta_0 ([B, H, 1, pairs]),
        and the carried (cos theta_L - 1, sin theta_L): from phi [B, L, pairs] and dt [B, H, L, 1]."""
        op, L, i64 = g.op, g.length, (lambda v: g.const(v, np.int64))
        c0, s0 = op.Add(state["cos"], 1.0), state["sin"]  # [B, H, pairs], renormalised
        norm = op.Sqrt(op.Add(op.Add(op.Mul(c0, c0), op.Mul(s0, s0)), 1e-24))
        c0, s0 = (op.Unsqueeze(op.Div(v, norm), i64([2])) for v in (c0, s0))
        step = op.Mul(op.Unsqueeze(op.Mul(op.Tanh(phi), math.pi), i64([1])), dt)  # [B, H, L, pairs]
        own = op.MatMul(g.const(np.tril(np.ones((L, L)))), step)  # the window's own angles
        c, s = op.Sin(op.Add(own, math.pi / 2)), op.Sin(own)
        cos, sin = op.Sub(op.Mul(c0, c), op.Mul(s0, s)), op.Add(op.Mul(s0, c), op.Mul(c0, s))
        last = lambda v: op.Squeeze(op.Slice(v, i64([L - 1]), i64([L]), i64([2])), i64([2]))
        return (cos, sin), (c0, s0), {"cos": op.Sub(last(cos), 1.0), "sin": last(sin)}

    def rotate(self, g: Graph, v, angle):
        """v [..., N] rotated by the angles (cos, sin) [..., pairs] on its pairs of channels."""
        op, ones = g.op, 1 - self.spread.sum(0)  # cos 1 on the channels left alone
        cos, sin = (op.MatMul(a, g.const(self.spread)) for a in angle)
        return g.rotate_pairs(v, op.Add(cos, g.const(ones)), sin, self.swap)

    def trapezoid(self, g: Graph, qk, rotated, xh, carried, lam, dt, log_alpha):
        """y [B, H, L, P] and the last h of the trapezoidal recurrence: q and k [B, H, L, N] as
        they are (`qk`) and rotated; x per head; the carried x_0, rotated k_0 and h_0; lambda, dt
        and dt A [B, H, L, 1]."""
        op, L, i64 = g.op, g.length, (lambda v: g.const(v, np.int64))
        (q, k), (qr, kr), (x0, k0, ssm) = qk, rotated, carried
        prev = op.Mul(op.Sub(g.const(1.0), lam), dt)  # (1 - lambda_t) dt_t: the trapezoid's weight on frame t - 1
        first = op.Slice(prev, i64([0]), i64([1]), i64([2]))
        h0 = op.Add(ssm, op.Mul(first, op.MatMul(op.Transpose(x0, perm=[0, 1, 3, 2]), k0)))
        weight = op.Mul(lam, dt)
        if L > 1:  # each source frame's key also carries the next frame's trapezoid share ...
            later = op.Pad(op.Slice(prev, i64([1]), i64([L]), i64([2])), i64([0, 0, 0, 0, 0, 0, 1, 0]))
            weight = op.Add(weight, later)
        y, h = g.decayed_attention(qr, op.Mul(kr, weight), xh, log_alpha, h0, self.cfg.chunk)
        if L > 1:  # ... which reaches only later frames: taken off the frame itself
            qk = op.ReduceSum(op.Mul(q, k), i64([-1]), keepdims=1)  # rotations cancel in q_t . k_t
            y = op.Sub(y, op.Mul(op.Mul(qk, later), xh))
        return y, h

    def __call__(self, g: Graph, x, state: dict):
        op, n, L = g.op, self.name, g.length
        i64, T = (lambda v: g.const(v, np.int64)), (lambda v: op.Transpose(v, perm=[0, 2, 1]))
        z, u, b, c, d, a, lam, *phi = g.split(g.linear(x, f"{n}.in_proj", bias=False), self.sizes)
        per_head = lambda v: op.Unsqueeze(v, i64([-1]))  # [B, H, L] -> [B, H, L, 1]
        dt, lam = per_head(self.time_steps(g, d)), per_head(op.Sigmoid(T(lam)))
        log_alpha = op.Mul(op.Neg(op.Max(g.softplus(per_head(T(a))), g.const(1e-4))), dt)  # dt A
        b = g.norm("rms", b, f"{n}.B_norm")  # [B, L, N], carried as the next window's k_0
        bias = lambda v, bc: op.Add(op.Unsqueeze(v, i64([1])), g.param(f"{n}.{bc}_bias"))  # [B, H, L, N]
        k, q, xh = bias(b, "B"), bias(g.norm("rms", c, f"{n}.C_norm"), "C"), _heads(g, u, self.H)
        k0, x0 = bias(state["B"], "B"), _heads(g, state["x"], self.H)  # the previous frame, [B, H, 1, .]
        qr, kr, out = q, k, {}  # rotated by the angles, if any
        if phi:
            now, before, out = self.angles(g, phi[0], dt, state)
            qr, kr, k0 = self.rotate(g, q, now), self.rotate(g, k, now), self.rotate(g, k0, before)
        y, h = self.trapezoid(g, (q, k), (qr, kr), xh, (x0, k0, state["ssm"]), lam, dt, log_alpha)
        y = op.Mul(_merge_heads(g, self.skip(g, y, xh)), g.silu(z))
        last = lambda v: op.Slice(v, i64([L - 1]), i64([L]), i64([1]))
        return g.linear(y, f"{n}.out_proj", bias=False), {**out, "ssm": h, "B": last(b), "x": last(u)}


class GLALayer:
    """GLA: q, k, v, output gate g; per key channel log decay logsigmoid(x W_a W_b + b) / norm;
    h = diag(decay) h + v k^T per head (`Graph.decayed_attention`), y = h q / sqrt(key width);
    RMSNorm per head, times SiLU(g); out projection. State: h [H, value, key] per head."""

    width_unit = staticmethod(lambda cfg: 2 * cfg.heads)

    @staticmethod
    def state_shapes(cfg: GLA, width: int) -> list:
        K, V, H = round(cfg.expand_k * width), round(cfg.expand_v * width), cfg.heads
        return [("ssm", (H, V // H, K // H))]

    def __init__(self, name: str, cfg: GLA, width: int, init: _Init, at: LayerAt):
        K, V, H = round(cfg.expand_k * width), round(cfg.expand_v * width), cfg.heads
        if K % H or V % H:
            raise SpecError(f"gla: key width {K} and value width {V} must both be divisible by heads = {H}")
        self.name, self.cfg, self.K, self.V, self.H = name, cfg, K, V, H
        normal = lambda n, shape: init(n, init.rng.normal(0, 0.02, shape))
        for proj, out in (("q", K), ("k", K), ("v", V), ("g", V)):
            normal(f"{name}.{proj}_proj.weight", (width, out))
        normal(f"{name}.gk_a.weight", (width, cfg.gate_rank))
        normal(f"{name}.gk_b.weight", (cfg.gate_rank, K))
        init(f"{name}.gk_b.bias", np.zeros(K))
        init.norm("rms", f"{name}.norm", V // H)
        normal(f"{name}.o_proj.weight", (V, width))
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n, H = g.op, self.name, self.H
        proj = lambda p: g.linear(x, f"{n}.{p}_proj", bias=False)
        gate = g.linear(g.linear(x, f"{n}.gk_a", bias=False), f"{n}.gk_b")
        log_decay = op.Div(op.Neg(g.softplus(op.Neg(gate))), self.cfg.normalizer)  # logsigmoid / normalizer
        q = op.Mul(_heads(g, proj("q"), H), (self.K // H) ** -0.5)
        y, h = g.decayed_attention(q, _heads(g, proj("k"), H), _heads(g, proj("v"), H), _heads(g, log_decay, H),
                                   state["ssm"], self.cfg.chunk, per_key=True)
        y = _merge_heads(g, g.norm("rms", y, f"{n}.norm"))
        return g.linear(op.Mul(y, g.silu(proj("g"))), f"{n}.o_proj", bias=False), {"ssm": h}


class HGRN2Layer:
    """HGRN-2: q = SiLU(x W_q), forget gate f = lb + (1 - lb) sigmoid(x W_f) per key channel,
    key 1 - f, value x W_i; h = diag(f) h + v (1 - f)^T per head, y = h q / sqrt(key width);
    RMSNorm; out projection. State: h [H, value, key] per head."""

    width_unit = staticmethod(lambda cfg: cfg.heads)

    state_shapes = staticmethod(lambda cfg, width: [("ssm", (cfg.heads, width // cfg.heads, width // cfg.heads))])

    def __init__(self, name: str, cfg: HGRN2, width: int, init: _Init, at: LayerAt):
        if width % cfg.heads:
            raise SpecError(f"hgrn2: hidden size {width} is not divisible by heads = {cfg.heads}")
        self.name, self.cfg, self.H, self.E = name, cfg, cfg.heads, width // cfg.heads
        for proj in ("q", "f", "i"):
            init.linear(f"{name}.{proj}_proj", width, width, bias=False)
        init.norm("rms", f"{name}.norm", width)
        init.linear(f"{name}.o_proj", width, width, bias=False, scale=1 / math.sqrt(at.layers))
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n, H, lb = g.op, self.name, self.H, self.cfg.lower_bound
        proj = lambda p: g.linear(x, f"{n}.{p}_proj", bias=False)
        f = proj("f")
        if lb:  # log(lb + (1 - lb) sigmoid(f)): bounded away from log 0
            log_f = op.Log(op.Add(op.Mul(op.Sigmoid(f), 1 - lb), lb))
        else:
            log_f = op.Neg(g.softplus(op.Neg(f)))  # logsigmoid
        key = op.Mul(op.Sigmoid(op.Neg(f)), 1 - lb)  # 1 - f
        q = op.Mul(_heads(g, g.silu(proj("q")), H), self.E ** -0.5)
        y, h = g.decayed_attention(q, _heads(g, key, H), _heads(g, proj("i"), H), _heads(g, log_f, H),
                                   state["ssm"], self.cfg.chunk, per_key=True)
        y = g.norm("rms", _merge_heads(g, y), f"{n}.norm")
        return g.linear(y, f"{n}.o_proj", bias=False), {"ssm": h}


class RetNetLayer:
    """Retention: q, k (scaled by 1/sqrt(key width)) rotated by angle t theta_j on pairs of key
    channels at window position t = 1..L, v, gate g; per head S_t = gamma R^T S_{t-1} + k_t v_t^T,
    o_t = q_t S_t: with the rotations written into q and k, that is a fixed-decay
    `Graph.decayed_attention`, and the state leaves the window rotated back by L theta (so the
    step needs no position). RMSNorm per head (no weights), times SiLU(g), out projection."""

    width_unit = staticmethod(lambda cfg: 2 * cfg.heads)

    state_shapes = staticmethod(lambda cfg, width: [("ssm", (cfg.heads, cfg.value_factor * width // cfg.heads,
                                                              width // cfg.heads))])

    def __init__(self, name: str, cfg: RetNet, width: int, init: _Init, at: LayerAt):
        V, H = cfg.value_factor * width, cfg.heads
        if width % (2 * H):
            raise SpecError(f"retnet: hidden size {width} is not divisible by 2 x heads = {2 * H}")
        self.name, self.cfg, self.V, self.H, self.dk = name, cfg, V, H, width // H
        for proj, out in (("q", width), ("k", width), ("v", V), ("g", V)):
            init.linear(f"{name}.{proj}_proj", width, out, bias=False)
        init.linear(f"{name}.out_proj", V, width, bias=False, scale=1 / math.sqrt(at.layers))
        self.log_gamma = np.log(1 - 2.0 ** (-5 - np.arange(H)))
        half = self.dk // 2
        self.theta = np.repeat(10000.0 ** (-np.arange(half) / max(half - 1, 1)), 2)  # per key channel
        self.swap = _pair_swap(self.dk, half)
        self.states = self.state_shapes(cfg, width)

    def rotate(self, g: Graph, x, angle: np.ndarray):
        """x [..., n, dk] rotated by `angle` [n, dk] on each pair of key channels."""
        return g.rotate_pairs(x, g.const(np.cos(angle)), g.const(np.sin(angle)), self.swap)

    def __call__(self, g: Graph, x, state: dict):
        op, n, H, L = g.op, self.name, self.H, g.length
        proj = lambda p: g.linear(x, f"{n}.{p}_proj", bias=False)
        at = np.arange(1, L + 1)[:, None] * self.theta  # [L, dk]
        q = self.rotate(g, _heads(g, proj("q"), H), at)
        k = self.rotate(g, op.Mul(_heads(g, proj("k"), H), self.dk ** -0.5), at)
        log_gamma = g.const(np.broadcast_to(self.log_gamma[None, :, None, None], (1, H, L, 1)))
        y, h = g.decayed_attention(q, k, _heads(g, proj("v"), H), log_gamma, state["ssm"], self.cfg.chunk)
        h = self.rotate(g, h, -L * self.theta[None, :])
        y = _merge_heads(g, g.norm("rms", y, None))
        return g.linear(op.Mul(y, g.silu(proj("g"))), f"{n}.out_proj", bias=False), {"ssm": h}


class RWKV7Layer:
    """RWKV-7 time mixing (x070). Per frame, with x_* = x + (x_prev - x) mu_*: r, k, v
    projections; decay w = exp(-e^-0.5 sigmoid(w0 + tanh(x_w W1) W2)); in-context rate a =
    sigmoid(a0 + x_a A1 A2); gate g = sigmoid(x_g G1) G2; the first layer's v is mixed into
    later layers' v (value residual); kk = L2-normalised k k_k per head, k <- k (1 + (a - 1) k_a);
    per head S <- S diag(w) - (S kk)(a kk)^T + v k^T, y = S r; per-head LayerNorm plus
    (sum r k r_k) v; out = (y g) W_o. States: x_prev [1, C] and S [H, N, N]."""

    width_unit = staticmethod(lambda cfg: cfg.head_size)

    state_shapes = staticmethod(lambda cfg, width: [("shift", (1, width)),
                                                    ("wkv", (width // cfg.head_size, cfg.head_size, cfg.head_size))])

    def __init__(self, name: str, cfg: RWKV7, width: int, init: _Init, at: LayerAt):
        C, N = width, cfg.head_size
        if C % N:
            raise SpecError(f"rwkv7: hidden size {C} is not divisible by head_size = {N}")
        self.name, self.C, self.N, self.H = name, C, N, C // N
        self.first = at.first  # its values are passed on to the later RWKV-7 layers
        self.ranks = {"w": cfg.lora, "a": cfg.lora, "g": cfg.gate_lora, **({} if self.first else {"v": cfg.lora})}
        depth = at.depth
        i = np.arange(C) / C
        for mix, power in (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2)):
            init(f"{name}.mu_{mix}", 1 - i ** (power * (1 - depth)))
        lin = np.arange(C) / max(C - 1, 1) - 0.5
        z = ((np.arange(C) % N) - (N - 1) / 2) / max((N - 1) / 2, 1)
        zigzag = np.sign(z) * z ** 2
        init(f"{name}.w0", -6 + 6 * (np.arange(C) / max(C - 1, 1)) ** (1 + depth ** 0.3) + 0.5 + 2.5 * zigzag)
        init(f"{name}.a0", -0.19 + 0.3 * zigzag + 0.4 * lin)
        if not self.first:
            init(f"{name}.v0", 0.73 - 0.4 * lin)
        for lora, r in self.ranks.items():  # first factor zero, second small: starts at the biases
            init(f"{name}.{lora}1", np.zeros((C, r)))
            init(f"{name}.{lora}2", init.rng.normal(0, 0.1 / math.sqrt(r), (r, C)))
        init(f"{name}.k_k", 0.71 - 0.1 * lin)
        init(f"{name}.k_a", np.full(C, 1.02))
        init(f"{name}.r_k", np.full((self.H, N), -0.04))
        for proj, bound in (("r", 0.5), ("k", 0.05), ("v", 0.5)):
            init.uniform(f"{name}.{proj}_proj.weight", (C, C), bound / math.sqrt(C))
        init(f"{name}.o_proj.weight", np.zeros((C, C)))
        init.norm("layer", f"{name}.ln_x", C)
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n, H, N = g.op, self.name, self.H, self.N
        prev, shift = g.token_shift(x, state["shift"])
        delta = op.Sub(prev, x)
        xs = {m: op.Add(x, op.Mul(delta, g.param(f"{n}.mu_{m}"))) for m in "rwkvag"}
        lora = lambda m, inner: op.MatMul(inner(op.MatMul(xs[m], g.param(f"{n}.{m}1"))), g.param(f"{n}.{m}2"))
        r = g.linear(xs["r"], f"{n}.r_proj", bias=False)
        k = g.linear(xs["k"], f"{n}.k_proj", bias=False)
        v = g.linear(xs["v"], f"{n}.v_proj", bias=False)
        w = op.Exp(op.Mul(op.Sigmoid(op.Add(g.param(f"{n}.w0"), lora("w", op.Tanh))), -math.exp(-0.5)))
        if self.first:  # its values are passed on to the later RWKV-7 layers
            g.shared["rwkv7.v_first"] = v
        else:
            mixv = op.Sigmoid(op.Add(g.param(f"{n}.v0"), lora("v", lambda t: t)))
            v = op.Add(v, op.Mul(op.Sub(g.shared["rwkv7.v_first"], v), mixv))
        a = op.Sigmoid(op.Add(g.param(f"{n}.a0"), lora("a", lambda t: t)))
        gate = lora("g", op.Sigmoid)
        heads = g.const([0, 0, H, N], np.int64)
        kk = op.Reshape(op.Mul(k, g.param(f"{n}.k_k")), heads)
        kk = op.Div(kk, op.Sqrt(op.Add(op.ReduceSum(op.Mul(kk, kk), g.const([-1], np.int64), keepdims=1), 1e-12)))
        k = op.Mul(k, op.Add(op.Mul(op.Sub(a, 1.0), g.param(f"{n}.k_a")), 1.0))
        rh, kh, vh, wh, ah = (op.Reshape(t, heads) for t in (r, k, v, w, a))
        col, row = g.const([-1], np.int64), g.const([-2], np.int64)

        def wkv(frame, s):  # S [B, 1, H, N(v), N(k)], all per head
            rt, kt, vt, wt, at, kkt = frame
            S = s["wkv"]
            S = op.Add(op.Sub(op.Mul(S, op.Unsqueeze(wt, row)),
                              op.MatMul(op.MatMul(S, op.Unsqueeze(kkt, col)), op.Unsqueeze(op.Mul(at, kkt), row))),
                       op.MatMul(op.Unsqueeze(vt, col), op.Unsqueeze(kt, row)))
            return op.Squeeze(op.MatMul(S, op.Unsqueeze(rt, col)), col), {"wkv": S}

        state_in = op.Unsqueeze(state["wkv"], g.const([1], np.int64))
        y, s = g.scan(wkv, [rh, kh, vh, wh, ah, kk], {"wkv": state_in})  # y [B, L, H, N]
        y = op.Sub(y, op.ReduceMean(y, col, keepdims=1))  # GroupNorm over each head, eps 64e-5
        y = op.Div(y, op.Sqrt(op.Add(op.ReduceMean(op.Mul(y, y), col, keepdims=1), 64e-5)))
        y = op.Reshape(y, g.const([0, 0, self.C], np.int64))
        y = op.Add(op.Mul(y, g.param(f"{n}.ln_x.weight")), g.param(f"{n}.ln_x.bias"))
        bonus = op.ReduceSum(op.Mul(op.Mul(rh, kh), g.param(f"{n}.r_k")), col, keepdims=1)  # [B, L, H, 1]
        y = op.Add(y, op.Reshape(op.Mul(bonus, vh), g.const([0, 0, self.C], np.int64)))
        out = g.linear(op.Mul(y, gate), f"{n}.o_proj", bias=False)
        return out, {"shift": shift, "wkv": op.Squeeze(s["wkv"], g.const([1], np.int64))}


class RWKV7FFNLayer:
    """RWKV-7 channel mixing: k = ReLU((x + (x_prev - x) mu_k) W_key)^2, out = k W_value.
    State: x_prev [1, C]."""

    state_shapes = staticmethod(lambda cfg, width: [("shift", (1, width))])

    def __init__(self, name: str, cfg: RWKV7FFN, width: int, init: _Init, at: LayerAt):
        self.name = name
        depth = at.depth
        init(f"{name}.mu_k", 1 - (np.arange(width) / width) ** ((1 - depth) ** 4))
        init.uniform(f"{name}.key.weight", (width, cfg.expand * width), 0.5 / math.sqrt(width))
        init(f"{name}.value.weight", np.zeros((cfg.expand * width, width)))
        self.states = self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n = g.op, self.name
        prev, shift = g.token_shift(x, state["shift"])
        k = op.Relu(g.linear(op.Add(x, op.Mul(op.Sub(prev, x), g.param(f"{n}.mu_k"))), f"{n}.key", bias=False))
        return g.linear(op.Mul(k, k), f"{n}.value", bias=False), {"shift": shift}


class CfCLayer:
    """CfC: z = lecun_tanh([x, h] W_bb + b) (1.7159 tanh(0.666 .)); f1 = tanh(z W_1 + b_1),
    f2 = tanh(z W_2 + b_2); tau = sigmoid(z W_t + b_t) (its time_a * t + time_b with the time
    step t = 1 frame: one head); h = f1 (1 - tau) + tau f2. The input part of the backbone runs
    on the whole window; the rest is unrolled. State: h."""

    state_shapes = staticmethod(lambda cfg, width: [("h", (1, width))])

    def __init__(self, name: str, cfg: CfC, width: int, init: _Init, at: LayerAt):
        U = cfg.backbone
        xavier = lambda n, shape: init.uniform(n, shape, math.sqrt(6 / sum(shape)))
        xavier(f"{name}.backbone_x.weight", (width, U))
        xavier(f"{name}.backbone_h.weight", (width, U))
        init.uniform(f"{name}.backbone.bias", (U,), 1 / math.sqrt(2 * width))
        for head in ("ff1", "ff2", "time"):
            xavier(f"{name}.{head}.weight", (U, width))
            init.uniform(f"{name}.{head}.bias", (width,), 1 / math.sqrt(U))
        self.name, self.states = name, self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n = g.op, self.name
        xb = op.Add(op.MatMul(x, g.param(f"{n}.backbone_x.weight")), g.param(f"{n}.backbone.bias"))
        w_h = g.param(f"{n}.backbone_h.weight")

        def cell(frame, s):
            z = op.Mul(op.Tanh(op.Mul(op.Add(frame[0], op.MatMul(s["h"], w_h)), 0.666)), 1.7159)
            f1, f2 = (op.Tanh(g.linear(z, f"{n}.{head}")) for head in ("ff1", "ff2"))
            tau = op.Sigmoid(g.linear(z, f"{n}.time"))
            h = op.Add(f1, op.Mul(tau, op.Sub(f2, f1)))  # f1 (1 - tau) + tau f2
            return h, {"h": h}

        return g.scan(cell, [xb], state)


def _hippo_n(states: int) -> np.ndarray:
    """The eigenvalues of S5's HiPPO-N matrix (the normal part of HiPPO-LegS) for 2 x states
    real states, one of each conjugate pair: real parts -1/2, imaginary parts > 0."""
    n = np.arange(2 * states)
    legs = -np.sqrt(np.outer(2 * n + 1, 2 * n + 1)) * (n[:, None] > n[None, :]) - np.diag(n + 1)
    root = np.sqrt(n + 0.5)
    eig = np.linalg.eigvals(legs + np.outer(root, root))
    return eig[np.argsort(-eig.imag)][:states]


class S5Layer:
    """S5 in real arithmetic: the discrete eigenvalue lambda = r (cos, sin) per state, with
    r = exp(-exp(nu)) and the angle a learned unit vector rho / |rho| (LRU-style; started from the
    zero-order hold of HiPPO-N with steps log-uniform in [1e-3, 1e-1]); x_t = lambda x_{t-1} +
    u_t B; y = 2 Re(x C) + D u, then S5's GLU: g = GELU(y), out = g sigmoid(g W + b). The window
    is x = T u with the Toeplitz powers of lambda (made by L complex products per window) plus
    lambda^(t+1) x_0. States: the real and imaginary parts of x."""

    state_shapes = staticmethod(lambda cfg, width: [("re", (1, cfg.state)), ("im", (1, cfg.state))])

    def __init__(self, name: str, cfg: S5, width: int, init: _Init, at: LayerAt):
        P = cfg.state
        lam = _hippo_n(P)
        step = np.exp(init.rng.uniform(math.log(1e-3), math.log(1e-1), P))
        angle = lam.imag * step
        init(f"{name}.nu", np.log(-lam.real * step))
        init(f"{name}.rho", np.stack([np.cos(angle), np.sin(angle)], -1))
        for part in ("re", "im"):
            init(f"{name}.B_{part}", init.rng.normal(0, 1 / math.sqrt(width), (width, P)) * step)
            init(f"{name}.C_{part}", init.rng.normal(0, 0.5 / math.sqrt(P), (P, width)))
        init(f"{name}.D", init.rng.normal(0, 1, width))
        init.linear(f"{name}.glu", width, width)
        self.name, self.P, self.states = name, P, self.state_shapes(cfg, width)

    def __call__(self, g: Graph, x, state: dict):
        op, n, L, P = g.op, self.name, g.length, self.P
        i64 = lambda v: g.const(v, np.int64)
        rho = g.param(f"{n}.rho")
        unit = op.Div(rho, op.Sqrt(op.ReduceSum(op.Mul(rho, rho), i64([-1]), keepdims=1)))
        cos, sin = g.split(op.Mul(unit, op.Unsqueeze(op.Exp(op.Neg(op.Exp(g.param(f"{n}.nu")))), i64([-1]))), [1, 1])
        a, b = op.Squeeze(cos, i64([-1])), op.Squeeze(sin, i64([-1]))  # lambda = a + i b, [P]
        powers = [(g.const(np.ones(P)), g.const(np.zeros(P)))]  # lambda^0 .. lambda^L
        for _ in range(L):
            re, im = powers[-1]
            powers.append((op.Sub(op.Mul(re, a), op.Mul(im, b)), op.Add(op.Mul(re, b), op.Mul(im, a))))
        stacked = [op.Concat(*[op.Unsqueeze(p[j], i64([0])) for p in powers], axis=0) for j in (0, 1)]  # [L+1, P]
        t, s = np.arange(L)[:, None], np.arange(L)[None, :]
        toeplitz = [op.Transpose(op.Mul(op.Gather(w, g.const(np.clip(t - s, 0, L), np.int64), axis=0),
                                        g.const((t >= s)[:, :, None].astype(np.float32))), perm=[2, 0, 1])
                    for w in stacked]  # [P, t, s]: lambda^(t - s) below the diagonal
        col = lambda v: op.Unsqueeze(op.Transpose(v, perm=[0, 2, 1]), i64([-1]))  # [B, L, P] -> [B, P, L, 1]
        u_re, u_im = (col(op.MatMul(x, g.param(f"{n}.B_{part}"))) for part in ("re", "im"))
        T_re, T_im = toeplitz
        x_re = op.Sub(op.MatMul(T_re, u_re), op.MatMul(T_im, u_im))
        x_im = op.Add(op.MatMul(T_re, u_im), op.MatMul(T_im, u_re))
        back = lambda v: op.Transpose(op.Squeeze(v, i64([-1])), perm=[0, 2, 1])  # -> [B, L, P]
        later = [op.Slice(w, i64([1]), i64([L + 1]), i64([0])) for w in stacked]  # lambda^(t+1), [L, P]
        x0_re, x0_im = state["re"], state["im"]
        x_re = op.Add(back(x_re), op.Sub(op.Mul(later[0], x0_re), op.Mul(later[1], x0_im)))
        x_im = op.Add(back(x_im), op.Add(op.Mul(later[0], x0_im), op.Mul(later[1], x0_re)))
        y = op.Mul(op.Sub(op.MatMul(x_re, g.param(f"{n}.C_re")), op.MatMul(x_im, g.param(f"{n}.C_im"))), 2.0)
        y = g.activation("gelu", op.Add(y, op.Mul(x, g.param(f"{n}.D"))))
        out = op.Mul(y, op.Sigmoid(g.linear(y, f"{n}.glu")))
        last = lambda v: op.Slice(v, i64([L - 1]), i64([L]), i64([1]))
        return out, {"re": last(x_re), "im": last(x_im)}


MIXERS = {Dense: DenseLayer, LSTM: LSTMLayer, GRU: GRULayer, Mamba: MambaLayer, Attention: AttentionLayer,
          GatedSSM: GatedSSMLayer, Mamba2: Mamba2Layer, Mamba3: Mamba3Layer, GLA: GLALayer, HGRN2: HGRN2Layer,
          RetNet: RetNetLayer, RWKV7: RWKV7Layer, RWKV7FFN: RWKV7FFNLayer,
          CfC: CfCLayer, S5: S5Layer}


def _spec_settings(cls, spec: Spec) -> dict:
    """What a mixer class takes from the spec beyond its own settings and the width."""
    return {"window": spec.window} if cls is AttentionLayer else {}


def spec_states(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """A spec's carried state tensors as `Model.states` lists them, from its mixers' declarations
    (`state_shapes`), without building the model."""
    return [(f"layers.{i}.mixer.{s}", shape) for i, block in enumerate(spec.layers)
            for cls in [MIXERS[type(block.mixer)]]
            for s, shape in cls.state_shapes(block.mixer, spec.hidden, **_spec_settings(cls, spec))]


def estimate_params(spec: Spec) -> int:
    """A spec's parameter count without allocating it: counts are a quadratic in the width, so
    three small copies of the spec give it (exactly at widths that are multiples of 16)."""
    # a mixer with heads needs a width its `width_unit` divides
    base = math.lcm(16, *[getattr(MIXERS[type(b.mixer)], "width_unit", lambda cfg: 1)(b.mixer) for b in spec.blocks])
    xs = [base, 2 * base, 3 * base]
    ys = [sum(v.size for v in Model(msgspec.structs.replace(spec, hidden=x), check=False).params.values()) for x in xs]
    h = spec.hidden  # Lagrange interpolation through the three points
    return round(sum(y * math.prod((h - xj) / (xi - xj) for xj in xs if xj != xi) for xi, y in zip(xs, ys)))


MAX_PARAMS = 400_000_000  # an ONNX file holds at most 2 GB of weights


def check_size(spec: Spec) -> None:
    """Refuse a spec too large to store or to train on this machine, with the numbers."""
    n = estimate_params(spec)
    need = 16 * n  # parameters, gradients and two AdamW moments, in float32
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else float("inf")
    if n > MAX_PARAMS or need > have:
        raise SpecError(f"spec {spec.name!r} is too large: about {n:,} parameters (hidden {spec.hidden}), which need "
                        f"about {need / 2**30:,.1f} GiB to train (this machine has {have / 2**30:,.1f} GiB) and "
                        f"{4 * n / 2**30:,.1f} GiB in a graph file (ONNX holds at most 2 GiB)")


def _true_values(g: Graph, action, head: str, logits):
    """The one-hot value [B, L, k] of a head in an action's codes [B, L, UNIFORMS] (its 8 bits
    for the buttons; see `sample_actions`)."""
    op = g.op
    if head == "buttons":
        bits = op.Slice(action, g.const([0], np.int64), g.const([8], np.int64), g.const([-1], np.int64))
        return op.Cast(bits, to=g.ir.DataType.FLOAT)
    column = op.Gather(action, g.const(8 + _CLASS_HEADS.index(head), np.int64), axis=2)
    return op.OneHot(column, g.const(HEADS[head], np.int64), g.const([0.0, 1.0]), axis=-1)


class Sampler:
    """Samples heads inside a step graph as `sample_actions` does, from the uniform numbers
    `noise` [B, UNIFORMS] at `temperature`. A call samples one head from its logits [B, k] and
    returns its value as the conditioning reads it in the step graph: the 0/1 bits of the
    buttons; for a class head c, the steps b [B, k] of its cumulative distribution that lie
    below the number (b_i = 1 for i < c, ties at the top kept by `prefix_rows`); `action()`
    joins the samples into codes [B, UNIFORMS] (a class: the sum of its first k - 1 steps)."""

    def __init__(self, g: Graph, noise, temperature):
        op = g.op
        self.g, self.values = g, {}
        self.numbers = dict(zip(HEADS, g.split(noise, [8] + [1] * len(_CLASS_HEADS))))  # (HEADS order)
        self.temperature = op.Max(temperature, g.const(1e-6))  # 0: the most likely value

    def __call__(self, head: str, logits):
        g, op = self.g, self.g.op
        x = op.Div(logits, self.temperature)
        if head == "buttons":  # pressed when u < sigmoid(x / T)
            below = op.Less(self.numbers[head], op.Sigmoid(x))
        else:  # the class where the cumulative softmax passes u (the last one if rounding leaves it under u)
            below = op.Less(op.CumSum(op.Softmax(x, axis=-1), g.const(-1, np.int64)), self.numbers[head])
        self.values[head] = op.Cast(below, to=g.ir.DataType.FLOAT)
        return self.values[head]

    def action(self):
        """Codes [B, UNIFORMS]: one MatMul adds up each class head's steps (all but its last)."""
        g, op = self.g, self.g.op
        pick = np.zeros((sum(HEADS.values()), UNIFORMS), np.float32)
        pick[np.arange(8), np.arange(8)] = 1
        for j, (h, first) in enumerate(zip(_CLASS_HEADS, np.cumsum(list(HEADS.values()))[:-1])):
            pick[first:first + HEADS[h] - 1, 8 + j] = 1
        codes = op.MatMul(op.Concat(*(self.values[h] for h in HEADS), axis=-1), g.const(pick))
        return op.Cast(codes, to=g.ir.DataType.INT64)

    @staticmethod
    def prefix_rows(g: Graph, weight, before: Sequence[str]):
        """The conditioning weights [sum k, r] of one-hot values of the heads `before`, rewritten
        for the sampler's steps: a class head's rows W_0..W_k-1 become W_1 - W_0, ..., W_k-1 -
        W_k-2, 0 (so steps b of class c give W_c - W_0), and the rows W_0 add up to the returned
        offset [1, r]. Built from parameters alone: onnxruntime folds it when the session loads."""
        op, rows, offsets = g.op, [], []
        blocks = g.split(weight, [HEADS[h] for h in before], axis=0) if len(before) > 1 else [weight]
        for h, w in zip(before, blocks):
            if h == "buttons":
                rows.append(w)
                continue
            cut = lambda a, b: op.Slice(w, g.const([a], np.int64), g.const([b], np.int64), g.const([0], np.int64))
            rows += [op.Sub(cut(1, HEADS[h]), cut(0, HEADS[h] - 1)), op.Mul(cut(0, 1), 0.0)]
            offsets.append(cut(0, 1))
        offset = functools.reduce(op.Add, offsets) if offsets else op.Mul(op.Slice(
            weight, g.const([0], np.int64), g.const([1], np.int64), g.const([0], np.int64)), 0.0)
        return (rows[0] if len(rows) == 1 else op.Concat(*rows, axis=0)), offset


class Model:
    """A spec's parameters (name -> array) and the code that builds its graphs."""

    def __init__(self, spec: Spec, params: dict[str, np.ndarray] | None = None, seed: int = 0, check: bool = True):
        if check:
            check_size(spec)
        self.spec = spec
        init = _Init({}, np.random.default_rng(seed))
        d = spec.hidden
        widths = {table: getattr(spec.embed, table) for table in EMBED_TABLES}
        fields, nums = spec.columns
        for table, vocab in EMBED_TABLES.items():
            if any(t == table for _, t in fields):
                init(f"embed.{table}", init.rng.normal(0, 1, (vocab, widths[table])))
        d_in = sum(widths[table] for _, table in fields) + len(nums) + spec.returns.input
        init.linear("in_proj", d_in, d)
        self.layers = []  # (block, mixer, prefix of the block's weights) per position
        layers, shared, kinds = spec.layers, {}, set()
        for i, block in enumerate(layers):
            name = f"shared.{block.share}" if block.share else f"layers.{i}"
            if block.share:  # each position's own input projection, started at the identity
                init(f"layers.{i}.site.weight", np.eye(d))
                init(f"layers.{i}.site.bias", np.zeros(d))
            if block.share in shared:
                self.layers.append((block, shared[block.share], name))
                continue
            init.norm(block.norm, f"{name}.norm", d)
            cls = MIXERS[type(block.mixer)]
            at = LayerAt(i, len(layers), first=cls not in kinds)
            kinds.add(cls)
            mixer = cls(f"{name}.mixer", block.mixer, d, init, at, **_spec_settings(cls, spec))
            self.layers.append((block, mixer, name))
            if block.share:
                shared[block.share] = self.layers[-1][1]
            if block.ffn:
                init.norm("layer", f"{name}.ffn_norm", d)
                init.linear(f"{name}.ffn.up", d, block.ffn * d)
                init.linear(f"{name}.ffn.down", block.ffn * d, d, scale=1 / math.sqrt(len(layers)))
        init.norm(spec.final_norm, "final_norm", d)
        if spec.heads.hidden:
            init.linear("heads.hidden", d, spec.heads.hidden)
        init.linear("heads.out", spec.heads.hidden or d, sum(HEADS.values()), scale=0.1)
        if spec.returns.value:
            init.linear("heads.value", spec.heads.hidden or d, 1, scale=0.1)
        if spec.heads.markov:
            for h, k in HEADS.items():
                init(f"heads.markov.{h}", np.zeros((2, 8) if h == "buttons" else (k, k)))
        if spec.heads.sampling == "autoregressive":  # (the conditioning starts at zero: independent heads)
            r, order = spec.heads.conditioning, spec.heads.order
            init.linear("heads.ar.features", spec.heads.hidden or d, r * (len(order) - 1))
            for j, h in enumerate(order[1:], 1):
                init(f"heads.ar.{h}.prefix", init.rng.normal(0, 1 / math.sqrt(j), (sum(HEADS[e] for e in order[:j]), r)))
                init(f"heads.ar.{h}.out", np.zeros((r, HEADS[h])))
        self.params = init.params
        if params is not None:
            self.load(params)

    def load(self, params: dict[str, np.ndarray]) -> None:
        missing = set(self.params) - set(params)
        if missing:
            raise ExphilError(f"weights do not match spec {self.spec.name!r}: missing {sorted(missing)[:5]}")
        for k, v in self.params.items():
            if params[k].shape != v.shape:
                raise ExphilError(f"weights do not match spec {self.spec.name!r}: {k} has shape "
                                  f"{params[k].shape}, spec needs {v.shape}")
            self.params[k] = np.asarray(params[k], dtype=np.float32)

    def start_from_baselines(self, freqs: dict[str, list[float]], markov: dict[str, list] | None = None,
                             mean_return: float | None = None) -> None:
        """Set the output biases so that an untrained model predicts the label frequencies (its
        loss starts at the frequency baseline instead of far above it); with the spec's Markov
        table heads, set those to the counted table instead (it starts at the Markov baseline).
        A value head starts at `mean_return` (the training frames' mean return-to-go)."""
        if self.spec.returns.value and mean_return is not None:
            self.params["heads.value.bias"] = np.array([mean_return], np.float32)
        if self.spec.heads.markov and markov is not None:
            for h in HEADS:
                p = np.asarray(markov[h], np.float64)  # smoothed counts: strictly inside (0, 1)
                self.params[f"heads.markov.{h}"] = (np.log(p / (1 - p)) if h == "buttons" else np.log(p)).astype(np.float32)
            self.params["heads.out.bias"] = np.zeros_like(self.params["heads.out.bias"])
            return
        bias = []
        for h, n in HEADS.items():
            p = np.clip(np.asarray(freqs[h], np.float64), 1e-4, 1 - 1e-4)
            bias.append(np.log(p / (1 - p)) if h == "buttons" else np.log(p))
        self.params["heads.out.bias"] = np.concatenate(bias).astype(np.float32)

    def metadata(self) -> dict[str, str]:
        """What a program needs to use the graphs without exphil, stored in each ONNX file's
        metadata_props: versions, the feature columns, the heads, the carried states, the spec."""
        return {"exphil.version": __version__, "exphil.feature_version": str(FEATURE_VERSION),
                "exphil.cat_fields": json.dumps([n for n, _ in CAT_FIELDS]),
                "exphil.num_fields": json.dumps(NUM_FIELDS), "exphil.heads": json.dumps(HEADS),
                "exphil.states": json.dumps({n: list(shape) for n, shape in self.states}),
                "exphil.spec": msgspec.toml.encode(self.spec).decode()}

    @property
    def states(self) -> list[tuple[str, tuple[int, ...]]]:
        """Carried state tensors, named `layers.<position>.mixer.<state>`, shapes without the
        batch axis (a shared block has a state at each of its positions)."""
        return spec_states(self.spec)

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, *shape), np.float32) for n, shape in self.states}

    def forward(self, g: Graph, cat, num, state: dict, rtg=None):
        """cat [B, L, C] int64, num [B, L, F] (and the return-to-go [B, L] of return-conditioned
        specs) -> the heads' features [B, L, D], new state."""
        op, spec = g.op, self.spec
        feats, (fields, nums) = [], spec.columns
        for i, table in fields:
            ids = op.Gather(cat, g.const(i, np.int64), axis=2)
            feats.append(g.lookup(f"embed.{table}", ids))
        if len(nums) < len(NUM_FIELDS):
            num = op.Gather(num, g.const(nums, np.int64), axis=2)
        extra = [op.Unsqueeze(rtg, g.const([-1], np.int64))] if rtg is not None else []
        x = g.dropout(g.linear(op.Concat(*feats, num, *extra, axis=-1), "in_proj"), spec.dropout)
        new_state = {}
        for i, (block, mixer, name) in enumerate(self.layers):
            own = {s: state[f"layers.{i}.mixer.{s}"] for s, _ in mixer.states}
            h = g.linear(x, f"layers.{i}.site") if block.share else x
            y, out = mixer(g, g.norm(block.norm, h, f"{name}.norm"), own)
            y = g.dropout(y, spec.dropout)
            new_state.update({f"layers.{i}.mixer.{s}": v for s, v in out.items()})
            x = op.Add(x, y) if block.residual else y
            if block.ffn:
                h = g.norm("layer", x, f"{name}.ffn_norm")
                h = g.linear(g.activation("gelu", g.linear(h, f"{name}.ffn.up")), f"{name}.ffn.down")
                x = op.Add(x, g.dropout(h, spec.dropout))
        x = g.norm(spec.final_norm, x, "final_norm")
        if spec.heads.hidden:
            x = g.activation("gelu", g.linear(x, "heads.hidden"))
        return x, new_state

    def head_logits(self, g: Graph, x, num, choose: Callable) -> dict:
        """Per head, its logits from the features x: the shared output layer (plus the Markov
        lookup). Autoregressive heads: each head after the first in the spec's `order` adds an
        MLP of x and the one-hot values `choose(head, logits)` gave the heads before it (the true
        values in the window graph, samples in the step graph)."""
        op, heads_spec = g.op, self.spec.heads
        logits = g.linear(x, "heads.out")
        if heads_spec.markov:
            logits = op.Add(logits, self.markov_logits(g, num))
        heads = dict(zip(HEADS, g.split(logits, list(HEADS.values()))))
        if heads_spec.sampling == "independent":
            return heads
        order, r = heads_spec.order, heads_spec.conditioning
        weights = {h: g.param(f"heads.ar.{h}.prefix") for h in order[1:]}
        bias = g.param("heads.ar.features.bias")
        if isinstance(choose, Sampler):  # its steps in place of one-hot values; the offsets join the bias
            rows = {h: Sampler.prefix_rows(g, w, order[:j]) for j, (h, w) in enumerate(weights.items(), 1)}
            weights = {h: w for h, (w, _) in rows.items()}
            bias = op.Add(bias, op.Concat(*(o for _, o in rows.values()), axis=-1))
        features = op.Add(op.MatMul(x, g.param("heads.ar.features.weight")), bias)
        seen = []  # the values of the heads so far
        for before, h, z in zip(order, order[1:], g.split(features, [r] * (len(order) - 1))):
            seen.append(choose(before, heads[before]))
            prefix = seen[0] if len(seen) == 1 else op.Concat(*seen, axis=-1)
            z = g.activation("gelu", op.Add(z, op.MatMul(prefix, weights[h])))
            heads[h] = op.Add(heads[h], op.MatMul(z, g.param(f"heads.ar.{h}.out")))
        return heads

    def markov_logits(self, g: Graph, num):
        """[B, L, sum(HEADS)]: per head, the row of its table picked by the current controller's
        class, recovered from the controller features exactly as the labels encode it. The
        analog heads share one lookup: their tables stacked (padded to 17 columns; onnxruntime
        folds that into one constant), one rounding and one gather for the five classes."""
        op = g.op
        ctrl = op.Slice(num, g.const([_CTRL], np.int64), g.const([_CTRL + 13], np.int64), g.const([-1], np.int64))
        buttons, analog = g.split(ctrl, [8, 5])
        table = g.param("heads.markov.buttons")
        released = op.Gather(table, g.const(0, np.int64), axis=0)
        pressed = op.Gather(table, g.const(1, np.int64), axis=0)
        heads = list(HEADS)[1:]  # a stick feature is (v - 0.5) * 2 for a value v in 0..1; the trigger is v
        sticks = np.array([h != "shoulder" for h in heads])
        top = np.array([HEADS[h] - 1 for h in heads], np.float32)
        v = op.Add(op.Mul(analog, g.const(np.where(sticks, 0.5, 1.0))), g.const(np.where(sticks, 0.5, 0.0)))
        cls = op.Round(op.Min(op.Max(op.Mul(v, g.const(top)), g.const(0.0)), g.const(top)))
        first = np.cumsum([0] + [HEADS[h] for h in heads[:-1]])  # each head's first row in the stack
        ids = op.Add(op.Cast(cls, to=g.ir.DataType.INT64), g.const(first, np.int64))
        tables = [g.param(f"heads.markov.{h}") for h in heads]
        tables = [t if HEADS[h] == STICK_CLASSES else op.Pad(t, g.const([0, 0, 0, STICK_CLASSES - HEADS[h]], np.int64))
                  for h, t in zip(heads, tables)]
        rows = g.lookup_value(op.Concat(*tables, axis=0), sum(HEADS[h] for h in heads), ids)  # [B, L, 5, 17]
        rows = op.Reshape(rows, g.const([0] * (1 if g.step else 2) + [len(heads) * STICK_CLASSES], np.int64))
        analog_logits = op.Slice(rows, g.const([0], np.int64), g.const([sum(HEADS[h] for h in heads)], np.int64),
                                 g.const([-1], np.int64))
        return op.Concat(op.Add(released, op.Mul(buttons, op.Sub(pressed, released))), analog_logits, axis=-1)

    def build(self, length: int | None = None, step: bool = False, extra=None, training: bool = False):
        """The window graph over `length` frames (default: the spec's window), or the step graph.

        `extra(g, heads, new_state, spec)` may add inputs and outputs first (the training loss does).
        training=True: the graph for onnxruntime-training, with a boolean input "training" that
        switches the spec's dropout on (train steps) or off (evaluation), when it has any."""
        length = 1 if step else (length or self.spec.window)
        g = Graph(self.params, length, f"{self.spec.name}.{'step' if step else 'window'}")
        op = g.op
        g.trained, g.step = training, step
        if training and self.spec.dropout:
            g.training = g.input("training", "BOOL", [])
        C, F = len(CAT_FIELDS), len(NUM_FIELDS)
        if step:
            axis1 = g.const([1], np.int64)
            cat = op.Unsqueeze(g.input("cat", "INT64", ["B", C]), axis1)
            num = op.Unsqueeze(g.input("num", "FLOAT", ["B", F]), axis1)
        else:
            cat = g.input("cat", "INT64", ["B", length, C])
            num = g.input("num", "FLOAT", ["B", length, F])
        state = {n: g.input(f"state_in.{n}", "FLOAT", ["B", *shape]) for n, shape in self.states}
        rtg = None
        if self.spec.returns.input:
            rtg = g.input("rtg", "FLOAT", ["B"] if step else ["B", length])
            rtg = op.Unsqueeze(rtg, axis1) if step else rtg
        x, new_state = self.forward(g, cat, num, state, rtg)
        if step:  # the heads work on [B, ...]: the frame axis goes once, before them
            x, num = op.Squeeze(x, axis1), op.Squeeze(num, axis1)
        sampler = None
        if self.spec.heads.sampling == "independent":
            choose = None
        elif step:  # the step graph samples the heads in order: noise and temperature are inputs
            sampler = choose = Sampler(g, g.input("noise", "FLOAT", ["B", UNIFORMS]), g.input("temperature", "FLOAT", []))
        else:  # teacher forcing: the heads before each one take their true values
            choose = functools.partial(_true_values, g, g.input("target.action", "INT64", ["B", length, UNIFORMS]))
        heads = self.head_logits(g, x, num, choose)
        if sampler:
            last = self.spec.heads.order[-1]
            sampler(last, heads[last])
            heads["action"] = sampler.action()
        if self.spec.returns.value:
            heads["value"] = op.Squeeze(g.linear(x, "heads.value"), g.const([-1], np.int64))
        if extra is not None:
            extra(g, heads, new_state, self.spec)
        lead = ["B"] if step else ["B", length]
        for name, value in heads.items():
            if name == "action":
                g.output(value, name, lead + [UNIFORMS], "INT64")
            else:
                g.output(value, name, lead + ([HEADS[name]] if name in HEADS else []))
        for n, shape in self.states:
            g.output(new_state[n], f"state_out.{n}", ["B", *shape])
        return g.to_proto()

    def save(self, out: str | os.PathLike, length: int | None = None) -> tuple[Path, Path]:
        """Write window.onnx and step.onnx into `out`."""
        import onnx

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = out / "window.onnx", out / "step.onnx"
        for path, proto in zip(paths, (self.build(length), self.build(step=True))):
            for key, value in self.metadata().items():
                proto.metadata_props.add(key=key, value=value)
            tmp = path.with_suffix(".onnx.tmp")
            onnx.save(proto, tmp)
            os.replace(tmp, path)
        return paths


def graph_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `exphil.*` facts a graph file carries (see Model.metadata)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
            if p.key.startswith("exphil.")}


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parameters (initializers) of an ONNX file, by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# =================================================================================================
# Features and actions
# =================================================================================================
# Game-state features and controller labels, identical from replays and from live play.
#
# Two sources produce the same numbers for the same frame:
#
# * ``read_replay`` + ``game_features`` / ``game_labels``: vectorised over a whole Slippi replay
#   parsed with peppi-py (training data); libmelee's replay console reads the replays peppi-py
#   cannot (``read_replay_libmelee``, same columns in libmelee's units).
# * ``features_from_gamestate`` / ``encode_controller``: one libmelee ``GameState`` at a time
#   (play time, and libmelee's replay console).
#
# Every value follows libmelee's own definition of the field (including its defaults for old
# replays that lack it), so a model trained on replay features sees the same inputs at play time.
# Ports are libmelee's 1-based controller ports everywhere (peppi's ``Port.P1`` is port 1).
#
# Frames: one row per frame id, from the first frame (-123) to the last.  Netplay rollbacks re-send
# frames; libmelee's console yields the *first* version of each (it skips any frame whose id is not
# above the highest id already yielded), and so does ``read_replay`` by default.  The first version
# holds the opponent's *predicted* inputs, so for training labels prefer
# ``read_replay(path, finalized=True)``, which keeps the last (final) version of each frame.
#
# Layout, FEATURE_VERSION 2.  Categorical ids (``cat``, int64):
#
#     0 self_action     400  libmelee Action value; values outside the enum -> 399
#     1 opp_action      400
#     2 self_character   34  libmelee Character value (internal id); unknown -> 33
#     3 opp_character    34
#     4 stage            32  libmelee Stage value (NO_STAGE = 0 for stages it does not know)
#     5 self_nana_action 400 Nana's action (Ice Climbers); 399 when there is no Nana
#     6 opp_nana_action  400
#     7-10 item{k}_type  256  the k-th nearest item or projectile's type + 1 (0: none; 255: type 254 and up)
#
# Floats (``num``, float32), feature = clip((raw - offset) * scale, -10, 10), raw in libmelee units:
#
#     per player, self block (0-17) then opponent block (18-35):
#     +0  x                    *0.02          +9  hitlag_left            *0.1
#     +1  y                    *0.02          +10 hitstun_frames_left    *0.02
#     +2  percent              *0.01          +11 action_frame           *0.02
#     +3  shield_strength      *0.01          +12 off_stage              0/1
#     +4  stock                *0.25          +13 speed_air_x_self       *0.25
#     +5  facing               +1 right, -1   +14 speed_y_self           *0.25
#     +6  jumps_left           *0.25          +15 speed_x_attack         *0.25
#     +7  on_ground            0/1            +16 speed_y_attack         *0.25
#     +8  invulnerable         0/1            +17 speed_ground_x_self    *0.25
#     own controller (36-48): buttons A B X Y Z L R D_UP (0/1, physical buttons), main_x, main_y,
#     c_x, c_y ((v - 0.5) * 2, i.e. -1..1), shoulder (analog trigger 0..1).
#     Nana (49-67 own, 68-86 the opponent's): exists (0/1), then the 18 player values (all 0 without one).
#     items (87-118): ITEM_SLOTS = 4 slots of 8 values, the nearest to the player first (libmelee's
#     ``GameState.projectiles``: projectiles and items alike): exists, mine (owned by the player's
#     port), theirs (the opponent's), dx, dy (position - the player's, *0.02), speed x, y (*0.25),
#     timer (``expiration_frames``, *0.01); owners are known from Slippi 3.6 on (both 0 before).
#     Randall (119-121): on Yoshi's Story (exists 1) its centre x and height (*0.02) from the frame
#     number (libmelee's ``stages.randall_position``); 0 elsewhere.
#
# libmelee reports one processed analog trigger for both shoulders (l_shoulder == r_shoulder), so
# a single ``shoulder`` feature stands for both.  Buttons are the physical ones
# (``controller_state.button``): in the processed bits Z also sets A, and the physical buttons are
# what ``Controller.press_button`` drives.  Fountain of Dreams' moving platforms are not included
# (recorded from Slippi 3.18 only, and not read by peppi-py 0.8.6); every other stage's platforms
# are fixed, known from the stage id.
#
# Labels: ``game_labels`` row t is ``encode_controller`` of that port's controller state at frame t,
# the same state that feature row t carries in 36-48.  Shifting targets by 1 + delay frames is the
# caller's job.

from melee import enums
from melee.enums import Button
from melee.stages import EDGE_GROUND_POSITION

FEATURE_VERSION = 2

ACTION_VOCAB, CHARACTER_VOCAB, STAGE_VOCAB, ITEM_VOCAB = 400, 34, 32, 256
UNKNOWN_ACTION, UNKNOWN_CHARACTER = ACTION_VOCAB - 1, CHARACTER_VOCAB - 1
ITEM_SLOTS = 4  # the items and projectiles a frame shows (4 or fewer on 99.9% of a Falco ditto's frames)
EMBED_TABLES = {"action": ACTION_VOCAB, "character": CHARACTER_VOCAB, "stage": STAGE_VOCAB, "item": ITEM_VOCAB}
CAT_FIELDS = ([("self_action", "action"), ("opp_action", "action"), ("self_character", "character"),
               ("opp_character", "character"), ("stage", "stage"), ("self_nana_action", "action"),
               ("opp_nana_action", "action")]
              + [(f"item{k}_type", "item") for k in range(ITEM_SLOTS)])  # (name, embedding table)

BUTTONS = ("A", "B", "X", "Y", "Z", "L", "R", "D_UP")
STICK_CLASSES = 17
SHOULDER_CLASSES = 5

# (name, offset, scale) for the raw libmelee-unit values.
_PLAYER_FIELDS = [
    ("x", 0, 0.02), ("y", 0, 0.02), ("percent", 0, 0.01), ("shield", 0, 0.01),
    ("stock", 0, 0.25), ("facing", 0, 1), ("jumps_left", 0, 0.25), ("on_ground", 0, 1),
    ("invulnerable", 0, 1), ("hitlag_left", 0, 0.1), ("hitstun_left", 0, 0.02),
    ("action_frame", 0, 0.02), ("off_stage", 0, 1),
    ("speed_air_x_self", 0, 0.25), ("speed_y_self", 0, 0.25), ("speed_x_attack", 0, 0.25),
    ("speed_y_attack", 0, 0.25), ("speed_ground_x_self", 0, 0.25)]
_CONTROLLER_FIELDS = ([("button_" + b, 0, 1) for b in BUTTONS]
                      + [(s, 0.5, 2) for s in ("main_x", "main_y", "c_x", "c_y")]
                      + [("shoulder", 0, 1)])
_NANA_FIELDS = [("exists", 0, 1)] + _PLAYER_FIELDS
_ITEM_FIELDS = [("exists", 0, 1), ("mine", 0, 1), ("theirs", 0, 1), ("dx", 0, 0.02), ("dy", 0, 0.02),
                ("speed_x", 0, 0.25), ("speed_y", 0, 0.25), ("timer", 0, 0.01)]
_RANDALL_FIELDS = [("randall_exists", 0, 1), ("randall_x", 0, 0.02), ("randall_y", 0, 0.02)]
_ALL = ([("self_" + n, o, s) for n, o, s in _PLAYER_FIELDS]
        + [("opp_" + n, o, s) for n, o, s in _PLAYER_FIELDS] + _CONTROLLER_FIELDS
        + [(f"{who}_nana_{n}", o, s) for who in ("self", "opp") for n, o, s in _NANA_FIELDS]
        + [(f"item{k}_{n}", o, s) for k in range(ITEM_SLOTS) for n, o, s in _ITEM_FIELDS] + _RANDALL_FIELDS)
NUM_FIELDS = [n for n, _, _ in _ALL]
_OFFSET = np.array([o for _, o, _ in _ALL], np.float32)
_SCALE = np.array([s for _, _, s in _ALL], np.float32)
_CLIP = 10.0
_P = len(_PLAYER_FIELDS)          # 18 values per player
_CTRL = 2 * _P                    # first controller column
_NANA = _CTRL + len(_CONTROLLER_FIELDS)  # first Nana column (own, then the opponent's)
_ITEMS = _NANA + 2 * len(_NANA_FIELDS)   # first item column
_RANDALL = _ITEMS + ITEM_SLOTS * len(_ITEM_FIELDS)
# the groups of columns (categorical, numeric) a spec's `sees` chooses from; "players" (the two
# players, the controller, the stage) is always read
GROUPS = {"players": (range(5), range(_NANA)), "nana": (range(5, 7), range(_NANA, _ITEMS)),
          "items": (range(7, 7 + ITEM_SLOTS), range(_ITEMS, _RANDALL)),
          "randall": (range(0), range(_RANDALL, len(NUM_FIELDS)))}

# Lookup tables from raw game values to categorical ids.
_ACTION_ID = np.full(1 << 16, UNKNOWN_ACTION, np.int64)
_ACTION_ID[[a.value for a in enums.Action]] = [a.value for a in enums.Action]
_CHARACTER_ID = np.full(256, UNKNOWN_CHARACTER, np.int64)
_known = [c.value for c in enums.Character if c.value < UNKNOWN_CHARACTER]
_CHARACTER_ID[_known] = _known
_BUTTON_ENUMS = tuple(Button["BUTTON_" + b] for b in BUTTONS)
_BUTTON_BITS = np.array([0x100, 0x200, 0x400, 0x800, 0x10, 0x40, 0x20, 0x08], np.uint16)

# libmelee's console adds 1 to action_frame for the (character, action) pairs that the game
# counts from 0; it reads the list from a data file shipped with libmelee.
with open(os.path.join(os.path.dirname(enums.__file__), "actiondata.csv")) as _f:
    _ZERO_INDEXED = np.array(sorted(int(r["character"]) << 16 | int(r["action"])
                                    for r in csv.DictReader(_f) if r["zeroindex"] == "True"))


class ReplayError(ExphilError):
    """A replay that cannot be read or is not a usable 1v1 game."""

    def __init__(self, path, reason):
        reason = " ".join(str(reason).split())  # one line, whatever the parser said
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class Game(NamedTuple):
    path: str
    stage: int                 # libmelee Stage value
    frame_ids: np.ndarray      # int32[T]
    players: dict              # libmelee port -> {field: array[T] (speeds: float32[T, 5])}
    info: dict = {}            # "slippi" version, "date" (as recorded), "codes": port -> player code,
                               # "parser" that read it: "peppi-py" or "libmelee"
    nana: dict = {}            # port -> Nana's columns as in `players` plus "exists" (uint8[T]), for
                               # Ice Climbers players
    items: dict = {}           # every item of every frame, flat: "frame" (row), "type", "owner"
                               # (libmelee's port; 0 none, -1 unknown), "x", "y", "speed_x",
                               # "speed_y", "timer" (arrays[N])

    @property
    def ports(self):
        return tuple(self.players)


def _column(arr, what, default=None, dtype=None, *, keep, path):
    """Arrow array -> numpy over the kept frames; `default` fills fields the version lacks."""
    if arr is None:
        if default is None:
            raise ReplayError(path, f"no {what} data (Slippi version too old)")
        return np.full(len(keep), default, dtype)
    if arr.null_count:
        raise ReplayError(path, f"missing values in {what}")
    return arr.to_numpy(zero_copy_only=False)[keep]


def read_replay(path, finalized=False) -> Game:
    """Parse a .slp file into per-frame arrays for its two players; ReplayError if unusable.

    finalized=False keeps the first version of rolled-back frames (as libmelee does),
    finalized=True the last one. peppi-py reads the file; one it cannot read (it panics on
    Slippi 3.3-3.6 replays, for one) or misreads (an Ice Climbers player's Nana) is read by
    libmelee's replay console instead (`read_replay_libmelee`). info["parser"] says which one read it.
    """
    import peppi_py

    path = os.fspath(path)
    try:
        with _quiet_fd2():  # a parser panic prints a Rust backtrace; the exception says enough
            game, arrow = _read_peppi(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # peppi panics raise pyo3's PanicException (a BaseException)
        try:
            return read_replay_libmelee(path, finalized)
        except ReplayError as fallback:
            if not fallback.reason.startswith(_UNREADABLE):  # read, but not a usable game
                raise
            raise ReplayError(path, f"{_UNREADABLE}peppi-py {_error_text(e)}; "
                                    f"{fallback.reason.removeprefix(_UNREADABLE)}") from None
    start, frames = game.start, game.frames
    if len(start.players) != 2 or start.is_teams:
        raise ReplayError(path, f"not a 1v1: {len(start.players)} players, teams={start.is_teams}")
    if any(p.type != peppi_py.game.PlayerType.HUMAN for p in start.players):
        raise ReplayError(path, "not two human players: " + ", ".join(
            f"port {p.port.value + 1} is {p.type.name}" for p in start.players))
    if frames is None or len(frames.id) == 0 or len(frames.ports) != 2:
        raise ReplayError(path, "no frame data")
    if any(d.follower is not None for d in frames.ports):  # Ice Climbers: peppi-py 0.8.6 moves the
        return read_replay_libmelee(path, finalized)       # frames of a Nana after her first death
    ids = frames.id.to_numpy(zero_copy_only=False)
    keep = _kept_frames(ids, finalized)
    col = functools.partial(_column, keep=keep, path=path)
    players = {info.port.value + 1: _peppi_player(data.leader, col) for info, data in zip(start.players, frames.ports)}
    stage = enums.to_internal_stage(start.stage).value
    owners = tuple(start.slippi.version) >= (3, 6, 0)  # (libmelee reads the owner from Slippi 3.6 on)
    return _checked(Game(path, stage, ids[keep], players, {**_replay_info(game), "parser": "peppi-py"},
                         {}, _peppi_items(arrow.field("item") if arrow.type.get_field_index("item") >= 0
                                            else None, keep, owners)))


def _read_peppi(path: str):
    """peppi_py.read_slippi, keeping the frames' arrow struct too: (game, arrow frames). peppi-py
    0.8.6's read_slippi leaves out the frames' items, which the arrow struct holds."""
    from peppi_py import _peppi, game as peppi_game, parse

    raw = _peppi.read_slippi(path, False)
    game = peppi_game.Game(parse.dc_from_json(peppi_game.Start, raw.start),
                           raw.end and parse.dc_from_json(peppi_game.End, raw.end), raw.metadata,
                           parse.frames_from_sa(raw.frames))
    return game, raw.frames


def _peppi_player(data, col) -> dict:
    """One player's columns from peppi-py's frame data."""
    pre, post = data.pre, data.post
    vel = post.velocities
    speeds = [col(None if vel is None else getattr(vel, k), "velocities", 0, np.float32)
              for k in ("self_x_air", "self_y", "knockback_x", "knockback_y", "self_x_ground")]
    return dict(
        character=col(post.character, "character"), action=col(post.state, "action state"),
        x=col(post.position.x, "position"), y=col(post.position.y, "position"),
        percent=col(post.percent, "percent"), shield=col(post.shield, "shield"),
        stock=col(post.stocks, "stocks"), direction=col(post.direction, "direction"),
        state_age=col(post.state_age, "state age"),
        misc_as=col(post.misc_as, "misc_as", 0, np.float32),
        airborne=col(post.airborne, "airborne", 0, np.uint8),
        jumps=col(post.jumps, "jumps", 1, np.uint8),
        hurtbox=col(post.hurtbox_state, "hurtbox", 0, np.uint8),
        hitlag=col(post.hitlag, "hitlag", 0, np.float32),
        speeds=np.stack(speeds, axis=1),
        joy_x=col(pre.joystick.x, "joystick"), joy_y=col(pre.joystick.y, "joystick"),
        c_x=col(pre.cstick.x, "c-stick"), c_y=col(pre.cstick.y, "c-stick"),
        trigger=col(pre.triggers, "triggers"), buttons=col(pre.buttons_physical, "buttons"))


def _peppi_items(arrow, keep: np.ndarray, owners: bool) -> dict:
    """Game.items from peppi-py's per-frame item lists (arrow, None before Slippi 3.0), for the kept frames."""
    if arrow is None:
        return _items_from([])
    start = arrow.offsets.to_numpy()
    n = start[keep + 1] - start[keep]
    at = np.repeat(start[keep] - np.cumsum(n) + n, n) + np.arange(n.sum())  # rows of arrow.values
    v = arrow.values
    get = lambda a, dtype=np.float32: a.to_numpy(zero_copy_only=False)[at].astype(dtype)
    owner = get(v.field("owner"), np.int64) + 1 if owners else np.full(len(at), -1, np.int64)
    return dict(frame=np.repeat(np.arange(len(keep)), n), type=get(v.field("type"), np.int64), owner=owner,
                x=get(v.field("position").field("x")), y=get(v.field("position").field("y")),
                speed_x=get(v.field("velocity").field("x")), speed_y=get(v.field("velocity").field("y")),
                timer=get(v.field("timer")))


def _items_from(rows: list) -> dict:
    """Game.items from (frame row, type, owner, x, y, speed x, speed y, timer) tuples."""
    a = np.array(rows, np.float64).reshape(-1, 8)
    f32 = lambda k: a[:, k].astype(np.float32)
    return dict(frame=a[:, 0].astype(np.int64), type=a[:, 1].astype(np.int64), owner=a[:, 2].astype(np.int64),
                x=f32(3), y=f32(4), speed_x=f32(5), speed_y=f32(6), timer=f32(7))


_UNREADABLE = "unreadable ("  # how the reason for a file no parser could read starts


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:160]}"


def _kept_frames(ids: np.ndarray, finalized: bool) -> np.ndarray:
    """Indices of the version of each frame id to keep from a replay's frames in file order."""
    if finalized:  # last occurrence of each frame id, in id order
        _, last = np.unique(ids[::-1], return_index=True)
        return len(ids) - 1 - last
    first = np.ones(len(ids), bool)  # frames whose id is above every id seen before
    first[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    return np.flatnonzero(first)


def _checked(game: Game) -> Game:
    for port, arrays in game.players.items():
        for k, v in arrays.items():  # (misc_as is NaN outside hitstun: libmelee reads that as 0)
            if k != "misc_as" and v.dtype.kind == "f" and not np.isfinite(v).all():
                raise ReplayError(game.path, f"non-finite {k} values at port {port}")
    return game


# libmelee's physical buttons, as the bits of a Slippi pre-frame's physical button field
_MELEE_BUTTON_BITS = {Button["BUTTON_" + b]: bit for b, bit in (
    ("D_LEFT", 0x1), ("D_RIGHT", 0x2), ("D_DOWN", 0x4), ("D_UP", 0x8), ("Z", 0x10), ("R", 0x20), ("L", 0x40),
    ("A", 0x100), ("B", 0x200), ("X", 0x400), ("Y", 0x800), ("START", 0x1000))}


def _melee_values(p) -> tuple:
    """One libmelee PlayerState's values, in the order of _from_melee_values."""
    cs = p.controller_state
    return (p.character.value, p.action.value, p.position.x, p.position.y, p.percent, p.shield_strength, p.stock,
            p.facing, p.action_frame, p.hitstun_frames_left, p.on_ground, p.jumps_left, p.invulnerable,
            p.hitlag_left, p.speed_air_x_self, p.speed_y_self, p.speed_x_attack, p.speed_y_attack,
            p.speed_ground_x_self, *cs.main_stick, *cs.c_stick, cs.l_shoulder,
            sum(_MELEE_BUTTON_BITS.get(button, 0) for button, pressed in cs.button.items() if pressed))


def _from_melee_values(v: np.ndarray, reindexed: bool = True) -> dict:
    """read_replay's columns of one player from _melee_values rows [T, 25] (float64: exact for
    every value). libmelee's integers stand for peppi-py's floats (state age, hitstun, hitlag: the
    features truncate them the same way), its booleans for flags (hurtbox: 1 for any invulnerability),
    and its 0..1 sticks for peppi-py's -1..1 ones (the features map them back to the same float32).
    reindexed: whether libmelee added 1 to the action frame of zero-indexed actions (not for Nana)."""
    f32 = lambda a: a.astype(np.float32)
    character, action = v[:, 0].astype(np.uint8), v[:, 1].astype(np.uint16)
    zero_indexed = np.isin(character.astype(np.int64) << 16 | action, _ZERO_INDEXED) & reindexed
    sticks = (f32(v[:, 19:23]) - np.float32(0.5)) * np.float32(2)
    return dict(character=character, action=action, x=f32(v[:, 2]), y=f32(v[:, 3]), percent=f32(v[:, 4]),
                shield=f32(v[:, 5]), stock=v[:, 6].astype(np.uint8), direction=f32(np.where(v[:, 7] > 0, 1, -1)),
                state_age=f32(v[:, 8] - zero_indexed), misc_as=f32(v[:, 9]), airborne=(v[:, 10] == 0).astype(np.uint8),
                jumps=v[:, 11].astype(np.uint8), hurtbox=v[:, 12].astype(np.uint8), hitlag=f32(v[:, 13]),
                speeds=f32(v[:, 14:19]), joy_x=sticks[:, 0], joy_y=sticks[:, 1], c_x=sticks[:, 2], c_y=sticks[:, 3],
                trigger=f32(v[:, 23]), buttons=v[:, 24].astype(np.uint16))


_SLP_HEADER = b"{U\x03raw[$U#l"  # a .slp file's first bytes; then the length of its event stream (4 bytes)
_PLAYER_TYPES = ("HUMAN", "CPU", "DEMO")  # a game start's player types (3: no player)


def _human_ports(path: str) -> list[int]:
    """The two ports of a 1v1 of two humans, from a replay's game start event (teams flag and
    player types), which follows the event payload sizes at the start of its event stream
    (libmelee 0.47 reads the teams flag together with the next byte and tells no player type)."""
    with open(path, "rb") as f:
        head = f.read(len(_SLP_HEADER) + 4 + 256 + 0x100)
    events = head[len(_SLP_HEADER) + 4:]
    at = events[1] + 1 if len(events) > 1 else 0
    if not head.startswith(_SLP_HEADER) or len(events) < at + 0x100 or events[0] != 0x35 or events[at] != 0x36:
        raise ValueError("no game start event at the start of the replay")
    start = events[at:]
    teams, types = bool(start[0xD]), [start[0x66 + 0x24 * i] for i in range(4)]
    players = {i + 1: _PLAYER_TYPES[t] if t < 3 else str(t) for i, t in enumerate(types) if t != 3}
    if len(players) != 2 or teams:
        raise ReplayError(path, f"not a 1v1: {len(players)} players, teams={teams}")
    if any(t != "HUMAN" for t in players.values()):
        raise ReplayError(path, "not two human players: " + ", ".join(f"port {p} is {t}" for p, t in players.items()))
    return list(players)


def read_replay_libmelee(path, finalized=False) -> Game:
    """read_replay through libmelee's replay console (what read_replay falls back to): every
    version of every frame, kept as read_replay keeps them; ReplayError if unusable."""
    import melee

    path = os.fspath(path)
    ids, first, items = [], None, []
    try:
        console = melee.Console(path=path, is_dolphin=False, allow_old_version=True, skip_rollback_frames=False)
        console.connect()
        rows = {p: [] for p in _human_ports(path)}
        nana = {p: [] for p in rows}
        while (gs := console.step()) is not None:
            if set(gs.players) != set(rows):
                raise ReplayError(path, f"frame {gs.frame} holds ports {sorted(map(int, gs.players))}, not {list(rows)}")
            if first is None:
                first = gs
            items += [(len(ids), *_melee_item(p)) for p in gs.projectiles]
            ids.append(gs.frame)
            for p, r in rows.items():
                r.append(_melee_values(gs.players[p]))
                n = gs.players[p].nana
                nana[p].append((1, *_melee_values(n)) if n is not None else (0,) * (len(r[-1]) + 1))
    except ReplayError:
        raise
    except Exception as e:  # (libmelee raises what its reading code meets: decoder, type and value errors)
        raise ReplayError(path, f"{_UNREADABLE}libmelee {_error_text(e)})") from None
    if first is None:
        raise ReplayError(path, "no frame data")
    keep = _kept_frames(np.array(ids, np.int32), finalized)
    columns = {p: _from_melee_values(np.array(r, np.float64)[keep]) for p, r in rows.items()}
    nana = {p: _from_melee_values(v[:, 1:], False) | {"exists": v[:, 0].astype(np.uint8)}
            for p, r in nana.items() if any(v[0] for v in r) for v in [np.array(r, np.float64)[keep]]}
    codes = {p: first.players[p].connectCode.replace("\uff03", "#") for p in rows if first.players[p].connectCode}
    info = {"slippi": console.slp_version, "date": first.startAt or None, "codes": codes, "parser": "libmelee"}
    row = np.full(len(ids), -1)  # each frame version's row among the kept ones
    row[keep] = np.arange(len(keep))
    items = _items_from([(row[i], *rest) for i, *rest in items if row[i] >= 0])
    return _checked(Game(path, first.stage.value, np.array(ids, np.int32)[keep], columns, info, nana, items))


def _melee_item(p) -> tuple:
    """(type, owner, x, y, speed x, speed y, timer) of a libmelee Projectile."""
    return (p.type.value, p.owner, p.position.x, p.position.y, p.speed.x, p.speed.y, p.expiration_frames)


def _replay_info(game) -> dict:
    """The Slippi version, the recorded start date and the players' codes (netplay games only);
    metadata not in the expected shape is left out (it is informative only)."""
    info = {"slippi": ".".join(map(str, game.start.slippi.version))}
    try:
        meta = game.metadata if isinstance(game.metadata, dict) else {}
        named = {int(k) + 1: (v.get("names") or {}).get("code") for k, v in (meta.get("players") or {}).items()
                 if isinstance(v, dict) and str(k).isdigit()}
        codes = {p.port.value + 1: (p.netplay.code if p.netplay else named.get(p.port.value + 1))
                 for p in game.start.players}
        date = meta.get("startAt")
        return {**info, "date": str(date) if date is not None else None,
                "codes": {port: str(c).replace("\uff03", "#") for port, c in codes.items() if c}}
    except (AttributeError, TypeError, ValueError):
        return info


def _trunc_int(a):
    """Python's int() of a float32 array (toward zero), NaN -> 0 as libmelee does for hitstun."""
    return np.nan_to_num(np.trunc(a), nan=0.0)


def _player_raw(p, stage, out, reindexed=True):
    """Fill float32 out[T, 18] with one player's values in libmelee units (reindexed: the action
    frame counted from 1 for every action, as libmelee counts it for players but not for Nana)."""
    on_ground = p["airborne"] == 0
    x, y = p["x"], p["y"]
    edge = EDGE_GROUND_POSITION.get(enums.Stage(stage))
    off_stage = (np.zeros(len(x), bool) if edge is None else
                 ((np.abs(x) > np.float32(edge)) | (y < np.float32(-6))) & ~on_ground)
    key = p["character"].astype(np.int64) << 16 | p["action"]
    action_frame = _trunc_int(p["state_age"]) + (np.isin(key, _ZERO_INDEXED) & reindexed)
    cols = (x, y, p["percent"], p["shield"], p["stock"], np.where(p["direction"] > 0, 1, -1),
            p["jumps"], on_ground, p["hurtbox"] != 0, _trunc_int(p["hitlag"]),
            _trunc_int(p["misc_as"]), action_frame, off_stage)
    for i, c in enumerate(cols):
        out[:, i] = c
    out[:, len(cols):_P] = p["speeds"]


def _stick(a):
    """libmelee's 0..1 stick value from peppi's -1..1 processed value, in float32."""
    return a / np.float32(2) + np.float32(0.5)


def game_features(game: Game, port: int, opponent_port: int):
    """Features for every frame: (cat int64[T, 11], num float32[T, 122])."""
    me, op = game.players[port], game.players[opponent_port]
    T = len(game.frame_ids)
    cat = np.empty((T, len(CAT_FIELDS)), np.int64)
    cat[:, 0], cat[:, 1] = _ACTION_ID[me["action"]], _ACTION_ID[op["action"]]
    cat[:, 2], cat[:, 3] = _CHARACTER_ID[me["character"]], _CHARACTER_ID[op["character"]]
    cat[:, 4] = game.stage
    raw = np.empty((T, len(NUM_FIELDS)), np.float32)
    _player_raw(me, game.stage, raw[:, :_P])
    _player_raw(op, game.stage, raw[:, _P:_CTRL])
    raw[:, _CTRL:_CTRL + 8] = (me["buttons"][:, None] & _BUTTON_BITS) != 0
    for i, k in enumerate(("joy_x", "joy_y", "c_x", "c_y")):
        raw[:, _CTRL + 8 + i] = _stick(me[k])
    raw[:, _CTRL + 12] = me["trigger"]
    for i, p in enumerate((port, opponent_port)):
        o = _NANA + i * len(_NANA_FIELDS)
        cat[:, 5 + i] = _nana_raw(game.nana.get(p), game.stage, raw[:, o:o + len(_NANA_FIELDS)])
    cat[:, 7:], raw[:, _ITEMS:_RANDALL] = _item_raw(game.items, T, port, opponent_port, me["x"], me["y"])
    raw[:, _RANDALL:] = _randall_raw(game.frame_ids, game.stage)
    raw -= _OFFSET
    raw *= _SCALE
    return cat, np.clip(raw, -_CLIP, _CLIP, out=raw)


def _nana_raw(nana, stage, out) -> np.ndarray:
    """Fill float32 out[T, 19] with a Nana's values (exists, then as _player_raw; 0 where there
    is none); her action ids [T]."""
    if nana is None:
        out[:] = 0
        return np.full(len(out), UNKNOWN_ACTION)
    _player_raw(nana, stage, out[:, 1:], reindexed=False)
    out[:, 0] = nana["exists"]
    out[nana["exists"] == 0] = 0
    return np.where(nana["exists"] != 0, _ACTION_ID[nana["action"]], UNKNOWN_ACTION)


def _item_raw(items: dict, T: int, port: int, opponent_port: int, x, y):
    """The ITEM_SLOTS items nearest to the player (at x[T], y[T]) on each frame, ties in the
    game's order: (type ids int64[T, K], float32[T, K * 8] values in libmelee units)."""
    cat, raw = np.zeros((T, ITEM_SLOTS), np.int64), np.zeros((T, ITEM_SLOTS, len(_ITEM_FIELDS)), np.float32)
    f = items["frame"]
    dx, dy = items["x"] - x[f], items["y"] - y[f]
    order = np.lexsort((dx * dx + dy * dy, f))  # (stable: equal distances keep the game's order)
    rank = np.arange(len(f)) - np.searchsorted(f[order], f[order])
    i, k = order[rank < ITEM_SLOTS], rank[rank < ITEM_SLOTS]
    cat[f[i], k] = np.minimum(items["type"][i], ITEM_VOCAB - 2) + 1
    owner = items["owner"][i]
    raw[f[i], k] = np.stack([np.ones(len(i)), owner == port, owner == opponent_port, dx[i], dy[i],
                             items["speed_x"][i], items["speed_y"][i], _trunc_int(items["timer"][i])], -1)
    return cat, raw.reshape(T, -1)


@functools.cache
def _randall_path() -> np.ndarray:
    """float32[1200, 3]: Randall's (1, centre x, height) at each frame of its 1200-frame loop."""
    from melee.stages import RANDALL_INTERVAL, randall_position

    pos = np.array([randall_position(f) for f in range(RANDALL_INTERVAL)], np.float64)
    return np.stack([np.ones(len(pos)), (pos[:, 1] + pos[:, 2]) / 2, pos[:, 0]], -1).astype(np.float32)


def _randall_raw(frame_ids, stage: int) -> np.ndarray:
    """float32[T, 3]: Randall's values on Yoshi's Story, 0 on other stages."""
    if stage != enums.Stage.YOSHIS_STORY.value:
        return np.zeros((len(frame_ids), len(_RANDALL_FIELDS)), np.float32)
    path = _randall_path()
    return path[np.asarray(frame_ids, np.int64) % len(path)]


def _stick_class(v):
    return np.clip(np.rint(np.float32(v) * np.float32(16)), 0, 16).astype(np.int64)


def _shoulder_class(v):
    return np.clip(np.rint(np.float32(v) * np.float32(4)), 0, 4).astype(np.int64)


def game_labels(game: Game, port: int):
    """Controller classes for every frame (see encode_controller)."""
    p = game.players[port]
    return dict(buttons=((p["buttons"][:, None] & _BUTTON_BITS) != 0).astype(np.uint8),
                main_x=_stick_class(_stick(p["joy_x"])), main_y=_stick_class(_stick(p["joy_y"])),
                c_x=_stick_class(_stick(p["c_x"])), c_y=_stick_class(_stick(p["c_y"])),
                shoulder=_shoulder_class(p["trigger"]))


_REWARD_COLUMNS = [NUM_FIELDS.index(n) for n in ("self_percent", "opp_percent", "self_stock", "opp_stock")]


def frame_rewards(num: np.ndarray, returns: Returns) -> np.ndarray:
    """[T] float64: the reward of each frame of one player view's features `num` [T, F]: what
    follows from frame t to t + 1 (see `Returns`); the last frame's is 0. Percent only rises
    with damage (it drops back to 0 with a lost stock, which is not counted as healing)."""
    raw = num[:, _REWARD_COLUMNS].astype(np.float64) / _SCALE[_REWARD_COLUMNS]  # percents, stocks
    step = np.diff(raw, axis=0)
    rise, lost = np.maximum(step[:, :2], 0), np.maximum(-np.rint(step[:, 2:]), 0)  # (stocks are whole numbers)
    r = returns.damage * (rise[:, 1] - rise[:, 0]) + returns.stock * (lost[:, 1] - lost[:, 0])
    return np.append(r, 0.0)



def returns_to_go(num: np.ndarray, returns: Returns) -> np.ndarray:
    """[T] float32: at each frame, the sum of the rewards from it to the end of the game, the
    reward k frames ahead weighted by returns.discount^k."""
    r, g = frame_rewards(num, returns), returns.discount
    if g == 1:
        return np.cumsum(r[::-1])[::-1].astype(np.float32)
    out, acc = np.empty_like(r), 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + g * acc
        out[t] = acc
    return out.astype(np.float32)


def encode_controller(cs):
    """libmelee ControllerState -> action dict (sticks 17 classes, shoulder 5 classes).

    Meant for a GameState's controller_state; a Controller's own ``current`` state holds the
    pipe values after libmelee's analog fix-up, which do not map back to the same classes.
    """
    b = cs.button
    (mx, my), (cx, cy) = cs.main_stick, cs.c_stick
    return dict(buttons=np.array([b[e] for e in _BUTTON_ENUMS], np.uint8),
                main_x=int(_stick_class(mx)), main_y=int(_stick_class(my)),
                c_x=int(_stick_class(cx)), c_y=int(_stick_class(cy)),
                shoulder=int(_shoulder_class(max(cs.l_shoulder, cs.r_shoulder))))


def press_action(controller, action):
    """Drive a libmelee Controller to an action dict; buttons are sent only when they change."""
    current = controller.current.button  # libmelee keeps the last state sent through the pipe
    for button, pressed in zip(_BUTTON_ENUMS, action["buttons"]):
        if bool(pressed) != current[button]:
            (controller.press_button if pressed else controller.release_button)(button)
    controller.tilt_analog(Button.BUTTON_MAIN, action["main_x"] / 16, action["main_y"] / 16)
    controller.tilt_analog(Button.BUTTON_C, action["c_x"] / 16, action["c_y"] / 16)
    controller.press_shoulder(Button.BUTTON_L, action["shoulder"] / 4)


def _fill_player(num, o, p):
    num[o:o + _P] = (
        p.position.x, p.position.y, p.percent, p.shield_strength, p.stock,
        1 if p.facing else -1, p.jumps_left, p.on_ground, p.invulnerable, p.hitlag_left,
        p.hitstun_frames_left, p.action_frame, p.off_stage, p.speed_air_x_self,
        p.speed_y_self, p.speed_x_attack, p.speed_y_attack, p.speed_ground_x_self)


def _fill_items(cat, num, projectiles, port: int, opponent_port: int, x, y) -> None:
    """features_from_gamestate's items: _item_raw for one frame (the same float32 arithmetic and
    order) in plain Python, a few microseconds for the few items of a frame."""
    near = []
    for i, p in enumerate(projectiles):
        dx, dy = np.float32(p.position.x) - x, np.float32(p.position.y) - y
        near.append((dx * dx + dy * dy, i, dx, dy, p))
    near.sort(key=lambda item: item[:2])
    for k, (_, _, dx, dy, p) in enumerate(near[:ITEM_SLOTS]):
        cat[7 + k] = min(p.type.value, ITEM_VOCAB - 2) + 1
        o = _ITEMS + k * len(_ITEM_FIELDS)
        num[o:o + len(_ITEM_FIELDS)] = (1, p.owner == port, p.owner == opponent_port, dx, dy, p.speed.x, p.speed.y,
                                        math.trunc(p.expiration_frames))


def features_from_gamestate(gamestate, port: int, opponent_port: int):
    """Features of one libmelee GameState: (cat int64[11], num float32[122])."""
    me, op = gamestate.players[port], gamestate.players[opponent_port]
    cat = np.empty(len(CAT_FIELDS), np.int64)
    # (a PlayerState that never received a frame has action value -1: index -1 is unknown too)
    cat[0], cat[1] = _ACTION_ID[me.action.value], _ACTION_ID[op.action.value]
    cat[2], cat[3] = _CHARACTER_ID[me.character.value], _CHARACTER_ID[op.character.value]
    cat[4] = gamestate.stage.value
    num = np.zeros(len(NUM_FIELDS), np.float32)
    _fill_player(num, 0, me)
    _fill_player(num, _P, op)
    cs = me.controller_state
    b = cs.button
    num[_CTRL:_CTRL + 8] = [b[e] for e in _BUTTON_ENUMS]
    num[_CTRL + 8:_CTRL + 12] = cs.main_stick + cs.c_stick
    num[_CTRL + 12] = max(cs.l_shoulder, cs.r_shoulder)
    for i, nana in enumerate((me.nana, op.nana)):
        cat[5 + i] = UNKNOWN_ACTION if nana is None else _ACTION_ID[nana.action.value]
        if nana is not None:
            o = _NANA + i * len(_NANA_FIELDS)
            num[o] = 1
            _fill_player(num, o + 1, nana)
    cat[7:] = 0
    if gamestate.projectiles:
        _fill_items(cat, num, gamestate.projectiles, port, opponent_port, np.float32(me.position.x),
                    np.float32(me.position.y))
    if gamestate.stage.value == enums.Stage.YOSHIS_STORY.value:
        path = _randall_path()
        num[_RANDALL:] = path[gamestate.frame % len(path)]
    num -= _OFFSET
    num *= _SCALE
    return cat, np.clip(num, -_CLIP, _CLIP, out=num)


# =================================================================================================
# Data: replays -> datasets (memory-mapped shards and a manifest) -> training windows
# =================================================================================================

def cache_dir() -> Path:
    """Where parsed replays are kept: $EXPHIL_CACHE, else the platform's cache folder:
    %LOCALAPPDATA% on Windows, ~/Library/Caches on macOS, $XDG_CACHE_HOME (or ~/.cache) elsewhere."""
    if os.environ.get("EXPHIL_CACHE"):
        return Path(os.environ["EXPHIL_CACHE"])
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "exphil"


@dataclasses.dataclass
class Episode:
    """One game seen from one player's port: inputs per frame and that player's controller."""

    source: str
    port: int
    cat: np.ndarray  # [T, C] categorical ids: int64 parsed, uint16 from a dataset (views of its shards)
    num: np.ndarray  # [T, F] float32 numeric features
    labels: dict[str, np.ndarray]  # controller per frame: buttons [T, 8] uint8, sticks/shoulder [T] (int64
    # parsed, uint8 from a dataset)
    code: str | None = None  # the player's connect code, where the replay has one
    digest: str = ""  # the content hash of its replay (from a dataset)
    _rtg: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def frames(self) -> int:
        return len(self.cat)

    def rtg(self, returns: Returns) -> np.ndarray:
        """[T] the return-to-go at every frame (`returns_to_go`, computed once per settings)."""
        if returns not in self._rtg:
            self._rtg[returns] = returns_to_go(self.num, returns)
        return self._rtg[returns]

    def part(self, start: int, end: int, returns: Returns | None = None) -> Episode:
        """Its frames start .. end - 1 (with the whole game's returns-to-go for `returns`)."""
        part = dataclasses.replace(self, cat=self.cat[start:end], num=self.num[start:end],
                                   labels={h: v[start:end] for h, v in self.labels.items()}, _rtg={})
        if returns is not None:
            part._rtg[returns] = self.rtg(returns)[start:end]
        return part

    def in_memory(self) -> Episode:
        """A copy in memory with the types parsing gives (int64 ids and classes, uint8 buttons)."""
        return Episode(self.source, self.port, self.cat.astype(np.int64), np.array(self.num),
                       {h: v.astype(np.uint8 if h == "buttons" else np.int64) for h, v in self.labels.items()},
                       self.code, self.digest)


def find_replays(root: str | os.PathLike, unreadable: list | None = None) -> list[Path]:
    """A .slp file, or every .slp file under a directory (recursively, following symbolic links
    to folders once each), sorted. What cannot be used is appended to `unreadable` as {"path",
    "reason"}: folders that cannot be read, .slp names that lead nowhere (a broken symbolic link,
    a loop) and names that are not valid UTF-8 (shown with \\x escapes)."""
    root = Path(root)
    if not root.is_dir() and not os.path.lexists(root):
        raise ExphilError(f"{_shown(root)}: no such replay file or directory")
    found, seen = [], set()

    def refused(path, reason: str):
        if unreadable is not None:
            unreadable.append({"path": _shown(path), "reason": reason})

    def usable(path: str) -> bool:
        try:
            os.fsdecode(path).encode("utf-8")
            return stat.S_ISREG(os.stat(path).st_mode)
        except UnicodeEncodeError:
            refused(path, "the file name is not valid UTF-8: rename it")
        except OSError as e:
            refused(path, "a broken symbolic link" if e.errno == errno.ENOENT and os.path.islink(path)
                    else f"cannot read file: {e.strerror}")
        return False

    if not root.is_dir():
        return [root] if usable(os.fspath(root)) else []
    for folder, subfolders, files in os.walk(root, followlinks=True,
                                             onerror=lambda e: refused(e.filename, f"cannot read folder: {e.strerror}")):
        real = os.path.realpath(folder)
        if real in seen:  # a link back into a folder already walked: no loop
            subfolders[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / f for f in files if f.lower().endswith(".slp") and usable(os.path.join(folder, f))]
    return sorted(found)


def _shown(path) -> str:
    """A path as text that prints anywhere (bytes that are not UTF-8 as \\x escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# A dataset is a folder: `manifest.sqlite` (one row per replay file and per game) and `shards/`,
# each shard a folder of `.npy` columns that hold the frames of a few dozen games, both player
# views of each game one after the other. Shards are memory-mapped: training reads the windows it
# draws, never whole games. A shard is written under a temporary name and renamed into place
# before the manifest rows that point at it are committed, so a dataset interrupted at any moment
# holds only complete shards that its manifest trusts (and unreferenced ones that are removed).
DATA_VERSION = 1  # the layout of a dataset: manifest tables, shard columns and their dtypes

# A shard's columns, one row per frame of a player view: categorical ids fit in uint16 and the
# controller classes (buttons 0-7, then one column per other head) in uint8; batches cast them.
SHARD_COLUMNS = {"cat": np.uint16, "num": np.float32, "labels": np.uint8}
LABEL_COLUMNS = {h: slice(0, 8) if h == "buttons" else 7 + i for i, h in enumerate(HEADS)}
LEFTOVER_AGE = 24 * 3600  # seconds untouched after which another host's unreferenced shard counts as abandoned
SHARD_FRAMES = 1 << 19  # player-view frames a parsing task puts in one shard (about 275 MB)
GAME_FIELDS = ("hash", "path", "frames", "stage", "slippi", "date", "port_1", "character_1", "code_1",
               "port_2", "character_2", "code_2", "shard", "start", "skipped")


def _episodes_from_game(game: Game) -> list[Episode]:
    out = []
    for port, other in ((game.ports[0], game.ports[1]), (game.ports[1], game.ports[0])):
        cat, num = game_features(game, port, other)
        out.append(Episode(game.path, port, cat, num, game_labels(game, port)))
    return out


def _episodes_from_replay(path: Path) -> list[Episode]:
    return _episodes_from_game(read_replay(path, finalized=True))  # the final version of rolled-back frames


@functools.lru_cache(None)
def _host() -> str:
    """Where this process's id names this process, 8 hex digits: a hash of the machine's name,
    its boot (Linux: boot_id) and this process's PID namespace (Linux: a container's own ids)."""
    import platform

    parts = [platform.node()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass
    return True


_MAPS: dict[str, tuple] = {}  # shard column file -> (mmap, array): opened once per process
_MAPPED_ROWS = [0]  # reads of shards since their pages were last released


def _mapped(path: Path) -> np.ndarray:
    """A shard column, memory-mapped read-only (checked: its header is read, never its data)."""
    import mmap

    key = str(path)
    if key not in _MAPS:
        _room_for_maps()
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
            if fortran or size != offset + int(np.prod(shape)) * dtype.itemsize:
                raise ValueError(f"{path}: {size} bytes for an array of {shape} {dtype}")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if path.name != "labels.npy" and hasattr(mmap, "MADV_RANDOM"):  # windows are read at random: no
            mm.madvise(mmap.MADV_RANDOM)  # read-ahead (the baselines read the small labels column in order)
        _MAPS[key] = mm, np.frombuffer(mm, dtype, int(np.prod(shape)), offset).reshape(shape)
    return _MAPS[key][1]


def _unmap(path: Path) -> None:
    """Close the mapping of a file that exphil wrote itself, and remove the file."""
    mm, _ = _MAPS.pop(str(path), (None, None))
    if mm is not None:
        with contextlib.suppress(BufferError):  # (views of it still in use keep it open until they go)
            mm.close()
    path.unlink(missing_ok=True)


def _room_for_maps() -> None:
    """Each mapping holds a file descriptor: near the soft limit, raise it to the hard one."""
    try:
        import resource
    except ImportError:  # (Windows: no such limit)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and len(_MAPS) + 256 > soft and (soft < hard or hard == resource.RLIM_INFINITY):
        with contextlib.suppress(ValueError, OSError):  # (macOS refuses an unlimited soft limit)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 10240, hard))


def release_pages(reads: int = 0, every: int = 16) -> None:
    """Count `reads` of shards (a window counts one, a whole episode read in order its frames);
    past `every`, drop the mapped shard pages from this process (the OS keeps them in its page
    cache), so its memory stays flat in the dataset's size. A read costs pages whatever its
    length: a page fault often maps a whole large page-cache folio, up to 2 MB (on a dataset just
    written, 64 windows mapped ~300 MB)."""
    import mmap

    _MAPPED_ROWS[0] += reads
    if _MAPPED_ROWS[0] >= every and hasattr(mmap, "MADV_DONTNEED"):
        for mm, _ in list(_MAPS.values()):
            mm.madvise(mmap.MADV_DONTNEED)
        _MAPPED_ROWS[0] = 0


class ShardCutShort(ExphilError):
    """A shard's file became shorter than its mapping while in use (see `check_shards`)."""


def check_shards(episodes) -> None:
    """Raise ShardCutShort if a shard column these episodes are views of became shorter than its
    mapping (a restore or a copy over the dataset while it is in use): the next read of a page
    past the file's new end would end this process with SIGBUS, which Python cannot catch.
    Checked before each batch is read (one fstat per column in use); a cut during the read
    itself still ends the process so."""
    import mmap

    maps = {}
    for ep in {id(ep): ep for ep in episodes}.values():
        for a in (ep.cat, ep.num, ep.labels["buttons"]):
            while isinstance(a, (np.ndarray, memoryview)):  # (a view of a memoryview of the mapping)
                a = a.base if isinstance(a, np.ndarray) else a.obj
            if isinstance(a, mmap.mmap):
                maps[id(a)] = a
    for mm in maps.values():
        if mm.size() < len(mm):
            key = next(k for k, (m, _) in _MAPS.items() if m is mm)
            del _MAPS[key]  # (mapped again, and found damaged, if the shard is used again)
            path = Path(key)
            raise ShardCutShort(f"{path.parent.parent.parent}: shard {path.parent.name} was cut short while in use "
                                f"({path.name}: {mm.size():,} of {len(mm):,} bytes)")


def _write_shard(folder: Path, name: str, episodes: list[Episode]) -> None:
    """Write the episodes' columns as shard `name`: under a temporary name, renamed when complete."""
    tmp = folder / f".tmp-{name}"
    labels = np.concatenate([np.column_stack([ep.labels["buttons"]] + [ep.labels[h] for h in HEADS if h != "buttons"])
                             for ep in episodes])
    columns = {"cat": np.concatenate([ep.cat for ep in episodes]),
               "num": np.concatenate([ep.num for ep in episodes]), "labels": labels}
    try:
        tmp.mkdir(parents=True)
        for column, dtype in SHARD_COLUMNS.items():
            np.save(tmp / f"{column}.npy", columns[column].astype(dtype, copy=False))
        os.rename(tmp, folder / name)
    except OSError as e:  # (a full disk: numpy's message names no file and no error)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExphilError(f"{folder.parent}: cannot write shard {name}: {e.strerror or e}"
                          + ("" if e.errno else " (is the disk full?)")) from None


def parse_replays(task: tuple) -> tuple[list[dict], float]:
    """Parse some replays into one new shard of a dataset: the mapped step of ingestion (it
    needs only its task and the dataset's folder). task: (dataset folder, shard name,
    [(content hash, path)]). Returns a manifest row per replay (a skip reason for unusable ones),
    its `hash` the content that was parsed (the file may have been replaced since it was hashed),
    or None with an `error` for a file that could not be read whole; and the processor time it
    took (seconds of this process's CPU time: what one core does, however busy the machine is
    with other work)."""
    folder, name, items = task
    t0, rows, episodes, at = time.process_time(), [], [], 0
    for _, path in items:
        row = dict.fromkeys(GAME_FIELDS)
        row.update(path=str(path))
        try:
            row["hash"], game = _read_unchanged(path)
            skipped = game.reason if isinstance(game, ReplayError) else None
            eps = None if skipped else _episodes_from_game(game)
        except ReplayError as e:  # (not raised again from here: a traceback through this frame would hold
            skipped = e.reason    # every game of the task until the garbage collector ran)
        except _Unreadable as e:
            rows.append({**row, "error": str(e)})
            continue
        if skipped:
            rows.append({**row, "skipped": skipped})
            continue
        codes = game.info.get("codes", {})
        row.update(frames=eps[0].frames, stage=game.stage, slippi=game.info.get("slippi"), date=game.info.get("date"),
                   shard=name, start=at, parser=game.info.get("parser"))  # (the parser is reported, not recorded)
        for i, ep in enumerate(eps, 1):
            row.update({f"port_{i}": ep.port, f"character_{i}": int(ep.cat[0, 2]), f"code_{i}": codes.get(ep.port)})
        rows.append(row)
        episodes += eps
        at += 2 * eps[0].frames
    if episodes:
        _write_shard(Path(folder) / "shards", name, episodes)
    return rows, time.process_time() - t0


class _Unreadable(Exception):
    """A replay file that cannot be read whole: gone or refused (or _Changing)."""


class _Changing(_Unreadable):
    def __init__(self):
        super().__init__("changed while being read (still being written or copied?); ingest it again once complete")


def _identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced or written: its inode, size and times."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _content(path) -> tuple[str, tuple]:
    """(SHA-256 of a file's content, 24 hex digits; its `_identity` while read), read in blocks of
    1 MiB (constant memory). _Unreadable if it cannot be read, _Changing if it changes meanwhile."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            before = _identity(os.fstat(f.fileno()))
            while block := f.read(1 << 20):
                digest.update(block)
            if _identity(os.stat(path)) != before:
                raise _Changing
    except OSError as e:
        raise _Unreadable(f"cannot read file: {e.strerror}") from None
    return digest.hexdigest()[:24], before


def _read_unchanged(path, tries: int = 3) -> tuple[str, Game | ReplayError]:
    """(The hash of a replay's content, the game parsed from that content or why it is unusable):
    hashed after parsing, the file the same before and after; a file that changes meanwhile is
    read again (up to `tries` times), then _Unreadable."""
    for _ in range(tries):
        try:
            before = _identity(os.stat(path))
        except OSError as e:
            raise _Unreadable(f"cannot read file: {e.strerror}") from None
        try:
            game = read_replay(path, finalized=True)
        except ReplayError as e:  # kept without tracebacks (its own, its cause's): their frames, and the
            game = e.with_traceback(None)  # frames that called them, would hold every game of the task
            game.__cause__ = game.__context__ = None
        with contextlib.suppress(_Changing):
            digest, after = _content(path)
            if after == before:
                return digest, game
    raise _Changing


def _file_hash(path: Path) -> tuple[str | None, str | None]:
    """(SHA-256 of the file's content, 24 hex digits, or None; why it cannot be read, or None)."""
    try:
        return _content(path)[0], None
    except _Unreadable as e:
        return None, str(e)


def _manifest(method):
    """A Dataset method that uses the manifest: SQLite's errors (a damaged file, a full disk)
    become one line naming the dataset."""
    @functools.wraps(method)
    def checked(self, *args, **kw):
        import sqlite3

        try:
            return method(self, *args, **kw)
        except sqlite3.DatabaseError as e:
            damaged = "" if isinstance(e, sqlite3.OperationalError) else f" (damaged: {self.remedy})"
            raise ExphilError(f"{self.label}: manifest.sqlite: {e}{damaged}") from None
    return checked


def _row_problem(row: dict) -> str | None:
    """What is wrong with a manifest row (types, ranges, known ids, a shard name inside the
    dataset), or None."""
    text = lambda f: row[f] is None or isinstance(row[f], str)
    integer = lambda f, ok: isinstance(row[f], int) and ok(row[f])
    if not (isinstance(row["hash"], str) and isinstance(row["path"], str) and text("skipped")):
        return "hash, path and skipped must be text"
    if row["skipped"] is not None:
        return None
    valid = {"frames": integer("frames", lambda v: v > 0), "start": integer("start", lambda v: v >= 0),
             "stage": integer("stage", lambda v: v in _KNOWN_STAGES),
             **{f"port_{i}": integer(f"port_{i}", lambda v: 1 <= v <= 4) for i in (1, 2)},
             **{f"character_{i}": integer(f"character_{i}", lambda v: v in _KNOWN_CHARACTERS) for i in (1, 2)},
             **{f: text(f) for f in ("slippi", "date", "code_1", "code_2")},
             "shard": isinstance(row["shard"], str) and bool(_SHARD_NAME.fullmatch(row["shard"]))
             and ".." not in row["shard"]}
    bad = next((f for f, ok in valid.items() if not ok), None)
    return bad and f"{bad} {row[bad]!r} is not valid" + (" (a folder name inside the dataset's shards/)"
                                                          if bad == "shard" else "")


_KNOWN_STAGES = {s.value for s in enums.Stage}
_KNOWN_CHARACTERS = {c.value for c in enums.Character}
_SHARD_NAME = re.compile(r"\w[\w.-]*")  # a folder of shards/ (no separators, no leading dot)


class Dataset:
    """A dataset folder (see above) and its manifest (SQLite, WAL; each write one short
    transaction, so several processes can share it). Opened to read (`create` False), it is
    never written (a read-only folder can be read). in_cache: the replay cache's dataset (see
    `_selected`), named as such in errors.

    `files`: the content hash of each replay file at a given size and modification time, so a
    file is read again only when new or changed. `games`: one row per distinct content: source
    path, frames, stage, Slippi version, date, and per player view (1 and 2) its port, character
    and player code; where its frames are (shard and first row); or why it was skipped."""

    def __init__(self, folder: str | os.PathLike, create: bool = False, in_cache: bool = False):
        self.folder, self.inside = Path(folder), set()
        self.label = f"the replay cache's dataset {folder}" if in_cache else str(folder)
        self.remedy = "delete that folder to rebuild it from the replays" if in_cache else \
            "ingest the replays into a new dataset folder"
        if not create and not (self.folder / "manifest.sqlite").is_file():
            raise ExphilError(f"{self.folder}: not a dataset (no manifest.sqlite); build one with "
                              f"`exphil ingest REPLAYS --out {self.folder}`")
        self._open(create)

    @_manifest
    def _open(self, create: bool) -> None:
        import sqlite3
        from urllib.parse import quote

        if not create:  # read only; where SQLite cannot even add its shared-memory file (a read-only
            uri = "file:" + quote(str(self.folder.absolute() / "manifest.sqlite"))  # folder), as unchanging
            try:
                self.db = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=60, isolation_level=None)
                self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                self.db = sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None)
            self._check_layout()
            return
        (self.folder / "shards").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.folder / "manifest.sqlite", timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime_ns INT, hash TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS games (hash TEXT PRIMARY KEY, path TEXT, frames INT, stage INT, "
                        "slippi TEXT, date TEXT, port_1 INT, character_1 INT, code_1 TEXT, port_2 INT, "
                        "character_2 INT, code_2 TEXT, shard TEXT, start INT, skipped TEXT)")
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('layout', ?)", (f"{FEATURE_VERSION}.{DATA_VERSION}",))
        self._check_layout()

    def _check_layout(self) -> None:
        layout = f"{FEATURE_VERSION}.{DATA_VERSION}"
        found = (self.db.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone() or [None])[0]
        if found != layout:
            raise ExphilError(f"{self.folder}: a dataset of layout {found}; this exphil reads layout {layout}: "
                              "ingest the replays into a new folder")

    @_manifest
    def known_files(self) -> dict[str, tuple[int, int, str]]:
        return {p: (size, mtime, h) for p, size, mtime, h in self.db.execute("SELECT * FROM files")}

    @_manifest
    def record_files(self, rows: list[tuple]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", rows)

    @_manifest
    def rows(self, where: str = "", args: tuple = ()) -> list[dict]:
        """The manifest's game rows, checked: the manifest is input (it may have been edited)."""
        cur = self.db.execute(f"SELECT * FROM games {where}", args)
        names = [c[0] for c in cur.description]
        missing = [f for f in GAME_FIELDS if f not in names]
        if missing:
            raise ExphilError(f"{self.label}: manifest.sqlite: its games table has no column {missing[0]} "
                              f"(damaged: {self.remedy})")
        rows = [dict(zip(names, r)) for r in cur]
        for row in rows:
            problem = _row_problem(row)
            if problem:
                raise ExphilError(f"{self.label}: manifest row of game {row['hash']!r} ({row['path']}): {problem}; "
                                  f"the manifest was edited or damaged: {self.remedy}")
        return rows

    @_manifest
    def commit(self, rows: list[dict]) -> None:
        """Record parsed games (their shard already in place); a content already recorded by
        another process stays as it was."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany(f"INSERT OR IGNORE INTO games VALUES ({', '.join('?' * len(GAME_FIELDS))})",
                                [tuple(r[f] for f in GAME_FIELDS) for r in rows])

    def columns(self, shard: str) -> dict[str, np.ndarray]:
        paths = {c: self.folder / "shards" / shard / f"{c}.npy" for c in SHARD_COLUMNS}
        if shard not in self.inside:  # (checked once per shard: no link leads out of the dataset)
            base = os.path.realpath(self.folder / "shards")
            for path in paths.values():
                if os.path.commonpath([base, os.path.realpath(path)]) != base:
                    raise ExphilError(f"{self.label}: shard {shard}: {path.name} leads outside the dataset "
                                      f"(to {os.path.realpath(path)}); refused")
            self.inside.add(shard)
        return {c: _mapped(path) for c, path in paths.items()}

    @_manifest
    def check(self, rows: list[dict]) -> list[str]:
        """Shards of these rows that are missing or damaged (from their headers and sizes):
        their games are forgotten, to be parsed again."""
        ends = collections.defaultdict(int)
        for r in rows:
            if r["shard"]:
                ends[r["shard"]] = max(ends[r["shard"]], r["start"] + 2 * r["frames"])
        bad, widths = [], {"cat": len(CAT_FIELDS), "num": len(NUM_FIELDS), "labels": 8 + len(HEADS) - 1}
        for shard, end in ends.items():
            try:  # (more rows than the manifest uses: games another process recorded first)
                cols = self.columns(shard)
                if any(len(a) < end or a.shape[1:] != (widths[c],) or a.dtype != SHARD_COLUMNS[c]
                       for c, a in cols.items()):
                    raise ValueError("columns of other shapes than the manifest's")
            except (FileNotFoundError, ValueError) as e:  # (other errors, e.g. too many open files, are raised)
                bad.append(f"{shard}: {e}")
                with self.db:
                    self.db.execute("BEGIN")
                    self.db.execute("DELETE FROM games WHERE shard = ?", (shard,))
        return bad

    def episodes(self, row: dict, source: str | None = None) -> list[Episode]:
        """The two player views of a game, as views of its memory-mapped shard (a missing or
        damaged shard is an ExphilError: ingesting the replays again parses its games again)."""
        T = row["frames"]
        try:
            cols = self.columns(row["shard"])
            if any(len(a) < row["start"] + 2 * T for a in cols.values()):
                raise ValueError("fewer rows than the manifest's")
        except (FileNotFoundError, ValueError) as e:
            raise ExphilError(f"{self.folder}: shard {row['shard']} is damaged ({e}); `exphil ingest` the replays "
                              "into this dataset again to parse its games again") from None
        out = []
        for i in (1, 2):
            rows = slice(row["start"] + (i - 1) * T, row["start"] + i * T)
            labels = cols["labels"][rows]
            out.append(Episode(source or row["path"], row[f"port_{i}"], cols["cat"][rows], cols["num"][rows],
                               {h: labels[:, c] for h, c in LABEL_COLUMNS.items()}, row[f"code_{i}"], row["hash"]))
        return out

    @_manifest
    def remove_unreferenced(self) -> None:
        """Shards no manifest row points at, and temporary ones, left by processes that ended
        (killed while ingesting, or beaten to a game by another process). A shard's name starts
        with the `_host` and the process id of the ingestion that wrote it: those of this host
        are removed once that process is gone; those of another host (a Ray node, another
        container), whose processes cannot be asked, once untouched for LEFTOVER_AGE."""
        used = {r for (r,) in self.db.execute("SELECT DISTINCT shard FROM games")}
        for d in (self.folder / "shards").iterdir():
            name = d.name.removeprefix(".tmp-")
            if d.name == name and name in used:
                continue
            host, pid = (name.split("-") + [""])[:2]
            try:
                age = time.time() - d.stat().st_mtime
            except OSError:  # (removed meanwhile)
                continue
            ours = host == _host() and pid.isdigit()
            if (ours and not _pid_alive(int(pid))) or (not ours and age > LEFTOVER_AGE):
                shutil.rmtree(d, ignore_errors=True)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: exit as soon as the process that started the worker is gone (even
    killed with SIGKILL, which gives it no chance to stop its workers), and quietly on Ctrl-C
    (held back until now, see `_ctrl_c_held`): the parent says it, in one line."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(1))
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold Ctrl-C (SIGINT) back while worker processes start: they inherit it held, so that no
    worker is interrupted while it imports (a traceback each); here it arrives on leaving."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def _mapper(workers: int, ray: str | None = None):
    """map(function, items) with results in order: on `workers` processes (started at the first
    call with more than one item), or here; with `ray` (a cluster's address), as Ray tasks on
    the cluster's cores."""
    if ray:
        cluster = connect_ray(ray)
        def on_ray(function, items, chunksize: int = 1):
            task = cluster.remote(num_cpus=1)(function)
            return map(cluster.get, [task.remote(x) for x in items])
        yield on_ray
        return
    pool = None

    def mapped(function, items, chunksize: int = 1):
        nonlocal pool
        if workers <= 1 or len(items) <= 1:
            return map(function, items)
        # workers (started as tasks are submitted) start with Ctrl-C held, and with their output
        # silenced (their errors reach this process as exceptions): a Ctrl-C is one line from here
        with _ctrl_c_held(), _quiet_fd2():
            if pool is None:
                from concurrent.futures import ProcessPoolExecutor
                import multiprocessing

                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_die_with_parent, initargs=(os.getpid(),))
            return pool.map(function, items, chunksize=chunksize)
    try:
        yield mapped
    finally:
        # (a Ctrl-C that lands while the pool starts its manager thread leaves nothing to join:
        # shutdown says so with a RuntimeError; the workers already started exit with this process)
        if pool is not None:
            with contextlib.suppress(RuntimeError):
                pool.shutdown(cancel_futures=True)


class _Collection(NamedTuple):
    paths: list[Path]  # every replay file found, in order
    hashes: dict  # path -> content hash (files that could be read)
    errors: dict  # path -> why it cannot be read
    unreadable: list  # what could not be read (folders, links to nowhere, names not UTF-8): {"path", "reason"}
    dataset: Dataset


def _tasks(folder: Path, new: list[tuple[str, Path]], sizes: dict, workers: int) -> list[tuple]:
    """Parsing tasks of at most ~SHARD_FRAMES player-view frames (guessed from file sizes: about 170
    bytes of replay per player-view frame), and at least four per worker where there are enough
    replays (the work stays balanced, and an interrupted ingestion keeps most of what it did)."""
    per = max(1, min(math.ceil(len(new) / (4 * workers)),
                     SHARD_FRAMES * 170 // max(1, int(np.mean(list(sizes.values()))))))
    return [(str(folder), f"{_host()}-{os.getpid()}-{time.time_ns():x}-{k}", new[k:k + per])
            for k in range(0, len(new), per)]


def ingest(replays, out: str | os.PathLike, log=None, max_files: int = 0, workers: int | None = None,
           ray: str | None = None, in_cache: bool = False) -> _Collection:
    """Add the new and changed replays under `replays` to the dataset in `out` (created if need
    be), parsing on every core (with `ray`, a cluster's address: as Ray tasks on its cores; the
    replays and `out` must then be folders every node reaches). A file whose path, size and
    modification time the manifest knows is not read; a new file is hashed (in blocks: constant
    memory), and a content already in the dataset (a copy) is not parsed again. A new content is
    hashed again after parsing: each game is recorded under the content it was parsed from, also
    when its file was replaced meanwhile (one that keeps changing is reported). Unusable replays
    are recorded with their reason and reported. in_cache: `out` is the replay cache's dataset
    (see Dataset)."""
    unreadable = []
    paths = [p for r in ([replays] if isinstance(replays, (str, os.PathLike)) else replays)
             for p in find_replays(r, unreadable)]
    paths = paths[:max_files] if max_files else paths
    dataset = Dataset(out, create=True, in_cache=in_cache)
    known, hashes, errors, stats, unknown = dataset.known_files(), {}, {}, {}, []
    for p in paths:
        try:
            st = p.stat()
        except OSError as e:
            errors[p] = f"cannot read file: {e.strerror}"
            continue
        key = os.path.abspath(p)
        stats[p] = (key, st.st_size, st.st_mtime_ns)
        if known.get(key, (None, None, None))[:2] == (st.st_size, st.st_mtime_ns):
            hashes[p] = known[key][2]
        else:
            unknown.append(p)
    workers = int(connect_ray(ray).cluster_resources().get("CPU", 1)) if ray else max(1, workers or os.cpu_count() or 1)
    dataset.remove_unreferenced()
    from concurrent.futures.process import BrokenProcessPool
    try:
        with _mapper(workers, ray) as mapped:
            hashing = mapped(_file_hash, unknown, chunksize=8) if len(unknown) > 16 else map(_file_hash, unknown)
            for p, (digest, error) in zip(unknown, hashing):
                if error:
                    errors[p] = error
                else:
                    hashes[p] = digest
            dataset.record_files([(*stats[p], hashes[p]) for p in unknown if p in hashes])
            wanted = set(hashes.values())
            for problem in dataset.check([r for r in dataset.rows() if r["hash"] in wanted]):
                if log:
                    log(f"parsing again the games of a damaged shard: {problem}")
            _forget_unread_by_libmelee(dataset, wanted)
            have, new, sizes = {r["hash"] for r in dataset.rows()}, {}, {}
            for p, h in hashes.items():
                if h not in have and h not in new:
                    new[h], sizes[h] = Path(stats[p][0]), stats[p][1]  # (the absolute path, recorded)
            if new:
                changed = _parse_new(dataset, list(new.items()), sizes, workers, log, mapped)
                for p in [p for p in hashes if stats[p][0] in changed]:  # replaced since hashed: what was parsed
                    hashes[p], error = changed[stats[p][0]]
                    if error:
                        errors[p] = error
                        del hashes[p]
    except BrokenProcessPool:
        if workers == 1:
            raise
        if log:
            log("parsing on one core: the worker processes stopped (killed, or they could not start: a script "
                "that calls exphil needs an `if __name__ == \"__main__\":` guard to use every core)")
        return ingest(replays, out, log, max_files, workers=1, in_cache=in_cache)
    return _Collection(paths, hashes, errors, unreadable, dataset)


def _forget_unread_by_libmelee(dataset: Dataset, hashes: set) -> None:
    """Forget the games of these contents that an exphil without the libmelee fallback recorded as
    unreadable (their reason names peppi-py's error alone), so that they are parsed again."""
    with dataset.db:
        dataset.db.execute("BEGIN")
        dataset.db.executemany("DELETE FROM games WHERE hash = ? AND shard IS NULL AND skipped LIKE 'unreadable (%' "
                               "AND skipped NOT LIKE '%libmelee%'", [(h,) for h in hashes])


def _parse_new(dataset: Dataset, new: list, sizes: dict, workers: int, log, mapped) -> dict:
    """Parse the new contents [(hash, path)] into the dataset; returns {path: (hash, error)} of
    the files that held another content when parsed (hash None: could not be read whole)."""
    t0, frames, busy, fallback = time.perf_counter(), 0, 0.0, 0
    bar = Progress(len(new), "parsing replays", quiet=log in (None, _silent))
    tasks, asked, changed = _tasks(dataset.folder, new, sizes, workers), {str(p): h for h, p in new}, {}
    try:
        for rows, seconds in mapped(parse_replays, tasks):
            dataset.commit([r for r in rows if r["hash"]])  # its shard is in place
            changed.update({r["path"]: (r["hash"], r.get("error")) for r in rows if r["hash"] != asked[r["path"]]})
            busy += seconds
            for r in rows:
                frames += r["frames"] or 0
                fallback += r.get("parser") == "libmelee"
                bar.update(r["frames"] or 0)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if log and frames:
        read_by = f", {fallback} read by libmelee (peppi-py cannot read them, or their Nana)" if fallback else ""
        log(f"parsed {len(new)} new replays ({frames:,} frames{read_by}) in {seconds:.1f} s on {workers} core(s): "
            f"{frames / seconds:,.0f} frames/s ({frames / busy:,.0f} per core: frames per second of parsing CPU time)")
    return changed


def _cache_dataset(cache: Path | None) -> Path:
    """The dataset that `--replays` collections are ingested into, in the cache folder."""
    return (cache or cache_dir()) / f"dataset-v{FEATURE_VERSION}.{DATA_VERSION}"


def _selected(replays=None, data=None, cache: Path | None = None, log=None, max_files: int = 0,
              workers: int | None = None, ray: str | None = None) -> tuple[Dataset, list, list]:
    """(dataset, [(source path, manifest row)] in order, skipped replays) of a replay collection
    (ingested into the cache's dataset first, on a Ray cluster with `ray`; a content found twice
    counts once) or of a whole dataset folder (`data`)."""
    if data is not None:
        dataset = Dataset(data)
        rows = dataset.rows("ORDER BY path, hash")[:max_files or None]
        return dataset, [(r["path"], r) for r in rows], []
    col = ingest(replays, _cache_dataset(cache), log, max_files, workers, ray, in_cache=True)
    by_hash = {r["hash"]: r for r in col.dataset.rows()}
    chosen, seen = [], set()
    skipped = [*col.unreadable, *({"path": str(p), "reason": reason} for p, reason in col.errors.items())]
    for p in col.paths:
        h = col.hashes.get(p)
        if h is not None and h not in seen and h in by_hash:
            seen.add(h)
            chosen.append((str(p), by_hash[h]))
    return col.dataset, chosen, skipped


def load_games(replays=None, cache: Path | None = None, log=None, max_files: int = 0, workers: int | None = None,
               keep: Callable[[dict], bool] | None = None, left_out: list | None = None,
               data: str | os.PathLike | None = None, ray: str | None = None) -> tuple[list[list[Episode]], list[dict]]:
    """Episodes grouped by game, and the replays that were skipped (path and reason), of a
    replay collection (`replays`, ingested into the cache's dataset first) or of a dataset folder
    (`data`). The episodes' arrays are memory-mapped views of the dataset's shards.

    A replay that cannot be used is reported in one line and skipped; the rest go on.
    `keep(manifest row)` selects games from the manifest alone (see `_game_filter`); the paths
    of those it leaves out are appended to `left_out`. ray: parse new replays on this Ray
    cluster (see `ingest`)."""
    dataset, chosen, skipped = _selected(replays, data, cache, log, max_files, workers, ray)
    games = []
    for source, row in chosen:
        if row["skipped"]:
            skipped.append({"path": source, "reason": row["skipped"]})
        elif keep is None or keep(row):
            games.append(dataset.episodes(row, source))
        elif left_out is not None:
            left_out.append(source)
    for s in skipped if log else []:
        log(f"skipped {s['path']}: {s['reason']}")
    return games, skipped


def load_replay(path: Path, cache: Path | None = None) -> list[Episode]:
    """Both players' episodes of one replay, through the cache's dataset, in memory with the
    types parsing gives (int64 ids and classes, as a graph's inputs take them). Raises
    ReplayError (remembered in the dataset too, so a bad file is not parsed again)."""
    dataset, chosen, skipped = _selected(Path(path), None, cache)
    if skipped or chosen[0][1]["skipped"]:
        raise ReplayError(path, skipped[0]["reason"] if skipped else chosen[0][1]["skipped"])
    return [ep.in_memory() for ep in dataset.episodes(chosen[0][1], str(path))]


def describe(replays=None, cache: Path | None = None, log=None, data: str | os.PathLike | None = None,
             ray: str | None = None) -> dict:
    """What a replay collection or a dataset holds (`exphil data`): games, frames, hours of
    play, player views per character, games per stage and per Slippi version, skipped replays
    per reason; from the manifest alone (new and changed replays of a collection are ingested
    into the cache's dataset first)."""
    _, chosen, unreadable = _selected(replays, data, cache, log, ray=ray)
    count = collections.Counter
    characters, stages, versions, skipped = count(), count(), count(), count()
    frames = 0
    for u in unreadable:
        skipped[u["reason"].split(":")[0]] += 1
    for _, row in chosen:
        if row["skipped"]:
            skipped[row["skipped"].split(":")[0].split(" (")[0]] += 1
            continue
        frames += row["frames"]
        characters.update(enums.Character(row[f"character_{i}"]).name.lower() for i in (1, 2))
        stages[enums.Stage(row["stage"]).name.lower()] += 1
        versions[row["slippi"]] += 1
    return {"replays": len(chosen) + len(unreadable), "games": sum(stages.values()), "frames": frames,
            "hours": frames / 60 / 3600, "characters": dict(characters.most_common()),
            "stages": dict(stages.most_common()), "versions": dict(versions.most_common()),
            "skipped": dict(skipped.most_common())}


def _enum_id(enum, name: str, what: str) -> int:
    try:
        return enum[name.upper().replace("-", "_").replace(" ", "_")].value
    except KeyError:
        raise UsageError(f"unknown {what} {name!r}; known: "
                          + ", ".join(sorted(e.name.lower() for e in enum))) from None


def _view_filter(character: str | None = None, opponent: str | None = None, stage: str | None = None,
                 min_frames: int = 0) -> Callable[[int, int, int, int], bool]:
    """keep(own character, opponent character, stage, frames) for a player view of a game."""
    want = [v and _enum_id(enum, v, what) for enum, v, what in ((enums.Character, character, "character"),
                                                                 (enums.Character, opponent, "character"),
                                                                 (enums.Stage, stage, "stage"))]
    return lambda *view: view[3] >= min_frames and all(w is None or w == "" or w == v for w, v in zip(want, view))


def filter_games(games: list[list[Episode]], character: str | None = None, opponent: str | None = None,
                 stage: str | None = None, min_frames: int = 0) -> list[list[Episode]]:
    """Keep games of at least `min_frames` on `stage`, and the player views whose own and
    opponent characters match (names as in libmelee, e.g. fox, falco, final_destination)."""
    keep = _view_filter(character, opponent, stage, min_frames)
    out = []
    for game in games:
        kept = [ep for ep in game if keep(*map(int, ep.cat[0, 2:5]), ep.frames)]
        release_pages(len(game))  # (a dataset's: a read of each view's first frame maps its page, not kept)
        if kept:
            out.append(kept)
    return out


def _game_filter(character=None, opponent=None, stage=None, min_frames: int = 0) -> Callable[[dict], bool]:
    """keep(manifest row): whether any player view of the game passes `filter_games`."""
    keep = _view_filter(character, opponent, stage, min_frames)
    return lambda row: any(keep(row[f"character_{i}"], row[f"character_{3 - i}"], row["stage"], row["frames"])
                           for i in (1, 2))


SPLITS = ("game", "player", "source")


def split_groups(games: list[list[Episode]], by: str = "game") -> list[list[int]]:
    """Indices of the games that must stay on one side of a split together, in the games' order:
    each game alone (`by` "game"); the games of one folder ("source"); or ("player") the
    connected components of games that share a player, a player being a connect code and, in a
    game without any code, the players of its folder (known only by where the replay is)."""
    if by == "game":
        return [[i] for i in range(len(games))]
    folder = lambda game: ("folder", str(Path(game[0].source).parent))
    keys = [[("code", e.code) for e in g if e.code and by == "player"] or [folder(g)] for g in games]
    root: dict = {}

    def find(k):  # the key that stands for k's group (union-find)
        while root.setdefault(k, k) != k:
            root[k] = root[root[k]]  # (halves the path for the next look-up)
            k = root[k]
        return k
    for ks in keys:
        for k in ks[1:]:
            root[find(k)] = find(ks[0])
    groups: dict = {}
    for i, ks in enumerate(keys):
        groups.setdefault(find(ks[0]), []).append(i)
    return list(groups.values())


def split_games(games: list, val_split: float, seed: int, by: str = "game") -> tuple[list, list]:
    """Train/validation split, never of a game's frames, a function of the seed and the games:
    the groups of `split_groups` in a seeded order fill the validation side up to `val_split`
    of the games, a group that would overshoot it skipped (so one large group stays in training).
    A split that leaves validation empty is refused (UsageError)."""
    groups = split_groups(games, by)
    n_val = min(len(games) - 1, max(1, round(len(games) * val_split))) if val_split > 0 and len(games) > 1 else 0
    val: set[int] = set()
    for j in np.random.default_rng(seed).permutation(len(groups)):
        if len(val) + len(groups[j]) <= n_val:
            val.update(groups[j])
    if val_split > 0 and not val:
        raise UsageError(f"--split-by {by} leaves no validation game: each of the {len(groups)} groups of games "
                         f"that share a {by} holds more than the {n_val} games --val-split {val_split} asks for "
                         f"(the smallest holds {min(map(len, groups))}); raise --val-split or split by game")
    return [g for i, g in enumerate(games) if i not in val], [g for i, g in enumerate(games) if i in val]


class Windows:
    """The consecutive windows of episodes, numbered in order (episode by episode); window k is
    (episode, first frame), found by a binary search over one count per episode, so a plan of
    windows is an array of numbers and nothing is held per window. Frame t is trained to predict
    the controller at t + 1 + delay, so the last 1 + delay frames of an episode have no target."""

    def __init__(self, episodes: list[Episode], length: int, delay: int = 0):
        counts = -(-np.array([max(ep.frames - 1 - delay, 0) for ep in episodes], np.int64) // length)
        self.length, self.ends = length, np.cumsum(counts)
        self.firsts = self.ends - counts

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, k) -> np.ndarray:
        """[n, 2] (episode, first frame) of window numbers k (an array or a slice; [2] for one number)."""
        k = np.arange(*k.indices(len(self))) if isinstance(k, slice) else np.asarray(k, np.int64) % max(len(self), 1)
        i = np.searchsorted(self.ends, k, side="right")
        return np.stack([i, (k - self.firsts[i]) * self.length], -1)


class Batches:
    """An epoch's batches of windows in a seeded order: batch k is the windows at positions
    k * size .. (k + 1) * size of a pseudo-random permutation of the window numbers, computed for
    those positions only (`order`), so nothing is held per window: the same order for the same
    rng, each window exactly once.

    The permutation is a keyed Feistel network over [0, 4^h), the smallest power of 4 at or
    above the number of windows n (h bits each half, ROUNDS rounds, round keys drawn from the
    rng), with cycle walking: a number that lands at or past n is permuted again until it lands
    in [0, n) (fewer than 4 tries on average), which is a permutation of [0, n)."""

    ROUNDS = 6

    def __init__(self, wins: Windows, size: int, rng: np.random.Generator):
        self.wins, self.size, self.n = wins, size, len(wins)
        self.half = max(-(-(self.n - 1).bit_length() // 2), 1)
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, self.ROUNDS, dtype=np.uint64, endpoint=True)

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.wins[self.order(np.arange(k * self.size, min((k + 1) * self.size, self.n)))]

    def order(self, positions) -> np.ndarray:
        """The window numbers at these positions of the epoch's order (int64, each in [0, n))."""
        out = self._feistel(np.asarray(positions, np.uint64))
        walk = np.flatnonzero(out >= self.n)
        while len(walk):
            out[walk] = self._feistel(out[walk])
            walk = walk[out[walk] >= self.n]
        return out.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        """The keyed bijection of [0, 4^half) (uint64 arrays; products wrap modulo 2^64)."""
        h, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & mask
        for key in self.keys:  # the round function: splitmix64's finaliser of (right xor the round key)
            z = right ^ key
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        return (left << h) | right


def windows(episodes: list[Episode], length: int, delay: int = 0) -> Windows:
    """(episode, first frame) of the consecutive windows of episodes (see Windows)."""
    return Windows(episodes, length, delay)


# Left/right mirror: these feature columns change sign, and stick x classes k <-> 16 - k.
MIRROR_COLUMNS = [f"{who}_{n}" for who in ("self", "opp", "self_nana", "opp_nana")
                  for n in ("x", "facing", "speed_air_x_self", "speed_x_attack", "speed_ground_x_self")]
MIRROR_COLUMNS += ["main_x", "c_x", "randall_x"] + [f"item{k}_{n}" for k in range(ITEM_SLOTS) for n in ("dx", "speed_x")]
MIRROR_SIGN = np.array([-1.0 if n in MIRROR_COLUMNS else 1.0 for n in NUM_FIELDS], np.float32)
MIRROR_HEADS = ("main_x", "c_x")


def make_batch(episodes: list[Episode], wins: np.ndarray | Sequence[tuple[int, int]], length: int,
               delay: int | Sequence[int] = 0, mirror: Sequence[bool] | None = None, smoothing: float = 0.0,
               teacher: dict | None = None, change_weight: float = 1.0,
               controller_dropout: tuple[float, int] | None = None, returns: Returns | None = None,
               ) -> dict[str, np.ndarray]:
    """Inputs, targets (probabilities, and the target action's codes `target.action`), a frame
    mask (0 for padding past an episode's end) and each frame's current controller classes
    `current.<head>` (what "repeat the current input" predicts) for windows, [n, 2] (episode, first frame); a window of episode -1 is all padding.

    delay: per batch or per window (frame t predicts the controller at t + 1 + delay).
    mirror: per window, flip left and right. smoothing: label smoothing of the targets.
    change_weight: the mask (the loss weight) of frames whose target differs from the current
    controller in any head. controller_dropout (p, seed): zero the current-controller inputs of
    a random share p of the frames. `delay` [B] holds each window's delay (`with_own_inputs`).
    teacher: {"logits": per-episode [T, sum(HEADS)] arrays, "temperature": T} adds the
    teacher's soft targets `soft.<head>` (distillation). returns: add each frame's return-to-go
    (`rtg`, the input of return-conditioned specs, and `target.value`, the same array)."""
    wins = np.asarray(wins, np.int64).reshape(-1, 2)
    B, C, F = len(wins), len(CAT_FIELDS), len(NUM_FIELDS)
    delays = np.broadcast_to(np.asarray(delay), (B,))
    batch = {"cat": np.zeros((B, length, C), np.int64), "num": np.zeros((B, length, F), np.float32),
             "mask": np.zeros((B, length), np.float32), "delay": delays.astype(np.int64)}
    labels = {h: np.zeros((B, length) + ((8,) if h == "buttons" else ()), np.int64) for h in HEADS}
    current = {h: np.zeros_like(v) for h, v in labels.items()}
    soft = teacher and np.zeros((B, length, sum(HEADS.values())), np.float32)
    if returns is not None:
        batch["rtg"] = batch["target.value"] = np.zeros((B, length), np.float32)
    check_shards(episodes[i] for i, _ in wins.tolist() if i >= 0)
    for b, (i, s) in enumerate(wins.tolist()):
        if i < 0:  # padding: an idle stream in stateful training
            continue
        release_pages(1)  # windows of a dataset's shards: their pages are not kept
        ep, d = episodes[i], int(delays[b])
        n = min(length, ep.frames - 1 - d - s)
        if n <= 0:
            continue
        batch["cat"][b, :n] = ep.cat[s:s + n]
        batch["num"][b, :n] = ep.num[s:s + n]
        batch["mask"][b, :n] = 1
        for h in HEADS:
            labels[h][b, :n] = ep.labels[h][s + 1 + d:s + 1 + d + n]
            current[h][b, :n] = ep.labels[h][s:s + n]
        if teacher:
            soft[b, :n] = teacher["logits"][i][s:s + n]
        if returns is not None:
            batch["rtg"][b, :n] = ep.rtg(returns)[s:s + n]
    if mirror is not None and np.any(mirror):
        flip = np.asarray(mirror, bool)
        batch["num"][flip] *= MIRROR_SIGN
        for h in MIRROR_HEADS:
            labels[h][flip] = 16 - labels[h][flip]
            current[h][flip] = 16 - current[h][flip]
    if controller_dropout:  # hide the current controller on some frames (the model must not just copy it)
        rng = np.random.default_rng(controller_dropout[1])
        batch["num"][..., _CTRL:_NANA][rng.random((B, length)) < controller_dropout[0]] = 0
    if change_weight != 1:  # key frames: the controller changes between the current and the target frame
        changed = np.any([(labels[h] != current[h]).reshape(B, length, -1).any(-1) for h in HEADS], axis=0)
        batch["mask"] *= np.where(changed, np.float32(change_weight), np.float32(1))
    # the target frame's action as codes (see `sample_actions`): what teacher forcing feeds autoregressive heads
    batch["target.action"] = np.concatenate([labels["buttons"]] + [labels[h][..., None] for h in _CLASS_HEADS], -1)
    for h, k in HEADS.items():
        batch[f"current.{h}"] = current[h]
        y = labels[h].astype(np.float32) if h == "buttons" else np.eye(k, dtype=np.float32)[labels[h]]
        batch[f"target.{h}"] = y * (1 - smoothing) + smoothing / (2 if h == "buttons" else k) if smoothing else y
    if teacher:
        T, offsets = teacher["temperature"], np.cumsum([0, *HEADS.values()])
        for (h, k), o in zip(HEADS.items(), offsets):
            x = soft[..., o:o + k] / T
            if mirror is not None and h in MIRROR_HEADS:
                x[np.asarray(mirror, bool)] = x[np.asarray(mirror, bool)][..., ::-1]
            if h == "buttons":
                p = 1 / (1 + np.exp(-x))
            else:
                p = np.exp(x - x.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
            batch[f"soft.{h}"] = p.astype(np.float32)
    return batch


def with_own_inputs(batch: dict[str, np.ndarray], out: dict[str, np.ndarray], share: float,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The batch with a share of its frames holding the model's own decision in their controller
    columns (and `current.<head>`) instead of the player's input, read back as play reads a
    controller (`controller_features`): the action sampled at T = 1 (`sample_actions`) from
    `out`, the model's outputs on this batch, at frame t - 1 - delay of the same window. What
    the bot sees in play, to first order (those decisions saw the players' earlier inputs;
    autoregressive heads' components are sampled given the player's earlier components)."""
    B, L = batch["mask"].shape
    flat = {h: out[h].reshape(B * L, -1) for h in HEADS}
    codes = sample_actions(flat, rng.random((B * L, UNIFORMS))).reshape(B, L, UNIFORMS)
    src = np.arange(L)[None] - 1 - batch["delay"][:, None]
    b, t = np.nonzero((src >= 0) & (rng.random((B, L)) < share))
    mine = codes[b, src[b, t]]
    new = {**batch, "num": batch["num"].copy(), "current.buttons": batch["current.buttons"].copy()}
    new["num"][b, t, _CTRL:_CTRL + 13] = controller_features(mine)
    new["current.buttons"][b, t] = mine[:, :8]
    for i, h in enumerate(_CLASS_HEADS):
        new[f"current.{h}"] = batch[f"current.{h}"].copy()
        new[f"current.{h}"][b, t] = mine[:, 8 + i]
    return new


def streams(episodes: list[Episode], length: int, batch_size: int, delay: int = 0,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Batches for stateful training, [steps, streams, 2] windows (episode, first frame): each
    batch row is a stream that walks whole episodes in consecutive windows, so the state a window
    ends with is where the next one starts. Episodes are dealt to at most `batch_size` streams
    (in shuffled order when `rng` is given), using as few streams as keeps their lengths
    balanced; a stream that runs out is padded with windows of episode -1."""
    per_stream = math.ceil(len(episodes) / batch_size)
    n = math.ceil(len(episodes) / per_stream)  # as many streams as keep them equally long
    dealt, loads = [[] for _ in range(n)], np.zeros(n)
    for i in sorted(range(len(episodes)), key=lambda i: -episodes[i].frames):  # longest first: balanced
        b = int(np.argmin(loads))
        dealt[b].append(i)
        loads[b] += episodes[i].frames
    if rng is not None:
        for d in dealt:
            rng.shuffle(d)
    wins = Windows(episodes, length, delay)
    rows = [wins[np.concatenate([np.arange(wins.firsts[i], wins.ends[i]) for i in d] or [[]]).astype(np.int64)]
            for d in dealt]
    plan = np.full((max(len(r) for r in rows), n, 2), -1, np.int64)
    for b, r in enumerate(rows):
        plan[:len(r), b] = r
    return plan


def carry_state(batch: dict, previous: dict | None, wins: Sequence, model: Model) -> dict:
    """Set a batch's initial state to the previous batch's final state, row by row, except
    where a row starts a new episode (or is padding): there the state is zero."""
    if previous is None:
        return batch
    wins = np.asarray(wins, np.int64).reshape(-1, 2)
    fresh = (wins[:, 0] < 0) | (wins[:, 1] == 0)
    for n, _ in model.states:
        state = previous[f"state_out.{n}"].copy()
        state[fresh] = 0
        batch[f"state_in.{n}"] = state
    return batch


def _transitions(episodes: list[Episode], delay: int) -> dict[str, np.ndarray]:
    """Per head, how often each (current controller, target) pair occurs: frame t and frame
    t + 1 + delay. buttons [2 now, 2 at the target, 8 buttons], the others [k now, k at the target].
    Counted one episode at a time (a dataset's episodes are never all in memory)."""
    counts = {h: np.zeros((2, 2, 8) if h == "buttons" else (k, k), np.int64) for h, k in HEADS.items()}
    for ep in episodes:
        n = max(ep.frames - 1 - delay, 0)
        for h, k in HEADS.items():
            cur, nxt = ep.labels[h][:n].astype(np.int64), ep.labels[h][1 + delay:1 + delay + n].astype(np.int64)
            if h == "buttons":
                counts[h] += np.bincount(((cur * 2 + nxt) * 8 + np.arange(8)).ravel(), minlength=32).reshape(2, 2, 8)
            else:
                counts[h] += np.bincount((cur * k + nxt).ravel(), minlength=k * k).reshape(k, k)
        release_pages(ep.frames)
    return counts


def label_frequencies(episodes: list[Episode], delay: int = 0) -> dict[str, list[float]]:
    """Per head: how often each button is pressed / each class occurs among training targets."""
    return _frequencies(_transitions(episodes, delay))


def _frequencies(transitions: dict[str, np.ndarray]) -> dict[str, list[float]]:
    freqs = {}
    for h, c in transitions.items():
        if h == "buttons":
            freqs[h] = (c[:, 1].sum(0) / max(c[:, :, 0].sum(), 1)).tolist()
        else:
            freqs[h] = ((c.sum(0) + 1) / (c.sum() + len(c))).tolist()
    return freqs


def markov_tables(episodes: list[Episode], delay: int = 0) -> dict[str, list]:
    """The "next input given current input" count table of each head, on training episodes:
    buttons [2, 8] (P(pressed at the target frame) given not pressed / pressed now), sticks
    and shoulder [k, k] (row: current class, P(target class)); add-one smoothed."""
    return _markov(_transitions(episodes, delay))


def _markov(transitions: dict[str, np.ndarray]) -> dict[str, list]:
    tables = {}
    for h, c in transitions.items():
        if h == "buttons":
            tables[h] = ((c[:, 1] + 1) / (c.sum(1) + 2)).tolist()
        else:
            tables[h] = ((c + 1 / len(c)) / (c.sum(1, keepdims=True) + 1)).tolist()
    return tables


def return_stats(episodes: list[Episode], returns: Returns) -> dict:
    """The return-to-go at the first frame of each episode (what a game's whole play earned):
    quantiles over the episodes, from which a target return for play can be chosen."""
    start = np.array([e.rtg(returns)[0] for e in episodes], np.float64)
    q = lambda p: round(float(np.quantile(start, p)), 4)
    return {"start": {"min": q(0), "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "max": q(1)}}


def frequency_loss(freqs: dict[str, list[float]], episodes: list[Episode], delay: int = 0) -> dict[str, float]:
    """The loss of always predicting `freqs` on these episodes."""
    out = {}
    for h, c in _transitions(episodes, delay).items():
        targets = c.sum(0)  # the target frames' counts (see `_frequency_loss_sum`)
        frames = targets[:, 0].sum() if h == "buttons" else targets.sum()
        out[h] = _frequency_loss_sum(h, freqs[h], targets) / max(int(frames), 1)
    out["total"] = sum(out.values())
    return out


def _frequency_loss_sum(h: str, freq: list[float], counts: np.ndarray) -> float:
    """The loss of always predicting a head's label frequencies `freq`, summed over frames whose
    targets are counted in `counts`: buttons [2, 8] (not pressed, pressed), other heads [k]."""
    q = np.asarray(freq, np.float64)
    if h == "buttons":
        p = q.clip(1e-6, 1 - 1e-6)
        return float(-(counts[1] * np.log(p) + counts[0] * np.log(1 - p)).sum())
    return float(-(counts * np.log(q)).sum())


# =================================================================================================
# Training on onnxruntime-training
# =================================================================================================

def _ort_training():
    """onnxruntime.training's `artifacts`, `api` and `onnxblock` modules.

    The package's own __init__ (1.19) imports `optim`, which needs PyTorch; these submodules do
    not. Registering the package folder as an empty module lets them import without it."""
    import types

    try:
        import onnxruntime

        name = "onnxruntime.training"
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
            sys.modules[name] = pkg
        from onnxruntime.training import api, artifacts, onnxblock
    except ImportError:
        raise ExphilError("training needs onnxruntime-training, which this environment lacks: pip install "
                          "'exphil[train]' (Python 3.10-3.12, in an environment without another onnxruntime)") from None
    return artifacts, api, onnxblock


def loss_graph(distill: tuple[float, float] | None = None):
    """The training loss, built inside the graph (`Model.build(extra=loss_graph())`).

    Hard loss: BCE summed over the 8 buttons plus the cross-entropy of each stick axis and the
    shoulder, each averaged over unmasked frames, summed over heads. Targets are probabilities.
    With distill = (T, alpha), each head's loss becomes
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard, with the teacher's tempered
    probabilities fed as `soft.<head>`. A model with a value head adds its spec's `value_weight`
    times the squared error of its `value` against `target.value` (the return-to-go), averaged
    over unmasked frames. Outputs: `loss`, `loss.<head>` (hard, per head), `loss.value` with a value
    head and, when distilling, `kl` (summed over heads)."""

    def add(g: Graph, heads: dict, new_state: dict, spec: Spec) -> None:
        op = g.op
        last = g.const([-1], np.int64)
        mask = g.input("mask", "FLOAT", ["B", g.length])
        count = op.Max(op.ReduceSum(mask, keepdims=0), 1.0)

        def frames_mean(per_frame_vector):  # [B, L, k] -> sum over k, masked mean over frames
            return op.Div(op.ReduceSum(op.Mul(op.ReduceSum(per_frame_vector, last, keepdims=0), mask), keepdims=0),
                          count)

        def cross_entropy(h, x, p):  # of logits x against probabilities p
            if h == "buttons":  # softplus(x) - x p, stable
                return op.Sub(g.softplus(x), op.Mul(x, p))
            return op.Neg(op.Mul(p, op.LogSoftmax(x, axis=-1)))

        total, kl_total, hard = None, None, {}
        for h, k in HEADS.items():
            x = heads[h]
            hard[h] = frames_mean(cross_entropy(h, x, g.input(f"target.{h}", "FLOAT", ["B", g.length, k])))
            loss = hard[h]
            if distill:
                T, alpha = distill
                p = g.input(f"soft.{h}", "FLOAT", ["B", g.length, k])
                logp = op.Log(op.Max(p, 1e-12))
                entropy = op.Neg(op.Mul(p, logp))
                if h == "buttons":  # Bernoulli entropy: both outcomes
                    q = op.Sub(1.0, p)
                    entropy = op.Sub(entropy, op.Mul(q, op.Log(op.Max(q, 1e-12))))
                kl = frames_mean(op.Sub(cross_entropy(h, op.Mul(x, 1 / T), p), entropy))
                kl_total = kl if kl_total is None else op.Add(kl_total, kl)
                loss = op.Add(op.Mul(kl, alpha * T * T), op.Mul(loss, 1 - alpha))
            total = loss if total is None else op.Add(total, loss)
        if "value" in heads:
            error = op.Sub(heads["value"], g.input("target.value", "FLOAT", ["B", g.length]))
            hard["value"] = op.Div(op.ReduceSum(op.Mul(op.Mul(error, error), mask), keepdims=0), count)
            total = op.Add(total, op.Mul(hard["value"], spec.returns.value_weight))
        # Every state output joins the loss with weight 0: onnxruntime-training 1.19 fails on a
        # Split (or fused Slices) whose outputs do not all reach the loss.
        for v in new_state.values():
            total = op.Add(total, op.Mul(op.ReduceSum(v, keepdims=0), 0.0))
        g.output(total, "loss", [])
        for h, v in hard.items():
            g.output(v, f"loss.{h}", [])
        if distill:
            g.output(kl_total, "kl", [])

    return add


add_loss = loss_graph()


def with_zero_state(batch: dict[str, np.ndarray], model: Model) -> dict[str, np.ndarray]:
    """The batch plus a zero initial state for every recurrent state it does not carry."""
    return {**{f"state_in.{n}": v for n, v in model.zero_state(len(batch["cat"])).items()}, **batch}


@contextlib.contextmanager
def _runtime_writes():
    """onnxruntime-training reports a file it failed to write (a full disk) as a RuntimeError
    ending in "errno:N": raise it as the OSError it is, which `train` reports in one line."""
    try:
        yield
    except RuntimeError as e:
        code = re.search(r"errno:(\d+)", str(e))
        if code is None or int(code[1]) == 0:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from None


def has_checkpoint(directory: Path) -> bool:
    return any((Path(directory) / f).exists() for f in ("checkpoint", "checkpoint.prev"))


class Trainer:
    """A model on onnxruntime-training: artifacts in `directory`, AdamW, checkpoint, export.

    An existing checkpoint in `directory` is loaded (parameters, optimizer state, progress)."""

    def __init__(self, model: Model, directory: Path, lr: float = 1e-3, weight_decay: float = 0.01,
                 length: int | None = None, max_grad_norm: float = 0.0, distill: tuple | None = None, log=None,
                 threads: int = 0):
        import onnx
        import shutil

        artifacts, api, onnxblock = _ort_training()
        self.model, self.dir = model, Path(directory)
        self.length = length or model.spec.window
        if not has_checkpoint(self.dir):  # build into a temporary folder, then rename
            tmp = self.dir.with_name(self.dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            clip = onnxblock.optim.ClipGradNorm(max_grad_norm) if max_grad_norm else None
            with _quiet_fd2(), _runtime_writes():
                artifacts.generate_artifacts(model.build(self.length, extra=loss_graph(distill), training=True),
                                             requires_grad=sorted(model.params), loss=None,
                                             optimizer=onnxblock.optim.AdamW(weight_decay=weight_decay,
                                                                             clip_grad=clip),
                                             artifact_directory=str(tmp))
            opt = onnx.load(str(tmp / "optimizer_model.onnx"))
            opt.ir_version = IR_VERSION  # written with the onnx library's newer default
            onnx.save(opt, str(tmp / "optimizer_model.onnx"))
            shutil.rmtree(self.dir, ignore_errors=True)
            os.replace(tmp, self.dir)
        self.state = self._load_checkpoint(api, log)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        self.module = api.Module(str(self.dir / "training_model.onnx"), self.state,
                                 str(self.dir / "eval_model.onnx"), session_options=options)
        self.optimizer = api.Optimizer(str(self.dir / "optimizer_model.onnx"), self.module)
        self.optimizer.set_learning_rate(lr)
        self.inputs = self.module.input_names()
        self.outputs = self.module.output_names()

    def _load_checkpoint(self, api, log):
        """The checkpoint, or the one saved before it when it is damaged (truncated, emptied)."""
        problems = []
        for name in ("checkpoint", "checkpoint.prev"):
            path = self.dir / name
            try:
                with _quiet_fd2():
                    state = api.CheckpointState.load_checkpoint(str(path))
            except Exception as e:
                problems.append(f"{path} is damaged ({type(e).__name__})" if path.exists() else f"{path} is missing")
                if path.exists():  # kept aside, so that the next save cannot push the good one out
                    os.replace(path, path.with_name(path.name + ".damaged"))
                continue
            if problems and log:
                log(f"{problems[0]}: continuing from the checkpoint saved before it")
            return state
        raise ExphilError("no usable checkpoint: " + "; ".join(problems))

    def _run(self, batch: dict[str, np.ndarray], training: bool) -> dict[str, np.ndarray]:
        if not len(batch["cat"]):  # onnxruntime-training kills the process (SIGFPE) on one
            raise ExphilError("a training batch with no windows")
        batch = {**with_zero_state(batch, self.model), "training": np.array(training)}
        return dict(zip(self.outputs, self.module(*[batch[n] for n in self.inputs])))

    def step(self, batch: dict[str, np.ndarray], lr: float | None = None) -> dict[str, np.ndarray]:
        """One AdamW step on a batch; returns the outputs (loss first) before the update."""
        out = self.backward(batch)
        self.update(lr)
        return out

    def backward(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of a batch, and the gradient of its loss (`state.parameters[name].grad`)."""
        self.module.train()
        return self._run(batch, True)

    def update(self, lr: float | None = None) -> None:
        """One AdamW step with the gradient held in the state (the optimizer graph clips it, if asked)."""
        if lr is not None:
            self.optimizer.set_learning_rate(lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def evaluate(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.module.eval()
        return self._run(batch, False)

    def params(self) -> dict[str, np.ndarray]:
        return {n: self.state.parameters[n].data for n in self.model.params}

    @property
    def progress(self) -> dict:
        """Where training stands, saved inside the checkpoint (empty for a fresh one)."""
        try:
            return json.loads(self.state.properties["progress"])
        except (KeyError, TypeError, ValueError):
            return {}

    def save_checkpoint(self, progress: dict) -> None:
        """Parameters, optimizer state and progress, in one file written atomically."""
        self.state.properties["progress"] = json.dumps(progress)
        write_checkpoint(self.dir, self.write_state)

    def write_state(self, path: Path) -> None:
        """Parameters, optimizer state and properties into one file."""
        _, api, _ = _ort_training()
        with _runtime_writes():
            api.CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=True)


def write_checkpoint(directory: Path, write: Callable[[Path], None]) -> None:
    """`directory`/checkpoint, written by `write(path)` atomically; the one before stays as checkpoint.prev."""
    tmp, path = directory / "checkpoint.tmp", directory / "checkpoint"
    write(tmp)
    if path.exists():  # the one before stays (a second name for it, so `checkpoint` is never missing)
        previous = directory / "checkpoint.prev"
        previous.unlink(missing_ok=True)
        try:
            os.link(path, previous)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, previous)
    os.replace(tmp, path)


def connect_ray(address: str):
    """The `ray` module, connected to the cluster at `address` ("auto": the one `ray start` runs
    on this machine; "local": a new one for this process alone; or a cluster's address). A
    connection the calling program made already (`ray.init`) is used as it is."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which this environment lacks: pip install 'exphil[cluster]'") from None
    if not ray.is_initialized():
        try:
            with _quiet_fd2():
                ray.init(address=None if address == "local" else address, log_to_driver=False,
                         include_dashboard=False, logging_level=logging.WARNING)
        except ConnectionError:
            raise ExphilError(f"--ray {address}: no running Ray cluster found; start one with `ray start --head`, "
                              "or give --ray local (a cluster for this run alone)") from None
        except (ValueError, RuntimeError) as e:
            raise ExphilError(f"--ray {address}: {str(e).splitlines()[0]}") from None
    return ray


class _TrainWorker:
    """One replica of data-parallel training (a Ray actor): a Trainer in a folder of its own,
    built from the driver's artifacts and checkpoint. Worker k of n sums the k-th n-th of
    every worker's gradient (reduce-scatter), then each gathers the n sums (all-gather)."""

    def __init__(self, model: Model, files: dict[str, bytes], threads: int, count: int):
        self.dir = Path(tempfile.mkdtemp(prefix="exphil-worker-"))
        for name, data in files.items():
            (self.dir / name).write_bytes(data)
        self.trainer = Trainer(model, self.dir, threads=threads)
        self.names, self.count = sorted(model.params), count

    def where(self) -> tuple[str, int]:
        import socket
        return socket.gethostname(), os.getpid()

    def backward(self, batch: dict, weight: float) -> tuple:
        """The outputs of a slice, the seconds it took, and its gradient times `weight` (flat,
        parameters in name order) cut in one chunk per worker. The chunks stay in this node's
        object store (passed on as references: the driver never holds them, however small)."""
        import ray

        t0 = time.perf_counter()
        out = self.trainer.backward(batch)
        grads = [self.trainer.state.parameters[n].grad.ravel() for n in self.names]
        flat = np.concatenate(grads) * np.float32(weight)
        return (out, time.perf_counter() - t0, *map(ray.put, np.array_split(flat, self.count)))

    def reduce(self, *chunks) -> Any:
        import ray

        return ray.put(functools.reduce(np.add, ray.get(list(chunks))))  # in worker order: the same sum every run

    def update(self, lr: float, *chunks) -> float:
        """Write the summed gradient into the state (`.grad` is a view of onnxruntime's buffer)
        and take the AdamW step; returns the seconds it took."""
        import ray

        gradient = np.concatenate(ray.get(list(chunks)))
        t0, at = time.perf_counter(), 0
        for n in self.names:
            g = self.trainer.state.parameters[n].grad
            np.copyto(g, gradient[at:at + g.size].reshape(g.shape))
            at += g.size
        self.trainer.update(lr)
        return time.perf_counter() - t0

    def evaluate(self, batch: dict) -> dict:
        return self.trainer.evaluate(batch)

    def params(self) -> dict[str, np.ndarray]:
        return self.trainer.params()

    def checkpoint(self, progress: dict) -> bytes:
        self.trainer.state.properties["progress"] = json.dumps(progress)
        self.trainer.write_state(self.dir / "checkpoint.out")
        return (self.dir / "checkpoint.out").read_bytes()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class RayTrainer:
    """Trainer's interface (step, evaluate, params, progress, save_checkpoint), data-parallel on
    Ray: each of `workers` actors holds a Trainer and runs forward and backward on its slice of
    every batch. Their gradients, each weighted by its slice's share of the batch's
    loss-weighted frames (the loss is a mean over them), add up to the gradient of the whole
    batch's loss; the workers sum them among themselves (reduce-scatter, then all-gather, in the
    Ray object store: 2 (n - 1) / n x 4 bytes per parameter sent and as many received by each),
    write the sum into their gradient buffers and take the same AdamW step (clipping, if asked,
    sees the sum), so they hold the same parameters and follow one process's trajectory with the
    whole batch. The driver builds the artifacts and loads the checkpoint as Trainer does, and
    cuts the batches; checkpoints come from worker 1. A worker that fails stops training with an
    ExphilError, the last checkpoint left as it was."""

    def __init__(self, model: Model, directory: Path, ray: str = "auto", workers: int = 2, cpus: int = 1,
                 lr: float = 1e-3, log=None, **trainer_args):
        self.ray = connect_ray(ray)
        self.model, self.dir, self.workers = model, Path(directory), []
        have = self.ray.cluster_resources().get("CPU", 0)
        if workers * cpus > have:
            raise UsageError(f"--workers {workers} needs {workers * cpus} CPUs; the Ray cluster has {have:g}")
        local = Trainer(model, directory, lr=lr, log=log, **trainer_args)  # artifacts and checkpoint, as in one process
        self.progress, self.lr = local.progress, lr
        with tempfile.TemporaryDirectory() as tmp:
            local.write_state(Path(tmp) / "checkpoint")
            files = {f: (Path(tmp) / f if f == "checkpoint" else self.dir / f).read_bytes()
                     for f in ("checkpoint", "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")}
        del local
        actor, shipped = self.ray.remote(num_cpus=cpus, max_restarts=0)(_TrainWorker), self.ray.put(files)
        self.workers = [actor.remote(model, shipped, cpus, workers) for _ in range(workers)]
        # the actors are stopped with the trainer, also when an error ends training before close()
        self._stop = weakref.finalize(self, lambda ray, actors: [ray.kill(w) for w in actors], self.ray, self.workers)
        self.hosts = self._gather([w.where.remote() for w in self.workers])
        self.timings: list[dict] = []  # per step: seconds in compute, in the optimizer step, in all
        if log:
            log(f"{workers} Ray workers: " + ", ".join(f"{h} (process {p})" for h, p in self.hosts))

    def _gather(self, refs: list, within: list = ()) -> list:
        """The results of calls to the workers (`within`: the intermediate results of the same
        calls); a failure stops the run (and every worker)."""
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as e:
            for ref in [*refs, *within]:  # collected, so that Ray does not report them again as unhandled
                with contextlib.suppress(Exception):
                    self.ray.get(ref, timeout=10)
            reason = str(getattr(e, "cause", None) or type(e).__name__).strip().splitlines()[0]
            dead = [k for k, w in enumerate(self.workers) if not self._answers(w)]
            self.close()
            who = (", ".join(f"{k + 1} ({self.hosts[k][0]}, process {self.hosts[k][1]})" for k in dead)
                   + " of " + str(len(self.workers)) + " died") if dead and hasattr(self, "hosts") else "failed"
            raise ExphilError(f"{self.dir.parent}: Ray worker {who} ({reason}); training stopped, the last "
                              "checkpoint is kept: continue with --resume") from None

    def _answers(self, worker) -> bool:
        try:
            self.ray.get(worker.where.remote(), timeout=10)
            return True
        except Exception:
            return False

    def _slices(self, batch: dict) -> tuple[list[dict], list[int], list[float]]:
        """The batch cut into one slice per worker, their sizes, and the weights that turn their
        mean losses into the whole batch's (a worker without windows gets one with no weight)."""
        parts = np.array_split(np.arange(len(batch["mask"])), len(self.workers))
        slices = [{k: v[p] for k, v in batch.items()} if len(p) else
                  {**{k: v[:1] for k, v in batch.items()}, "mask": np.zeros_like(batch["mask"][:1])} for p in parts]
        count = lambda m: max(float(m.sum()), 1.0)  # as loss_graph counts
        total = count(batch["mask"])
        return slices, [len(p) for p in parts], [count(s["mask"]) / total for s in slices]

    @staticmethod
    def _join(outs: list[dict], sizes: list[int], weights: list[float]) -> dict:
        """The workers' outputs as one process's: per-window arrays joined, mean losses weighted."""
        return {k: np.concatenate([o[k] for o, n in zip(outs, sizes) if n]) if outs[0][k].ndim else
                np.float32(sum(float(o[k]) * w for o, w in zip(outs, weights))) for k in outs[0]}

    def step(self, batch: dict[str, np.ndarray], lr: float | None = None) -> dict[str, np.ndarray]:
        t0, n = time.perf_counter(), len(self.workers)
        self.lr = self.lr if lr is None else lr
        slices, sizes, weights = self._slices(batch)
        calls = [w.backward.options(num_returns=n + 2).remote(s, x) for w, s, x in zip(self.workers, slices, weights)]
        sums = [w.reduce.remote(*[c[2 + k] for c in calls]) for k, w in enumerate(self.workers)]
        done = [w.update.remote(self.lr, *sums) for w in self.workers]
        results = self._gather([c[0] for c in calls] + [c[1] for c in calls] + done,
                               [*sums, *(r for c in calls for r in c[2:])])
        self.timings.append({"compute": max(results[n:2 * n]), "update": max(results[2 * n:]),
                             "total": time.perf_counter() - t0})
        return self._join(results[:n], sizes, weights)

    def evaluate(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slices, sizes, weights = self._slices(batch)
        return self._join(self._gather([w.evaluate.remote(s) for w, s in zip(self.workers, slices)]), sizes, weights)

    def params(self) -> dict[str, np.ndarray]:
        return self._gather([self.workers[0].params.remote()])[0]

    def save_checkpoint(self, progress: dict) -> None:
        data = self._gather([self.workers[0].checkpoint.remote(progress)])[0]
        write_checkpoint(self.dir, lambda path: path.write_bytes(data))
        self.progress = progress

    def close(self) -> None:
        """Stop the workers (their folders removed where they still answer)."""
        self.ray.wait([w.close.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        self._stop()


# decision thresholds of a button's probability among which a run picks its own (on training frames)
BUTTON_THRESHOLDS = (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _bce(p, y):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


class Metrics:
    """Loss (total and per head), button F1 and top-1 accuracy of the other heads over frames,
    and the same on the same frames for the baselines a model must beat:

    * copy: "repeat the current input" (the target equals the controller of the current frame,
      which the model sees as an input): button F1 and top-1 per head;
    * markov: the "next input given current input" count table of the training games
      (`markov_tables`): loss per head and total;
    * frequency: always the training games' label frequencies: loss, and the top-1 of always
      the most common class;
    * change frames: the model's top-1 per head on the frames whose target differs from the
      current input, and its accuracy on the button entries that change;
    * a value head's squared error beside that of always the training frames' mean return
      (`baselines["mean_return"]`).

    A button counts as pressed when its probability is above `button_threshold` (one of
    BUTTON_THRESHOLDS); button F1 is also counted at every one of those thresholds, so that a
    run can choose its threshold on training frames (`best_button_threshold`).
    `baselines` = {"frequency": label_frequencies(...), "markov": markov_tables(...)}."""

    def __init__(self, baselines: dict | None = None, button_threshold: float = 0.5, sums: dict | None = None):
        if button_threshold not in BUTTON_THRESHOLDS:
            raise ValueError(f"button threshold {button_threshold} is not one of {BUTTON_THRESHOLDS}")
        self.sums = sums or {}
        self.baselines = baselines
        self.button_threshold = button_threshold

    def _count(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def add(self, out: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> None:
        mask = batch["mask"] > 0
        frames = float(mask.sum())
        self._count("frames", frames)
        for name in ["loss", *(f"loss.{h}" for h in HEADS), *(n for n in ("kl", "loss.value") if n in out)]:
            self._count(name, float(out[name]) * frames)
        if "loss.value" in out and self.baselines and "mean_return" in self.baselines:
            # weighted as the loss graph weighs `loss.value`: by the mask, change frames included
            error = batch["target.value"].astype(np.float64) - self.baselines["mean_return"]
            weights = batch["mask"].astype(np.float64)
            self._count("mean_return.loss.value", (weights * error ** 2).sum() / max(weights.sum(), 1.0) * frames)
        for h in HEADS:
            true = batch[f"target.{h}"][mask]
            true = true > 0.5 if h == "buttons" else true.argmax(-1)
            if h == "buttons":
                for t in BUTTON_THRESHOLDS:
                    self._score(h, f"{t}.", out[h][mask] > _logit(t), true)
            pred = out[h][mask] > _logit(self.button_threshold) if h == "buttons" else out[h][mask].argmax(-1)
            if f"current.{h}" not in batch:  # batches made without make_batch: no baselines
                self._score(h, "", pred, true)
                continue
            current = batch[f"current.{h}"][mask]
            if h == "buttons":
                current = current > 0
            changed = current != true
            self._score(h, "", pred, true, changed)
            self._score(h, "copy.", current, true)
            if self.baselines:
                self._baseline_losses(h, current, true)

    def _score(self, h, who, pred, true, changed=None) -> None:
        if h == "buttons":
            for key, value in (("tp", pred & true), ("fp", pred & ~true), ("fn", ~pred & true)):
                self._count(who + key, value.sum())
        else:
            self._count(f"{who}hit.{h}", (pred == true).sum())
        if changed is not None:
            self._count(f"change.n.{h}", changed.sum())
            self._count(f"change.hit.{h}", ((pred == true) & changed).sum())

    def _baseline_losses(self, h, current, true) -> None:
        freq, markov = np.asarray(self.baselines["frequency"][h]), self.baselines.get("markov")
        if h == "buttons":
            counts = np.stack([(~true).sum(0), true.sum(0)])  # per button: frames not pressed, pressed
        else:
            counts = np.bincount(true, minlength=len(freq))
            self._count(f"frequency.hit.{h}", (true == freq.argmax()).sum())
        self._count(f"frequency.loss.{h}", _frequency_loss_sum(h, freq, counts))
        if markov:  # (runs from before the Markov tables have none)
            table = np.asarray(markov[h])
            if h == "buttons":
                loss = _bce(table[current.astype(np.int64), np.arange(8)], true.astype(np.float64)).sum()
            else:
                loss = -np.log(table[current, true]).sum()
            self._count(f"markov.loss.{h}", loss)

    def best_button_threshold(self) -> float:
        """The threshold of BUTTON_THRESHOLDS with the highest button F1 on these frames."""
        f1 = {t: self._f1(f"{t}.") for t in BUTTON_THRESHOLDS}
        return max(BUTTON_THRESHOLDS, key=lambda t: (f1[t], t))

    def _f1(self, who: str) -> float:
        tp, fp, fn = (self.sums.get(who + k, 0.0) for k in ("tp", "fp", "fn"))
        return round(2 * tp / max(2 * tp + fp + fn, 1.0), 5)

    def result(self, prefix: str) -> dict:
        acc, n = self.sums, max(self.sums.get("frames", 0.0), 1.0)
        f1 = self._f1
        top1 = lambda who: {h: round(acc.get(f"{who}hit.{h}", 0.0) / n, 5) for h in HEADS if h != "buttons"}
        # the hard loss (label cross-entropy), comparable with the baselines; with distillation
        # the optimised loss also mixes in the KL and is reported apart
        hard = sum(acc.get(f"loss.{h}", 0.0) for h in HEADS) if "frames" in acc else float("nan")
        out = {f"{prefix}_loss": hard / n,
               f"{prefix}_heads": {h: round(acc.get(f"loss.{h}", 0.0) / n, 5) for h in HEADS},
               f"{prefix}_button_f1": f1(""), f"{prefix}_button_threshold": self.button_threshold,
               f"{prefix}_button_f1_by_threshold": {str(t): f1(f"{t}.") for t in BUTTON_THRESHOLDS},
               f"{prefix}_accuracy": top1(""),
               f"{prefix}_frames": int(acc.get("frames", 0))}
        if "change.n.main_x" in acc:
            out[f"{prefix}_change"] = {
                "frames": {h: int(acc[f"change.n.{h}"]) for h in HEADS},
                "accuracy": {h: round(acc[f"change.hit.{h}"] / max(acc[f"change.n.{h}"], 1.0), 5) for h in HEADS}}
            out[f"{prefix}_copy"] = {"button_f1": f1("copy."), "accuracy": top1("copy.")}
        for who in ("markov", "frequency"):
            if f"{who}.loss.main_x" in acc:
                heads = {h: round(acc[f"{who}.loss.{h}"] / n, 5) for h in HEADS}
                out[f"{prefix}_{who}"] = {"loss": round(sum(heads.values()), 5), "heads": heads}
        if "frequency.hit.main_x" in acc:
            out[f"{prefix}_frequency"]["accuracy"] = top1("frequency.")  # always the most common class
        if "loss.value" in acc:  # the value head's squared error, beside always the mean training return's
            out[f"{prefix}_value_mse"] = round(acc["loss.value"] / n, 5)
            if "mean_return.loss.value" in acc:
                out[f"{prefix}_value_mse_mean_return"] = round(acc["mean_return.loss.value"] / n, 5)
        if "kl" in acc:
            out[f"{prefix}_kl"] = acc["kl"] / n
            out[f"{prefix}_distill_loss"] = acc["loss"] / n
        return out


def summary_line(result: dict, prefix: str) -> str:
    """A model's headline metrics beside its baselines on the same frames, e.g.
    `val loss 1.567 (markov 1.635, -4.2%) | main_x 0.848 (copy 0.857) | buttons F1 0.871 (copy 0.887) | ...`"""
    r = lambda key: result.get(f"{prefix}_{key}")
    loss, markov, copy, change = r("loss"), r("markov"), r("copy"), r("change")
    parts = [f"{prefix} loss {loss:.3f}" + (f" (markov {markov['loss']:.3f}, {100 * (loss / markov['loss'] - 1):+.1f}%)"
                                           if markov else "")]
    for h in ("main_x", "main_y"):
        parts.append(f"{h} {r('accuracy')[h]:.3f}" + (f" (copy {copy['accuracy'][h]:.3f})" if copy else ""))
    threshold = r("button_threshold")
    parts.append(f"buttons F1 {r('button_f1'):.3f}" + (f" at p > {threshold}" if threshold not in (None, 0.5) else "")
                 + (f" (copy {copy['button_f1']:.3f})" if copy else ""))
    if change:
        parts.append("change frames: " + " ".join(f"{h} {change['accuracy'][h]:.2f}" for h in ("main_x", "main_y", "buttons")))
    if r("value_mse") is not None:
        mean = r("value_mse_mean_return")
        parts.append(f"value mse {r('value_mse'):.3f}" + (f" (mean return {mean:.3f})" if mean is not None else ""))
    return " | ".join(parts)


def scoreboard(res: dict) -> str:
    """Per head: the model's loss and top-1 (buttons: F1) beside copy, Markov and frequency on
    the same frames, and its top-1 on change frames; `res` as `evaluate` returns it."""
    rows = ["  head       loss  markov  frequency   top-1   copy  most-common  on change frames"]
    for h in HEADS:
        get = lambda who, key: (res.get(who) or {}).get(key, {}).get(h, float("nan"))
        top1 = res["button_f1"] if h == "buttons" else res["accuracy"][h]
        copy = (res.get("copy") or {}).get("button_f1", float("nan")) if h == "buttons" else get("copy", "accuracy")
        common = "-" if h == "buttons" else f"{get('frequency', 'accuracy'):.3f}"
        rows.append(f"  {h:<9}{res['heads'][h]:>6.3f}{get('markov', 'heads'):>8.3f}{get('frequency', 'heads'):>11.3f}"
                    f"{top1:>8.3f}{copy:>7.3f}{common:>13}{get('change', 'accuracy'):>18.3f}")
    rows.append("  (buttons: F1 instead of top-1; on change frames, the share of changing button entries right)")
    return "\n".join(rows)


def evaluate_batches(run, batches, metrics: Metrics | None = None) -> Metrics:
    """Metrics of `run(batch) -> outputs` over batches (an iterable of input dicts), added to
    `metrics` (default: a new Metrics without baselines)."""
    metrics = metrics or Metrics()
    for batch in batches:
        metrics.add(run(batch), batch)
    return metrics


def stream_batches(model: Model, episodes, length, delay, run, batch_size: int = 64, **batch_args):
    """Batches walking each game from its start in consecutive windows, the state carried
    from one to the next (what the step graph sees playing the games frame by frame); at most
    `batch_size` games at once, a row taking the next game when its game ends."""
    previous, batch_args = None, {"returns": model.spec.returns_used, **batch_args}
    for wins in streams(episodes, length, batch_size, delay):
        batch = carry_state(make_batch(episodes, wins, length, delay, **batch_args), previous, wins, model)
        previous = run(batch)
        yield wins, batch, previous


def score_games(run, model: Model, episodes, length: int, delay: int, metrics: Metrics | None = None,
                batch_size: int = 64, **batch_args) -> Metrics:
    """Metrics over every frame of whole games. A model with state walks each game from its
    start with the state carried from window to window (what its step graph sees in play);
    a model without state scores independent windows."""
    if not model.states:
        batch_args = {"returns": model.spec.returns_used, **batch_args}
        return evaluate_batches(run, (make_batch(episodes, w, length, delay, **batch_args)
                                      for w in chunks(windows(episodes, length, delay), batch_size)), metrics)
    metrics = metrics or Metrics()
    for _, batch, out in stream_batches(model, episodes, length, delay, run, batch_size, **batch_args):
        metrics.add(out, batch)
    return metrics


GROUPINGS: dict[str, Callable[[Episode], str]] = {  # the groups of player views that reports compare
    "character": lambda ep: enums.Character(int(ep.cat[0, 2])).name.lower(),  # the player's own character
    "opponent": lambda ep: enums.Character(int(ep.cat[0, 3])).name.lower(),  # the opponent's character
    "player": lambda ep: ep.code or "(no code)",  # the player's connect code
}


def score_groups(run, model: Model, episodes, length: int, delay: int, new_metrics: Callable[[], Metrics],
                 by: str, top: int = 8, batch_size: int = 64, **batch_args) -> tuple[Metrics, dict]:
    """`score_games` per group of player views (`by`, one of GROUPINGS): the `top` groups with
    the most frames by name, the rest pooled as "(others)". Returns the metrics of all the
    views (the groups' sums) and a report per group (`group_report`)."""
    groups = collections.defaultdict(list)  # the indices of each group's views in `episodes`
    for k, ep in enumerate(episodes):
        groups[GROUPINGS[by](ep)].append(k)
    frames = lambda g: sum(episodes[k].frames for k in groups[g])
    ranked = sorted(groups, key=lambda g: (-frames(g), g))
    parts = {g: groups[g] for g in ranked[:top]} | ({"(others)": [k for g in ranked[top:] for k in groups[g]]}
                                                  if ranked[top:] else {})
    total, report, teacher = new_metrics(), {}, batch_args.pop("teacher", None)
    for name, ks in parts.items():
        eps = [episodes[k] for k in ks]
        if teacher:  # its logits are per episode: those of the group's views
            batch_args["teacher"] = {**teacher, "logits": [teacher["logits"][k] for k in ks]}
        metrics = score_games(run, model, eps, length, delay, new_metrics(), batch_size, **batch_args)
        report[name] = group_report(metrics, eps)
        for k, v in metrics.sums.items():
            total.sums[k] = total.sums.get(k, 0.0) + v
    return total, report


def group_report(metrics: Metrics, episodes) -> dict:
    """A group's frames and games, loss beside Markov's, stick top-1 and button F1 beside copy's,
    and the top-1 on frames where the input changes."""
    r = metrics.result("g")
    return {"games": len({e.source for e in episodes}), "views": len(episodes), "frames": r["g_frames"],
            "loss": r["g_loss"], "markov_loss": (r.get("g_markov") or {}).get("loss"),
            "accuracy": r["g_accuracy"], "copy_accuracy": r["g_copy"]["accuracy"],
            "button_f1": r["g_button_f1"], "copy_button_f1": r["g_copy"]["button_f1"],
            "change_accuracy": r["g_change"]["accuracy"]}


def group_table(report: dict, by: str) -> str:
    """Per group, one line: frames and games, loss and its margin under Markov, main_x, main_y and
    button F1 beside copy's, main_x top-1 on change frames."""
    rows = [f"  {by:<16}{'games':>6}{'frames':>11}{'loss':>7}{'vs markov':>10}  {'main_x (copy)':>15}"
            f"{'main_y (copy)':>15}{'buttons F1 (copy)':>19}{'main_x on changes':>19}"]
    for name, g in report.items():
        margin = f"{100 * (g['loss'] / g['markov_loss'] - 1):+.1f}%" if g["markov_loss"] else "-"
        rows.append(f"  {name[:16]:<16}{g['games']:>6}{g['frames']:>11,}{g['loss']:>7.3f}{margin:>10}  "
                    + "".join(f"{g['accuracy'][h]:>7.3f} ({g['copy_accuracy'][h]:.3f})" for h in ("main_x", "main_y"))
                    + f"{g['button_f1']:>11.3f} ({g['copy_button_f1']:.3f}){g['change_accuracy']['main_x']:>19.3f}")
    return "\n".join(rows)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _silent(*args) -> None:
    pass


def _log(quiet: bool):
    return _silent if quiet else logger.info


def _columns() -> int:
    """The width of the terminal that stderr writes to (COLUMNS, or 80, when it has none)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or shutil.get_terminal_size().columns
    except (OSError, ValueError):
        return shutil.get_terminal_size().columns


class Progress:
    """A one-line progress bar on stderr (frames/s and ETA) that fits the terminal's width,
    shown only on a terminal."""

    def __init__(self, total: int, label: str, quiet: bool = False):
        self.total, self.label, self.done, self.frames = total, label, 0, 0
        self.on = not quiet and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, frames: int) -> None:
        self.done += 1
        self.frames += frames
        now = time.perf_counter()
        if self.on and (now - self.last > 0.1 or self.done == self.total):
            self.last, rate = now, self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate
            width = _columns() - 1  # the last column would wrap on some terminals
            text = f" {self.done}/{self.total} {self.frames / (now - self.t0):,.0f} frames/s ETA {eta:.0f}s"
            room = min(width - len(self.label) - len(text) - 3, 30)
            bar = f" [{'#' * int(room * self.done / max(self.total, 1)):<{room}}]" if room >= 5 else ""
            print(f"\r{(self.label + bar + text)[:width]}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.on:
            print("\r" + " " * (_columns() - 1) + "\r", end="", file=sys.stderr, flush=True)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (recorded in run.json; `--resume` reads it back)."""

    epochs: int = 1
    batch_size: int = 64  # windows per step (streams, in stateful training)
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine" (to 0 at the end, after a linear warm-up)
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 0.0  # clip the global gradient norm (inside the optimizer graph); 0 = off
    label_smoothing: float = 0.0
    val_split: float = 0.2
    seed: int = 0
    split_seed: int | None = None  # the seed of the train/validation split (None: `seed`)
    split_by: str = "game"  # what validation holds out: games, players or sources (see `split_games`)
    val_sample: int = 200_000  # validation frames scored per epoch, a fixed sample (0: all; all at the end)
    train_games: int = 0  # train on this many of the training games, a seeded choice (0: all; validation unchanged)
    frame_delay: int = 0  # frame t predicts the controller at frame t + 1 + frame_delay
    online_robust: bool = False  # a random delay in [delay_min, delay_max] per window instead
    delay_min: int = 0
    delay_max: int = 0
    mirror_prob: float = 0.0
    change_weight: float = 1.0  # loss weight of frames whose target differs from the current input
    controller_dropout: float = 0.0  # share of training frames whose current-controller inputs are zeroed
    own_inputs: float = 0.0  # share of training frames whose controller inputs are the model's own decisions
    stateful: bool = False
    save_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    early_stopping: bool = False
    patience: int = 3
    max_steps: int = 0  # stop after this many steps in all (0: no limit)
    budget_seconds: float = 0.0  # stop training after this long (0: no limit)
    max_files: int = 0
    character: str | None = None
    opponent_character: str | None = None
    stage: str | None = None
    min_frames: int = 0
    teacher: str | None = None  # a run folder to distill from
    distill_temperature: float = 2.0
    distill_alpha: float = 0.7

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"invalid training setting: {f.name.replace('_', '-')} must be a finite number, "
                                  f"not {value}")
        checks = [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch-size must be >= 1"),
                  (0 < self.lr <= 1, f"lr must be in (0, 1], not {self.lr} (typical: 1e-4 to 3e-3)"),
                  (self.lr_schedule in ("constant", "cosine"),
                                                    "lr-schedule must be constant or cosine"),
                  (0 <= self.val_split < 1, "val-split must be in [0, 1)"),
                  (self.split_by in SPLITS, f"split-by must be one of {', '.join(SPLITS)}"),
                  (0 <= self.label_smoothing < 1, "label-smoothing must be in [0, 1)"),
                  (0 <= self.mirror_prob <= 1, "mirror-prob must be in [0, 1]"),
                  (0 <= self.controller_dropout <= 1, "controller-dropout must be in [0, 1]"),
                  (0 <= self.own_inputs <= 1, "own-inputs must be in [0, 1]"),
                  (0 < self.change_weight < 1e6, "change-weight must be in (0, 1e6)"),
                  (self.frame_delay >= 0 and 0 <= self.delay_min <= self.delay_max,
                   "delays must be >= 0 and delay-min <= delay-max"),
                  (not (self.online_robust and self.frame_delay), "with online-robust, set delay-min and "
                                                                  "delay-max instead of frame-delay"),
                  (self.online_robust or not (self.delay_min or self.delay_max),
                   "delay-min and delay-max apply only with online-robust"),
                  (self.max_grad_norm >= 0, "max-grad-norm must be >= 0"),
                  (0 <= self.weight_decay <= 1, f"weight-decay must be in [0, 1], not {self.weight_decay}"),
                  (not self.online_robust or self.delay_max > 0,
                   "online-robust needs a delay range: add --delay-max (and --delay-min), e.g. 0 and 4"),
                  (0 < self.distill_alpha <= 1 and self.distill_temperature > 0,
                   "distillation needs 0 < alpha <= 1 and temperature > 0"),
                  (min(self.max_files, self.save_every, self.max_steps, self.warmup_steps, self.min_frames,
                       self.val_sample, self.train_games, self.budget_seconds) >= 0, "counts and limits must be >= 0"),
                  (self.patience >= 1, "patience must be >= 1"),
                  (not (self.early_stopping and self.val_split == 0), "early stopping needs a validation split")]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"invalid training setting: {message}")

    @property
    def split_seed_used(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def delays(self) -> tuple[int, int]:
        return (self.delay_min, self.delay_max) if self.online_robust else (self.frame_delay, self.frame_delay)

    def learning_rate(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            progress = (step - self.warmup_steps) / max(total - self.warmup_steps, 1)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr


@dataclasses.dataclass
class RunResult:
    path: Path
    info: dict  # the contents of run.json


TEACHER_LOGITS = "teacher-logits.npy"  # in a distilling run's train/ folder, while it trains


def _teacher_logits(teacher: str | os.PathLike, episodes: list[Episode], path: Path,
                    batch_size: int = 64) -> tuple[list[np.ndarray], Model]:
    """The teacher's logits for every frame of every episode, from its window graph with the
    state carried from each game's start (what its step graph would output in play): written
    to `path` (.npy) as they come, and returned as per-episode views of it, memory-mapped like a
    dataset's shards (so they take no memory of their own). Autoregressive heads are fed each
    frame's target action (teacher forcing, as in training), so the frames without one (the
    last 1 + delay of each game) keep zeros; they have no targets to distill either."""
    model, info = load_run(teacher)
    L, K, ends = model.spec.window, sum(HEADS.values()), np.cumsum([0] + [ep.frames for ep in episodes])
    # delay -1: windows cover every frame (their targets are not used)
    delay = -1 if model.spec.heads.sampling == "independent" else int(info.get("frame_delay", 0))
    _unmap(path)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (int(ends[-1]), K)})
        at = f.tell()
        f.truncate(at + int(ends[-1]) * K * 4)
        for wins, _, result in stream_batches(model, episodes, L, delay, _window_runner(model), batch_size):
            logits = np.concatenate([result[h] for h in HEADS], -1).astype("<f4")
            for b, (i, s) in enumerate(wins.tolist()):
                if i >= 0:
                    rows = logits[b, :min(L, episodes[i].frames - 1 - delay - s)]
                    os.pwrite(f.fileno(), rows.tobytes(), at + (int(ends[i]) + s) * K * 4)
    table = _mapped(path)
    return [table[a:b] for a, b in zip(ends[:-1], ends[1:])], model


# The files and folders a training writes under temporary names in its run folder, renamed into
# place once complete (carry-<step>.tmp.npz: the state a stateful run carries into a step).
RUN_TEMPORARIES = ("run.json.tmp", "window.onnx.tmp", "step.onnx.tmp", "train.tmp", "train/checkpoint.tmp",
                   "train/best.tmp.npz", "train/carry-*.tmp.npz")


class RunLock:
    """Exclusive use of a run folder while a training writes into it: a lock on `<run>/.lock`
    that the operating system releases when the process ends, however it ends (so a killed
    training never leaves it stuck). A failed training removes the temporaries it wrote (the
    names of RUN_TEMPORARIES written or changed while it held the lock; nothing else, nothing
    in other folders). A folder this lock created and that holds nothing else afterwards is
    removed again."""

    def __init__(self, out: Path):
        self.out, self.file, self.created, self.before = Path(out), None, False, {}

    def _temporaries(self) -> dict[Path, tuple]:
        found = {}
        for name in RUN_TEMPORARIES:
            for path in self.out.glob(name):
                with contextlib.suppress(OSError):
                    st = path.lstat()
                    found[path] = (st.st_ino, st.st_mtime_ns)
        return found

    def __enter__(self):
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / ".lock", "a+")
        try:
            import fcntl
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ExphilError(f"{self.out} is in use by another training (process {holder}); wait for it to "
                              "finish, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        self.before = self._temporaries()  # (left by an earlier training, or a user's own: kept)
        return self

    def __exit__(self, kind, *exc):
        if kind is not None:  # a failed training leaves no half-written file behind
            for path, now in self._temporaries().items():
                if self.before.get(path) != now:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.file.close()
        if self.created and [p.name for p in self.out.iterdir()] == [".lock"]:
            shutil.rmtree(self.out, ignore_errors=True)


def train(spec: Spec | str | os.PathLike | None = None, replays=None, out: str | os.PathLike = "runs/run",
          resume: bool = False, quiet: bool = False, cache: Path | None = None,
          data: str | os.PathLike | None = None, ray: str | None = None, workers: int = 1, **settings) -> RunResult:
    """Train a spec on replays (or on a dataset folder: `data`, see `ingest`) into a run folder;
    see TrainConfig for the settings.

    resume=True continues the run in `out` from its last checkpoint with the same settings,
    step, optimizer state and data order. Spec, replays and settings come from the run; any that
    are given must match it, except a larger `epochs`, which extends a finished run.
    The run folder is locked for the whole training (RunLock).
    ray: the address of a Ray cluster ("auto", "local", ...) to train on `workers` Ray workers
    in data parallel (RayTrainer); a run may be resumed with or without Ray, on any number."""
    config = settings if resume else TrainConfig(**settings)  # bad settings: refused before anything is written
    if ray is None and workers != 1:
        raise UsageError("--workers needs --ray (the Ray cluster to run them on)")
    if ray is not None:
        if workers < 1 or workers > (config.get("batch_size", workers) if resume else config.batch_size):
            raise UsageError(f"--workers {workers}: each worker takes a slice of every batch, so it must be "
                             "between 1 and --batch-size")
        connect_ray(ray)
    if not resume and spec is not None:
        spec = spec if isinstance(spec, Spec) else load_spec(spec)
        check_size(spec)
    with RunLock(Path(out)):
        try:
            return _train(spec, replays, data, Path(out), resume, quiet, cache, config, ray, workers)
        except ShardCutShort as e:
            kept = (f"its last checkpoint is kept: once `exphil ingest` has parsed the shard's replays into the dataset "
                    f"again, continue with `exphil train --resume --out {out}`" if has_checkpoint(Path(out) / "train")
                    else "no checkpoint was written yet")
            raise ExphilError(f"{e}; the training stopped, {kept}") from None
        except OSError as e:
            if e.filename:
                raise
            raise ExphilError(f"{out}: {e.strerror or e} (while writing the run folder)") from None


def _flat(tree, prefix: str = "") -> dict:
    """{"a.b[0].c": value} for a nested dict/list (a tuple counts as a list)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def _differences(before, after) -> list[str]:
    a, b = _flat(before), _flat(after)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _fingerprint(spec: Spec, config: TrainConfig) -> str:
    """What a checkpoint was built from: the spec and every setting but the number of epochs."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "epochs"}
    text = json.dumps({"spec": msgspec.to_builtins(spec), "config": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resume_settings(out: Path, spec, replays, data, given: dict) -> tuple[dict, Spec, list, str | None]:
    """The run's recorded settings, spec and replays for `--resume`. What the caller gives again
    must match them (a re-run of the same command), except a larger `epochs`, which extends the
    run; a spec.toml edited since the run started is refused. Every difference is named."""
    if not (out / "run.json").exists() or not has_checkpoint(out / "train"):
        raise ExphilError(f"{out}: nothing to resume (no run.json and checkpoint)")
    info = read_run_info(out)
    recorded, run_spec = info["config"], load_spec(out / "spec.toml")
    if "spec_settings" in info and msgspec.convert(info["spec_settings"], Spec) != run_spec:  # (fields added
        # to the format since then take their defaults on both sides)
        raise ExphilError(f"{out}/spec.toml was edited since the run started ("
                          + "; ".join(_differences(info["spec_settings"], msgspec.to_builtins(run_spec)))
                          + "); restore it, or train the new spec into another --out")
    problems = [f"--{k.replace('_', '-')} {v} (the run has {recorded.get(k)})" for k, v in given.items()
                if v != recorded.get(k) and not (k == "epochs" and v > recorded["epochs"])]
    if spec is not None:
        spec = spec if isinstance(spec, Spec) else load_spec(spec)
        if spec != run_spec:
            problems.append("the spec (" + "; ".join(_differences(msgspec.to_builtins(run_spec),
                                                                msgspec.to_builtins(spec))) + ")")
    sources, run_data = info["replays"]["source"], info["replays"].get("data")
    if replays is not None and [str(r) for r in ([replays] if isinstance(replays, (str, os.PathLike)) else replays)] != sources:
        problems.append(f"--replays {replays} (the run has {', '.join(sources) or 'none'})")
    if data is not None and os.path.abspath(data) != os.path.abspath(run_data):
        problems.append(f"--data {data} (the run has {run_data})")
    if problems:
        raise UsageError(f"{out}: --resume continues the run with its own settings; these differ: "
                          + ", ".join(problems))
    return {**recorded, "epochs": max(recorded["epochs"], given.get("epochs", 0))}, run_spec, sources, run_data


def _games(replays, data, cache, log, config: TrainConfig, ray: str | None = None) -> tuple[list, list, list]:
    """The run's training and validation games (filtered, split as `config.split_by` says) and the
    skipped replays."""
    chosen = (config.character, config.opponent_character, config.stage, config.min_frames)
    left_out = []
    games, skipped = load_games(replays, cache, log, max_files=config.max_files, keep=_game_filter(*chosen),
                                left_out=left_out, data=data, ray=ray)
    replays = data or replays
    if not games and not left_out:
        raise ExphilError(f"{replays}: no usable replay (all {len(skipped)} skipped, see above)")
    games = filter_games(games, *chosen)
    if not games:
        raise ExphilError(f"{replays}: no game matches the filters (character {config.character}, opponent "
                          f"{config.opponent_character}, stage {config.stage}, min frames {config.min_frames})")
    if len(games) < 2 and config.val_split > 0:
        raise ExphilError(f"{replays}: need at least 2 usable games to hold one out for validation")
    try:
        train, val = split_games(games, config.val_split, config.split_seed_used, config.split_by)
    except UsageError as e:
        raise UsageError(f"{replays}: {e}") from None
    if config.train_games:  # the first of a seeded order: a smaller number takes a subset of a larger one's
        order = np.random.default_rng([config.split_seed_used, 2]).permutation(len(train))
        train = [train[i] for i in sorted(order[:config.train_games])]
    return train, val, skipped


def _train(spec, replays, data, out: Path, resume: bool, quiet: bool, cache, config, ray=None, workers=1) -> RunResult:
    """`train` inside its lock: the run resolved, its data loaded, trained an epoch at a time, exported."""
    log = _log(quiet)
    run = _resolve_run(spec, replays, data, out, resume, config)
    prepared = _load_data(run, out, cache, log, ray)
    _write_start(out, run, prepared.info)
    training = _start_training(run, prepared, out, log, ray, workers)
    training.announce()
    bar = Progress(training.total_steps - training.step, "", quiet)  # the whole run (its ETA too)
    while training.epoch <= training.epochs and not training.stopped:
        training.run_epoch(bar)
    return training.export(ray, workers)


class _Run(NamedTuple):
    """What a run trains: given (a new run), or as run.json records it (`--resume`)."""
    spec: Spec
    replays: Any
    data: Any
    config: TrainConfig
    recorded: dict | None  # run.json as the run left it (resuming; None: a new run)

    @property
    def resume(self) -> bool:
        return self.recorded is not None

    @property
    def extending(self) -> bool:  # resumed with more epochs than the run had
        return self.resume and self.config.epochs > self.recorded["config"]["epochs"]


def _resolve_run(spec, replays, data, out: Path, resume: bool, config) -> _Run:
    """The run's spec, replays, dataset and settings, checked: a new run's, or the recorded ones (`--resume`)."""
    if resume:
        settings, spec, replays, data = _resume_settings(out, spec, replays, data, config)
        recorded = read_run_info(out)
        return _Run(spec, replays, data, TrainConfig(**settings), recorded)
    if spec is None or (replays is None) == (data is None):
        raise UsageError("train needs a spec, and replays or a dataset (not both)")
    if has_checkpoint(out / "train"):
        raise UsageError(f"{out} already holds a run: continue it with --resume, or choose another --out")
    return _Run(spec if isinstance(spec, Spec) else load_spec(spec), replays, data, config, None)


class _Data(NamedTuple):
    """A run's games, their episodes and windows, its baselines and the run.json it starts with."""
    train_games: list
    val_games: list
    train_eps: list
    val_eps: list
    train_wins: Windows
    val_wins: Windows
    baselines: dict  # "frequency", "markov" (and "mean_return" with returns), from the training games
    info: dict  # run.json


def _load_data(run: _Run, out: Path, cache, log, ray) -> _Data:
    """The run's games (resuming: exactly the run's), their windows, baselines and run.json info."""
    config, spec, (d_lo, d_hi) = run.config, run.spec, run.config.delays
    train_games, val_games, skipped = _games(run.replays or None, run.data, cache, log, config, ray)
    train_eps, val_eps = [e for g in train_games for e in g], [e for g in val_games for e in g]
    lists = {"train": sorted({e.source for e in train_eps}), "val": sorted({e.source for e in val_eps})}
    if run.resume:
        for which, games in (("train", train_games), ("val", val_games)):
            _check_games(run.recorded["replays"].get("hashes", {}).get(which), games, which,
                         f"--resume cannot continue the run in {out} exactly: restore it, or train into another --out")
        if {k: run.recorded["replays"][k] for k in lists} != lists:
            raise ExphilError(f"{out}: the replays found now differ from the run's; cannot resume exactly")
    if config.controller_dropout and spec.heads.markov:
        raise UsageError(f"--controller-dropout hides the current controller that the Markov heads of spec "
                         f"{spec.name!r} read; set `markov = false` under [heads] to use it")
    if config.own_inputs and spec.window <= 1 + d_hi:
        raise UsageError(f"--own-inputs feeds each frame the decision made 1 + delay frames earlier in its window; "
                         f"spec {spec.name!r} has windows of {spec.window} frame(s) (delay up to {d_hi}): "
                         f"raise --window-size")
    train_wins, val_wins = Windows(train_eps, spec.window, d_hi), Windows(val_eps, spec.window, d_lo)
    if not len(train_wins) or (val_eps and not len(val_wins)):
        which, d = ("training", d_hi) if not train_wins else ("validation", d_lo)
        raise ExphilError(f"{run.data or run.replays}: no {which} frame has a target at frame delay {d}: the {which} "
                          f"games are all {1 + d} frames or shorter")
    baselines = _baselines(train_eps, d_lo, spec.returns_used)
    info = _run_info(run, train_eps, val_eps, lists, skipped, baselines)
    return _Data(train_games, val_games, train_eps, val_eps, train_wins, val_wins, baselines, info)


def _baselines(train_eps: list, d_lo: int, returns) -> dict:
    """The label frequencies and Markov tables of the training games (and their mean return, with returns).

    All are counted on every training frame alike, whatever `--change-weight`: they are the
    baselines of validation, whose frames are never change-weighted, and a model's start."""
    transitions = _transitions(train_eps, d_lo)  # counted on training games only
    baselines = {"frequency": _frequencies(transitions), "markov": _markov(transitions)}
    if returns:
        sums = np.array([(float(e.rtg(returns)[:e.frames - 1 - d_lo].sum(dtype=np.float64)), max(e.frames - 1 - d_lo, 0))
                         for e in train_eps])
        baselines["mean_return"] = float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1))
    return baselines


def _run_info(run: _Run, train_eps: list, val_eps: list, lists: dict, skipped: list, baselines: dict) -> dict:
    """run.json as the run starts ("status": "running")."""
    spec, config, replays, data, (d_lo, d_hi) = run.spec, run.config, run.replays, run.data, run.config.delays
    freqs, returns = baselines["frequency"], spec.returns_used
    baseline = frequency_loss(freqs, val_eps, d_lo) if val_eps else None
    info = {
        "exphil": __version__, "spec": spec.name, "feature_version": FEATURE_VERSION,
        "spec_settings": msgspec.to_builtins(spec), "fingerprint": _fingerprint(spec, config),
        "config": dataclasses.asdict(config), "frame_delay": d_lo,
        "delay_range": [d_lo, d_hi], "target": "frame t predicts the controller at frame t + "
        + (f"{1 + d_lo}" if d_lo == d_hi else f"{1 + d_lo}..{1 + d_hi}"),
        "replays": {"source": [str(r) for r in ([replays] if isinstance(replays, (str, os.PathLike)) else replays or [])],
                    "data": data and os.path.abspath(data), **lists, "skipped": skipped,
                    "hashes": {k: sorted({e.digest for e in eps}) for k, eps in (("train", train_eps), ("val", val_eps))}},
        "frames": {"train": sum(e.frames for e in train_eps), "val": sum(e.frames for e in val_eps)},
        "baseline_loss": baseline, "label_frequencies": freqs, "markov_tables": baselines["markov"],
        "status": "running",
    }
    if returns:
        info["returns"] = return_stats(train_eps, returns) | {"mean_return": baselines["mean_return"]}
    return info


def _write_start(out: Path, run: _Run, info: dict) -> None:
    """The run folder as the run starts (a new run: its spec.toml and an empty metrics.jsonl) and its run.json."""
    out.mkdir(parents=True, exist_ok=True)
    if not run.resume:
        (out / "spec.toml").write_text(msgspec.toml.encode(run.spec).decode())
        (out / "metrics.jsonl").write_text("")
    _write_json(out / "run.json", info)


def _start_training(run: _Run, prepared: _Data, out: Path, log, ray, workers) -> _Training:
    """The teacher (distilling), the model (from the baselines) and its trainer, new or from the run's checkpoint."""
    config, baselines = run.config, prepared.baselines
    teacher = _teacher(config, prepared, out) if config.teacher else None
    distill = (config.distill_temperature, config.distill_alpha) if teacher else None
    model = Model(run.spec, seed=config.seed, check=False)  # checked in train() (or when the run began)
    model.start_from_baselines(baselines["frequency"], baselines["markov"], baselines.get("mean_return"))
    trainer = (functools.partial(RayTrainer, ray=ray, workers=workers) if ray else Trainer)(
        model, out / "train", lr=config.lr, weight_decay=config.weight_decay, log=log,
        max_grad_norm=config.max_grad_norm, distill=distill)
    progress = _checkpoint_progress(run, trainer, prepared.info, out)
    return _Training(out, run, prepared, teacher, distill, model, trainer, progress, log)


def _teacher(config: TrainConfig, prepared: _Data, out: Path) -> dict:
    """The teacher's logits on the training and the validation episodes (distilling), and its model."""
    teacher_delay = load_run(config.teacher)[1].get("frame_delay", 0)
    if config.delays != (teacher_delay, teacher_delay):
        raise ExphilError(f"teacher {config.teacher} was trained with frame delay {teacher_delay}; "
                          f"distill with the same --frame-delay (and without --online-robust)")
    (out / "train").mkdir(exist_ok=True)
    train_eps = prepared.train_eps
    logits, teacher_model = _teacher_logits(config.teacher, train_eps + prepared.val_eps,
                                            out / "train" / TEACHER_LOGITS, config.batch_size)
    return {"temperature": config.distill_temperature, "train": logits[:len(train_eps)],
            "val": logits[len(train_eps):], "model": teacher_model}


def _teacher_view(teacher: dict | None, which: str) -> dict | None:
    """The teacher with its logits on the "train" or "val" episodes, as batches and scorers take it."""
    return teacher and {**teacher, "logits": teacher[which]}


def _checkpoint_progress(run: _Run, trainer, info: dict, out: Path) -> dict:
    """The checkpoint's progress ({} new), checked to be the run's; metrics.jsonl cut to the epochs it includes."""
    progress = trainer.progress if run.resume else {}
    # as recorded when the run started (settings added later do not count)
    if run.resume and run.recorded.get("fingerprint"):
        info["fingerprint"] = run.recorded["fingerprint"]
    if progress.get("fingerprint", info["fingerprint"]) != info["fingerprint"]:
        raise ExphilError(f"{out}: the checkpoint was built from another spec or other settings than the run's "
                          "spec.toml and run.json now hold; cannot resume")
    if run.resume:  # drop rows of epochs the checkpoint does not include (killed after writing them)
        rows = [l for l in _jsonl_lines(out / "metrics.jsonl") if json.loads(l)["epoch"] < progress.get("epoch", 1)]
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return progress


def _jsonl_lines(path: Path) -> list[str]:
    """The lines of a .jsonl file that hold a value."""
    return [l for l in path.read_text().splitlines() if l.strip()]


class _Training:
    """`_train`'s model and trainer, where the run stands (step, epoch, best, ...), its epochs and its export."""

    def __init__(self, out: Path, run: _Run, prepared: _Data, teacher, distill, model, trainer, progress: dict, log):
        config = self.config = run.config
        self.out, self.spec, self.data, self.log, self.progress = out, run.spec, prepared, log, progress
        self.teacher, self.distill, self.model, self.trainer = teacher, distill, model, trainer
        L = self.L = run.spec.window
        (self.d_lo, self.d_hi), self.returns = config.delays, run.spec.returns_used
        self.stateful = config.stateful and bool(model.states)
        self.steps_per_epoch = len(streams(prepared.train_eps, L, config.batch_size, self.d_hi)) if self.stateful else \
            -(-len(prepared.train_wins) // config.batch_size)
        # --max-steps decides
        self.epochs = -(-config.max_steps // self.steps_per_epoch) if config.max_steps else config.epochs
        self.total_steps = config.max_steps or self.steps_per_epoch * self.epochs
        # per epoch, a fixed sample of the validation windows when the games hold more frames than --val-sample
        self.sample, val_wins = None, prepared.val_wins
        if config.val_sample and len(val_wins) * L > config.val_sample:
            self.sample = np.sort(np.random.default_rng([config.split_seed_used, 1 << 31]).choice(
                len(val_wins), max(config.val_sample // L, 1), replace=False))
        self.step = progress.get("step", 0)
        self.epoch, self.start = progress.get("epoch", 1), progress.get("batch", 0)
        self.best = progress.get("best", {"val_loss": float("inf"), "epoch": 0})
        self.stale = progress.get("stale", 0)
        self.t_start, self.stopped = time.perf_counter(), progress.get("stopped")
        if self.stopped and run.extending:
            raise ExphilError(f"{out}: the run stopped ({self.stopped}); more --epochs cannot continue it: "
                              "train again into another --out")

    def announce(self) -> None:
        """The run's plan, in one log line."""
        config, L, d = self.config, self.L, self.data
        self.log(f"{self.spec.name}: {len(d.train_games)} train games ({d.info['frames']['train']:,} frames), "
                 f"{len(d.val_games)} validation games (split by {config.split_by}), {self.steps_per_epoch} steps of "
                 f"{config.batch_size} x {L} frames per epoch, "
                 + (f"{self.total_steps} steps in all (--max-steps)" if config.max_steps else f"{self.epochs} epochs")
                 + (f"; validation on {len(self.sample) * L:,} sampled frames per epoch, on all at the end"
                    if self.sample is not None else "")
                 + (f"; resuming at epoch {self.epoch}, step {self.step}" if self.progress else ""))

    def plan(self):
        """The batches of this epoch (batch k: plan[k]): a function of (seed, epoch) only."""
        config, epoch = self.config, self.epoch
        rng = np.random.default_rng([config.seed, epoch])
        if self.stateful:
            return streams(self.data.train_eps, self.L, config.batch_size, self.d_hi, rng)
        return Batches(self.data.train_wins, config.batch_size, rng)

    def carry(self, at: int) -> Path:
        """Stateful: the file of the state carried into step `at`."""
        return self.out / "train" / f"carry-{at}.npz"

    def run_epoch(self, bar: Progress) -> None:
        """One epoch (the rest of it, resuming): its steps, then its row in metrics.jsonl and its checkpoint."""
        batches, metrics = self.plan(), Metrics(sums=self.progress.get("sums") if self.start else None)
        bar.label, t0 = f"epoch {self.epoch}/{self.epochs}", time.perf_counter()
        frames = self.train_steps(batches, metrics, bar)
        bar.close()
        self.end_epoch(metrics, frames, time.perf_counter() - t0)

    def train_steps(self, batches, metrics: Metrics, bar: Progress) -> int:
        """The epoch's steps from batch `start` on, until its end or a step or time budget; the frames trained."""
        config, epoch, out, d = self.config, self.epoch, self.out, self.data
        frames, previous = 0, None
        flipped = np.random.default_rng([config.seed, epoch, 1 << 30]).random(len(d.train_eps)) < config.mirror_prob
        if self.stateful and self.start:
            if not self.carry(self.step).exists():
                raise ExphilError(f"{out}: the state carried into step {self.step} is missing; cannot resume exactly")
            with np.load(self.carry(self.step)) as z:
                previous = dict(z)
        prepare = lambda k: self.batch_for(batches[k], np.random.default_rng([config.seed, epoch, k]),
                                           _teacher_view(self.teacher, "train"), flipped)
        # the next batch is made during this step, on a thread closed with the epoch (or an error)
        with contextlib.closing(_Ahead(prepare, range(self.start, len(batches)))) as ahead:
            for k in range(self.start, len(batches)):
                batch = ahead.next()
                if self.stateful:
                    batch = carry_state(batch, previous, batches[k], self.model)
                if config.own_inputs:  # the model's decisions on this batch, read back as in play
                    batch = with_own_inputs(batch, self.trainer.evaluate(batch), config.own_inputs,
                                            np.random.default_rng([config.seed, epoch, k, 1 << 31]))
                previous = self.trainer.step(batch, config.learning_rate(self.step, self.total_steps))
                if not math.isfinite(float(previous["loss"])):
                    _diverged(out, d.info, f"the loss is {float(previous['loss'])} at step {self.step + 1}", config)
                metrics.add(previous, batch)
                self.step, n = self.step + 1, int((batch["mask"] > 0).sum())
                frames += n
                bar.update(n)
                over = (config.max_steps and self.step >= config.max_steps) or \
                    (config.budget_seconds and time.perf_counter() - self.t_start >= config.budget_seconds)
                if over:
                    self.stopped = "step or time budget reached"
                if config.save_every and self.step % config.save_every == 0 and k + 1 < len(batches) and not over:
                    self.save_within(k + 1, previous, metrics)
                if over:
                    break
        return frames

    def batch_for(self, wins, rng, eps_teacher, flipped) -> dict:
        """The training batch of windows `wins`, delayed, mirrored and masked as the settings say."""
        config, d_lo, d_hi, n = self.config, self.d_lo, self.d_hi, len(wins)
        if not config.mirror_prob:
            mirror = None
        elif self.stateful:  # a stream keeps one side for a whole game: its state carries across windows
            mirror = [w is not None and bool(flipped[w[0]]) for w in wins]
        else:
            mirror = rng.random(n) < config.mirror_prob
        return make_batch(self.data.train_eps, wins, self.L, rng.integers(d_lo, d_hi + 1, n) if d_hi > d_lo else d_lo,
                          mirror=mirror, smoothing=config.label_smoothing, teacher=eps_teacher,
                          change_weight=config.change_weight,
                          controller_dropout=(config.controller_dropout, int(rng.integers(1 << 62)))
                          if config.controller_dropout else None, returns=self.returns)

    def save_within(self, batch: int, previous: dict, metrics: Metrics) -> None:
        """A checkpoint inside the epoch, before `batch` (stateful: with the state carried into the next step)."""
        carry = self.carry(self.step)
        if self.stateful:  # written before the checkpoint that points at it; older ones after
            np.savez(carry.with_suffix(".tmp.npz"), **{n: v for n, v in previous.items() if n.startswith("state_out.")})
            os.replace(carry.with_suffix(".tmp.npz"), carry)
        self.checkpoint({"step": self.step, "epoch": self.epoch, "batch": batch, "sums": metrics.sums,
                         "fingerprint": self.data.info["fingerprint"], "best": self.best, "stale": self.stale})
        carries = [f for f in (self.out / "train").glob("carry-*.npz") if f.stem[6:].isdigit()]
        for old in sorted(carries, key=lambda f: int(f.stem[6:]))[:-2]:
            old.unlink()  # the carries of the last two checkpoints stay

    def checkpoint(self, progress: dict | None) -> None:
        """`progress` saved with the weights (None: not saved); never a checkpoint (or export) of non-finite ones."""
        if not all(np.isfinite(v).all() for v in self.trainer.params().values()):
            _diverged(self.out, self.data.info, f"a parameter is not finite after step {self.step}", self.config)
        if progress is not None:
            self.trainer.save_checkpoint(progress)

    def end_epoch(self, metrics: Metrics, frames: int, seconds: float) -> None:
        """The epoch's validation (best weights, early stopping), metrics.jsonl row, checkpoint and log line."""
        config, step, best_file = self.config, self.step, self.out / "train" / "best.npz"
        row = {"epoch": self.epoch, "step": step, **metrics.result("train"), "seconds": round(seconds, 3),
               "button_threshold": metrics.best_button_threshold(),  # chosen on this epoch's training batches
               "frames_per_s": round(frames / max(seconds, 1e-9), 1),
               "lr": config.learning_rate(step, self.total_steps)}
        if self.data.val_eps:
            row.update(self.validate(row["button_threshold"]))
            if row["val_loss"] < self.best["val_loss"] - 1e-4:  # an improvement, not noise
                self.best, self.stale = {"val_loss": row["val_loss"], "epoch": self.epoch}, 0
                np.savez(best_file.with_suffix(".tmp.npz"), **self.trainer.params())
                os.replace(best_file.with_suffix(".tmp.npz"), best_file)
            else:
                self.stale += 1
            if config.early_stopping and self.stale >= config.patience:
                self.stopped = f"early stopping: no validation improvement in {self.stale} epochs"
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.epoch, self.start = self.epoch + 1, 0
        self.checkpoint({"step": step, "epoch": self.epoch, "batch": 0, "best": self.best, "stale": self.stale,
                         "fingerprint": self.data.info["fingerprint"], "stopped": self.stopped})
        self.log(f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f}, "
                 + (summary_line(row, "val") if self.data.val_eps else "no validation games")
                 + f" | {row['frames_per_s']:,.0f} frames/s" + (f" ({self.stopped})" if self.stopped else ""))

    def validate(self, threshold: float) -> dict:
        """Validation on the sampled windows, or on every frame (whole games, the state carried)."""
        config, d, run = self.config, self.data, self.trainer.evaluate
        metrics, vt = Metrics(d.baselines, button_threshold=threshold), _teacher_view(self.teacher, "val")
        if self.sample is None:
            return score_games(run, self.model, d.val_eps, self.L, self.d_lo, metrics, config.batch_size,
                               teacher=vt).result("val")
        batches = (make_batch(d.val_eps, d.val_wins[w], self.L, self.d_lo, teacher=vt, returns=self.returns)
                   for w in chunks(self.sample, config.batch_size))
        return evaluate_batches(run, batches, metrics).result("val") | {"val_sampled": True}

    def export(self, ray, workers) -> RunResult:
        """The best epoch's weights (or the last step's) exported, scored on all validation frames; run.json."""
        out, d, best_file = self.out, self.data, self.out / "train" / "best.npz"
        info = d.info
        self.export_weights(best_file, ray, workers)
        history = [json.loads(l) for l in _jsonl_lines(out / "metrics.jsonl")]
        exported = next((r for r in history if r["epoch"] == self.best["epoch"]), history[-1] if history else None)
        self.trainer = None  # (its session's memory goes before the scoring session's comes)
        if d.val_eps and exported:
            exported = self.score_exported(exported)
        info.update({"status": "finished", "final": history[-1] if history else None, "best": self.best,
                     "exported_metrics": exported, "button_threshold": (exported or {}).get("button_threshold", 0.5),
                     "exported": "best validation epoch" if best_file.exists() else "last step",
                     "stopped": self.stopped, "steps": self.step})
        if self.teacher:
            eps, logits = (d.val_eps, self.teacher["val"]) if d.val_eps else (d.train_eps, self.teacher["train"])
            info["distillation"] = distillation_report(out, eps, logits, self.teacher["model"], self.d_lo)
            _unmap(out / "train" / TEACHER_LOGITS)
        _write_json(out / "run.json", info)
        return RunResult(out, info)

    def export_weights(self, best_file: Path, ray, workers) -> None:
        """The model's window and step graphs in the run folder, with the best (or the last) weights."""
        self.checkpoint(None)
        if best_file.exists():
            with np.load(best_file) as z:
                self.model.load(dict(z))
        else:
            self.model.load(self.trainer.params())
        if ray:
            self.data.info["ray"] = {"workers": workers, "hosts": [h for h, _ in self.trainer.hosts]}
            self.trainer.close()
        self.model.save(self.out)
        for stale in (self.out / f for p, f in PRECISIONS.items() if p != "fp32"):  # made from the weights before
            stale.unlink(missing_ok=True)  # this export
        self.data.info["graphs"] = {f: graph_digest(self.out / f) for f in ("window.onnx", "step.onnx")}

    def score_exported(self, exported: dict) -> dict:
        """The exported weights on every validation frame, per group of player views; their metrics."""
        d = self.data
        runner = _window_runner(self.model, loss_graph(self.distill))
        vt = _teacher_view(self.teacher, "val")
        new_metrics = lambda: Metrics(d.baselines, button_threshold=exported["button_threshold"])
        groups = {by: score_groups(runner, self.model, d.val_eps, self.L, self.d_lo, new_metrics, by,
                                   batch_size=self.config.batch_size, teacher=vt) for by in GROUPINGS}
        d.info["val_by"] = {by: report for by, (_, report) in groups.items()}
        if self.sample is not None:
            exported = {**exported, **groups["character"][0].result("val"), "val_sampled": False}
            self.log("exported weights on all validation frames: " + summary_line(exported, "val"))
        return exported


class _Ahead:
    """`make(k)` for each k of `keys` in turn, each made on a thread while the caller works on
    the one before (onnxruntime releases the GIL during a step)."""

    def __init__(self, make, keys):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.make, self.keys = ThreadPoolExecutor(1), make, iter(keys)
        self.pending = self._submit()

    def _submit(self):
        k = next(self.keys, None)
        return None if k is None else self.pool.submit(self.make, k)

    def next(self):
        result = self.pending.result()
        self.pending = self._submit()
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _diverged(out: Path, info: dict, what: str, config: TrainConfig):
    """Stop a run whose loss or parameters went non-finite: marked in run.json, nothing exported,
    the last good checkpoint kept."""
    _write_json(out / "run.json", {**info, "status": "diverged", "diverged": what})
    raise ExphilError(f"{out}: training diverged: {what} (likely a learning rate too high, --lr {config.lr}, or "
                      f"non-finite values in the data); nothing was exported and the last good checkpoint is kept: "
                      f"train again into another --out with other settings")


def chunks(items, size: int):
    """Consecutive slices of `size` items (a list, an array, Windows), one at a time."""
    return (items[k:k + size] for k in range(0, len(items), size))


def _check_games(recorded: list[str] | None, games: list[list[Episode]], which: str, advice: str) -> None:
    """Refuse games whose contents are not exactly the `recorded` ones (content hashes; None: a
    run from before they were recorded), naming a game that changed."""
    if recorded is None:
        return
    found = {g[0].digest: g[0].source for g in games}
    changed = [source for digest, source in found.items() if digest not in recorded]
    if changed:
        raise ExphilError(f"{changed[0]}: not the content of the run's {which} game (it changed since); {advice}")
    if len(found) < len(recorded):
        raise ExphilError(f"{len(recorded) - len(found)} of the run's {which} games are gone; {advice}")


def recorded_games(info: dict, which: str, log=None) -> list[list[Episode]]:
    """A run's training or validation games (`which`: "train" or "val") as its run.json lists
    them: from its dataset when it trained on one (`--data`; exactly the recorded contents),
    else from the replay files (refused when one has another content now)."""
    listed, data = info.get("replays", {}).get(which), info.get("replays", {}).get("data")
    recorded = info.get("replays", {}).get("hashes", {}).get(which)  # (None: a run from before they were recorded)
    if not listed:
        return []
    wanted = set(listed if recorded is None else recorded)
    games, _ = (load_games(data=data, log=log, keep=lambda row: row["path" if recorded is None else "hash"] in wanted)
                if data else load_games(listed, log=log))
    _check_games(recorded, games, which, "pass the replays to use")
    return games


def games_to_judge(run: Path, info: dict, replays=None, data=None, log=None) -> tuple[list[list[Episode]], list[dict]]:
    """The games `eval` scores a run on: replays or a dataset, else the run's validation games."""
    if replays is None and data is None:
        games = recorded_games(info, "val", log)
        if not games:
            raise UsageError(f"{run}: it has no validation games to judge it on; pass --replays or --data")
        return games, []
    games, skipped = load_games(replays, log=log, data=data)
    if not games:
        raise ExphilError(f"{data or replays}: no usable replay (skipped {len(skipped)})")
    return games, skipped


MAX_FRAME_DELAY = 1 << 16  # frames (18 minutes): longer than a game of Melee's default 8-minute timer


class _RunReplays(msgspec.Struct, frozen=True):
    source: list[str] = []
    data: Union[str, None] = None
    train: list[str] = []
    val: list[str] = []
    skipped: list[dict] = []
    hashes: dict[str, list[str]] = {}  # content hashes of the train and val games


class _RunFrames(msgspec.Struct, frozen=True):
    train: Annotated[int, msgspec.Meta(ge=0)] = 0
    val: Annotated[int, msgspec.Meta(ge=0)] = 0


class _RunHold(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    buttons: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0  # (see `hold_vector`)
    sticks: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0


class RunInfo(msgspec.Struct):
    """What exphil reads back from a run.json (which holds more: metrics, reports, ...), checked as
    a spec is: a wrong type or a value out of range is refused, naming the field."""

    feature_version: int = FEATURE_VERSION
    spec: str = ""
    frame_delay: Annotated[int, msgspec.Meta(ge=0, le=MAX_FRAME_DELAY)] = 0
    delay_range: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=MAX_FRAME_DELAY)]],
                           msgspec.Meta(min_length=2, max_length=2)] = msgspec.field(default_factory=lambda: [0, 0])
    button_threshold: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    config: Union[TrainConfig, None] = None
    replays: _RunReplays = _RunReplays()
    frames: _RunFrames = _RunFrames()
    label_frequencies: Union[dict[str, list[Annotated[float, msgspec.Meta(ge=0, le=1)]]], None] = None
    markov_tables: Union[dict[str, list], None] = None
    returns: dict[str, Any] = {}
    graphs: dict[str, str] = {}
    hold: _RunHold = _RunHold()
    fingerprint: Union[str, None] = None
    status: str = "finished"


def read_run_info(run: str | os.PathLike, layout: bool = True) -> dict:
    """A run folder's run.json ({} if it has none), checked (RunInfo): one line naming the file
    and the field otherwise. run.json is input: it may have been edited or damaged. layout: refuse
    a run of another feature layout (its graphs read other features) in one line."""
    path = Path(run) / "run.json"
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_bytes())
        msgspec.convert(info, RunInfo)
        unknown = sorted(set(info.get("config") or {}) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ExphilError(f"unknown setting `$.config.{unknown[0]}`")
        if info.get("button_threshold", 0.5) not in BUTTON_THRESHOLDS:
            raise ExphilError(f"`$.button_threshold` must be one of {', '.join(map(str, BUTTON_THRESHOLDS))}")
    except (ValueError, msgspec.ValidationError, ExphilError) as e:  # (json's errors are ValueErrors)
        raise ExphilError(f"{path}: not a valid run.json: {e}") from None
    version = info.get("feature_version", FEATURE_VERSION)
    if layout and version != FEATURE_VERSION:
        raise ExphilError(f"{run}: trained with feature layout v{version}; this exphil reads v{FEATURE_VERSION} "
                          "(it sees items, projectiles, Nana and Randall): retrain, or install the matching exphil")
    return info


def load_run(run: str | os.PathLike) -> tuple[Model, dict]:
    """The model of a run folder with its exported weights, and its run.json."""
    run = Path(run)
    for f in ("spec.toml", "window.onnx"):
        if not (run / f).exists():
            raise ExphilError(f"{run}: not a finished run folder (no {f})")
    info = read_run_info(run)
    return Model(load_spec(run / "spec.toml"), load_params(run / "window.onnx")), info


def _window_runner(model: Model, extra=None):
    """run(batch) -> outputs for a model's window graph on onnxruntime (inference)."""
    sess = session(model.build(extra=extra).SerializeToString())
    names, inputs = [o.name for o in sess.get_outputs()], [i.name for i in sess.get_inputs()]

    def run(batch):
        batch = with_zero_state(batch, model)
        return dict(zip(names, sess.run(None, {n: batch[n] for n in inputs})))
    return run


def evaluate(run: str | os.PathLike, replays=None, batch_size: int = 64, quiet: bool = False,
             data: str | os.PathLike | None = None, by: str | None = None, top: int = 8) -> dict:
    """Loss, button F1 and accuracies of a trained run on replays (or a dataset; neither: its
    validation games), every game played from its start with the state carried, beside its
    baselines on the same frames: copy, the run's Markov table and label frequencies (see
    Metrics), and on change frames.
    by: also per group of player views ("by": see `score_groups`), one of GROUPINGS."""
    model, info = load_run(run)
    games, skipped = games_to_judge(Path(run), info, replays, data, _log(quiet))
    episodes = [ep for g in games for ep in g]
    delay, L = int(info.get("frame_delay", 0)), model.spec.window
    baselines = ({"frequency": info["label_frequencies"], "markov": info.get("markov_tables")}
                 if "label_frequencies" in info else None)
    if baselines and "returns" in info:
        baselines["mean_return"] = info["returns"]["mean_return"]
    new_metrics = lambda: Metrics(baselines=baselines, button_threshold=info.get("button_threshold", 0.5))
    runner = _window_runner(model, add_loss)
    if by:
        metrics, report = score_groups(runner, model, episodes, L, delay, new_metrics, by, top, batch_size)
    else:
        metrics, report = score_games(runner, model, episodes, L, delay, new_metrics(), batch_size), None
    res = {k.removeprefix("eval_"): v for k, v in metrics.result("eval").items()}
    return {**res, **({"by": {by: report}} if by else {}), "frame_delay": delay, "target": f"frame t predicts the controller at frame t + {1 + delay}",
            "games": len(games), "game_frames": sum(e.frames for e in episodes), "skipped": skipped}


def distillation_report(student_run: Path, episodes: list[Episode], logits: list[np.ndarray], teacher_model: Model,
                        delay: int) -> dict:
    """Per-head agreement of the student with the teacher on the episodes' frames (most likely
    value per head; per button, pressed or not), and both step latencies."""
    student, _ = load_run(student_run)
    agree = {h: [0.0, 0.0] for h in HEADS}
    teacher = {"logits": logits, "temperature": 1.0}
    for _, batch, out in stream_batches(student, episodes, student.spec.window, delay, _window_runner(student),
                                     teacher=teacher):
        mask = batch["mask"] > 0
        for h in HEADS:
            soft, mine = batch[f"soft.{h}"][mask], out[h][mask]
            same = (soft > 0.5) == (mine > 0) if h == "buttons" else soft.argmax(-1) == mine.argmax(-1)
            agree[h][0] += float(same.sum())
            agree[h][1] += float(same.size)
    return {"agreement": {h: round(a / max(n, 1), 4) for h, (a, n) in agree.items()},
            "step_latency_ms": {"teacher": step_latency(teacher_model), "student": step_latency(student)}}


def timed(call, min_calls: int = 300, max_calls: int = 5000, seconds: float = 0.6, warmup: int = 50) -> dict:
    """p50 and p99 wall time (ms) of `call()` over at least `min_calls` calls after a warm-up,
    more (up to `max_calls`) when calls are fast enough to fit in about `seconds`."""
    for _ in range(warmup):
        call()
    t0 = time.perf_counter()
    call()
    calls = int(np.clip(seconds / max(time.perf_counter() - t0, 1e-6), min_calls, max_calls))
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    ms = times * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "calls": calls}


def step_latency(graph: Model | bytes | str | os.PathLike, provider: str = "cpu", threads: int = 1,
                 frames: tuple[np.ndarray, np.ndarray] | None = None, **timing) -> dict:
    """Step-graph wall time per call (batch 1, state carried): p50/p99 ms (see `timed`).
    `graph`: a Model, serialized graph bytes or a path; `frames`: (cat [N, C], num [N, F]) inputs
    to cycle through (default: random values shaped like real frames)."""
    if isinstance(graph, Model):
        graph = graph.build(step=True).SerializeToString()
    stepper = Stepper(graph if isinstance(graph, bytes) else str(graph), provider, threads)
    if frames is None:
        rng = np.random.default_rng(0)
        frames = (np.stack([rng.integers(0, EMBED_TABLES[t], 256) for _, t in CAT_FIELDS], 1).astype(np.int64),
                  rng.normal(0, 1, (256, len(NUM_FIELDS))).astype(np.float32))
    cats, nums = frames
    counter = iter(range(1 << 62))

    def call():  # (a graph that samples also draws its action, from the deterministic rule's numbers)
        k = next(counter) % len(cats)
        stepper(cats[k], nums[k], noise=numbers[k])
    numbers = fixed_uniforms(np.arange(len(cats)))
    return timed(call, **timing)


# =================================================================================================
# Inference: onnxruntime sessions
# =================================================================================================

PROVIDERS = {"cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "cpu": "CPUExecutionProvider"}


def select_providers(requested: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """Execution providers for a session: "auto" picks CUDA, then ROCm, then CoreML, then CPU
    among those installed (CPU always stays as the fallback). A named provider that is not
    installed is an error that lists what is."""
    import onnxruntime as ort

    available = list(ort.get_available_providers() if available is None else available)
    if requested == "auto":
        best = next((p for p in PROVIDERS.values() if p in available), "CPUExecutionProvider")
        return [best] if best == "CPUExecutionProvider" else [best, "CPUExecutionProvider"]
    name = PROVIDERS.get(requested.lower(), requested)
    if name not in available:
        names = ", ".join(k for k, v in PROVIDERS.items() if v in available)
        raise ExphilError(f"provider {requested!r} is not available here; available: {names}")
    return [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]


def session(path: str | os.PathLike | bytes, provider: str = "auto", threads: int = 1):
    """An onnxruntime session tuned for latency: `threads` intra-op threads (one by default: no
    thread pool to wake), sequential execution, full graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=select_providers(provider))


class Stepper:
    """Runs a step graph frame by frame, carrying its recurrent state (zeros = start of a game).

    Every input and output lives in a buffer allocated once and bound to the session (IO
    binding): a step allocates nothing. Two bindings alternate so that one step's state output
    is the next step's state input without a copy."""

    def __init__(self, path: str | os.PathLike | bytes, provider: str = "auto", threads: int = 1):
        import onnxruntime as ort

        self.session = session(path, provider, threads)
        dims = lambda shape: [d if isinstance(d, int) else 1 for d in shape]
        inputs = {i.name: i for i in self.session.get_inputs()}
        # the frame's inputs: features, and where the graph reads them the return-to-go and, in a
        # graph that samples (autoregressive heads), the decision rule's numbers and temperature
        self.inputs = {n: np.zeros(dims(inputs[n].shape), np.int64 if n == "cat" else np.float32)
                       for n in ("cat", "num", "rtg", "noise", "temperature") if n in inputs}
        self.cat, self.num, self.rtg = self.inputs["cat"], self.inputs["num"], self.inputs.get("rtg")
        self.samples = "noise" in inputs
        self.state_names = [n[len("state_in."):] for n in inputs if n.startswith("state_in.")]
        self.heads = {o.name: np.zeros(dims(o.shape), np.int64 if o.name == "action" else np.float32)
                      for o in self.session.get_outputs() if o.name in HEADS or o.name in ("value", "action")}
        buffers = [{n: np.zeros(dims(inputs[f"state_in.{n}"].shape), np.float32) for n in self.state_names}
                   for _ in range(2)]
        value = ort.OrtValue.ortvalue_from_numpy
        self._keep = [value(a) for a in (*self.inputs.values(), *self.heads.values())]
        self._bindings = []
        for src, dst in ((buffers[0], buffers[1]), (buffers[1], buffers[0])):
            io = self.session.io_binding()
            for n, v in zip(self.inputs, self._keep):
                io.bind_ortvalue_input(n, v)
            for n, v in zip(self.heads, self._keep[len(self.inputs):]):
                io.bind_ortvalue_output(n, v)
            for n in self.state_names:
                a, b = value(src[n]), value(dst[n])
                self._keep += [a, b]
                io.bind_ortvalue_input(f"state_in.{n}", a)
                io.bind_ortvalue_output(f"state_out.{n}", b)
            self._bindings.append((io, src))
        self._turn = 0

    @property
    def state(self) -> dict[str, np.ndarray]:
        """The state the next step will read (a view: copy it to keep it)."""
        return self._bindings[self._turn][1]

    def reset(self) -> None:
        for a in self.state.values():
            a.fill(0)

    def __call__(self, cat: np.ndarray, num: np.ndarray, rtg: float = 0.0, noise: np.ndarray | None = None,
                 temperature: float = 1.0) -> dict[str, np.ndarray]:
        """Logits per head for one frame (cat [C], num [F]; the return-to-go `rtg` for a graph
        that reads one), and `value` for a graph with a value head; advances the state. A graph
        that samples (`samples`) also returns the `action` it sampled from the numbers `noise`
        [UNIFORMS] at `temperature` (see `DecisionRule`). The returned arrays are reused by the
        next call."""
        self.cat[0] = cat
        self.num[0] = num
        if self.rtg is not None:
            self.rtg[0] = rtg
        if self.samples:
            if noise is None:
                raise UsageError("this step graph samples its action (autoregressive heads): give it the frame's numbers")
            self.inputs["noise"][0] = noise
            self.inputs["temperature"][...] = temperature
        io, _ = self._bindings[self._turn]
        self.session.run_with_iobinding(io)
        self._turn ^= 1
        return {h: v[0] for h, v in self.heads.items()}


# One uniform number per button and per class head decides a frame's action (inverse CDF).
UNIFORMS = len(BUTTONS) + len(HEADS) - 1


FIXED_FRAMES = 1 << 16  # the deterministic rule's numbers repeat after this many frames (18 minutes)
# the numbers each hold applies to: the buttons and the analog trigger (presses), the two sticks
HOLD_GROUPS = {"buttons": [*range(len(BUTTONS)), UNIFORMS - 1], "sticks": list(range(len(BUTTONS), UNIFORMS - 1))}


def hold_vector(hold: dict | None) -> np.ndarray:
    """[UNIFORMS]: the probability that each number of the decision rule is kept from one frame to
    the next, from a run's `hold` ({"buttons": p, "sticks": p}; absent: 0, a new number every frame)."""
    keep = np.zeros(UNIFORMS)
    for group, p in (hold or {}).items():
        if group not in HOLD_GROUPS or not 0 <= p < 1:
            raise UsageError(f"hold {group}={p}: the groups are {', '.join(HOLD_GROUPS)}, each a number in [0, 1)")
        keep[HOLD_GROUPS[group]] = p
    return keep


def next_uniforms(u: np.ndarray, keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The decision rule's numbers for the next frame: each of u [..., UNIFORMS] kept with
    probability `keep`, else drawn anew. Every frame's numbers stay uniform and independent of the
    game, so every decision is still a sample of the model's distribution; a kept number changes
    the action only when the distribution moves, not by the luck of a new draw."""
    fresh = rng.random(u.shape)
    return np.where(rng.random(u.shape) < keep, u, fresh) if keep.any() else fresh


@functools.cache
def _fixed_table(keep: tuple = ()) -> np.ndarray:
    rng = np.random.default_rng(0)
    fresh = rng.random((FIXED_FRAMES, UNIFORMS))
    if not any(keep):
        return fresh
    kept = rng.random((FIXED_FRAMES, UNIFORMS)) < np.array(keep)
    kept[0] = False
    drawn = np.maximum.accumulate(np.where(kept, 0, np.arange(FIXED_FRAMES)[:, None]), 0)  # the last draw
    return np.take_along_axis(fresh, drawn, 0)


def fixed_uniforms(frames, keep: np.ndarray | None = None) -> np.ndarray:
    """[..., UNIFORMS]: the numbers the deterministic rule uses at frame index `frames` of a game
    (0 at its first frame): one fixed table of uniform numbers, the same for every game, each
    number kept from the frame before with probability `keep` (`next_uniforms`; None: never).
    (A low-discrepancy sequence, tried instead, correlates consecutive frames and biases how long
    inputs are held: see the README's decision rule.)"""
    keep = () if keep is None or not np.any(keep) else tuple(map(float, keep))
    return _fixed_table(keep)[np.asarray(frames) % FIXED_FRAMES]


_CLASS_HEADS = list(HEADS)[1:]
_CLASS_SIZES = np.array([HEADS[h] for h in _CLASS_HEADS])


def sample_actions(logits: dict[str, np.ndarray], u: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Actions [B, UNIFORMS] int64 (8 buttons 0/1, then the class of each other head in HEADS
    order) from head logits [B, k] and uniform numbers u [B, UNIFORMS]: button i is pressed when
    u_i < sigmoid(b_i / T), a class head picks the class where its cumulative softmax(x / T) passes
    its number. Independent uniform u gives a sample of the model's distribution."""
    out = np.empty((len(u), UNIFORMS), np.int64)
    out[:, :8] = u[:, :8] * (1 + np.exp(-logits["buttons"].astype(np.float64) / temperature)) < 1
    x = np.full((len(u), len(_CLASS_HEADS), STICK_CLASSES), -np.inf)  # the heads side by side, padded
    for i, h in enumerate(_CLASS_HEADS):
        x[:, i, :HEADS[h]] = logits[h]
    cdf = np.cumsum(np.exp((x - x.max(-1, keepdims=True)) / temperature), -1)
    out[:, 8:] = np.minimum((cdf < u[:, 8:, None] * cdf[:, :, -1:]).sum(-1), _CLASS_SIZES - 1)
    return out


def action_dict(codes: np.ndarray) -> dict:
    """One action's codes [UNIFORMS] -> an action dict (as `encode_controller` returns)."""
    return {"buttons": codes[:8].astype(np.uint8), **{h: int(c) for h, c in zip(_CLASS_HEADS, codes[8:])}}


def action_codes(action: dict) -> np.ndarray:
    """An action dict -> its codes [UNIFORMS] (see `sample_actions`)."""
    return np.array([*action["buttons"], *(action[h] for h in _CLASS_HEADS)], np.int64)


class DecisionRule:
    """How a game's actions are picked from head logits, frame after frame, for `views` player
    views at once: `sample_actions` at `temperature`, driven by numbers that are random (`rng`)
    or, deterministic, the fixed table (`fixed_uniforms`: the same game state gives the same
    actions), each kept from the frame before with probability `keep` ([UNIFORMS], `hold_vector`;
    None: never)."""

    def __init__(self, keep: np.ndarray | None = None, deterministic: bool = False,
                 rng: np.random.Generator | None = None, temperature: float = 1.0, views: int = 1):
        self.keep = np.zeros(UNIFORMS) if keep is None else np.asarray(keep, np.float64)
        self.deterministic, self.temperature, self.views = deterministic, temperature, views
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset()

    def reset(self) -> None:
        """A new game: the deterministic rule starts its table again."""
        self.frame, self.u = 0, None

    def numbers(self) -> np.ndarray:
        """The next frame's numbers [views, UNIFORMS]. A step graph that samples (autoregressive
        heads) takes them as its `noise`: its `action` is this rule's decision."""
        if self.deterministic:
            self.u = fixed_uniforms(np.full(self.views, self.frame), self.keep)
        else:
            self.u = self.rng.random((self.views, UNIFORMS)) if self.u is None else next_uniforms(self.u, self.keep, self.rng)
        self.frame += 1
        return self.u

    def __call__(self, logits: dict[str, np.ndarray]) -> np.ndarray:
        """Actions [views, UNIFORMS] (see `sample_actions`) from logits [views, k] per head, with
        the next frame's numbers."""
        return sample_actions(logits, self.numbers(), self.temperature)


# =================================================================================================
# Agent: libmelee GameState -> action -> libmelee Controller
# =================================================================================================

PRECISIONS = {"fp32": "step.onnx", "int8": "step.int8.onnx", "int4": "step.int4.onnx", "fp16": "step.fp16.onnx"}
QUANTIZE_MODES = {"dynamic": "int8", "static": "int8", "int4": "int4", "fp16": "fp16"}  # -> precision


def graph_digest(path: Path) -> str:
    """The content hash of a graph file, recorded in run.json when the run writes it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]


def checked_step_graph(run: Path, path: Path, info: dict) -> bytes:
    """A run's step graph, read once and checked before onnxruntime sees it: the file the run
    recorded (hash in run.json), a valid ONNX model with all its weights inside, and the
    interface of the run's spec (inputs, head widths, state names and shapes). One clear error
    otherwise; graph files are untrusted input."""
    import onnx

    data = path.read_bytes()
    recorded = info.get("graphs", {}).get(path.name)
    if recorded and hashlib.sha256(data).hexdigest()[:24] != recorded:
        raise ExphilError(f"{path}: not the graph this run wrote (its hash differs from run.json's); "
                          "re-export it by training or quantizing again")
    try:
        proto = onnx.load_from_string(data)
    except Exception as e:
        raise ExphilError(f"{path}: not a valid ONNX model ({type(e).__name__})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExphilError(f"{path}: refers to external weight files; exphil graphs keep their weights inside")
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim][1:]  # without the batch
    got = {v.name: dims(v) for v in [*proto.graph.input, *proto.graph.output]}
    if (run / "spec.toml").exists():  # the states of the run's spec
        spec = load_spec(run / "spec.toml")
        states, what = spec_states(spec), f"the run's spec {spec.name!r}"
        scalars = [n for n, used in (("rtg", spec.returns.input), ("value", spec.returns.value)) if used]
        samples = spec.heads.sampling == "autoregressive"
    else:  # at least a consistent interface
        states, what = [(k[len("state_in."):], v) for k, v in got.items() if k.startswith("state_in.")], "a step graph"
        scalars, samples = [n for n in ("rtg", "value") if n in got], "noise" in got
    want = {"cat": [len(CAT_FIELDS)], "num": [len(NUM_FIELDS)], **{h: [k] for h, k in HEADS.items()},
            **{f"state_{io}.{n}": list(shape) for n, shape in states for io in ("in", "out")}, **{n: [] for n in scalars},
            **({"noise": [UNIFORMS], "temperature": [], "action": [UNIFORMS]} if samples else {})}
    if got != want:
        wrong = sorted(f"{k} {got.get(k, 'missing')} (expected {want.get(k, 'none')})"
                       for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ExphilError(f"{path}: its inputs and outputs do not match {what}: " + ", ".join(wrong[:4])
                          + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""))
    return data


def step_path(run: str | os.PathLike, precision: str = "fp32") -> Path:
    """A run folder's step graph at a precision ("fp32", "int8" or "fp16")."""
    run = Path(run)
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    path = run / PRECISIONS[precision]
    if not path.exists():
        have = [p for p, f in PRECISIONS.items() if (run / f).exists()]
        hint = {"fp32": "", "int8": f"; write it with `exphil quantize {run}`",
                "fp16": f"; write it with `exphil quantize {run} --fp16`"}[precision]
        raise ExphilError(f"{run}: no {precision} step graph ({path.name}){hint}; "
                          f"this folder has: {', '.join(have) or 'none (not a run folder)'}")
    return path


def _all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in arrays.values())


class Agent:
    """A trained run playing through libmelee.

    >>> agent = Agent("runs/lstm", precision="int8")
    >>> action = agent.act(gamestate, port=1)
    >>> agent.press(controller, action)

    A return-conditioned run (`returns.input` in its spec) aims for `target_return` from the
    start of each game (default: the median return of its training games), lowered after every
    frame by the reward observed (`frame_rewards`).

    Actions come from the `DecisionRule` at `temperature` (random numbers from `seed`, or the
    fixed table when `deterministic`), each number held from frame to frame as the run's `hold`
    says (`exphil hold`; `hold` = {"buttons": p, "sticks": p} overrides it)."""

    def __init__(self, run: str | os.PathLike, provider: str = "auto", temperature: float = 1.0,
                 deterministic: bool = False, seed: int | None = None, threads: int = 1,
                 precision: str = "fp32", target_return: float | None = None, hold: dict | None = None):
        run = Path(run)
        path = step_path(run, precision)
        self.info = read_run_info(run)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise UsageError(f"temperature must be a finite number >= 0 (0: deterministic), not {temperature}")
        self.step = Stepper(checked_step_graph(run, path, self.info), provider, threads)
        self.precision = precision
        # temperature 0 is deterministic play at the model's own distribution (temperature 1)
        self.temperature, self.deterministic = temperature or 1.0, deterministic or temperature == 0
        self.rng = np.random.default_rng(seed)
        keep = hold_vector(self.info.get("hold") if hold is None else hold)
        self.rule = DecisionRule(keep, self.deterministic, self.rng, self.temperature)
        self.frame_delay = int(self.info.get("frame_delay", 0))
        self._last_frame: int | None = None
        self._warned = False
        self._finite = None  # the last logits `logits` returned, when they were all finite
        self.returns, self.target_return = None, None
        if self.step.rtg is not None:  # a return-conditioned policy
            self.returns = load_spec(run / "spec.toml").returns
            recorded = self.info.get("returns", {}).get("start", {}).get("p50")
            if target_return is None and recorded is None:
                raise UsageError(f"{run}: run.json records no returns of training games; give a target return")
            self.target_return = float(recorded if target_return is None else target_return)
            if not math.isfinite(self.target_return):
                raise UsageError(f"the target return must be a finite number, not {target_return}")
        elif target_return is not None:
            raise UsageError(f"{run}: its spec {self.info.get('spec', '')!r} is not return-conditioned "
                             "(no `returns.input`); it takes no target return")
        self.reset()

    def reset(self) -> None:
        """Forget the game so far (called automatically when a new game starts)."""
        self.step.reset()
        self._last_frame = None
        self.rtg, self._num = self.target_return, None  # the return still to earn; the last frame's features
        self.rule.reset()

    def logits(self, gamestate, port: int, opponent_port: int | None = None) -> dict[str, np.ndarray]:
        """One frame's head logits. Logits that are not finite (a NaN in the game state) leave
        the carried state at zero, so the next frames recover by themselves (logged once)."""
        if port not in gamestate.players:
            raise ExphilError(f"port {port} is not in the game (ports present: {sorted(map(int, gamestate.players))})")
        if opponent_port is None:
            others = [p for p in gamestate.players if p != port]
            if not others:
                raise ExphilError(f"no opponent in the game state (players: {sorted(gamestate.players)})")
            opponent_port = others[0]
        if self._last_frame is not None and gamestate.frame <= self._last_frame:
            self.reset()  # the frame counter went back: a new game
        self._last_frame = gamestate.frame
        cat, num = features_from_gamestate(gamestate, port, opponent_port)
        if self.returns is not None:  # the target return, less what the frames so far earned
            if self._num is not None:
                reward = frame_rewards(np.stack([self._num, num]), self.returns)[0]
                self.rtg = (self.rtg - reward) / self.returns.discount
            self._num = num.copy()
        noise = self.rule.numbers()[0] if self.step.samples else None  # (the graph samples the action)
        logits = self.step(cat, num, self.rtg if self.returns else 0.0, noise, self.temperature)
        self._finite = logits if _all_finite(logits) else None
        if self._finite is None:
            self.step.reset()
            if not self._warned:
                logger.warning("the model returned non-finite logits at frame %s (a NaN in "
                                                    "the game state?); its state was reset", gamestate.frame)
                self._warned = True
        return logits

    def sample(self, logits: dict[str, np.ndarray]) -> dict:
        """An action from one frame's logits, at the agent's temperature (autoregressive heads:
        the action the step graph sampled with them). Logits that are NaN or infinite are an
        error: no action is ever made from them (those `logits` just returned were checked there)."""
        if logits is not self._finite and not _all_finite(logits):
            raise ExphilError("the model returned NaN or infinite logits")
        if "action" in logits:
            return action_dict(logits["action"])
        return action_dict(self.rule({h: v[None] for h, v in logits.items()})[0])

    def act(self, gamestate, port: int, opponent_port: int | None = None) -> dict:
        """The action for this frame (a dict like `encode_controller` returns)."""
        return self.sample(self.logits(gamestate, port, opponent_port))

    def press(self, controller, action: dict) -> None:
        """Send an action to a libmelee Controller (its commands are flushed by the console)."""
        press_action(controller, action)


# =================================================================================================
# Precision: INT8 and FP16 step graphs
# =================================================================================================
# `quantize_step` rewrites a step graph with onnxruntime's quantization tools; `quantize_run`
# writes it into a run folder only after checking, frame by frame on real replays, that it picks
# the same actions as the FP32 graph. Each graph carries its own recurrent state, as in play.
#
# * dynamic INT8: weights of every MatMul stored as int8, activations quantised per call
#   (MatMulInteger). No calibration. The fastest on CPU here.
# * static INT8: QDQ format, activation ranges calibrated on real frames together with the state
#   the FP32 graph carries into each frame.
# * FP16: weights and arithmetic in float16, inputs and outputs (state included) kept float32.
#   Meant for GPUs; onnxruntime's CPU provider runs it, slowly, through casts.

def replay_frames(episodes: Sequence, max_frames: int, returns: Returns | None = None):
    """(t, cat, num, rtg, counted) for every frame of the episodes in order, t counting from
    each episode's start, rtg its return-to-go under `returns` (0 without); `counted` marks up
    to `max_frames` of them, spread evenly over the whole of every game (after its countdown),
    where a measurement is taken. Every frame is yielded because a recurrent graph must step
    through all of them."""
    per = max(1, max_frames // max(1, len(episodes)))
    for ep in episodes:
        start = min(123, ep.frames - 1)  # frame ids start at -123: the countdown before "GO"
        every = max(1, -(-(ep.frames - start) // per))  # ceil: at most `per` marks per game
        rtg = ep.rtg(returns) if returns else np.zeros(ep.frames, np.float32)
        for t in range(ep.frames):
            yield t, ep.cat[t].astype(np.int64), ep.num[t], float(rtg[t]), t >= start and (t - start) % every == 0


def calibration_feeds(model: str | os.PathLike | bytes, episodes: Sequence, count: int,
                      returns: Returns | None = None):
    """About `count` step-graph inputs for static calibration, spread over whole games, each
    with the state that the FP32 graph carries into it from stepping through every frame
    before it (and the frame's return-to-go under `returns` for a graph that reads one; the
    deterministic rule's numbers for a graph that samples)."""
    stepper = Stepper(model, "cpu")
    for t, cat, num, rtg, counted in replay_frames(episodes, count, returns):
        if t == 0:
            stepper.reset()
        u = fixed_uniforms(t)
        if counted:
            sampling = {"noise": u[None].astype(np.float32), "temperature": np.array(1.0, np.float32)}
            yield {"cat": cat[None], "num": num[None], **({"rtg": np.array([rtg], np.float32)} if returns else {}),
                   **(sampling if stepper.samples else {}), **{f"state_in.{n}": v.copy() for n, v in stepper.state.items()}}
        stepper(cat, num, rtg, u)


class _Feeds:
    """onnxruntime's CalibrationDataReader protocol (get_next, None at the end) over an iterable."""

    def __init__(self, feeds):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


@contextlib.contextmanager
def _no_warnings():
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The step graph declares LayerNormalization's Mean/InvStdDev outputs (training needs them);
    # the converter would retype them to float16, which the operator forbids. Play never reads them.
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            while len(node.output) > 1 and node.output[-1] not in used:
                node.output.pop()
    return convert_float_to_float16(model, keep_io_types=True)


INT4_BLOCK = 32  # weights per scale and zero point, along K (MatMulNBits' block_size)
INT4_ACCURACY = 4  # MatMulNBits' accuracy_level: 4 quantizes the activations to int8 (the fast CPU path)


def _int4_blocks(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A weight [K, N] in MatMulNBits' 4-bit layout: per output column, blocks of `block` rows
    (zero-padded) with their own scale and zero point (asymmetric, 0..15, 0 exact); two values
    per byte, the first in the low nibble. Returns (packed [N, blocks, block / 2] uint8, scales
    [N * blocks] float32, zero points [N * ceil(blocks / 2)] uint8)."""
    K, N = w.shape
    blocks = -(-K // block)
    x = np.zeros((blocks * block, N), np.float32)
    x[:K] = w
    x = x.T.reshape(N, blocks, block)
    low, high = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    scale = np.where(high > low, (high - low) / 15, 1).astype(np.float32)
    zero = np.clip(np.round(-low / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    zeros = np.zeros((N, blocks + blocks % 2), np.uint8)
    zeros[:, :blocks] = zero
    return q[..., 0::2] | (q[..., 1::2] << 4), scale.ravel(), (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).ravel()


def _int4(model):
    """The graph with every MatMul by a constant 2-D weight replaced by onnxruntime's 4-bit
    weight-only MatMulNBits (`_int4_blocks`); the rest stays float32."""
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    packed, nodes = {}, []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        names = [f"{w.name}.int4", f"{w.name}.scales", f"{w.name}.zero_points"]
        if w.name not in packed:
            packed[w.name] = [numpy_helper.from_array(a, n) for a, n in
                              zip(_int4_blocks(numpy_helper.to_array(w)), names)]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], node.output, name=node.name,
                                      domain="com.microsoft", K=w.dims[0], N=w.dims[1], bits=4,
                                      block_size=INT4_BLOCK, accuracy_level=INT4_ACCURACY))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used] + [t for ts in packed.values() for t in ts]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def quantize_step(model, mode: str = "dynamic", calibration=None):
    """A step graph (path or onnx.ModelProto) at lower precision, as an onnx.ModelProto.

    mode: "dynamic" (INT8 weights), "static" (INT8 QDQ; `calibration` = iterable of input feeds,
    see `calibration_feeds`), "int4" (4-bit weights, `_int4`) or "fp16". Inputs and outputs stay
    float32, so a Stepper runs any."""
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    if mode not in QUANTIZE_MODES:
        raise UsageError(f"quantization mode {mode!r}: choose {', '.join(QUANTIZE_MODES)}")
    if mode == "static" and calibration is None:
        raise UsageError("static quantization needs calibration frames")
    model = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else onnx.ModelProto.FromString(
        model.SerializeToString())  # a copy: the conversions below edit the proto they are given
    if mode == "fp16":
        out = _fp16(model)
    elif mode == "int4":
        out = _int4(model)
    else:
        # INT8 for the MatMuls with a weight operand, where the time goes: quantising the other
        # ops too (or the activation x activation MatMuls) costs agreement and gains nothing.
        weights = {t.name for t in model.graph.initializer}
        matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        with tempfile.TemporaryDirectory() as tmp, _no_warnings():  # warnings: "consider pre-processing"
            src, dst = Path(tmp) / "step.onnx", Path(tmp) / "step.int8.onnx"
            if mode == "dynamic":
                onnx.save(model, src)
                quantize_dynamic(src, dst, nodes_to_quantize=matmuls)
            else:
                # onnxruntime 1.19 fuses QDQ MatMuls into QLinearMatMul nodes at the graph's opset,
                # and has no CPU kernel for QLinearMatMul-21: write the source graph at opset 20.
                onnx.save(onnx.version_converter.convert_version(model, 20), src)
                # ranges are folded in batches so memory stays flat however many frames are given
                quantize_static(src, dst, _Feeds(calibration), quant_format=QuantFormat.QDQ,
                                nodes_to_quantize=matmuls, extra_options={"CalibMaxIntermediateOutputs": 256})
            out = onnx.load(str(dst))
    out.ir_version = min(out.ir_version, IR_VERSION)
    opset = max(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    if opset > OPSET:
        raise ExphilError(f"the {mode} graph needs opset {opset}; onnxruntime here reads up to {OPSET}")
    return out


def agreement(reference: Stepper, other: Stepper, frames) -> tuple[dict[str, float], np.ndarray, int]:
    """Per-head agreement of the deterministic decisions (`DecisionRule`'s numbers at frame t of a
    game using `fixed_uniforms(t)`, from which graphs that sample draw their actions) of two step
    graphs run side by side over frames in order (each carrying its own state) on the frames
    marked counted, their per-call times in seconds [frames, 2], and how many frames were
    counted. Buttons are compared one by one."""
    same = {h: [] for h in HEADS}
    times = []
    for t, cat, num, rtg, counted in frames:
        if t == 0:
            reference.reset()
            other.reset()
        u = fixed_uniforms(t)  # (a graph that samples draws its action from them)
        t0 = time.perf_counter()
        a = reference(cat, num, rtg, u)
        t1 = time.perf_counter()
        b = other(cat, num, rtg, u)
        times.append((t1 - t0, time.perf_counter() - t1))
        if counted:
            x, y = (o["action"] if "action" in o else sample_actions({h: o[h][None] for h in HEADS}, u[None])[0]
                    for o in (a, b))
            same["buttons"].append(x[:8] == y[:8])
            for h, i in zip(_CLASS_HEADS, range(8, UNIFORMS)):
                same[h].append([x[i] == y[i]])
    return {h: float(np.mean(np.concatenate(v))) for h, v in same.items()}, np.array(times), len(same["c_x"])


def quantize_run(run: str | os.PathLike, mode: str = "dynamic", calibration_replays=None,
                 min_agreement: float = 0.98, replays=None, max_frames: int = 20000,
                 calibration_frames: int = 2000, provider: str = "auto", quiet: bool = False) -> dict:
    """Write step.int8.onnx (mode "dynamic" or "static") or step.fp16.onnx into a run folder.

    The graph is written only if, on validation frames (`replays`, default: the validation
    replays listed in run.json; at most `max_frames`), every head agrees with FP32 on at least
    `min_agreement` of them. Static calibration uses `calibration_replays` (default: the run's
    training replays). Returns the report: agreement per head and p50/p99 step latency of both."""
    log = _log(quiet)
    run = Path(run)
    reference = step_path(run, "fp32")
    info = read_run_info(run)
    returns = load_spec(run / "spec.toml").returns if (run / "spec.toml").exists() else None
    returns = returns if returns and returns.input else None  # what the step graph reads

    def episodes(given, listed: str):
        games = load_games(given, log=log)[0] if given is not None else recorded_games(info, listed, log)
        if given is None and not info.get("replays", {}).get(listed):
            raise ExphilError(f"{run}: run.json lists no {listed} replays; pass some replays")
        if not games:
            raise ExphilError(f"{run}: none of the {listed} replays could be read")
        return [ep for g in games for ep in g]

    val = episodes(replays, "val")
    calibration = None
    if mode == "static":
        log(f"calibrating on {calibration_frames} frames of the training replays")
        calibration = calibration_feeds(reference, episodes(calibration_replays, "train"), calibration_frames, returns)
    proto = quantize_step(reference, mode, calibration)
    precision = QUANTIZE_MODES[mode]
    fp32, low = Stepper(reference, provider), Stepper(proto.SerializeToString(), provider)
    log(f"comparing {precision} with fp32 on up to {max_frames} validation frames")
    heads, times, counted = agreement(fp32, low, replay_frames(val, max_frames, returns))
    ms = times * 1e3
    report = {"mode": mode, "precision": precision, "frames": counted, "agreement": heads,
              "min_agreement": min_agreement,
              "latency_ms": {name: {"p50": float(np.median(ms[:, i])), "p99": float(np.percentile(ms[:, i], 99))}
                             for i, name in enumerate(("fp32", precision))},
              "providers": low.session.get_providers()}
    if mode == "fp16" and report["providers"] == ["CPUExecutionProvider"]:
        report["note"] = "no GPU here: FP16 ran on the CPU provider (through casts, slower than FP32)"
    worst = min(heads, key=heads.get)
    if heads[worst] < min_agreement:
        raise ExphilError(f"{mode} graph not written: head {worst!r} agrees with FP32 on "
                          f"{heads[worst]:.2%} of {counted} frames (< {min_agreement:.2%})")
    import onnx

    proto.metadata_props.add(key="exphil.quantize", value=json.dumps(report))
    path = run / PRECISIONS[precision]
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    if info:
        info.setdefault("graphs", {})[path.name] = graph_digest(path)
        _write_json(run / "run.json", info)
    report["path"] = str(path)
    return report


# =================================================================================================
# Play: the sync and async runners, over a libmelee Console and Controller
# =================================================================================================
# A runner takes one GameState per console.step() and sends one batch of controller commands per
# frame. In game it plays the Agent; in menus it hands the frame to `menus` (see Menus). Dolphin's
# console flushes its connected controllers inside step(); with any other source of game states
# (libmelee's Console streaming a replay) the runner flushes the controller itself.
#
# Between the model and the controller:
#   action repeat N  a new action every N frames, held in between;
#   frame delay D    the action chosen at frame t is sent at frame t + D, through a queue that
#                    starts with D neutral actions. D = the run's trained delay + the extra asked.

NEUTRAL = {"buttons": np.zeros(len(BUTTONS), np.uint8), "main_x": 8, "main_y": 8, "c_x": 8, "c_y": 8,
           "shoulder": 0}
FPS = 60


def confidence(logits: dict[str, np.ndarray], action: dict) -> float:
    """The probability the model gave to the main-stick class it chose, x and y averaged (the
    stats line's `Conf`)."""
    p = [np.exp(logits[h] - logits[h].max()) for h in ("main_x", "main_y")]
    return float((p[0][action["main_x"]] / p[0].sum() + p[1][action["main_y"]] / p[1].sum()) / 2)


class Stats:
    """A run's counters, and its stats line:

        [Stats] 30.1s | 58.5/60 fps | Inferences: 1802 | Conf: 0.72 | p99 0.41 ms

    fps, Conf and p99 (one inference: features -> step -> sample) cover the time since the last
    line; Inferences counts from the start. The summary's percentiles cover the last hour."""

    KEEP = 60 * 60 * FPS  # samples kept for the summary: memory stays flat however long the run

    def __init__(self):
        self.start = self._mark = time.perf_counter()
        self.frames = self.games = self.errors = self.inferences = 0
        self.inference_s = collections.deque(maxlen=self.KEEP)
        self.frame_s = collections.deque(maxlen=self.KEEP)
        self._times, self._confs, self._seen_frames = [], [], 0

    def inference(self, seconds: float, conf: float) -> None:
        self.inferences += 1
        self.inference_s.append(seconds)
        self._times.append(seconds)
        self._confs.append(conf)

    def line(self) -> str:
        now = time.perf_counter()
        fps = (self.frames - self._seen_frames) / max(now - self._mark, 1e-9)
        conf = f"{np.mean(self._confs):.2f}" if self._confs else "-"
        p99 = f"{np.percentile(self._times, 99) * 1e3:.2f}" if self._times else "-"
        self._mark, self._seen_frames, self._times, self._confs = now, self.frames, [], []
        return (f"[Stats] {now - self.start:.1f}s | {fps:.1f}/{FPS} fps | Inferences: {self.inferences} | "
                f"Conf: {conf} | p99 {p99} ms" + (f" | Errors: {self.errors}" if self.errors else ""))

    def summary(self) -> dict:
        seconds = time.perf_counter() - self.start
        ms = lambda v, q: float(np.percentile(v, q) * 1e3) if v else None
        return {"seconds": seconds, "frames": self.frames, "fps": self.frames / seconds, "games": self.games,
                "inferences": self.inferences, "errors": self.errors,
                "inference_ms": {"p50": ms(self.inference_s, 50), "p99": ms(self.inference_s, 99)},
                "frame_ms": {"p50": ms(self.frame_s, 50), "p99": ms(self.frame_s, 99)}}


class Runner:
    """Plays an Agent through a libmelee Console and Controller, inference in the game loop: each
    frame, console.step() -> features -> step -> sample -> controller -> flush.

    `frame_ms` in the summary is that per-frame work, from the game state to the flushed commands."""

    def __init__(self, agent, console, controller, port: int, opponent_port: int | None = None, *,
                 action_repeat: int = 1, frame_delay: int = 0, menus: Menus | None = None,
                 on_game_end: str = "stop", stats_every: float = 10.0, log: Callable[[str], None] | None = None):
        self.delay = agent.frame_delay + frame_delay
        if action_repeat < 1:
            raise UsageError(f"action repeat {action_repeat}: must be 1 or more")
        if self.delay < 0:
            raise ExphilError(f"frame delay {frame_delay} plus the run's trained delay {agent.frame_delay} "
                              "is negative")
        if on_game_end not in ("stop", "restart"):
            raise UsageError(f"on game end {on_game_end!r}: choose stop or restart")
        self.agent, self.console, self.controller = agent, console, controller
        self.port, self.opponent_port, self.menus = port, opponent_port, menus
        self.action_repeat, self.on_game_end, self.stats_every = action_repeat, on_game_end, stats_every
        self.log = log or logger.info
        self.flush = controller not in getattr(console, "controllers", ())

    def run(self) -> dict:
        """Play until the console sends no more frames, the game ends (on_game_end="stop"),
        Dolphin or the controller pipe goes away, or Ctrl-C. Every button is released on the way
        out. Returns Stats.summary()."""
        from melee import Menu
        from melee.slippstream import EnetDisconnected

        self.stats = Stats()
        in_game, reason, next_line = False, "the console sent no more frames", self.stats.start + self.stats_every
        try:
            while (gs := self.console.step()) is not None:
                t0 = time.perf_counter()
                self.stats.frames += 1
                if gs.menu_state in (Menu.IN_GAME, Menu.SUDDEN_DEATH):
                    if not in_game:
                        in_game = True
                        self._new_game(gs)
                    self._play(gs)
                else:
                    if in_game:
                        in_game = False
                        self._game_over()
                        if self.on_game_end == "stop":
                            reason = "game over"
                            break
                    if self.menus is not None:
                        self.menus(gs)
                if self.flush:
                    self.controller.flush()
                now = time.perf_counter()
                self.stats.frame_s.append(now - t0)
                if self.stats_every and now >= next_line:
                    self.log(self.stats.line())
                    next_line = now + self.stats_every
        except KeyboardInterrupt:
            reason = "interrupted (Ctrl-C)"
        except (ConnectionError, EOFError, EnetDisconnected) as e:  # BrokenPipeError is a ConnectionError
            reason = f"Dolphin closed or the controller pipe broke ({type(e).__name__})"
        finally:
            if in_game:
                self._game_over()
            self._release()
        self.log(f"stopped: {reason}")
        return self.stats.summary()

    # ---- per game and per frame ------------------------------------------------------------------

    def _new_game(self, gs) -> None:
        self.stats.games += 1
        self._me = int(self.menus.port(gs, self.port)) if self.menus is not None else self.port
        if self.menus is not None and self.menus.chose:
            self.log(f"our port: {self.menus.chose}")
        self._stocks = {int(p): int(ps.stock) for p, ps in gs.players.items()}
        self._held, self._queue = NEUTRAL, collections.deque([NEUTRAL] * self.delay)
        self._wait, self._game_frames = 0, 0
        names = ", ".join(f"{self._who(p)} {ps.character.name.lower()}" for p, ps in sorted(gs.players.items()))
        self.log(f"game {self.stats.games}: {names} on {gs.stage.name.lower()}")

    def _play(self, gs) -> None:
        self._game_frames += 1
        for p, ps in gs.players.items():
            p, stock = int(p), int(ps.stock)
            if stock < self._stocks.get(p, stock):
                self.log(f"{self._who(p)} lost a stock: {stock} left")
            self._stocks[p] = stock
        try:
            action = self.decide(gs)
        except Exception as e:  # the model failed: never leave a button held
            self._failed(e)
            return
        if action is not None:
            self._held = action
        self._queue.append(self._held)
        press_action(self.controller, self._queue.popleft())

    def decide(self, gs) -> dict | None:
        """This frame's new action, or None to hold the last one."""
        self._wait -= 1
        if self._wait > 0:
            return None
        self._wait = self.action_repeat
        return self._infer(gs)

    def _infer(self, gs) -> dict:
        t0 = time.perf_counter()
        try:
            logits = self.agent.logits(gs, self._me, self.opponent_port)
            action = self.agent.sample(logits)
        except Exception:
            self.agent.reset()  # a failed step may have left NaN in the carried state
            raise
        self.stats.inference(time.perf_counter() - t0, confidence(logits, action))
        return action

    def _failed(self, e: Exception) -> None:
        self.stats.errors += 1
        if self.stats.errors == 1:
            self.log(f"inference failed ({type(e).__name__}: {e}); all buttons released, playing on "
                     "(further failures are counted in the stats line)")
        self.controller.release_all()
        self._held, self._queue = NEUTRAL, collections.deque([NEUTRAL] * self.delay)

    def _game_over(self) -> None:
        me = self._stocks.get(self._me)
        others = [s for p, s in self._stocks.items() if p != self._me]
        result = "lost" if me == 0 else "won" if others and max(others) == 0 else "no result"
        stocks = ", ".join(f"{self._who(p)} {s}" for p, s in sorted(self._stocks.items()))
        self.log(f"game {self.stats.games} over after {self._game_frames / FPS:.1f}s: {result} (stocks: {stocks})")

    def _who(self, port: int) -> str:
        return f"bot (port {port})" if port == self._me else f"port {port}"

    def _release(self) -> None:
        try:
            self.controller.release_all()
            self.controller.flush()
        except (OSError, ValueError, RuntimeError):  # the pipe is already gone
            pass


class AsyncRunner(Runner):
    """A Runner whose inference runs in its own thread: the game loop never waits for the model.
    Each frame it sends the newest action the model has finished, repeating the last one while
    inference runs, and hands the current game state to the worker when it is free (and
    action_repeat frames have passed). A recurrent model sees only the frames it was given."""

    def run(self) -> dict:
        self._requests, self._results = queue.SimpleQueue(), queue.SimpleQueue()
        self._busy = False
        worker = threading.Thread(target=self._work, name="exphil-inference", daemon=True)
        worker.start()
        try:
            return super().run()
        finally:
            self._requests.put(None)
            worker.join(1.0)

    def _work(self) -> None:
        while (request := self._requests.get()) is not None:
            game, gs = request
            try:
                out = self._infer(gs)
            except Exception as e:
                out = e
            self._results.put((game, out))
            self._busy = False

    def decide(self, gs) -> dict | None:
        """The newest action the worker finished, if any; hands it this frame when it is free."""
        self._wait -= 1
        if self._wait <= 0 and not self._busy:
            self._wait, self._busy = self.action_repeat, True
            self._requests.put((self.stats.games, gs))
        try:
            game, out = self._results.get_nowait()
        except queue.Empty:
            return None
        if game != self.stats.games:  # finished after its game ended
            return None
        if isinstance(out, Exception):
            raise out
        return out


class ReplayGame:
    """A Slippi replay standing in for Dolphin: libmelee's Console streams it, one GameState per
    step(), paced at `fps` like the game (None: as fast as it reads), for at most `frames`."""

    controllers = ()  # nothing here flushes a controller: the runner does

    def __init__(self, path: str | os.PathLike, fps: float | None = FPS, frames: int | None = None):
        import melee

        self.console = melee.Console(path=str(path), is_dolphin=False, allow_old_version=True)
        self.console.connect()
        self.fps, self.frames, self.count, self._start = fps, frames, 0, None

    def step(self):
        if self.frames is not None and self.count >= self.frames:
            return None
        if self.fps:
            self._start = self._start or time.perf_counter()
            time.sleep(max(0.0, self._start + self.count / self.fps - time.perf_counter()))
        self.count += 1
        return self.console.step()


class Menus:
    """Walks libmelee's menus into a game with its MenuHelper: the bot's controller picks the
    character and stage (or enters the connect code); against a CPU, the CPU's controller picks
    its character and level, and the bot starts the game."""

    def __init__(self, controller, character: str, stage: str, connect_code: str | None = None,
                 cpu=None, cpu_level: int = 0, costume: int = 0, own_code: str | None = None):
        import melee

        self.controller, self.cpu, self.cpu_level, self.costume = controller, cpu, cpu_level, costume
        self.character = melee.Character(_enum_id(melee.Character, character, "character"))
        self.stage = melee.Stage(_enum_id(melee.Stage, stage, "stage"))
        self.connect_code, self.own_code = connect_code, own_code
        self._bot, self._cpu = melee.MenuHelper(), melee.MenuHelper()
        self.chose = ""  # why the last game's port was chosen

    def __call__(self, gamestate) -> None:
        self._bot.menu_helper_simple(gamestate, self.controller, self.character, self.stage, self.connect_code,
                                     costume=self.costume, autostart=self.cpu is not None)
        if self.cpu is not None:
            self._cpu.menu_helper_simple(gamestate, self.cpu, self.character, self.stage, cpu_level=self.cpu_level)

    def port(self, gamestate, default: int) -> int:
        """The bot's port in this game: Slippi online assigns one (see own_port); `chose` says how."""
        if not self.connect_code:
            return default
        port, self.chose = own_port(gamestate, self.own_code, self.connect_code, self.character, self.costume)
        if port is None:
            self.chose += f": playing port {default}"
        return default if port is None else port


def own_port(gamestate, own_code: str | None, opponent_code: str | None, character, costume: int) -> tuple[int | None, str]:
    """The local player's port in a netplay game, and one line saying how it was found: the port
    with our connect code; else the one without the opponent's code; else the only player with our
    character and costume (display names are not used: two players may share one)."""
    same = lambda a, b: bool(a) and bool(b) and a.replace("\uff03", "#").upper() == b.replace("\uff03", "#").upper()
    players = {int(p): ps for p, ps in gamestate.players.items()}
    mine = [p for p, ps in players.items() if same(ps.connectCode, own_code)]
    if len(mine) == 1:
        return mine[0], f"port {mine[0]}: our connect code {own_code}"
    theirs = [p for p, ps in players.items() if same(ps.connectCode, opponent_code)]
    if len(theirs) == 1 and len(players) == 2:
        port = next(p for p in players if p != theirs[0])
        return port, f"port {port}: the opponent {opponent_code} is on port {theirs[0]}"
    looks = [p for p, ps in players.items() if ps.character == character and int(ps.costume) == costume]
    if len(looks) == 1:
        return looks[0], (f"port {looks[0]}: no port has our connect code ({own_code or 'unknown'}) or the opponent's; "
                          f"the only {character.name.lower()} in costume {costume}")
    return None, (f"no port has our connect code ({own_code or 'unknown'}) or the opponent's, and "
                  f"{len(looks)} players are {character.name.lower()} in costume {costume}")


def _user_code(console) -> str | None:
    """The connect code in the Slippi user.json that libmelee's console set up for Dolphin."""
    try:
        user = json.loads((Path(console._get_dolphin_home_path()) / "Slippi" / "user.json").read_text())
        return str(user["connectCode"]) or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def play(run: str | os.PathLike, dolphin: str | os.PathLike, iso: str | os.PathLike, port: int = 1,
         opponent_port: int = 2, character: str = "fox", stage: str = "final_destination",
         connect_code: str | None = None, cpu_level: int = 0, asynchronous: bool = False,
         provider: str = "auto", precision: str = "fp32", temperature: float = 1.0,
         deterministic: bool = False, target_return: float | None = None, own_code: str | None = None,
         **runner) -> dict:
    """Play a run in Slippi Dolphin: start it on the ISO, walk the menus, play (Runner or
    AsyncRunner, with `runner` settings) and close Dolphin at the end. Online (`connect_code`: the
    opponent's), the bot's port is found by `own_code` (default: the code in Slippi's user.json),
    see own_port."""
    import melee

    if connect_code and cpu_level:
        raise UsageError("--cpu-level and --connect-code exclude each other: a CPU or an online opponent")
    if not Path(iso).is_file():
        raise ExphilError(f"{iso}: no such ISO file")
    agent = Agent(run, provider=provider, precision=precision, temperature=temperature, deterministic=deterministic,
                  target_return=target_return)
    try:
        console = melee.Console(path=str(dolphin))
    except ValueError as e:  # libmelee's word for a wrong path
        raise ExphilError(f"{dolphin}: {e}; give the Slippi Dolphin executable or its folder") from None
    controller = melee.Controller(console, port)
    cpu = melee.Controller(console, opponent_port) if cpu_level and not connect_code else None
    menus = Menus(controller, character, stage, connect_code, cpu, cpu_level)
    console.run(iso_path=str(iso))
    try:
        if not console.connect():
            raise ExphilError(f"could not connect to Dolphin ({dolphin})")
        if connect_code and not console.has_user_json:
            raise ExphilError("a connect code needs Slippi's user.json: log in once with the Slippi Launcher")
        menus.own_code = own_code or _user_code(console)
        for c in (controller, cpu):
            if c is not None and not c.connect():
                raise ExphilError(f"could not open the controller pipe of port {c.port}")
        kind = AsyncRunner if asynchronous else Runner
        return kind(agent, console, controller, port, None if connect_code else opponent_port, menus=menus,
                    **runner).run()
    finally:
        console.stop()


# =================================================================================================
# Judging play: closed-controller rollouts, skill checks, field scores
# =================================================================================================
# Every number of `evaluate` is teacher-forced: frame t's controller columns come from the replay.
# In play they hold what the bot itself pressed. Melee cannot run here, so these measures come as
# close as a replay allows; all work on "inputs": int64 codes [T, UNIFORMS] per frame (8 buttons,
# then main_x, main_y, c_x, c_y, shoulder classes), the controller in effect at each frame.
#
# * `rollout` walks player views (batched) frame by frame through a step graph with the Agent's
#   decision rule: game state from the replay, and the controller columns either the replay's
#   (teacher-forced) or the bot's own earlier decisions, as `features_from_gamestate` would read
#   them in play (closed-controller). The decision at frame t is the input at t + 1 + delay.
# * `input_stats`: how a sequence of inputs moves (changes per second, holds, the joint
#   distribution of buttons and main-stick region), bot beside the player of the same view.
# * `SKILLS`: situations found from the player's action states, each with a window of frames
#   where a well-defined input is correct; scored on the player's inputs and on the bot's, and
#   (`situated_skills`) on the bot's own inputs from each situation on.
# * `field_labels`: single-label button classes and 37 two-dimensional main-stick clusters, as
#   HAL and MIMIC publish their figures; `judge` scores them with macro-F1 and top-1.

_NEUTRAL_CODES = action_codes(NEUTRAL)
_CTRL_COLUMNS = slice(_CTRL, _CTRL + 13)


def controller_features(codes: np.ndarray) -> np.ndarray:
    """The controller columns [B, 13] (num 36-48) that `features_from_gamestate` reads when the
    controller holds these actions (codes [B, UNIFORMS]): every class round-trips through
    libmelee's pipe and the game (test_actions), a stick class c reads back as c / 16."""
    raw = np.concatenate([codes[:, :8], codes[:, 8:12] / 16, codes[:, 12:] / 4], 1).astype(np.float32)
    return (raw - _OFFSET[_CTRL_COLUMNS]) * _SCALE[_CTRL_COLUMNS]


def episode_inputs(ep: Episode) -> np.ndarray:
    """The player's own inputs [T, UNIFORMS] of a view."""
    return np.concatenate([ep.labels["buttons"], np.stack([ep.labels[h] for h in _CLASS_HEADS], 1)],
                          1).astype(np.int64)


def _graph_step(graph: bytes, views: int):
    """step(cat [V, C], num [V, F], rtg [V], noise [V, UNIFORMS], temperature) -> head logits
    (and the `action` a graph that samples drew from `noise`) for a step graph, carrying the
    state of `views` player views at once."""
    sess = session(graph, "cpu")
    inputs = {i.name: i for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    state = {n: np.zeros([views, *inputs[n].shape[1:]], np.float32) for n in inputs if n.startswith("state_in.")}

    def step(cat, num, rtg, noise, temperature):
        given = {"cat": cat, "num": num, "rtg": rtg, "noise": noise.astype(np.float32),
                 "temperature": np.array(temperature, np.float32)}
        feeds = {**state, **{n: v for n, v in given.items() if n in inputs}}
        out = dict(zip(names, sess.run(None, feeds)))
        state.update({"state_in." + n[len("state_out."):]: v for n, v in out.items() if n.startswith("state_out.")})
        return out
    step.state = state  # (its carried state, by input name: `situated_skills` reads and sets it)
    return step


def _markov_step(tables: dict):
    """The Markov baseline as a step: each head's logits are the row of the run's "next input
    given current input" table (`markov_tables`) picked by the current controller columns."""
    tables = {h: np.asarray(v, np.float64) for h, v in tables.items()}

    def step(cat, num, rtg, noise, temperature):
        ctrl = num[:, _CTRL_COLUMNS] / _SCALE[_CTRL_COLUMNS] + _OFFSET[_CTRL_COLUMNS]
        p = tables["buttons"][(ctrl[:, :8] > 0.5).astype(np.int64), np.arange(8)]
        out = {"buttons": np.log(p) - np.log1p(-p)}
        for (h, k), v in zip(list(HEADS.items())[1:], ctrl[:, 8:].T):
            out[h] = np.log(tables[h][np.clip(np.rint(v * (k - 1)), 0, k - 1).astype(np.int64)])
        return out
    step.state = {}
    return step


def rollout(step, episodes: list[Episode], closed: bool = False, deterministic: bool = False,
            temperature: float = 1.0, delay: int = 0, seed: int = 0, returns: Returns | None = None,
            button_threshold: float = 0.5, keep: np.ndarray | None = None, own_from: int = 0,
            on_frame: Callable[[int], None] | None = None) -> list[dict[str, np.ndarray]]:
    """Walk the episodes (all at once, one frame per call of `step`: `_graph_step` or
    `_markov_step`) with the Agent's decision rule (`DecisionRule`, numbers kept from frame to
    frame with probability `keep`), and return per episode its decisions placed where they take effect:
    "inputs" [T, UNIFORMS] (the first 1 + delay frames neutral), and the head-wise guesses the
    field scores read: "buttons" [T, 8] (probability above `button_threshold`) and "main" [T]
    (the most likely of the 37 main-stick clusters). closed: the controller columns hold the
    bot's own inputs instead of the replay's (from frame `own_from` on). returns: feed each
    frame's return-to-go. on_frame(t) is called before each frame's step."""
    V, T = len(episodes), max(ep.frames for ep in episodes)
    cat, num = np.zeros((T, V, len(CAT_FIELDS)), np.int64), np.zeros((T, V, len(NUM_FIELDS)), np.float32)
    rtg = np.zeros((T, V), np.float32)
    for v, ep in enumerate(episodes):
        cat[:ep.frames, v], num[:ep.frames, v] = ep.cat, ep.num
        if returns is not None:
            rtg[:ep.frames, v] = ep.rtg(returns)
    rule, lag = DecisionRule(keep, deterministic, np.random.default_rng(seed), temperature, V), 1 + delay
    inputs = np.broadcast_to(_NEUTRAL_CODES, (T, V, UNIFORMS)).copy()
    pressed, main = np.zeros((T, V, 8), bool), np.zeros((T, V), np.int64)
    cut = _logit(button_threshold)
    for t in range(T):
        if on_frame is not None:
            on_frame(t)
        x = num[t]
        if closed and t >= own_from:
            x = x.copy()
            x[:, _CTRL_COLUMNS] = controller_features(inputs[t])
        u = rule.numbers()
        out = step(cat[t], x, rtg[t], u, temperature)
        if t + lag < T:
            inputs[t + lag] = out["action"] if "action" in out else sample_actions(out, u, temperature)
            pressed[t + lag], main[t + lag] = out["buttons"] > cut, _main_cluster_guess(out)
    return [{"inputs": inputs[:ep.frames, v], "buttons": pressed[:ep.frames, v], "main": main[:ep.frames, v]}
            for v, ep in enumerate(episodes)]


# ---- how inputs move ------------------------------------------------------------------------------

STICK_REGION_DEADZONE = 2  # stick classes within 2 of the centre (|value| <= 0.25) are neutral


def stick_region(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Main-stick region 0..8 of stick classes: 4 = neutral, else one of 8 directions."""
    side = lambda c: np.where(np.abs(c - 8) <= STICK_REGION_DEADZONE, 0, np.sign(c - 8)) + 1
    return side(x) * 3 + side(y)


def _runs(x: np.ndarray) -> np.ndarray:
    """Lengths of the runs of identical rows of x [T, ...]."""
    change = np.flatnonzero((x[1:] != x[:-1]).reshape(len(x) - 1, -1).any(1)) + 1
    return np.diff(np.concatenate([[0], change, [len(x)]]))


def input_stats(inputs: list[np.ndarray], players: list[np.ndarray] | None = None, start: int = 123) -> dict:
    """How inputs (one [T, UNIFORMS] array per view, from frame `start`: after the countdown)
    move: button and main-stick changes per second, the share of buttons pressed, the share of
    frames with a neutral main stick, the longest unchanged input (seconds: mean over views, max),
    and the joint distribution of (buttons, main-stick region) as counts; with the players'
    inputs of the same views, the share of frames where the input equals the player's."""
    n = changes_b = changes_m = pressed = neutral = same = 0
    longest, joint = [], np.zeros(256 * 9)
    for v, x in enumerate(inputs):
        x = x[start:]
        if len(x) < 2:
            continue
        n += len(x)
        changes_b += (x[1:, :8] != x[:-1, :8]).any(1).sum()
        changes_m += (x[1:, 8:10] != x[:-1, 8:10]).any(1).sum()
        pressed += x[:, :8].sum()
        region = stick_region(x[:, 8], x[:, 9])
        neutral += (region == 4).sum()
        longest.append(_runs(x).max() / FPS)
        joint += np.bincount((x[:, :8] << np.arange(8)).sum(1) * 9 + region, minlength=256 * 9)
        if players is not None:
            same += (x == players[v][start:]).all(1).sum()
    seconds = max(n, 1) / FPS
    res = {"frames": n, "button_changes_per_s": changes_b / seconds, "main_changes_per_s": changes_m / seconds,
           "press_share": pressed / max(8 * n, 1), "neutral_share": neutral / max(n, 1),
           "longest_s_mean": float(np.mean(longest)) if longest else 0.0,
           "longest_s_max": float(np.max(longest)) if longest else 0.0, "joint": joint}
    if players is not None:
        res["same_as_player"] = same / max(n, 1)
    return {k: float(v) if k != "joint" else v for k, v in res.items()}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits, 0..1) of two count vectors."""
    p, q = p / max(p.sum(), 1), q / max(q.sum(), 1)
    m = (p + q) / 2
    kl = lambda a: float(np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])))
    return (kl(p) + kl(q)) / 2


# ---- skill checks ---------------------------------------------------------------------------------

_AERIALS, _AERIAL_LANDINGS = range(65, 70), range(70, 75)  # NAIR..DAIR, NAIR_LANDING..DAIR_LANDING
_GROUND_HITS = (183, 191, 199, 200, 201)  # TECH_MISS_UP, TECH_MISS_DOWN, NEUTRAL/FORWARD/BACKWARD_TECH
_JUMP_SQUAT, _AIRDODGE, _LANDING_SPECIAL, _EDGE_CATCHING = 24, 236, 43, 252


def _starts(action: np.ndarray, states) -> np.ndarray:
    """Frames where the action enters one of `states` (from an action outside them)."""
    inside = np.isin(action, list(states))
    return np.flatnonzero(inside[1:] & ~inside[:-1]) + 1


def _l_cancel(action):
    """An aerial attack landing (aerial -> its landing lag): a new press of L, R or Z (or the
    analog trigger) on one of the 7 frames ending with touchdown. On 368 landings of 8 games this
    agrees with the game's own L-cancel flag 96.5% of the time."""
    return [(s, s - 6, s + 1) for s in _starts(action, _AERIAL_LANDINGS) if action[s - 1] in _AERIALS]


def _tech(action):
    """Hitting the ground in tumble (a tech or a missed tech begins): a new press of L or R (or
    the analog trigger) in the 20 frames before. On 422 of them in 24 games this agrees with
    whether the player teched 86.7% of the time (the game also locks out early presses)."""
    return [(s, s - 20, s) for s in _starts(action, _GROUND_HITS)]


def _wavedash(action):
    """A jump squat that ends in an airdodge (or a special landing) within 2 frames: a new press
    of L or R from the first jump-squat frame to the airdodge's first frame."""
    found = []
    for s in _starts(action, (_JUMP_SQUAT,)):
        end = s + int(np.argmax(action[s:] != _JUMP_SQUAT))  # the first frame after the squat
        dodge = [e for e in range(end, min(end + 3, len(action))) if action[e] in (_AIRDODGE, _LANDING_SPECIAL)]
        if end > s and dodge:
            found.append((s, s, dodge[0] + 1))
    return found


def _ledge(action):
    """A ledge grab (EDGE_CATCHING begins): any ledge option held (A, B, X, Y, L or R, or the main
    stick out of neutral) within 37 frames: the catch and the ledge invincibility after it."""
    return [(s, s, s + 37) for s in _starts(action, (_EDGE_CATCHING,))]


def _trigger(x, z=False):
    return (x[:, 5] | x[:, 6] | (x[:, 12] > 0) | (x[:, 4] if z else 0)) > 0


def _ledge_input(x):
    return x[:, :4].any(1) | (x[:, 5] > 0) | (x[:, 6] > 0) | (stick_region(x[:, 8], x[:, 9]) != 4)


# name -> (situations(the player's action ids [T]) -> [(frame, first, end)],
#          correct(inputs [n, UNIFORMS]) -> [n] bool, only a new press counts,
#          a new press just before the window is too early: a mistake, not a shield or a drift)
SKILLS = {
    "l_cancel": (_l_cancel, lambda x: _trigger(x, z=True), True, True),
    "tech": (_tech, _trigger, True, True),
    "wavedash": (_wavedash, _trigger, True, False),
    "ledge_option": (_ledge, _ledge_input, False, False),
}


def skill_situations(ep: Episode) -> dict[str, list[tuple[int, int, int]]]:
    """Per skill, its situations in a player view: (frame, first, end) with the window of frames
    [first, end) where the correct input counts, inside the game."""
    action = np.asarray(ep.cat[:, 0], np.int64)
    return {name: [w for w in find(action) if w[1] >= 1 and w[2] <= ep.frames] for name, (find, *_) in SKILLS.items()}


SKILL_LEAD = 24  # frames (0.4 s) before a skill's window where a first new press comes too early


def skill_hit(name: str, x: np.ndarray, lead: int = 0) -> tuple[bool, bool]:
    """(hit, early) for inputs x [n, UNIFORMS]: a frame, the `lead` frames before a situation's
    window, then the window. hit: the correct input on at least one frame of the window, pressed
    anew where the skill asks (not already held on the frame before); early: where a press
    can come too soon (L-cancel, tech), a new press of it in the lead frames."""
    _, correct, new, early = SKILLS[name]
    ok = correct(x)
    got = ok[1:] & ~ok[:-1] if new else ok[1:]
    return bool(got[lead:].any()), bool(early and got[:lead].any())


def skill_scores(situations: list[dict], inputs: list[np.ndarray],
                 lead: int = SKILL_LEAD) -> dict[str, tuple[int, int, int]]:
    """Per skill, (situations, how many of them the inputs [T, UNIFORMS] of each view got right,
    in how many a new press came early: in the `lead` frames before the window)."""
    def score(name):
        got = [skill_hit(name, x[max(a - 1 - lead, 0):b], min(lead, a - 1))
               for f, x in zip(situations, inputs) for _, a, b in f[name]]
        return len(got), sum(h for h, _ in got), sum(e for _, e in got)
    return {name: score(name) for name in SKILLS}


SITUATIONS_AT_ONCE = 256  # situations walked together (their carried states: ~76 KB each for mamba)


def situated_skills(make_step: Callable[[int], Callable], episodes: list[Episode], found: list[dict],
                    players: list[np.ndarray], temperature: float = 1.0, delay: int = 0, seed: int = 0,
                    returns: Returns | None = None, keep: np.ndarray | None = None,
                    lead: int = SKILL_LEAD) -> dict[str, tuple[int, int, int]]:
    """Skill checks (as `skill_scores`) of a bot that reads back its own inputs from each situation
    on: up to the situation's window (`lead` frames before it where a press can come too early)
    the game, the controller and the bot's carried state follow the player's frames (a history
    the game state agrees with, as when the bot reached the situation by itself), and from the
    first decision that takes effect there the bot reads its own inputs, sampling as it plays (so
    a press that comes too early counts against it, as in the game). A wavedash's window opens
    with the jump squat, which the player's jump made: there the bot takes over at the window.
    A whole game walked on its own inputs (`rollout`, closed) pairs a game state the player's
    inputs made with a controller that never made them (a jump squat the bot never pressed jump
    for), which lowers these checks for reasons play would not have.
    make_step(views): a fresh `_graph_step` or `_markov_step`."""
    lag, rng = 1 + delay, np.random.default_rng(seed)
    hits = {name: [0, 0, 0] for name in SKILLS}
    pending = []  # (view, skill, first own input, window first, window end, state at its decision)

    def walk():
        step = make_step(len(pending))
        for n in step.state:
            step.state[n] = np.stack([p[5][n] for p in pending])
        parts = [episodes[v].part(c - lag, b, returns) for v, _, c, _, b, _ in pending]
        out = rollout(step, parts, True, False, temperature, delay, int(rng.integers(2**31)), returns,
                      keep=keep, own_from=lag)
        for (v, name, c, a, b, _), r in zip(pending, out):  # the player's input at c - 1, the bot's at c .. b - 1
            got = skill_hit(name, np.vstack([players[v][c - 1:c], r["inputs"][lag:]]), a - c)
            hits[name] = [n + k for n, k in zip(hits[name], (1, *got))]
        pending.clear()

    for views in chunks(range(len(episodes)), VIEWS_AT_ONCE):
        starts = collections.defaultdict(list)
        for j, v in enumerate(views):
            for name, windows in found[v].items():
                for _, a, b in windows:
                    if a >= lag:
                        c = max(a - (lead if SKILLS[name][3] else 0), lag)
                        starts[c - lag].append((j, v, name, c, a, b))
        step = make_step(len(views))

        def at(t):  # before frame t's step: the state carried through frames 0 .. t - 1
            for j, v, name, c, a, b in starts.get(t, ()):
                pending.append((v, name, c, a, b, {n: s[j].copy() for n, s in step.state.items()}))
            if len(pending) >= SITUATIONS_AT_ONCE:
                walk()
        rollout(step, [episodes[v] for v in views], False, True, temperature, delay, seed,
                returns, on_frame=at)
    if pending:
        walk()
    return {name: tuple(n) for name, n in hits.items()}


# ---- scores comparable with HAL and MIMIC ---------------------------------------------------------

# HAL's 37 main-stick cluster centres (its STICK_XY_CLUSTER_CENTERS_V2), in -1..1 stick units.
STICK_CLUSTERS = np.array(
    [[0, 0], [.35, 0], [-.35, 0], [0, .35], [0, -.35], [.675, 0], [-.675, 0], [0, .675], [0, -.675],
     [1, 0], [0, 1], [-1, 0], [0, -1], [.95, -.3], [-.95, -.3], [.95, .3], [-.95, .3],
     [.85, -.5], [.85, .5], [-.85, -.5], [-.85, .5], [.7, -.7], [-.7, -.7], [.7, .7], [-.7, .7],
     [.5, .5], [-.5, .5], [.5, -.5], [-.5, -.5], [.5, .85], [-.5, .85], [.5, -.85], [-.5, -.85],
     [.3, -.95], [.3, .95], [-.3, -.95], [-.3, .95]])
_GRID = np.stack(np.meshgrid(np.arange(17), np.arange(17), indexing="ij"), -1).reshape(-1, 2) / 8 - 1
GRID_CLUSTER = np.argmin(((_GRID[:, None] - STICK_CLUSTERS[None]) ** 2).sum(-1), 1).reshape(17, 17)
_GRID_ONE_HOT = np.eye(len(STICK_CLUSTERS))[GRID_CLUSTER.ravel()]  # [289, 37]

# Single-label buttons: groups of exphil's buttons (A B X Y Z L R D_UP), in tie-break order.
HAL_BUTTONS = ("A", "B", "jump", "Z", "none")
MIMIC_BUTTONS = ("A", "B", "jump", "Z", "trigger", "shield_grab", "none")
_BUTTON_GROUPS = [[0], [1], [2, 3], [4], [5, 6]]  # A, B, jump = X or Y, Z, trigger = L or R


def _main_cluster_guess(logits: dict[str, np.ndarray]) -> np.ndarray:
    """[B] the most likely main-stick cluster under the heads' joint p(main_x) p(main_y)."""
    p = [np.exp(logits[h] - logits[h].max(-1, keepdims=True)) for h in ("main_x", "main_y")]
    return ((p[0][:, :, None] * p[1][:, None, :]).reshape(len(p[0]), -1) @ _GRID_ONE_HOT).argmax(1)


def button_classes(pressed: np.ndarray, before: np.ndarray, mimic: bool = False) -> np.ndarray:
    """[T] single-label button classes of frames whose buttons are `pressed` [T, 8], the true
    buttons of every frame before each being `before` [T, 8] (rows 0..t-1 of the player's own
    inputs, `before[t]` the frame just before): of the groups held (A, B, jump = X or Y, Z, and
    for MIMIC trigger = L or R), the most recently pressed one wins (ties: that order), else none.
    MIMIC: the trigger held together with A is shield-grab."""
    groups = len(_BUTTON_GROUPS) - (0 if mimic else 1)
    group = lambda b: np.stack([b[:, g].any(1) for g in _BUTTON_GROUPS[:groups]], 1)
    held, prev = group(pressed), group(before)
    T = len(held)
    onset = np.where(prev & ~np.vstack([np.zeros((1, groups), bool), prev[:-1]]), np.arange(T)[:, None], -1)
    onset = np.maximum.accumulate(onset, 0)  # when each group was last pressed, up to the frame before
    when = np.where(held, np.where(prev, onset, T), -2)  # a press new on this frame is the newest
    cls = np.where(held.any(1), np.argmax(when, 1), groups)  # argmax: ties go to the first group
    if mimic:
        cls = np.where(held[:, 4] & held[:, 0], 5, np.where(cls == groups, 6, cls))
    return cls


def classification_scores(pred: np.ndarray, true: np.ndarray, classes: int) -> dict:
    """Top-1 and macro-F1 (over the classes that occur in either) of class guesses."""
    f1 = []
    for c in range(classes):
        tp, fp, fn = ((pred == c) & (true == c)).sum(), ((pred == c) & (true != c)).sum(), ((pred != c) & (true == c)).sum()
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return {"top1": float((pred == true).mean()) if len(true) else 0.0, "macro_f1": float(np.mean(f1)) if f1 else 0.0}


def field_labels(inputs: np.ndarray, buttons: np.ndarray | None = None, main: np.ndarray | None = None) -> dict:
    """The field classes of one view's frames: HAL buttons, MIMIC buttons and main-stick cluster,
    from the player's inputs [T, UNIFORMS] (the truth), or of guesses for those frames: `buttons`
    [T, 8] pressed and `main` [T] clusters, read against the player's earlier inputs."""
    before = np.vstack([np.zeros((1, 8), np.int64), inputs[:-1, :8]]) > 0
    pressed = inputs[:, :8] > 0 if buttons is None else buttons
    return {"hal_buttons": button_classes(pressed, before), "mimic_buttons": button_classes(pressed, before, True),
            "main_stick": GRID_CLUSTER[inputs[:, 8], inputs[:, 9]] if main is None else main}


FIELD_CLASSES = {"hal_buttons": len(HAL_BUTTONS), "mimic_buttons": len(MIMIC_BUTTONS), "main_stick": len(STICK_CLUSTERS)}


# ---- the report ---------------------------------------------------------------------------------

VIEWS_AT_ONCE = 32  # player views walked together through one session (a batch)
BOT_ROWS = {  # row -> (the bot or the Markov baseline, closed controller, deterministic)
    "bot, sampling, teacher-forced": ("bot", False, False), "bot, sampling, own inputs": ("bot", True, False),
    "bot, deterministic, teacher-forced": ("bot", False, True), "bot, deterministic, own inputs": ("bot", True, True),
    "Markov, sampling, teacher-forced": ("markov", False, False), "Markov, sampling, own inputs": ("markov", True, False)}


def judge(run: str | os.PathLike, replays=None, data: str | os.PathLike | None = None, closed: bool = True,
          skills: bool = True, field: bool = True, seed: int = 0, temperature: float = 1.0,
          hold: dict | None = None, quiet: bool = False) -> dict:
    """Judge a run the way it plays, on replays (or a dataset; neither: the run's validation
    games): closed-controller rollouts (`input_stats` of the bot beside the players,
    teacher-forced and reading back its own inputs, sampling and deterministic, and the Markov
    baseline), skill checks (`SKILLS`; also `situated_skills`) and field scores
    (`field_labels`); the FP32 step graph with the Agent's rule at `temperature`, holding its
    numbers as `hold` says (None: as the run's `hold`; the Markov rows never hold them)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"temperature must be a finite number > 0, not {temperature}")
    run = Path(run)
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    graph = checked_step_graph(run, step_path(run), info)
    spec = load_spec(run / "spec.toml")
    games, skipped = games_to_judge(run, info, replays, data, _log(quiet))
    episodes = [ep for g in games for ep in g]
    delay, threshold = int(info.get("frame_delay", 0)), info.get("button_threshold", 0.5)
    keep = hold_vector(info.get("hold") if hold is None else hold)
    players = [episode_inputs(ep) for ep in episodes]
    wanted = {name: how for name, how in BOT_ROWS.items()  # (the field scores read teacher-forced sampling only)
              if (closed or skills or how[1:] == (False, False)) and (how[0] == "bot" or "markov_tables" in info)}
    log, runs = _log(quiet), {}
    for name, (who, own, det) in wanted.items():
        log(f"{name}: {len(episodes)} player views")
        runs[name] = []
        for k, part in enumerate(chunks(episodes, VIEWS_AT_ONCE)):  # (memory: views x frames of features)
            step = _graph_step(graph, len(part)) if who == "bot" else _markov_step(info["markov_tables"])
            runs[name] += rollout(step, part, own, det, temperature, delay, seed + k,
                                  spec.returns if spec.returns.input else None, threshold,
                                  keep if who == "bot" else None)
    res = {"games": len(games), "views": len(episodes), "frames": sum(ep.frames for ep in episodes),
           "frame_delay": delay, "temperature": temperature, "skipped": skipped,
           "hold": {g: float(keep[i[0]]) for g, i in HOLD_GROUPS.items()}}
    if closed:
        res["closed_controller"] = _closed_rows(players, runs)
    if skills:
        found = [skill_situations(ep) for ep in episodes]
        res["skills"] = {"players": skill_scores(found, players),
                         **{name: skill_scores(found, [r["inputs"] for r in rows]) for name, rows in runs.items()}}
        situated = {"bot": (lambda n: _graph_step(graph, n), keep)}
        if "markov_tables" in info:
            situated["Markov"] = (lambda n: _markov_step(info["markov_tables"]), None)
        for who, (make, held) in situated.items():
            log(f"{who}, sampling, own inputs from each skill situation")
            res["skills"][f"{who}, sampling, own inputs from the situation"] = situated_skills(
                make, episodes, found, players, temperature, delay, seed, spec.returns if spec.returns.input else None, held)
    if field:
        res["field_scores"] = _field_rows(players, runs, delay)
    return res


HOLD_GAMES = 8  # training games whose closed-controller rollouts choose a run's hold
HOLD_STEPS = 7  # bisection steps per group, on log2 of 1 - hold in [-10, 0] (to within 6% of 1 - hold)
HOLD_RANGE = 10.0  # the longest hold tried keeps a number for about 2^10 frames


def tune_hold(run: str | os.PathLike, replays=None, data: str | os.PathLike | None = None,
              games: int = HOLD_GAMES, seed: int = 0, quiet: bool = False) -> dict:
    """Choose the run's `hold` (`hold_vector`) so that the bot reading back its own inputs
    (closed-controller rollouts, sampling) changes its buttons and its main stick as often as the
    players do, on a seeded choice of `games` of its training games (or of the replays/dataset
    given); a group the bot already changes no more often than the players gets 0 (holding only
    slows changes). Bisection on log2(1 - hold) (a bot that twitches at delay 18 needs a number
    kept for about a second): the rates fall as the hold grows. Written into run.json."""
    run, log = Path(run), _log(quiet)
    info = read_run_info(run)
    graph = checked_step_graph(run, step_path(run), info)
    spec = load_spec(run / "spec.toml")
    found = load_games(replays, log=log, data=data)[0] if replays or data else recorded_games(info, "train", log)
    if not found:
        raise ExphilError(f"{run}: no training games to choose its hold on (pass --replays or --data)")
    chosen = [found[i] for i in sorted(np.random.default_rng(seed).permutation(len(found))[:games])]
    episodes = [ep for g in chosen for ep in g]
    players = input_stats([episode_inputs(ep) for ep in episodes])
    rate = {"buttons": "button_changes_per_s", "sticks": "main_changes_per_s"}

    def rates(hold: dict) -> dict:
        inputs = rollout(_graph_step(graph, len(episodes)), episodes, True, delay=int(info.get("frame_delay", 0)),
                         seed=seed, returns=spec.returns if spec.returns.input else None, keep=hold_vector(hold))
        got = input_stats([r["inputs"] for r in inputs])
        return {g: got[k] for g, k in rate.items()}

    keep = lambda x: {g: 1 - 2.0 ** -v for g, v in x.items()}  # x: -log2(1 - hold) per group
    low, high = {g: 0.0 for g in rate}, {g: HOLD_RANGE for g in rate}
    at_zero = rates(keep(low))
    for _ in range(HOLD_STEPS):
        mid = {g: (low[g] + high[g]) / 2 if at_zero[g] > players[k] else 0.0 for g, k in rate.items()}
        got = rates(keep(mid))
        for g, k in rate.items():
            (low if got[g] > players[k] else high)[g] = mid[g]
    hold = {g: round(p, 4) if at_zero[g] > players[k] else 0.0 for (g, p), k in zip(keep(low).items(), rate.values())}
    report = {"games": len(chosen), "views": len(episodes), "players": {g: players[k] for g, k in rate.items()},
              "without": at_zero, "with": rates(hold)}
    info.update(hold=hold, hold_report=report)
    _write_json(run / "run.json", info)
    log(f"{run}: hold buttons {hold['buttons']:.3f}, sticks {hold['sticks']:.3f} (changes/s on {len(chosen)} "
        f"training games, own inputs: buttons {at_zero['buttons']:.2f} -> {report['with']['buttons']:.2f}, "
        f"main stick {at_zero['sticks']:.2f} -> {report['with']['sticks']:.2f}; players "
        f"{players['button_changes_per_s']:.2f} and {players['main_changes_per_s']:.2f})")
    return report


def _closed_rows(players: list[np.ndarray], runs: dict) -> dict:
    ref = input_stats(players)
    rows = {"players": ref}
    for name, out in runs.items():
        rows[name] = input_stats([r["inputs"] for r in out], players)
        rows[name]["joint_divergence"] = js_divergence(rows[name]["joint"], ref["joint"])
    for row in rows.values():
        row.pop("joint")
    return rows


def _field_rows(players: list[np.ndarray], runs: dict, delay: int, start: int = 123) -> dict:
    """Field scores of the bot's teacher-forced guesses beside copy ("the input lag + 1 frames
    earlier"), the Markov table's guesses and the most common class of these frames."""
    first = max(start, 1 + delay)
    cut = lambda parts: {k: np.concatenate([p[k][first:] for p in parts]) for k in FIELD_CLASSES}
    truth = cut([field_labels(x) for x in players])
    copy = [np.vstack([np.broadcast_to(_NEUTRAL_CODES, (1 + delay, UNIFORMS)), x[:-1 - delay]]) for x in players]
    guesses = {"copy": cut([field_labels(x, c[:, :8] > 0, GRID_CLUSTER[c[:, 8], c[:, 9]]) for x, c in zip(players, copy)])}
    for who, name in (("bot", "bot, sampling, teacher-forced"), ("Markov", "Markov, sampling, teacher-forced")):
        if name in runs:
            guesses[who] = cut([field_labels(x, r["buttons"], r["main"]) for x, r in zip(players, runs[name])])
    rows = {who: {k: classification_scores(g[k], truth[k], n) for k, n in FIELD_CLASSES.items()}
            for who, g in guesses.items()}
    rows["most common class"] = {k: classification_scores(np.full(len(truth[k]), np.bincount(truth[k]).argmax()),
                                                          truth[k], n) for k, n in FIELD_CLASSES.items()}
    return {"frames": len(truth["main_stick"]), "rows": rows}


def judge_tables(res: dict) -> str:
    """The report of `judge` as text tables."""
    lines = [f"{res['games']} games, {res['views']} player views, {res['frames']:,} frames; frame t decides the "
             f"input at t + {1 + res['frame_delay']}; temperature {res['temperature']:g}; hold "
             + ", ".join(f"{g} {p:g}" for g, p in res["hold"].items())]
    if "closed_controller" in res:
        lines += ["", f"{'inputs':<36}{'buttons/s':>10}{'main/s':>8}{'press':>7}{'neutral':>8}"
                      f"{'longest mean/max s':>19}{'JS div':>8}{'= player':>9}"]
        for name, r in res["closed_controller"].items():
            extra = f"{r['joint_divergence']:>8.3f}{r['same_as_player']:>9.1%}" if name != "players" else ""
            lines.append(f"{name:<36}{r['button_changes_per_s']:>10.2f}{r['main_changes_per_s']:>8.2f}"
                         f"{r['press_share']:>7.1%}{r['neutral_share']:>8.1%}"
                         f"{r['longest_s_mean']:>10.1f} / {r['longest_s_max']:<6.1f}{extra}")
    if "skills" in res:
        names = list(SKILLS)
        lines += ["", f"{'skill checks: rate, early press, situations':<48}" + "".join(f"{n:>22}" for n in names)]
        def cell(skill, n, hits, early):
            return f"{hits / max(n, 1):>9.1%} {format(early / max(n, 1), '.1%') if SKILLS[skill][3] else '-':>6} ({n:>4})"
        for who, scores in res["skills"].items():
            lines.append(f"{who:<48}" + "".join(cell(s, *scores[s]) for s in names))
    if "field_scores" in res:
        f = res["field_scores"]
        lines += ["", f"{'field scores, ' + format(f['frames'], ',') + ' frames':<36}"
                      + "".join(f"{k + ' F1/top-1':>26}" for k in FIELD_CLASSES)]
        for who, r in f["rows"].items():
            lines.append(f"{who:<36}" + "".join(f"{r[k]['macro_f1']:>17.3f} / {r[k]['top1']:.3f}" for k in FIELD_CLASSES))
    return "\n".join(lines)


# =================================================================================================
# Command line
# =================================================================================================

# The built-in specs: `specs/` in a clone; installed, the same files are the data package
# `exphil_specs` beside this module (pyproject.toml maps one onto the other).
_HERE = Path(__file__).resolve().parent
SPECS_DIR = _HERE / "exphil_specs" if (_HERE / "exphil_specs").is_dir() else _HERE / "specs"

# Presets fill in settings; flags given on the command line win.
PRESETS = {
    "quick": {"spec": "mlp", "max_files": 5, "epochs": 1},
    "standard": {"spec": "mamba", "window_size": 60, "epochs": 10, "lr_schedule": "cosine", "warmup_steps": 100},
    "production": {"spec": "mamba", "window_size": 60, "hidden": 512, "num_layers": 4, "epochs": 30,
                   "lr_schedule": "cosine", "warmup_steps": 500, "stateful": True, "mirror_prob": 0.5,
                   "label_smoothing": 0.05, "max_grad_norm": 1.0, "early_stopping": True, "patience": 5},
}

SPEC_FLAGS = {  # flag -> (mixer kinds it applies to, field), for overriding a spec without editing it
    "state_size": ((Mamba, Mamba2, Mamba3, S5), "state"), "expand_factor": ((Mamba, GatedSSM, Mamba2, Mamba3), "expand"),
    "conv_size": ((Mamba, GatedSSM, Mamba2), "conv"), "num_heads": ((Attention, GLA, HGRN2, RetNet), "heads"),
    "head_dim": ((Mamba2, Mamba3), "head_dim"), "head_size": ((RWKV7,), "head_size"),
    "chunk_size": ((Mamba2, Mamba3, GLA, HGRN2, RetNet), "chunk"),
}


def override_spec(spec: Spec, window_size: int | None = None, hidden: int | None = None,
                  num_layers: int | None = None, sampling: str | None = None, **mixer_fields) -> Spec:
    """A copy of a spec with some settings changed (`sampling`: its heads'); a setting no layer
    of the spec has is an error, never ignored. The result is validated like a spec file."""
    changes = {k: v for k, v in (("window", window_size), ("hidden", hidden)) if v is not None}
    if sampling is not None:
        changes["heads"] = msgspec.structs.replace(spec.heads, sampling=sampling)
    blocks = list(spec.blocks)
    if num_layers is not None:
        if len(blocks) != 1:
            raise SpecError(f"spec {spec.name!r} has {len(blocks)} groups of blocks; --num-layers needs one: "
                            "edit the spec's `repeat` fields instead")
        blocks = [msgspec.structs.replace(blocks[0], repeat=num_layers)]
    for flag, value in mixer_fields.items():
        if value is None:
            continue
        kinds, field = SPEC_FLAGS[flag]
        if not any(isinstance(b.mixer, kinds) for b in blocks):
            raise SpecError(f"spec {spec.name!r} has no layer with a {field!r} setting "
                            f"(--{flag.replace('_', '-')} applies to {', '.join(k.__name__ for k in kinds)})")
        blocks = [msgspec.structs.replace(b, mixer=msgspec.structs.replace(b.mixer, **{field: value}))
                  if isinstance(b.mixer, kinds) else b for b in blocks]
    new = msgspec.structs.replace(spec, blocks=blocks, **changes)
    return parse_spec(msgspec.toml.encode(new), source=f"{spec.name} with overrides")


def _spec_file(name: str) -> Path:
    path = Path(name)
    if not path.exists() and (SPECS_DIR / f"{name}.toml").exists():
        path = SPECS_DIR / f"{name}.toml"  # a shipped spec by name: "mamba"
    if not path.exists():
        raise UsageError(f"{name}: no such spec file, and no built-in spec of that name (built-in: "
                        + ", ".join(p.stem for p in sorted(SPECS_DIR.glob("*.toml"))) + ")")
    return path


def _spec_arg(name: str) -> Spec:
    return load_spec(_spec_file(name))


def _training_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and distill. Defaults are None so presets can fill them in."""
    d = p.add_argument_group("data")
    d.add_argument("--replays", help="a .slp file or a directory (searched recursively), ingested into a dataset "
                                     "in the cache")
    d.add_argument("--data", help="a dataset folder (`exphil ingest`), instead of --replays")
    d.add_argument("--max-files", type=int, help="use at most this many replays, sorted by path (0: all)")
    d.add_argument("--character", help="keep the player views of this character (e.g. fox)")
    d.add_argument("--opponent-character", help="... against this character")
    d.add_argument("--stage", help="keep games on this stage (e.g. final_destination)")
    d.add_argument("--min-frames", type=int, help="drop games shorter than this many frames")
    d.add_argument("--val-split", type=float, help="fraction of games held out for validation")
    d.add_argument("--train-games", type=int, help="train on this many of the training games, a seeded choice "
                   "(a smaller number takes a subset of a larger one's; validation unchanged; 0: all)")
    d.add_argument("--val-sample", type=int, metavar="FRAMES", help="validation frames scored per epoch: a fixed "
                   "sample of the validation windows when the games hold more (every frame at the end; 0: every "
                   "frame every epoch)")
    d.add_argument("--seed", type=int, help="seed for the split, the data order and the initial weights")
    d.add_argument("--split-seed", type=int, help="seed for the split alone (default: --seed): other seeds, same games")
    d.add_argument("--split-by", choices=SPLITS, help="what validation holds out: whole games, players (connect "
                   "codes; games without codes by folder; no player on both sides) or sources (folders)")
    m = p.add_argument_group("model overrides (written into the run's spec.toml)")
    for flag in ("window-size", "hidden", "num-layers", *(f.replace("_", "-") for f in SPEC_FLAGS)):
        m.add_argument(f"--{flag}", type=int, help="(default: the spec's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help="passes over the training windows (--max-steps, when given, "
                                              "decides alone)")
    o.add_argument("--batch-size", type=int, help="windows per step")
    o.add_argument("--lr", type=float, help="peak learning rate")
    o.add_argument("--lr-schedule", choices=["constant", "cosine"], help="after the warm-up")
    o.add_argument("--warmup-steps", type=int, help="steps of linear warm-up of the learning rate")
    o.add_argument("--weight-decay", type=float, help="AdamW decoupled weight decay")
    o.add_argument("--max-grad-norm", type=float,
                   help="clip the global gradient norm, inside the optimizer graph (0 = off)")
    o.add_argument("--label-smoothing", type=float, help="share of each target spread over the other classes")
    o.add_argument("--frame-delay", type=int, metavar="D",
                   help="frame t predicts the controller at frame t + 1 + D (0: the next frame)")
    o.add_argument("--online-robust", action="store_true", default=None,
                   help="a random delay in [--delay-min, --delay-max] per window")
    o.add_argument("--delay-min", type=int, help="--online-robust: the smallest delay")
    o.add_argument("--delay-max", type=int, help="--online-robust: the largest delay")
    o.add_argument("--mirror-prob", type=float, help="probability of a left/right mirrored window")
    o.add_argument("--change-weight", type=float,
                   help="loss weight of frames whose target differs from the current input")
    o.add_argument("--controller-dropout", type=float,
                   help="share of training frames whose current-controller inputs are zeroed")
    o.add_argument("--own-inputs", type=float, metavar="SHARE",
                   help="share of training frames whose controller inputs hold the model's own decisions "
                        "(sampled from its outputs on the same batch), as in play")
    o.add_argument("--stateful", action="store_true", default=None,
                   help="carry recurrent state across consecutive windows of each game (truncated BPTT)")
    o.add_argument("--max-steps", type=int, help="train this many steps in all, over as many epochs as they take "
                                                 "(0: --epochs decides)")
    o.add_argument("--budget-seconds", type=float, help="stop training after this many seconds (0: no limit)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run folder")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--save-every", type=int, help="also checkpoint every N steps (default: each epoch)")
    r.add_argument("--early-stopping", action="store_true", default=None,
                   help="stop when the validation loss has not improved for --patience epochs")
    r.add_argument("--patience", type=int, help="epochs without validation improvement")
    r.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    c = p.add_argument_group("cluster (pip install 'exphil[cluster]')")
    c.add_argument("--ray", metavar="ADDRESS", help="train on a Ray cluster, in data parallel: auto (the one "
                   "`ray start` runs here), local (a new one for this run) or the cluster's address")
    c.add_argument("--workers", type=int, help="--ray: Ray workers, each running a slice of every batch "
                   "(default: 2)")


CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

EXAMPLES = {
    "train": ["exphil train mamba --replays ~/Slippi --epochs 5 --out runs/mamba",
              "exphil train --preset quick --replays tests/replays --out runs/quick",
              "exphil train my.toml --replays ~/Slippi --character fox --frame-delay 2 --out runs/fox",
              "exphil train mamba --data data/ranked --character fox --out runs/fox",
              "exphil train mamba --data data/mine --split-by player --max-steps 3000 --out runs/m",
              "exphil train --resume --out runs/mamba --epochs 10",
              "exphil train mamba --data /shared/data/ranked --ray auto --workers 8 --out /shared/runs/mamba"],
    "distill": ["exphil distill --teacher runs/mamba --student mlp --replays ~/Slippi --out runs/mlp-student"],
    "eval": ["exphil eval runs/mamba --replays ~/Slippi/held-out", "exphil eval runs/mamba --replays game.slp --json",
             "exphil eval runs/mamba --data data/other --by character",
             "exphil eval runs/mamba --replays DIR --closed-controller --skills --field-scores"],
    "hold": ["exphil hold runs/mamba", "exphil hold runs/mamba --data data/mine --games 16"],
    "compile": ["exphil compile mamba --out build/mamba", "exphil compile my.toml --out build/my --window 30"],
    "ingest": ["exphil ingest ~/Slippi --out data/ranked", "exphil ingest /shared/replays --out /shared/data/ranked --ray auto"],
    "data": ["exphil data data/ranked", "exphil data ~/Slippi --json"],
    "plot": ["exphil plot runs/mamba"],
    "specs": ["exphil specs", "exphil specs show mamba > my.toml"],
    "quantize": ["exphil quantize runs/mamba", "exphil quantize runs/mamba --static", "exphil quantize runs/mamba --fp16"],
    "play": ["exphil play runs/mamba --dolphin ~/Slippi/netplay --iso melee.iso --cpu-level 9",
             "EXPHIL_DOLPHIN=~/Slippi/netplay EXPHIL_ISO=melee.iso exphil play runs/mamba --connect-code ABCD#123"],
    "bench": ["exphil bench", "exphil bench --markdown", "exphil bench --runs runs/mamba --providers cpu cuda"],
}


def _finish_help(parser: argparse.ArgumentParser, command: str) -> None:
    """Every flag's help ends with its default (TrainConfig's for the training flags, whose
    argparse default is None so that presets can fill them in); the help ends with examples."""
    for a in parser._actions:
        default = getattr(TrainConfig, a.dest, None) if a.default is None else a.default
        shown = default is not None and default is not False and "default" not in (a.help or "")
        if a.option_strings and argparse.SUPPRESS not in (a.help, a.default) and shown:
            a.help = f"{a.help or ''} (default: {default})".strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES[command])


def _run_training(args, preset: dict, **extra) -> RunResult:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    settings = {**preset, **flags, **extra}
    spec_name = settings.pop("spec", None) or settings.pop("student", None)
    cluster = {"ray": args.ray, "workers": args.workers or 2} if args.ray else \
        {"workers": args.workers} if args.workers else {}
    if args.resume:  # the same command again, with --resume: what it repeats must match the run
        spec = spec_name and override_spec(_spec_arg(spec_name), **{k: settings.get(k) for k in
                                                                     ("window_size", "hidden", "num_layers", *SPEC_FLAGS)})
        return train(spec, settings.get("replays"), out=args.out, resume=True, quiet=args.quiet, **cluster,
                     data=settings.get("data"), **{k: v for k, v in settings.items() if k in CONFIG_FIELDS})
    if not spec_name:
        raise UsageError("give a spec file (or --preset)")
    if bool(settings.get("replays")) == bool(settings.get("data")):
        raise UsageError("give --replays (a folder of replays) or --data (a dataset folder), one of them")
    spec = override_spec(_spec_arg(spec_name), **{k: settings.get(k) for k in
                                                  ("window_size", "hidden", "num_layers", *SPEC_FLAGS)})
    return train(spec, settings.get("replays"), out=args.out, quiet=args.quiet, data=settings.get("data"), **cluster,
                 **{k: v for k, v in settings.items() if k in CONFIG_FIELDS})


def plot(run: str | os.PathLike) -> Path:
    """Write curves.png (loss and accuracy per epoch) into a run folder."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExphilError("plotting needs matplotlib: pip install 'exphil[plot]'") from None
    run = Path(run)
    if not (run / "metrics.jsonl").exists():
        raise ExphilError(f"{run}: no metrics.jsonl")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    if not rows:
        raise ExphilError(f"{run}: metrics.jsonl has no epoch yet")
    info = read_run_info(run, layout=False)
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if key in rows[0]:
            a.plot(epochs, [r[key] for r in rows], marker="o", label=label)
    if "val_markov" in rows[-1]:
        a.axhline(rows[-1]["val_markov"]["loss"], color="black", linestyle="--", label="Markov baseline")
    if info.get("baseline_loss"):
        a.axhline(info["baseline_loss"]["total"], color="gray", linestyle=":", label="frequency baseline")
    a.set(title=f"{info.get('spec', run.name)}: loss", xlabel="epoch", ylabel="loss")
    for axis in (a, b):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a.legend()
    prefix = "val" if "val_accuracy" in rows[0] else "train"
    b.plot(epochs, [r[f"{prefix}_button_f1"] for r in rows], marker="o", label="button F1")
    for h in rows[0][f"{prefix}_accuracy"]:
        b.plot(epochs, [r[f"{prefix}_accuracy"][h] for r in rows], marker=".", label=f"{h} top-1")
    b.set(title=f"{'validation' if prefix == 'val' else 'training'} accuracy", xlabel="epoch", ylim=(0, 1))
    b.legend(fontsize=8)
    fig.tight_layout()
    path = run / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _add_play_commands(sub) -> None:
    """The `quantize` and `play` subcommands."""
    p = sub.add_parser("quantize", help="write an INT8 (or FP16) step graph into a run folder, if it "
                                        "picks the same actions as FP32")
    p.add_argument("run")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--static", action="store_true",
                      help="static INT8 (QDQ) calibrated on real frames (default: dynamic INT8)")
    kind.add_argument("--int4", action="store_true", help="4-bit weights (onnxruntime's MatMulNBits): "
                      "smaller; faster only for wide models (README: INT4)")
    kind.add_argument("--fp16", action="store_true", help="an FP16 graph, for GPUs")
    p.add_argument("--calibration-replays", help="replays to calibrate --static on (default: the run's "
                                                 "training replays)")
    p.add_argument("--replays", help="replays to compare with FP32 on (default: the run's validation replays)")
    p.add_argument("--min-agreement", type=float, default=0.98,
                   help="write nothing unless every head picks FP32's action on this share of frames")
    p.add_argument("--max-frames", type=int, default=20000, help="validation frames to compare on")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("play", help="play a run in Slippi Dolphin")
    p.add_argument("run")
    for flag, what in (("dolphin", "Slippi Dolphin executable (or its folder)"), ("iso", "Melee NTSC 1.02 ISO")):
        env = f"EXPHIL_{flag.upper()}"
        p.add_argument(f"--{flag}", default=os.environ.get(env) or None, required=not os.environ.get(env),
                       help=f"{what} (default: ${env}, required when it is not set)")
    p.add_argument("--port", type=int, default=1, help="the bot's controller port")
    p.add_argument("--opponent-port", type=int, default=2, help="the opponent's port (a CPU's with --cpu-level)")
    p.add_argument("--character", default="fox", help="the bot's character (libmelee names)")
    p.add_argument("--stage", default="final_destination", help="the stage (libmelee names)")
    p.add_argument("--connect-code", help="play a Slippi online direct match with this code")
    p.add_argument("--own-code", help="online: our connect code, to find our port (default: the one in "
                                      "Slippi's user.json)")
    p.add_argument("--cpu-level", type=int, default=0,
                   help="1-9: a CPU (same character) on the opponent port; 0: a human there")
    p.add_argument("--async", dest="asynchronous", action="store_true",
                   help="inference in its own thread: the game never waits for the model")
    p.add_argument("--action-repeat", type=int, default=1, metavar="N", help="a new action every N frames")
    p.add_argument("--frame-delay", type=int, default=0, metavar="N",
                   help="frames of delay added to the run's trained delay (negative: fewer)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature; 0 is the same as --deterministic")
    sampling.add_argument("--deterministic", action="store_true",
                          help="the reproducible decision rule: a fixed table of numbers instead of random ones")
    p.add_argument("--target-return", type=float, metavar="R",
                   help="return-conditioned runs (`returns.input`): the return to aim for at the start of a game, "
                        "decreased by the rewards earned (default: the median of the run's training games)")
    p.add_argument("--on-game-end", choices=["restart", "stop"], default="stop", help="after a game: another one, or stop")
    p.add_argument("--provider", default="auto", help="auto, cpu, cuda, rocm or coreml")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="which step graph: int8, int4 and fp16 ones are written by `exphil quantize`")
    p.add_argument("--stats-every", type=float, default=10.0, metavar="SECONDS", help="0: no stats lines")


def _cmd_quantize(args) -> None:
    """quantize: the graph written and checked, its agreement with FP32 and its speed."""
    mode = "fp16" if args.fp16 else "static" if args.static else "int4" if args.int4 else "dynamic"
    if args.calibration_replays and mode != "static":
        raise UsageError("--calibration-replays only applies to --static")
    report = quantize_run(args.run, mode, calibration_replays=args.calibration_replays,
                          min_agreement=args.min_agreement, replays=args.replays, max_frames=args.max_frames)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    lat, low = report["latency_ms"], report["precision"]
    print(f"{report['path']}: {mode} {low.upper()}, checked on {report['frames']} validation frames")
    print("  agreement with FP32: " + "  ".join(f"{h} {v:.2%}" for h, v in report["agreement"].items())
          + f"  (required {report['min_agreement']:.2%})")
    print(f"  step p50/p99: fp32 {lat['fp32']['p50']:.3f}/{lat['fp32']['p99']:.3f} ms, {low} "
          f"{lat[low]['p50']:.3f}/{lat[low]['p99']:.3f} ms ({lat[low]['p50'] / lat['fp32']['p50']:.2f}x) "
          f"on {report['providers'][0]}")
    if "note" in report:
        print(f"  note: {report['note']}")


def _cmd_play(args) -> None:
    """play: in Dolphin, the game's events on stdout, then one summary line."""
    summary = play(args.run, args.dolphin, args.iso, port=args.port, opponent_port=args.opponent_port,
                   character=args.character, stage=args.stage, connect_code=args.connect_code,
                   cpu_level=args.cpu_level, asynchronous=args.asynchronous, provider=args.provider,
                   precision=args.precision, temperature=args.temperature, deterministic=args.deterministic,
                   target_return=args.target_return, own_code=args.own_code,
                   action_repeat=args.action_repeat, frame_delay=args.frame_delay,
                   on_game_end=args.on_game_end, stats_every=args.stats_every,
                   log=lambda line: print(line, flush=True))  # the game's events on stdout
    inf = summary["inference_ms"]
    print(f"played {summary['games']} game(s), {summary['frames']} frames at {summary['fps']:.1f} fps; "
          f"{summary['inferences']} inferences"
          + (f", p50 {inf['p50']:.2f} ms, p99 {inf['p99']:.2f} ms" if summary["inferences"] else ""))


def _bench():
    """bench.py, which lies beside this module (in a clone, and installed as a module too)."""
    import importlib.util

    path = _HERE / "bench.py"
    if not path.is_file():
        raise ExphilError(f"{path}: not found; `exphil bench` runs the bench.py installed beside exphil.py")
    module_spec = importlib.util.spec_from_file_location("bench", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _add_eval_command(sub) -> None:
    """`exphil eval`: the teacher-forced scores, or the bot judged the way it plays."""
    p = sub.add_parser("eval", help="loss and accuracy of a trained run on replays")
    p.add_argument("run")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--replays", help="a .slp file or a directory (searched recursively; default: the run's "
                        "validation games)")
    source.add_argument("--data", help="a dataset folder (`exphil ingest`)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--by", choices=GROUPINGS, help="also per group of player views: the player's character, the "
                   "opponent's character or the player's connect code")
    p.add_argument("--top", type=int, default=8, help="--by: the groups with the most frames shown by name, the rest "
                   "pooled (default: 8)")
    judged = p.add_argument_group("judge the bot the way it plays (instead of the teacher-forced scores; README: "
                                  "judging play)")
    judged.add_argument("--closed-controller", action="store_true", help="walk the replays reading back the "
                        "bot's own inputs: input changes, holds, divergence from the players'")
    judged.add_argument("--skills", action="store_true", help="L-cancel, tech, wavedash and ledge-option "
                        "rates of the bot beside the players'")
    judged.add_argument("--field-scores", action="store_true", help="HAL/MIMIC-style button classes and 37 "
                        "main-stick clusters: macro-F1 and top-1")
    judged.add_argument("--temperature", type=float, default=1.0, help="the Agent's sampling temperature")
    judged.add_argument("--seed", type=int, default=0, help="seed of the sampling rows")
    judged.add_argument("--hold", type=float, nargs=2, metavar=("BUTTONS", "STICKS"), help="the decision rule's "
                        "hold instead of the run's (0 0: a new number every frame; README: the decision rule)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exphil", description="Melee bots from Slippi replays.",
                                     epilog="`exphil COMMAND --help` shows each command's flags and examples.")
    parser.add_argument("--version", action="version", version=f"exphil {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a spec on replays into a run folder",
                       description="Train a spec on replays. Flags override the preset.")
    p.add_argument("spec", nargs="?", help="spec file or shipped spec name (e.g. specs/mamba.toml, mamba)")
    p.add_argument("--preset", choices=sorted(PRESETS), help=", ".join(
        f"{k}: {v['spec']}, {v['epochs']} epoch(s)" for k, v in PRESETS.items()))
    _training_flags(p)

    p = sub.add_parser("distill", help="train a student spec on a teacher run's soft targets",
                       description="loss = alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * hard loss")
    p.add_argument("--teacher", required=True, help="run folder of the teacher")
    p.add_argument("--student", required=True, help="spec of the student (e.g. specs/mlp.toml)")
    p.add_argument("--temperature", type=float, default=2.0, dest="distill_temperature",
                   help="softens both distributions (T)")
    p.add_argument("--alpha", type=float, default=0.7, dest="distill_alpha", help="weight of the teacher's term")
    _training_flags(p)

    _add_eval_command(sub)

    p = sub.add_parser("hold", help="choose how long the decision rule holds its numbers, so that the bot reading "
                                    "back its own inputs changes them as often as players do (written to run.json)")
    p.add_argument("run")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--replays", help="games to choose it on (default: the run's training games)")
    source.add_argument("--data", help="a dataset folder, instead of --replays")
    p.add_argument("--games", type=int, default=HOLD_GAMES, help=f"how many of them (a seeded choice; default: "
                   f"{HOLD_GAMES})")
    p.add_argument("--quiet", action="store_true", help="no log lines")

    p = sub.add_parser("compile", help="write a spec's untrained window and step graphs")
    p.add_argument("spec", help="spec file or built-in spec name")
    p.add_argument("--out", required=True, help="folder for window.onnx and step.onnx")
    p.add_argument("--window", type=int, help="frames in the window graph (default: the spec's)")

    p = sub.add_parser("ingest", help="parse new and changed replays into a dataset folder (for train --data)")
    p.add_argument("replays", help="a .slp file or a folder of them (searched recursively)")
    p.add_argument("--out", required=True, help="the dataset folder (created, or added to)")
    p.add_argument("--workers", type=int, help="processes that parse replays (default: one per core)")
    p.add_argument("--ray", metavar="ADDRESS", help="parse on this Ray cluster instead (auto, local or an address; "
                   "the replays and --out must be folders every node reaches)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")

    p = sub.add_parser("data", help="what a dataset or a replay collection holds: games, frames, characters, "
                                    "stages, versions, skipped")
    p.add_argument("replays", help="a dataset folder (`exphil ingest`), a .slp file or a folder of replays")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--ray", metavar="ADDRESS", help="parse new replays as tasks on this Ray cluster (auto, local or "
                   "an address; the cache folder must be one every node reaches)")

    p = sub.add_parser("plot", help="write curves.png (loss and accuracy per epoch) into a run folder")
    p.add_argument("run")
    p = sub.add_parser("specs", help="the built-in specs, one line each; `specs show NAME` prints one to edit")
    p.add_argument("action", nargs="?", choices=["show"])
    p.add_argument("name", nargs="?")
    _add_play_commands(sub)
    sub.add_parser("bench", help="can this machine run each spec? (bench.py; `exphil bench --help`)", add_help=False)
    for command, p in sub.choices.items():
        _finish_help(p, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: exit code 0 ok, 1 runtime error, 2 usage error, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = argv[:1] == ["bench"]  # bench.py parses its own flags
    args = None
    handler = logging.StreamHandler()  # the library's messages, one per line on stderr
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not twice where a dependency configured the root logger
    try:
        args = None if bench else _parser().parse_args(argv)
        return _bench().main(argv[1:]) if bench else _command(args)
    except ExphilError as e:
        print(f"exphil: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("onnxruntime"):
            raise
        print("exphil: error: no onnxruntime in this environment: pip install 'exphil[cpu]' (or 'exphil[gpu]'; "
              "'exphil[train]' for training too)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        resumable = out is not None and has_checkpoint(Path(out) / "train")
        print("exphil: interrupted" + (f"; continue the run with: exphil train --resume --out {out} (it restarts "
                                       f"from its last checkpoint)" if resumable else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped reading (`exphil specs | head -3`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print(f"exphil: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _cmd_train(args) -> None:
    """train and distill: the run, then the line saying what was exported (and the teacher's agreement)."""
    if args.command == "train":
        res = _run_training(args, dict(PRESETS[args.preset]) if args.preset else {})
    else:
        res = _run_training(args, {}, teacher=args.teacher)
    row, best = res.info["exported_metrics"] or {}, res.info["best"]
    print(f"{res.path}: exported " + (f"epoch {best['epoch']} (best validation loss): "
                                      + summary_line(row, "val") if "val_loss" in row and best["epoch"]
                                      else "the last step (no validation games)"))
    if "distillation" in res.info:
        rep = res.info["distillation"]
        print("agreement with the teacher: " + ", ".join(f"{h} {v:.3f}" for h, v in rep["agreement"].items()))
        print("step latency p50: " + ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in rep["step_latency_ms"].items()))


def _cmd_eval(args) -> None:
    """eval: judged play (--closed-controller, --skills, --field-scores), or the teacher-forced scoreboard."""
    if args.closed_controller or args.skills or args.field_scores:
        hold = dict(zip(HOLD_GROUPS, args.hold)) if args.hold else None
        res = judge(args.run, args.replays, args.data, args.closed_controller, args.skills, args.field_scores,
                    args.seed, args.temperature, hold)
        print(json.dumps(res, indent=2) if args.json else f"{args.run}: " + judge_tables(res))
        return
    if args.top < 1:
        raise UsageError(f"--top {args.top}: must be at least 1")
    res = evaluate(args.run, args.replays, data=args.data, by=args.by, top=args.top)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{args.run}: {res['games']} games, {res['frames']:,} scored frames, {res['target']}")
    print("  " + summary_line({f"eval_{k}": v for k, v in res.items()}, "eval"))
    print(scoreboard(res))
    if args.by:
        print(group_table(res["by"][args.by], args.by))


def _cmd_hold(args) -> None:
    if args.games < 1:
        raise UsageError(f"--games {args.games}: must be at least 1")
    tune_hold(args.run, args.replays, args.data, args.games, quiet=args.quiet)


def _cmd_compile(args) -> None:
    for path in Model(_spec_arg(args.spec)).save(args.out, args.window):
        print(path)


def _cmd_ingest(args) -> None:
    """ingest: the dataset updated, each skipped replay named, then one summary line."""
    log = _log(args.quiet)
    t0 = time.perf_counter()
    col = ingest(args.replays, args.out, log, workers=args.workers, ray=args.ray)
    by_hash = {r["hash"]: r for r in col.dataset.rows()}
    skipped = [*col.unreadable, *({"path": str(p), "reason": r} for p, r in col.errors.items()),
               *({"path": str(p), "reason": by_hash[h]["skipped"]} for p, h in col.hashes.items()
                 if by_hash.get(h, {}).get("skipped"))]
    for s in skipped:
        log(f"skipped {s['path']}: {s['reason']}")
    print(f"{args.out}: {len(col.paths)} replays found, {len(set(col.hashes.values()))} distinct, "
          f"{len(skipped)} skipped; the dataset holds {sum(not r['skipped'] for r in by_hash.values())} games "
          f"({time.perf_counter() - t0:.1f} s)")


def _cmd_data(args) -> None:
    """data: what a replay folder or a dataset holds."""
    dataset = (Path(args.replays) / "manifest.sqlite").is_file()
    res = describe(None if dataset else args.replays, log=_log(False), data=args.replays if dataset else None,
                   ray=args.ray)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    counts = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "none"
    print(f"{args.replays}: {res['games']} games, {res['frames']:,} frames ({res['hours']:.1f} hours of "
          f"play), {sum(res['skipped'].values())} of {res['replays']} replays skipped")
    print(f"  characters (player views): {counts(res['characters'])}")
    print(f"  stages: {counts(res['stages'])}")
    print(f"  Slippi versions: {counts(res['versions'])}")
    print(f"  skipped: {counts(res['skipped'])}")


def _cmd_specs(args) -> None:
    if args.action != "show":
        for path in sorted(SPECS_DIR.glob("*.toml")):
            spec = load_spec(path)
            print(f"{spec.name:<12}{estimate_params(spec):>11,} params  {spec.description}")
        return
    if not args.name:
        raise UsageError("specs show needs a name: " + ", ".join(p.stem for p in sorted(SPECS_DIR.glob("*.toml"))))
    print(_spec_file(args.name).read_text(), end="")


COMMANDS = {"train": _cmd_train, "distill": _cmd_train, "eval": _cmd_eval, "hold": _cmd_hold, "compile": _cmd_compile,
            "ingest": _cmd_ingest, "data": _cmd_data, "plot": lambda args: print(plot(args.run)), "specs": _cmd_specs,
            "quantize": _cmd_quantize, "play": _cmd_play}  # each command's function (bench: bench.py's main)


def _command(args) -> int:
    COMMANDS[args.command](args)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
