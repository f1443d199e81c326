r"""Stage 1: raw-sequence pretraining (the `pretrained_gr` method).

Launch:
  python -m modit_jax.train --config=configs/pretrain.py \
      --dataset=out/default/dataset --workdir=out/default/pretrain
Context = a prefix of a raw sequence (random length), target = the next item's embedding.
Variant `configs/pretrain.py:tiny` (tests): a tiny model, a few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-1 config; `arg` in {None, 'default', 'tiny'}."""
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"
  c.init_from = ""                  # a workdir of an earlier stage; none for stage 1
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.width = 256
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.max_context = 16
  # Raw sequences are walks in random order; seed sets have none: no positions.
  c.model.learned_positions = False

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.target_scale = 8.0    # sqrt(d) for d = 64: unit per-coordinate variance
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.sample_steps = 8
  c.diffusion.guidance_scale = 1.0

  # Optimiser (engine.make_optimizer): AdamW, linear warm-up then cosine decay.
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.weight_decay = 0.01
  c.grad_clip_norm = 1.0
  c.b1 = 0.9
  c.b2 = 0.99

  # Loop (engine.train_loop).
  c.num_steps = 1500
  c.batch_size = 256
  c.ema_decay = 0.999
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.fsdp = False

  if arg in (None, "", "default"):
    pass
  elif arg == "tiny":
    c.model.width = 32
    c.model.depth = 2
    c.model.num_heads = 2
    c.diffusion.target_scale = 5.66  # sqrt(32)
    c.diffusion.sample_steps = 4
    c.num_steps = 300
    c.batch_size = 64
    c.warmup_steps = 20
    c.ema_decay = 0.9
    c.log_every = 50
    c.checkpoint_every = 100
  else:
    raise ValueError(f"unknown pretrain config variant {arg!r}; use tiny or default")
  return c
