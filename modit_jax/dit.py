"""The diffusion transformer (DiT) that denoises a query embedding (DESIGN.md section 5).

The sequence is `[noisy query token; context item tokens; domain token]`; the diffusion time
conditions every block through adaLN-Zero, and the prediction is read at the query token. All
adaLN modulations and the output projection start at zero, so a freshly initialised model outputs
exactly zero for every input (the policy starts equal to its reference once both share params).

The module is pure `flax.linen`: params are a plain pytree, used as
`model.apply({'params': params}, x_t, t, context, context_mask, domain)`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

# The sinusoidal time embedding sees t * _TIME_SCALE, so t in [0, 1] spans the usual DDPM range of
# frequencies (integer steps up to 1000).
_TIME_SCALE = 1000.0
_MAX_PERIOD = 10000.0
# Masked attention logits; large enough that exp underflows to exactly 0 after max-subtraction.
_MASK_VALUE = -1e30

_dense_init = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def timestep_embedding(t: jnp.ndarray, dim: int) -> jnp.ndarray:
  """Sinusoidal embedding [B, dim] of diffusion times t [B] in [0, 1]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * _TIME_SCALE)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


@jax.custom_vjp
def _low_precision_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
  """x[..., k] @ w[k, n] on low-precision operands, accumulated and returned in float32.

  A low-precision output (Flax's plain `dtype=bfloat16`) sends XLA:CPU to a slow matmul: on an
  AMX CPU a bfloat16 x bfloat16 -> float32 matmul ran 5-6x faster than float32, and
  bfloat16 -> bfloat16 no faster (docs/benchmarks.md). The custom VJP keeps the backward's
  matmuls on the same fast path; JAX's own rule would give them low-precision outputs.
  """
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(x, w):
  return _low_precision_matmul(x, w), (x, w)


