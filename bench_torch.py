"""The shipped specs written by hand in PyTorch, for `bench.py --throughput --vs-torch`.

Each model is what a PyTorch user would write for the same math as exphil's graphs (eager mode,
CPU), started from the same weights as an `exphil.Model` and trained on the same loss with
torch.optim.AdamW. Only bench.py imports this file, and only when asked to: exphil itself never
needs PyTorch.

exphil stores Linear weights [in, out]; nn.Linear keeps them [out, in], so they load transposed
(`Weights` keeps each parameter's layout, to read gradients back under exphil's names).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import exphil


# (to torch's layout, back to exphil's) for the parameters stored differently
SAME = (lambda a: a, lambda t: t)
TRANSPOSED = (lambda a: a.T, lambda t: t.T)
CONV = (lambda a: a.T[:, None, :], lambda t: t[:, 0, :].T)  # exphil [K, D], Conv1d [D, 1, K]


class Weights:
    """An exphil.Model's parameters, copied into torch tensors; remembers which tensor (and in
    which layout) each name went to."""

    def __init__(self, params: dict[str, np.ndarray]):
        self.params, self.placed = params, {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.params[name]

    def put(self, name: str, param: torch.Tensor, layout=SAME) -> None:
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(layout[0](self.params[name]))))
        self.placed[name] = (param, layout[1])

    def parameter(self, name: str) -> nn.Parameter:
        param = nn.Parameter(torch.empty(self.params[name].shape))
        self.put(name, param)
        return param

    def gradients(self) -> dict[str, np.ndarray]:
        """The last backward pass's gradients, by exphil name and in exphil's layout."""
        return {name: back(param.grad).numpy() for name, (param, back) in self.placed.items()}


def linear(p: Weights, name: str, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(*p[f"{name}.weight"].shape, bias=bias)
    p.put(f"{name}.weight", layer.weight, TRANSPOSED)
    if bias:
        p.put(f"{name}.bias", layer.bias)
    return layer


def norm(kind: str, p: Weights, name: str, width: int) -> nn.Module:
    if kind == "layer":
        layer = nn.LayerNorm(width, eps=1e-5)
        p.put(f"{name}.bias", layer.bias)
    elif kind == "rms":
        layer = nn.RMSNorm(width, eps=1e-5)
    else:
        return nn.Identity()
    p.put(f"{name}.weight", layer.weight)
    return layer


def causal_conv(p: Weights, name: str, width: int, taps: int) -> nn.Conv1d:
    """Depthwise causal conv over time (padded with K-1 zeros, the zero initial state; the
    caller keeps the first L outputs). exphil's weight is [K, D] with tap K-1 the current frame,
    which is Conv1d's cross-correlation order."""
    conv = nn.Conv1d(width, width, taps, groups=width, padding=taps - 1)
    p.put(f"{name}.weight", conv.weight, CONV)
    p.put(f"{name}.bias", conv.bias)
    return conv


def run_conv(conv: nn.Conv1d, u: torch.Tensor) -> torch.Tensor:
    """[B, L, D] -> [B, L, D] through a causal conv."""
    return conv(u.transpose(1, 2))[..., :u.shape[1]].transpose(1, 2)


ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "gelu": F.gelu}  # gelu: the exact (erf) form


# ---- mixers: [B, L, d] -> [B, L, d] from a zero initial state --------------------------------------

class Dense(nn.Module):
    def __init__(self, p: Weights, name: str, cfg: exphil.Dense):
        super().__init__()
        self.linear, self.act = linear(p, f"{name}.linear"), ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.act(self.linear(x))


class LSTM(nn.Module):
    """nn.LSTM (same gate order i, f, g, o). exphil has one bias; nn.LSTM has two, so the
    hidden-side bias stays frozen at zero (training it too would double the bias's step)."""

    def __init__(self, p: Weights, name: str, cfg: exphil.LSTM):
        super().__init__()
        w_ih, w_hh = p[f"{name}.w_ih"], p[f"{name}.w_hh"]
        self.rnn = nn.LSTM(w_ih.shape[0], w_hh.shape[0], batch_first=True)
        p.put(f"{name}.w_ih", self.rnn.weight_ih_l0, TRANSPOSED)
        p.put(f"{name}.w_hh", self.rnn.weight_hh_l0, TRANSPOSED)
        p.put(f"{name}.bias", self.rnn.bias_ih_l0)
        nn.init.zeros_(self.rnn.bias_hh_l0).requires_grad_(False)

    def forward(self, x):
        return self.rnn(x)[0]


