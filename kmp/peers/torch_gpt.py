"""A PyTorch GPT-2 training step of the same shape as a kmp GPT preset: the `kmp bench --peer
torch` reference.

Written for this project after the recipe common to nanoGPT and MiniMind: pre-norm blocks
(LayerNorm, attention through `scaled_dot_product_attention` with a causal mask, LayerNorm, MLP
with tanh-approximated GELU), learned position embeddings, a final LayerNorm and logits tied
to the token embedding; AdamW (beta 0.9, 0.95, eps 1e-8) with weight decay on matrices only,
global-norm clipping, and the same cosine schedule as the recipe. Mixed precision is
`torch.autocast` (bfloat16, or float16 with `torch.amp.GradScaler`), float32 master weights,
and optionally `torch.compile`. Shapes, initialization scale and optimizer settings follow
kmp's GPTConfig; the weights are this module's own (the two models are not made equal, only
the same size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_DTYPES = {"float32": None, "mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}


class Block(nn.Module):
    """One pre-norm transformer decoder block."""

    def __init__(self, width: int, heads: int, inner: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-5)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-5)
        self.up = nn.Linear(width, inner)
        self.down = nn.Linear(inner, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.norm2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2: embeddings, `layers` blocks, a final norm, logits tied to the token embedding."""

    def __init__(self, vocab: int, length: int, layers: int, width: int, heads: int,
                 inner: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(Block(width, heads, inner) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=1e-5)
        for name, p in self.named_parameters():  # GPT-2's N(0, 0.02) for matrices
            if p.dim() == 2:
                nn.init.normal_(p, std=0.01 if name == "tokens.weight" else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tokens.weight.t()


class TorchPeer:
    """A kmp GPTConfig's model and optimizer in PyTorch, stepped with numpy batches.

    Args:
        config: kmp.gpt.GPTConfig. Shape, batch, learning rate, weight decay, clipping,
            schedule (`steps`, `warmup_steps`) and seed.
        policy: str. "float32", "mixed_bfloat16" (autocast) or "mixed_float16" (autocast and a
            GradScaler).
        compile: bool. Wrap the model in `torch.compile`. Defaults to False.
        device: str. Defaults to "cuda" when available, else "cpu".
    """

    def __init__(self, config, policy: str, compile: bool = False, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(config.seed)
        model = GPT(config.vocab_size, config.seq_len, config.num_layers, config.hidden_dim,
                    config.num_heads, config.intermediate_dim).to(self.device)
        decay = [p for p in model.parameters() if p.dim() >= 2 and p is not
                 model.tokens.weight and p is not model.positions.weight]
        rest = [p for p in model.parameters() if all(p is not d for d in decay)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay},
             {"params": rest, "weight_decay": 0.0}],
            lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-8)
        self.model = model
        self.forward = torch.compile(model) if compile else model
        self.dtype = _DTYPES[policy]
        self.scaler = torch.amp.GradScaler(self.device, enabled=policy == "mixed_float16")
        self.config, self.step_count = config, 0

    def learning_rate(self) -> float:
        """The recipe's schedule: linear warm-up, then cosine decay to 10% (Keras CosineDecay)."""
        c, s = self.config, self.step_count
        if s < c.warmup_steps:
            return c.learning_rate * s / c.warmup_steps
        done = min(s - c.warmup_steps, max(1, c.steps - c.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * done / max(1, c.steps - c.warmup_steps)))
        return c.learning_rate * (0.1 + 0.9 * cosine)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on token ids `x` and next-token targets `y`; returns the loss."""
        x = torch.from_numpy(np.asarray(x, np.int64)).to(self.device)
        y = torch.from_numpy(np.asarray(y, np.int64)).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        with torch.autocast(self.device, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            logits = self.forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_count += 1
        return float(loss.detach())

    def gpu_memory(self, reset: bool = False) -> dict | None:
        """Like `kmp.backends.gpu_memory`, from torch's CUDA allocator (None on a CPU)."""
        if self.device != "cuda":
            return None
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return {"current": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated(),
                "resettable": True}

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_bytes(self) -> int:
        """Bytes of the parameters and the optimizer's moments."""
        moments = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                      for t in s.values() if torch.is_tensor(t))
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + moments
