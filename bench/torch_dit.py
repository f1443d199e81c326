"""The PyTorch peer of bench/train_step.py: modit_jax's DiT and its stage-1 train step in torch.

`DiT` is a port of `modit_jax.dit.DiT` (without evidence tokens): the same token layout
(query token, context tokens, domain token), adaLN-Zero blocks with zero-initialised
modulation and output, pre-LN without affine parameters (eps 1e-6), GELU with the tanh
approximation, and a last block that runs attention and MLP for the query token only.
`load_jax_params` copies a JAX params pytree into it, so both compute the same function.

`denoising_loss` is `models.denoising_loss_fn` (`diffusion.training_loss` with the
config's target space) given explicit draws of t, noise and domain dropout; `TrainStep`
is `engine.train_step`: value-and-grad, clip by global norm, AdamW on the warm-up + cosine
schedule, then the bias-corrected EMA of the parameters. Float32 only; on the CPU or a GPU
(the module's device).
"""

import math
from typing import Any, NamedTuple

from flax import traverse_util
import ml_collections
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from modit_jax import diffusion
from modit_jax import dit
from modit_jax import engine
from modit_jax import models

# The port reads the JAX modules' own constants, so that the two cannot drift apart.
# pylint: disable=protected-access
_TIME_SCALE = dit._TIME_SCALE
_MAX_PERIOD = dit._MAX_PERIOD
_COSINE_OFFSET = diffusion._COSINE_OFFSET
# pylint: enable=protected-access
_LN_EPS = 1e-6  # flax's LayerNorm(epsilon=1e-6) in dit.py
# How many steps' EMA weights one vectorised call of `engine.ema_weight` fills: the step itself
# then only indexes a table, rather than paying a JAX dispatch per update.
_EMA_CHUNK = 4096


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
  """`dit.timestep_embedding` in torch: sinusoidal embedding [B, dim] of times t [B]."""
  half = dim // 2
  freqs = torch.exp(-math.log(_MAX_PERIOD)
                    * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = (t.float() * _TIME_SCALE)[:, None] * freqs[None, :]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(x: torch.Tensor) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], eps=_LN_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  # shift, scale: [B, 1, W]. `1 + scale`, so a zero-initialised adaLN changes nothing.
  return x * (1 + scale) + shift


class _Attention(nn.Module):
  """Multi-head self-attention with a key-padding mask (`dit._Attention`)."""

  def __init__(self, width: int, num_heads: int, query_only: bool):
    super().__init__()
    self.num_heads, self.query_only = num_heads, query_only
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    b, n, width = x.shape
    # The qkv kernel's columns are laid out [3, heads, head_dim], as the JAX reshape reads them.
    q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if self.query_only:
      q = q[:, :, :1]
    # A boolean mask: padded keys get -inf (JAX: -1e30); the query and domain tokens are
    # always real, so no row is fully masked and both give exactly zero weight.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return self.proj(out.transpose(1, 2).reshape(b, q.shape[2], width))