class GRU(nn.Module):
    """nn.GRU: the same cell (gates r, z, n; the reset gate scales the hidden product and its bias)."""

    def __init__(self, p: Weights, name: str, cfg: exphil.GRU):
        super().__init__()
        w_ih, w_hh = p[f"{name}.w_ih"], p[f"{name}.w_hh"]
        self.rnn = nn.GRU(w_ih.shape[0], w_hh.shape[0], batch_first=True)
        for ours, theirs, layout in (("w_ih", "weight_ih_l0", TRANSPOSED), ("w_hh", "weight_hh_l0", TRANSPOSED),
                                     ("b_ih", "bias_ih_l0", SAME), ("b_hh", "bias_hh_l0", SAME)):
            p.put(f"{name}.{ours}", getattr(self.rnn, theirs), layout)

    def forward(self, x):
        return self.rnn(x)[0]


class Mamba(nn.Module):
    """Mamba-1 with the sequential selective scan of the reference implementation:
    h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t h_t + D u_t, gated by SiLU(z)."""

    def __init__(self, p: Weights, name: str, cfg: exphil.Mamba):
        super().__init__()
        self.D, self.N = p[f"{name}.D"].shape[0], cfg.state
        self.R = p[f"{name}.dt_proj.weight"].shape[0]
        self.in_proj = linear(p, f"{name}.in_proj", bias=False)
        self.conv = causal_conv(p, f"{name}.conv", self.D, cfg.conv)
        self.x_proj = linear(p, f"{name}.x_proj", bias=False)
        self.dt_proj = linear(p, f"{name}.dt_proj")
        self.A_log, self.skip = p.parameter(f"{name}.A_log"), p.parameter(f"{name}.D")
        self.out_proj = linear(p, f"{name}.out_proj", bias=False)

    def forward(self, x):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(run_conv(self.conv, u))
        dt, b, c = self.x_proj(u).split([self.R, self.N, self.N], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # [B, L, D]
        decay = torch.exp(dt[..., None] * -torch.exp(self.A_log))  # [B, L, D, N]
        drive = (dt * u)[..., None] * b[:, :, None, :]
        h, ys = torch.zeros_like(decay[:, 0]), []
        # unbind: one view per frame with one backward node (indexing frame t instead would
        # make autograd write a full-size gradient per frame)
        for dA, dBu, ct in zip(decay.unbind(1), drive.unbind(1), c.unbind(1)):
            h = dA * h + dBu
            ys.append(h @ ct[..., None])  # [B, D, 1]
        y = torch.cat(ys, dim=-1).transpose(1, 2)  # [B, L, D]
        return self.out_proj((y + u * self.skip) * F.silu(z))


class GatedSSM(nn.Module):
    """[u, z] = x W_in; u = SiLU(conv(u)); a = sigmoid(u W_a + b_a); h_t = a_t h_{t-1} + (1 - a_t) u_t;
    y = (h * SiLU(z)) W_out."""

    def __init__(self, p: Weights, name: str, cfg: exphil.GatedSSM):
        super().__init__()
        self.in_proj = linear(p, f"{name}.in_proj", bias=False)
        width = self.in_proj.out_features // 2
        self.conv = causal_conv(p, f"{name}.conv", width, cfg.conv) if cfg.conv else None
        self.gate = linear(p, f"{name}.gate")
        self.out_proj = linear(p, f"{name}.out_proj", bias=False)

    def forward(self, x):
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(run_conv(self.conv, u) if self.conv is not None else u)
        a = torch.sigmoid(self.gate(u))
        drive = (1 - a) * u
        h, hs = torch.zeros_like(u[:, 0]), []
        for a_t, drive_t in zip(a.unbind(1), drive.unbind(1)):  # unbind: see Mamba
            h = a_t * h + drive_t
            hs.append(h)
        return self.out_proj(torch.stack(hs, dim=1) * F.silu(z))


class Attention(nn.Module):
    """Causal multi-head attention over a band of W frames (key j visible to query i iff
    i - W < j <= i) with per-head ALiBi slopes and optional per-head LayerNorm on q and k.
    From a zero state the carried keys are all invalid, so only the window's own keys count."""

    def __init__(self, p: Weights, name: str, cfg: exphil.Attention, window: int):
        super().__init__()
        self.qkv, self.out = linear(p, f"{name}.qkv"), linear(p, f"{name}.out")
        self.d, self.H, self.W = self.out.in_features, cfg.heads, cfg.window or window
        self.dh = self.d // self.H
        self.q_norm = norm("layer", p, f"{name}.q_norm", self.dh) if cfg.qk_norm else nn.Identity()
        self.k_norm = norm("layer", p, f"{name}.k_norm", self.dh) if cfg.qk_norm else nn.Identity()
        slopes = 2.0 ** (-8.0 * torch.arange(1, self.H + 1) / self.H) if cfg.alibi else torch.zeros(self.H)
        self.register_buffer("slopes", slopes[:, None, None], persistent=False)

    def bias(self, L: int) -> torch.Tensor:
        """[H, L, L]: -slope * distance inside the band, -inf outside."""
        dist = torch.arange(L)[:, None] - torch.arange(L)[None, :]
        return torch.where((dist >= 0) & (dist < self.W), -self.slopes * dist, -math.inf)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (t.view(B, L, self.H, self.dh) for t in self.qkv(x).chunk(3, dim=-1))
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(L))  # scale 1/sqrt(dh)
        return self.out(o.transpose(1, 2).reshape(B, L, self.d))