def _low_precision_matmul_bwd(residuals, g):
  x, w = residuals
  dx = lax.dot_general(g.astype(w.dtype), w, (((g.ndim - 1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32)
  # dw contracts every leading (row) axis of x and g.
  leading = tuple(range(x.ndim - 1))
  rows = ((leading, leading), ((), ()))
  if jax.default_backend() == "cpu" and x.ndim < 3:
    # XLA:CPU runs a matmul contracting one leading axis in float32 whatever its operands'
    # dtype, so it gets float32 operands rather than a round trip through bfloat16. With two
    # or more contracted axes XLA transposes the operands into a standard low-precision
    # matmul, 2x faster than float32 here (docs/benchmarks.md). Chosen at trace time: the
    # model runs on the default backend.
    dw = lax.dot_general(x.astype(jnp.float32), g, rows)
  else:
    dw = lax.dot_general(x, g.astype(x.dtype), rows, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`nn.Dense`'s `dot_general` for a low-precision dtype: see `_low_precision_matmul`."""
  del precision, preferred_element_type  # float32 accumulation is the point
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"expected a Dense contraction, got {dimension_numbers}")
  return _low_precision_matmul(lhs, rhs)


def _dense(features: int, dtype: Any, name: str,
           kernel_init: nn.initializers.Initializer = _dense_init) -> nn.Dense:
  """A Dense layer whose matmul takes `dtype` operands; its output is always float32.

  Only the Dense layers see `dtype`: everything between them (residual stream, layer norms,
  modulation, attention softmax) runs in float32, the inputs and parameters' dtype.
  """
  mixed = jnp.dtype(dtype) != jnp.float32
  return nn.Dense(features, dtype=dtype, kernel_init=kernel_init, name=name,
                  dot_general=_dense_dot_general if mixed else None)


def _modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  # `1 + scale` so a zero-initialised adaLN leaves the normalised activations unchanged.
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class _Attention(nn.Module):
  """Multi-head self-attention with a key-padding mask.

  With `query_only`, only token 0 (the noisy query) attends and is returned: the last block's
  other outputs are never read, and XLA does not remove that dead work by itself.
  """
  width: int
  num_heads: int
  dtype: Any
  query_only: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray) -> jnp.ndarray:
    b, n, _ = x.shape
    head_dim = self.width // self.num_heads
    qkv = _dense(3 * self.width, self.dtype, "qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    # A split (not three index ops): its gradient is one concatenate instead of three
    # full-size zero pads and their sum (bench/train_step.py, docs/benchmarks.md).
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
    if self.query_only:
      q = q[:, :1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    # Padded keys are never attended to, so they cannot reach any real token (in particular the
    # query token the output is read from).
    logits = jnp.where(key_mask[:, None, None, :], logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, q.shape[1], self.width)
    return _dense(self.width, self.dtype, "proj")(out)


class _Block(nn.Module):
  """A pre-LN transformer block modulated by adaLN-Zero."""
  width: int
  num_heads: int
  mlp_ratio: int
  dtype: Any
  query_only: bool = False  # the last block: only the query token's output is needed

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray, key_mask: jnp.ndarray) -> jnp.ndarray:
    # Zero-init: every gate starts at 0, so each block starts as the identity.
    mod = _dense(6 * self.width, self.dtype, "adaLN", _zeros)(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    h = nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, name="norm1")(x)
    h = _Attention(self.width, self.num_heads, self.dtype, self.query_only, name="attn")(
        _modulate(h, shift_a, scale_a), key_mask)
    if self.query_only:
      x = x[:, :1]
    x = x + gate_a[:, None, :] * h
    h = nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, name="norm2")(x)
    h = _modulate(h, shift_m, scale_m)
    h = _dense(self.mlp_ratio * self.width, self.dtype, "fc1")(h)
    h = nn.gelu(h, approximate=True)
    h = _dense(self.width, self.dtype, "fc2")(h)
    return x + gate_m[:, None, :] * h


class DiT(nn.Module):
  """Predicts the clean query embedding from a noisy one, a context of items and a domain.

  Attributes:
    dim: item-embedding dimension d (input and output).
    num_domains: number of real domains; index `num_domains` is the learned NULL domain.
    width: transformer width.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide width).
    mlp_ratio: MLP hidden size as a multiple of width.
    max_context: largest context length L accepted.
    learned_positions: add a learned position embedding to context tokens (ordered
      trajectories); without it the output is invariant to permuting the context (seed sets).
    num_evidence: evidence vectors per example (modit_jax/evidence.py; 0: none). Each gets
      its own token (a shared projection plus a learned slot embedding); they are masked
      out for the null domain, so the unconditional branch of guidance sees the seeds only.
    dtype: the Dense layers' matmul operand dtype. With bfloat16 (mixed precision) they
      multiply bfloat16 operands and accumulate in float32. Everything else, params and the
      output included, is float32.
  """
  dim: int
  num_domains: int
  width: int = 256
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  max_context: int = 16
  learned_positions: bool = False
  num_evidence: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_t: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray,
               context_mask: jnp.ndarray, domain: jnp.ndarray,
               evidence: jnp.ndarray | None = None) -> jnp.ndarray:
    """Predicts the clean query embedding.

    Args:
      x_t: float [B, d] noisy query embedding.
      t: float [B] diffusion time in [0, 1].
      context: float [B, L, d] context item embeddings, L <= max_context.
      context_mask: bool [B, L], True for real items; padded slots never affect the output.
      domain: int [B] in [0, num_domains]; `num_domains` is the null domain.
      evidence: float [B, num_evidence, d], required when num_evidence > 0 (else None).

    Returns:
      float32 [B, d] prediction, read at the query token.
    """
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    length = context.shape[1]
    if length > self.max_context:
      raise ValueError(f"context length {length} exceeds max_context {self.max_context}")
    context_mask = context_mask.astype(bool)
    # Zero the padded slots so that even non-finite garbage there cannot leak through 0 * inf.
    context = jnp.where(context_mask[..., None], context, 0)

    query_tok = _dense(self.width, self.dtype, "query_embed")(x_t)[:, None, :]
    context_tok = _dense(self.width, self.dtype, "context_embed")(context)
    if self.learned_positions:
      pos = self.param("context_pos", nn.initializers.normal(0.02),
                       (self.max_context, self.width))
      context_tok = context_tok + pos[None, :length]
    domain_tok = nn.Embed(self.num_domains + 1, self.width,
                          embedding_init=nn.initializers.normal(0.02),
                          name="domain_embed")(domain)[:, None, :]
    ones = jnp.ones((x_t.shape[0], 1), bool)
    tokens, masks = [query_tok, context_tok], [ones, context_mask]
    if self.num_evidence:
      if evidence is None or evidence.shape[1:] != (self.num_evidence, self.dim):
        raise ValueError(f"this model reads evidence [B, {self.num_evidence}, {self.dim}]; got "
                         f"{None if evidence is None else evidence.shape}")
      slots = self.param("evidence_slot", nn.initializers.normal(0.02),
                         (self.num_evidence, self.width))
      tokens.append(_dense(self.width, self.dtype, "evidence_embed")(evidence) + slots[None])
      real = (domain != self.num_domains)[:, None]
      masks.append(jnp.broadcast_to(real, (x_t.shape[0], self.num_evidence)))
    elif evidence is not None:
      raise ValueError("this model reads no evidence (num_evidence = 0); got some")
    x = jnp.concatenate(tokens + [domain_tok], axis=1)
    key_mask = jnp.concatenate(masks + [ones], axis=1)

    c = timestep_embedding(t, self.width)
    c = _dense(self.width, self.dtype, "time_mlp1", nn.initializers.normal(0.02))(c)
    c = _dense(self.width, self.dtype, "time_mlp2", nn.initializers.normal(0.02))(nn.silu(c))

    for i in range(self.depth):
      x = _Block(self.width, self.num_heads, self.mlp_ratio, self.dtype,
                 query_only=i == self.depth - 1, name=f"block{i}")(
          x, c, key_mask)

    # Final layer only at the query token: that is where the prediction is read.
    h = x[:, 0:1, :]
    mod = _dense(2 * self.width, self.dtype, "final_adaLN", _zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = nn.LayerNorm(use_scale=False, use_bias=False, epsilon=1e-6, name="final_norm")(h)
    h = _modulate(h, shift, scale)
    return _dense(self.dim, self.dtype, "out", _zeros)(h[:, 0])


def tiny(dim: int, num_domains: int, **overrides: Any) -> DiT:
  """A small DiT for tests (width 32, depth 2, 2 heads, max_context 16)."""
  kwargs = dict(width=32, depth=2, num_heads=2, max_context=16)
  kwargs.update(overrides)
  return DiT(dim=dim, num_domains=num_domains, **kwargs)


def init_params(model: DiT, rng: jax.Array, batch_size: int = 1,
                context_len: int | None = None) -> Any:
  """Initialises `model` on dummy inputs and returns its params pytree."""
  length = model.max_context if context_len is None else context_len
  evidence = (jnp.zeros((batch_size, model.num_evidence, model.dim), jnp.float32)
              if model.num_evidence else None)

  # Jitted: one compile is far cheaper than dispatching (and compiling) every op eagerly.
  @jax.jit
  def init(rng: jax.Array) -> Any:
    return model.init(
        rng,
        jnp.zeros((batch_size, model.dim), jnp.float32),
        jnp.zeros((batch_size,), jnp.float32),
        jnp.zeros((batch_size, length, model.dim), jnp.float32),
        jnp.ones((batch_size, length), bool),
        jnp.zeros((batch_size,), jnp.int32), evidence)["params"]

  return init(rng)


def flops_per_example(model: DiT, context_len: int) -> float:
  """Forward-pass matmul FLOPs per example (2*m*n*k per Dense and attention matmul).

  A training step (forward + backward) costs about 3x this.
  """
  w, d, n = model.width, model.dim, context_len + model.num_evidence + 2
  hidden = model.mlp_ratio * w
  flops = 2 * d * w                    # query token projection
  flops += 2 * (context_len + model.num_evidence) * d * w  # context and evidence projections
  flops += 2 * (2 * w * w)             # time MLP (frequency dim = width)
  per_block = (2 * w * 6 * w           # adaLN modulation
               + 2 * n * w * 3 * w     # qkv
               + 2 * 2 * n * n * w     # logits and weights @ values
               + 2 * n * w * w         # attention output projection
               + 2 * 2 * n * w * hidden)  # MLP
  # The last block runs attention and MLP for the query token only (k, v still for all).
  last_block = (2 * w * 6 * w + 2 * n * w * 3 * w + 2 * 2 * n * w + 2 * w * w
                + 2 * 2 * w * hidden)
  flops += (model.depth - 1) * per_block + last_block
  flops += 2 * w * 2 * w + 2 * w * d   # final adaLN and output, at the query token only
  return float(flops)