class _Block(nn.Module):
  """A pre-LN transformer block modulated by adaLN-Zero (`dit._Block`)."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, query_only: bool):
    super().__init__()
    self.query_only = query_only
    self.adaLN = nn.Linear(width, 6 * width)  # pylint: disable=invalid-name (the JAX name)
    self.attn = _Attention(width, num_heads, query_only)
    self.fc1 = nn.Linear(width, mlp_ratio * width)
    self.fc2 = nn.Linear(mlp_ratio * width, width)

  def forward(self, x: torch.Tensor, silu_c: torch.Tensor,
              key_mask: torch.Tensor) -> torch.Tensor:
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(silu_c)[:, None].chunk(6, -1)
    h = self.attn(_modulate(_norm(x), shift_a, scale_a), key_mask)
    if self.query_only:
      x = x[:, :1]
    x = x + gate_a * h
    h = _modulate(_norm(x), shift_m, scale_m)
    h = self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
    return x + gate_m * h


class DiT(nn.Module):
  """`modit_jax.dit.DiT` in torch: predicts the clean query embedding [B, d].

  Submodules and parameters are named as the JAX params pytree (`block0.attn.qkv`, ...),
  with a Dense `kernel` as a Linear `weight` (transposed) and an Embed `embedding` as `weight`.
  """

  def __init__(self, dim: int, num_domains: int, width: int = 256, depth: int = 4,
               num_heads: int = 4, mlp_ratio: int = 4, max_context: int = 16,
               learned_positions: bool = False):
    super().__init__()
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.dim, self.num_domains, self.depth, self.max_context = dim, num_domains, depth, max_context
    self.query_embed = nn.Linear(dim, width)
    self.context_embed = nn.Linear(dim, width)
    self.context_pos = nn.Parameter(torch.zeros(max_context, width)) if learned_positions else None
    self.domain_embed = nn.Embedding(num_domains + 1, width)
    self.time_mlp1 = nn.Linear(width, width)
    self.time_mlp2 = nn.Linear(width, width)
    for i in range(depth):
      self.add_module(f"block{i}", _Block(width, num_heads, mlp_ratio, i == depth - 1))
    self.final_adaLN = nn.Linear(width, 2 * width)  # pylint: disable=invalid-name
    self.out = nn.Linear(width, dim)
    self._reset_parameters()

  @classmethod
  def like(cls, model: dit.DiT) -> "DiT":
    """The torch DiT of a JAX one's hyperparameters (float32; no evidence tokens)."""
    if model.num_evidence:
      raise ValueError("the torch DiT has no evidence tokens; got num_evidence "
                       f"{model.num_evidence}")
    return cls(model.dim, model.num_domains, model.width, model.depth, model.num_heads,
               model.mlp_ratio, model.max_context, model.learned_positions)

  def _reset_parameters(self) -> None:
    """dit.py's initialisers, adaLN-Zero included.

    Xavier-uniform Dense kernels and zero biases; N(0, 0.02) time MLP kernels, domain
    embedding and positions; zero adaLN modulations and output, so the model starts at 0.
    """
    for module in self.modules():
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    for param in (self.time_mlp1.weight, self.time_mlp2.weight, self.domain_embed.weight,
                  self.context_pos):
      if param is not None:
        nn.init.normal_(param, std=0.02)
    for module in [self.final_adaLN, self.out] + [b.adaLN for b in self._blocks()]:
      nn.init.zeros_(module.weight)

  def _blocks(self) -> list[_Block]:
    return [getattr(self, f"block{i}") for i in range(self.depth)]

  def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
              context_mask: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """The x0 prediction [B, d]; the arguments are `dit.DiT.__call__`'s (no evidence)."""
    length = context.shape[1]
    if length > self.max_context:
      raise ValueError(f"context length {length} exceeds max_context {self.max_context}")
    context_mask = context_mask.bool()
    # Zero the padded slots so that even non-finite garbage there cannot leak through 0 * inf.
    context = torch.where(context_mask[..., None], context, 0.0)
    context_tok = self.context_embed(context)
    if self.context_pos is not None:
      context_tok = context_tok + self.context_pos[:length]
    x = torch.cat([self.query_embed(x_t)[:, None], context_tok,
                   self.domain_embed(domain)[:, None]], dim=1)
    ones = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    key_mask = torch.cat([ones, context_mask, ones], dim=1)

    c = self.time_mlp2(F.silu(self.time_mlp1(timestep_embedding(t, x.shape[-1]))))
    # Every adaLN reads silu(c): computed once here (XLA shares it between the JAX blocks too).
    silu_c = F.silu(c)
    for block in self._blocks():
      x = block(x, silu_c, key_mask)
    # The last block returned the query token alone: the final layer runs on it only.
    shift, scale = self.final_adaLN(silu_c)[:, None].chunk(2, -1)
    return self.out(_modulate(_norm(x), shift, scale)[:, 0])


def load_jax_params(module: DiT, params: Any) -> None:
  """Copies a `dit.DiT` params pytree into `module` (of the same hyperparameters), in place.

  Every torch parameter must be given and every JAX leaf used: a mismatch raises ValueError.
  """
  torch_params = dict(module.named_parameters())
  copied = {}
  for name, value in traverse_util.flatten_dict(params, sep=".").items():
    value = np.asarray(value, np.float32)
    if name.endswith(".kernel"):  # Dense: [in, out]; Linear: [out, in]
      name, value = name[:-len("kernel")] + "weight", value.T
    elif name.endswith(".embedding"):
      name = name[:-len("embedding")] + "weight"
    copied[name] = value
  if copied.keys() != torch_params.keys():
    raise ValueError(f"params do not match the torch DiT: JAX only "
                     f"{sorted(copied.keys() - torch_params.keys())}, torch only "
                     f"{sorted(torch_params.keys() - copied.keys())}")
  with torch.no_grad():
    for name, value in copied.items():
      if tuple(value.shape) != tuple(torch_params[name].shape):
        raise ValueError(f"{name}: JAX shape {value.shape}, "
                         f"torch {tuple(torch_params[name].shape)}")
      torch_params[name].copy_(torch.tensor(value))


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
  """`diffusion.alpha_bar` in torch: the cosine schedule's signal fraction, clipped to (0, 1)."""
  s = _COSINE_OFFSET
  f = torch.cos((t.float() + s) / (1 + s) * (math.pi / 2)) ** 2
  f0 = math.cos(s / (1 + s) * (math.pi / 2)) ** 2
  return torch.clamp(f / f0, diffusion.ALPHA_BAR_MIN, diffusion.ALPHA_BAR_MAX)


class Draws(NamedTuple):
  """The randomness of one `diffusion.training_loss` call."""
  t: torch.Tensor      # float [B] in [0, 1)
  noise: torch.Tensor  # float [B, d]
  drop: torch.Tensor   # bool [B]: True drops the domain to the null domain