MIXERS = {exphil.Dense: Dense, exphil.LSTM: LSTM, exphil.GRU: GRU, exphil.Mamba: Mamba, exphil.GatedSSM: GatedSSM,
          exphil.Attention: Attention}


def supports(spec: exphil.Spec) -> bool:
    """Whether every mixer of the spec has a PyTorch counterpart here (the original seven,
    without shared blocks or a return-to-go input or value head)."""
    return all(type(b.mixer) in MIXERS and not b.share for b in spec.blocks) and not spec.returns_used


# ---- the model ---------------------------------------------------------------------------------------

class Block(nn.Module):
    """x + mixer(norm(x)) (or mixer(norm(x)) without the residual), then an optional pre-norm
    GELU feed-forward with its own residual."""

    def __init__(self, p: Weights, i: int, block: exphil.Block, width: int, window: int, dropout: float):
        super().__init__()
        name, extra = f"layers.{i}", ({"window": window} if isinstance(block.mixer, exphil.Attention) else {})
        self.norm = norm(block.norm, p, f"{name}.norm", width)
        self.mixer = MIXERS[type(block.mixer)](p, f"{name}.mixer", block.mixer, **extra)
        self.residual, self.drop = block.residual, nn.Dropout(dropout)
        self.ffn = nn.Sequential(norm("layer", p, f"{name}.ffn_norm", width), linear(p, f"{name}.ffn.up"), nn.GELU(),
                                 linear(p, f"{name}.ffn.down"), nn.Dropout(dropout)) if block.ffn else None

    def forward(self, x):
        y = self.drop(self.mixer(self.norm(x)))
        x = x + y if self.residual else y
        return x + self.ffn(x) if self.ffn is not None else x


class MarkovHeads(nn.Module):
    """Per head, the row of a learned table picked by the current controller's class, which is
    recovered from the controller features the way the labels encode it."""

    def __init__(self, p: Weights):
        super().__init__()
        self.tables = nn.ParameterDict({h: p.parameter(f"heads.markov.{h}") for h in exphil.HEADS})

    def forward(self, num):
        ctrl = num[..., exphil._CTRL:exphil._CTRL + 13]
        released, pressed = self.tables["buttons"]
        parts = [released + ctrl[..., :8] * (pressed - released)]
        for j, (h, k) in enumerate(list(exphil.HEADS.items())[1:]):
            v = ctrl[..., 8 + j]
            if h != "shoulder":  # stick features are (v - 0.5) * 2 for v in 0..1
                v = v * 0.5 + 0.5
            ids = torch.round(torch.clamp(v * (k - 1), 0, k - 1)).long()
            parts.append(F.embedding(ids, self.tables[h]))
        return torch.cat(parts, dim=-1)


