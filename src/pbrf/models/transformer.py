"""A small decoder-only (causal) character-level Transformer.

Attention is written out with ``nn.Linear`` projections and an explicit causal mask (no
``nn.MultiheadAttention``, no fused ``scaled_dot_product_attention``) so that the model works
under :func:`torch.func.vmap`, :func:`torch.func.grad` and forward-mode :func:`torch.func.jvp`,
including forward-over-reverse. No dropout: every model in :mod:`pbrf.models` is a deterministic
function of its parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._layers import check_int

__all__ = ["transformer", "Transformer", "CausalSelfAttention", "Block"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``softmax(q kᵀ / √d_head + mask) v``, then a projection."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_heads, self.d_head).transpose(1, 2)  # [B, H, T, d_head]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, d_model]`` → ``[B, T, d_model]``; position ``t`` attends to positions
        ``≤ t``.
        """
        b, t, d = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU MLP)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: Tensor) -> Tensor:
        """The pre-norm block on ``x`` ``[B, T, d_model]``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token embedding + learned positional embedding, ``n_layers`` blocks, final LayerNorm,
    linear head.
    """

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int,
                 d_ff: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads, d_ff) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        """Long tokens ``[B, T]`` (``T ≤ seq_len``) → next-token logits ``[B, T, vocab_size]``."""
        t = tokens.shape[-1]
        if tokens.dim() != 2 or t > self.seq_len:
            raise ValueError(
                "Transformer expects long tokens of shape [B, T] with T <= "
                f"seq_len={self.seq_len}, "
                f"got shape {tuple(tokens.shape)}."
            )
        positions = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        return self.head(self.ln_f(self.blocks(x)))


def transformer(
    vocab_size: int, seq_len: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
        d_ff: int | None = None
) -> Transformer:
    """A small causal character-level Transformer language model.

    Args:
        vocab_size: number of tokens.
        seq_len: maximum sequence length (size of the learned positional embedding).
        d_model: embedding width; must be divisible by ``n_heads``.
        n_layers: number of Transformer blocks.
        n_heads: attention heads per block.
        d_ff: hidden width of the block MLPs (default ``4 * d_model``).

    Returns:
        A :class:`Transformer` mapping ``[B, T]`` long tokens to logits ``[B, T, vocab_size]``.
    """
    check_int("vocab_size", vocab_size)
    check_int("seq_len", seq_len)
    check_int("d_model", d_model)
    check_int("n_layers", n_layers)
    check_int("n_heads", n_heads)
    d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}.")
    return Transformer(vocab_size, seq_len, d_model, n_layers, n_heads, d_ff)
