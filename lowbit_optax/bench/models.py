"""Flax NNX models used by the benchmark, the examples and the tests.

The language models (a transformer, and an MLP without attention) keep every projection
a 2-D ``nnx.Linear`` kernel laid out (in, out), as Flax does, so per-layer rules
(SlimAdam) and low-rank projection see plain matrices. The transformer's parameter
names: ``embed``, ``blocks/i/{attn/{q,k,v,o},mlp/{up,down},norm1,norm2}``, ``norm_f``,
``lm_head`` (absent with tied embeddings).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 256
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    seq_len: int = 128
    tie_embeddings: bool = False  # GPT-2: the output layer is the token embedding


class Attention(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        init = nnx.initializers.normal(stddev=width**-0.5)
        self.q = nnx.Linear(width, width, use_bias=False, kernel_init=init, rngs=rngs)
        self.k = nnx.Linear(width, width, use_bias=False, kernel_init=init, rngs=rngs)
        self.v = nnx.Linear(width, width, use_bias=False, kernel_init=init, rngs=rngs)
        self.o = nnx.Linear(width, width, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        y = jax.nn.dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(y.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.attn = Attention(cfg.width, cfg.heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(cfg.width, rngs=rngs)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio * cfg.width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerLM(nnx.Module):
    """Decoder-only byte-level transformer (pre-LayerNorm, learned positions)."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.width)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm_f = nnx.LayerNorm(cfg.width, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(cfg.width, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[...][:t]
        for block in self.blocks:
            x = block(x)
        x = self.norm_f(x)
        return self.embed.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)


@dataclasses.dataclass(frozen=True)
class MLPLMConfig:
    vocab_size: int = 256
    context: int = 8  # bytes each prediction sees
    embed: int = 64  # per byte: the first layer takes context * embed values
    hidden: int = 512
    seq_len: int = 128


class MLPLM(nnx.Module):
    """Byte-level MLP language model, no attention (Bengio et al. 2003): each next byte
    from the embeddings of the ``context`` bytes before it, concatenated, through two
    GELU layers. Parameter names: ``embed``, ``l1``, ``l2``, ``out``."""

    def __init__(self, cfg: MLPLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.embed, rngs=rngs)
        self.l1 = nnx.Linear(cfg.context * cfg.embed, cfg.hidden, rngs=rngs)
        self.l2 = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.out = nnx.Linear(cfg.hidden, cfg.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        c = self.cfg.context
        padded = jnp.pad(tokens, ((0, 0), (c - 1, 0)))  # byte 0 before the text
        windows = jnp.stack([padded[:, i : i + t] for i in range(c)], axis=-1)  # (b, t, c)
        x = self.embed(windows).reshape(b, t, c * self.cfg.embed)
        return self.out(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))


class MLPClassifier(nnx.Module):
    """Two hidden layers with GELU, for the digits task."""

    def __init__(self, din: int = 64, hidden: int = 256, classes: int = 10, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))


def lm_loss(model: TransformerLM | MLPLM, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    logits = model(tokens).astype(jnp.float32)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1))


def classifier_loss(model: MLPClassifier, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model(x).astype(jnp.float32)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))