class Model(nn.Module):
    """embeddings + numeric features -> in_proj -> blocks -> final norm -> heads (+ Markov tables)."""

    def __init__(self, model: exphil.Model):
        super().__init__()
        spec, p = model.spec, Weights(model.params)
        self.weights = p
        self.embed = nn.ParameterDict({t: p.parameter(f"embed.{t}") for t in exphil.EMBED_TABLES})
        self.in_proj, self.drop = linear(p, "in_proj"), nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(Block(p, i, b, spec.hidden, spec.window, spec.dropout)
                                    for i, b in enumerate(spec.layers))
        self.final_norm = norm(spec.final_norm, p, "final_norm", spec.hidden)
        self.hidden = nn.Sequential(linear(p, "heads.hidden"), nn.GELU()) if spec.heads.hidden else nn.Identity()
        self.out = linear(p, "heads.out")
        self.markov = MarkovHeads(p) if spec.heads.markov else None

    def forward(self, cat, num):
        """cat [B, L, C] int64, num [B, L, F] -> {head: logits [B, L, k]}."""
        feats = [F.embedding(cat[..., i], self.embed[table]) for i, (_, table) in enumerate(exphil.CAT_FIELDS)]
        x = self.drop(self.in_proj(torch.cat([*feats, num], dim=-1)))
        for block in self.blocks:
            x = block(x)
        logits = self.out(self.hidden(self.final_norm(x)))
        if self.markov is not None:
            logits = logits + self.markov(num)
        return dict(zip(exphil.HEADS, logits.split(list(exphil.HEADS.values()), dim=-1)))


def loss(heads: dict, batch: dict) -> torch.Tensor:
    """exphil's hard loss: per head, the cross-entropy against target probabilities (BCE summed
    over the 8 buttons) averaged over unmasked frames; summed over heads."""
    mask = batch["mask"]
    count = mask.sum().clamp(min=1.0)
    total = 0
    for h, x in heads.items():
        p = batch[f"target.{h}"]
        if h == "buttons":
            per_frame = F.binary_cross_entropy_with_logits(x, p, reduction="none").sum(-1)
        else:
            per_frame = -(p * F.log_softmax(x, dim=-1)).sum(-1)
        total = total + (per_frame * mask).sum() / count
    return total


class Trainer:
    """A hand-written PyTorch training step for an exphil.Model: same weights, loss and AdamW
    hyper-parameters as exphil.Trainer (onnxruntime-training's AdamW defaults: betas
    (0.9, 0.999), eps 1e-6; weight decay on every parameter). onnxruntime's AdamW is the
    Hugging Face form (eps added to the uncorrected sqrt(v), decay after the update): its
    steps differ from torch's only for gradients near eps, and the work per step is the same."""

    def __init__(self, model: exphil.Model, lr: float = 1e-3, weight_decay: float = 0.01):
        self.model = Model(model)
        params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay,
                                           fused=True)

    @staticmethod
    def tensors(batch: dict) -> dict:
        """An exphil batch (arrays) as tensors, sharing memory: converted once, as a data loader would."""
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def step(self, batch: dict) -> float:
        """One AdamW step on a batch of tensors; returns the loss before the update."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss(self.model(batch["cat"], batch["num"]), batch)
        value.backward()
        self.optimizer.step()
        return float(value.detach())

    def gradients(self) -> dict[str, np.ndarray]:
        """The last step's gradients by exphil parameter name, in exphil's layout."""
        return self.model.weights.gradients()

    def evaluate(self, batch: dict) -> float:
        self.model.eval()
        with torch.no_grad():
            return float(loss(self.model(batch["cat"], batch["num"]), batch))