def draw(batch: int, dim: int, cond_drop_prob: float,
         generator: torch.Generator | None = None) -> Draws:
  """t ~ U(0, 1), noise ~ N(0, I) and the domain dropout, as `diffusion.training_loss` draws.

  The draws are made on the generator's device (the CPU without one).
  """
  device = generator.device if generator is not None else None
  return Draws(torch.rand(batch, generator=generator, device=device),
               torch.randn(batch, dim, generator=generator, device=device),
               torch.rand(batch, generator=generator, device=device) < cond_drop_prob)


def denoising_loss(model: DiT, batch: dict[str, torch.Tensor], draws: Draws,
                   space: diffusion.TargetSpace) -> torch.Tensor:
  """`models.denoising_loss_fn`'s loss given its draws: the mean denoising error.

  The batch holds unit `target` [B, d], `context` [B, L, d], `context_mask` [B, L] and
  `domain` [B]; `space` maps targets to x0 (scaled, and anchored at the context's mean).
  """
  context, mask = batch["context"], batch["context_mask"].bool()
  x0 = batch["target"]
  if space.anchored:
    total = torch.where(mask[..., None], context, 0.0).sum(dim=1)
    x0 = x0 - total / mask.sum(dim=1, keepdim=True).clamp(min=1)
  x0 = x0 * space.scale
  domain = torch.where(draws.drop, model.num_domains, batch["domain"])
  ab = alpha_bar(draws.t)[:, None]
  x_t = torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * draws.noise
  x0_hat = model(x_t, draws.t, context, mask, domain)
  return torch.mean(torch.square(x0_hat - x0))


class TrainStep:
  """`engine.train_step` for the torch DiT: one update per call, on the call's batch.

  Value-and-grad of `denoising_loss` (with `compiled`, under `torch.compile`: the forward
  and, through AOTAutograd, the backward), then the tail: the global grad norm and clip,
  AdamW (optax's eps and decoupled weight decay) at the engine's learning rate for the step,
  and the EMA with the engine's bias-corrected weight (`engine.ema_weight`). The tail is
  eager either way: its kernels already take all parameters at once (foreach, and the fused
  AdamW, the fastest of torch's three on this CPU: 0.5 ms a step at the default model size),
  so compiling it would mostly add compile time. torch's clip divides by the norm + 1e-6,
  optax's by the norm: the same to float32 rounding.
  """

  def __init__(self, model: DiT, config: ml_collections.ConfigDict, compiled: bool = False,
               seed: int = 0):
    self.model = model
    self.params = list(model.parameters())
    self.ema_params = [p.detach().clone() for p in self.params]
    self.step = 0
    self._config = config
    self._space = models.target_space(config, model.dim)
    self._drop_prob = float(config.diffusion.cond_drop_prob)
    self._clip = float(config.grad_clip_norm)
    # On the model's device, so that a GPU step draws its noise there as the JAX step does.
    self._generator = torch.Generator(device=self.params[0].device).manual_seed(seed)
    # The engine's schedule is flat (0) from `num_steps` on, so this table covers every step.
    self._lrs = [engine.learning_rate_at(config, s) for s in range(int(config.num_steps) + 1)]
    self._ema_weights = np.zeros(0)
    self._optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=(config.b1, config.b2),
                                        eps=1e-8, weight_decay=config.weight_decay, fused=True)
    self._loss = torch.compile(denoising_loss) if compiled else denoising_loss

  def _schedule(self, step: int) -> tuple[float, float]:
    """(learning rate, EMA weight) of the update from `step`, from the engine's own functions."""
    if step >= len(self._ema_weights):
      updates = np.arange(len(self._ema_weights) + 1, step + 1 + _EMA_CHUNK)
      self._ema_weights = np.concatenate([self._ema_weights, np.asarray(
          engine.ema_weight(updates, self._config.ema_decay))])
    return float(self._lrs[min(step, len(self._lrs) - 1)]), float(self._ema_weights[step])

  def __call__(self, batch: dict[str, torch.Tensor],
               draws: Draws | None = None) -> dict[str, torch.Tensor]:
    """One update; returns {"loss", "grad_norm" (before clipping)} as the JAX step's metrics.

    `draws` (tests: the JAX step's own) replace the step's draw from its generator.
    """
    lr, ema_weight = self._schedule(self.step)
    if draws is None:
      draws = draw(batch["target"].shape[0], self.model.dim, self._drop_prob, self._generator)
    loss = self._loss(self.model, batch, draws, self._space)
    self._optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in self.params]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if self._clip:
      torch.nn.utils.clip_grads_with_norm_(self.params, self._clip, grad_norm, foreach=True)
    self._optimizer.param_groups[0]["lr"] = lr
    self._optimizer.step()
    with torch.no_grad():
      # pylint: disable-next=protected-access
      torch._foreach_lerp_(self.ema_params, self.params, ema_weight)
    self.step += 1
    return {"loss": loss.detach(), "grad_norm": grad_norm}


def to_torch(batch_np: dict[str, np.ndarray],
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
  """A numpy batch as torch tensors on `device` (int32 domains as int64, torch's index dtype)."""
  return {k: torch.from_numpy(np.asarray(v, np.int64 if v.dtype.kind == "i" else None)).to(device)
          for k, v in batch_np.items()}
