"""bench/torch_dit.py, the PyTorch peer of bench/train_step.py: the same model and loss as JAX's.

Nothing here times anything: the peer is measured by running the bench with --torch_peer.
"""

import functools
import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import perturb
from modit_jax import dit
from modit_jax import engine
from modit_jax import models
from modit_jax import training
# pylint: enable=g-import-not-at-top,wrong-import-position

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(_ROOT, "bench", "train_step.py")
_DIM, _NUM_DOMAINS, _CONTEXT, _BATCH = 8, 3, 5, 6


@pytest.fixture(scope="module")
def torch_dit():
  spec = importlib.util.spec_from_file_location(
      "bench_torch_dit", os.path.join(_ROOT, "bench", "torch_dit.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_config(learned_positions: bool = False):
  """The tiny stage-1 config at width 32, depth 2, 2 heads, context 5."""
  config = training.default_config("tiny")
  config.model.max_context = _CONTEXT
  config.model.learned_positions = learned_positions
  return config


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """Contexts with masked slots (NaN there: they must not leak), null and real domains."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1],
                   [0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [0, 1, 0, 0, 0]], bool)
  context = unit(rng.standard_normal((_BATCH, _CONTEXT, _DIM))).astype(np.float32)
  context[~mask] = np.nan
  return {"context": context, "context_mask": mask,
          "domain": np.array([0, 1, 2, _NUM_DOMAINS, _NUM_DOMAINS, 1], np.int32),
          "target": unit(rng.standard_normal((_BATCH, _DIM))).astype(np.float32)}


def _models(torch_dit, config):
  """(JAX DiT, its perturbed params, the torch DiT holding the same params)."""
  model = models.make_model(config.model, _DIM, _NUM_DOMAINS)
  # Perturbed, so the zero-initialised adaLN and output layers take part.
  params = perturb(dit.init_params(model, jax.random.PRNGKey(0), context_len=_CONTEXT))
  module = torch_dit.DiT.like(model)
  torch_dit.load_jax_params(module, params)
  return model, params, module


@pytest.mark.parametrize("learned_positions", [False, True])
def test_torch_forward_equals_jax(torch_dit, fast_compile, learned_positions):
  """The same params and inputs give the same x0 prediction, padded slots and null domain too."""
  del fast_compile
  model, params, module = _models(torch_dit, _tiny_config(learned_positions))
  batch = _inputs()
  rng = np.random.default_rng(1)
  x_t = rng.standard_normal((_BATCH, _DIM)).astype(np.float32)
  t = np.array([0.0, 0.1, 0.3, 0.5, 0.9, 1.0], np.float32)
  names = ("x_t", "t", "context", "context_mask", "domain")
  inputs = dict(batch, x_t=x_t, t=t)
  expected = np.asarray(model.apply({"params": params}, *(inputs[n] for n in names)))
  torch_inputs = torch_dit.to_torch(inputs)
  got = module(*(torch_inputs[n] for n in names)).detach().numpy()
  assert np.all(np.isfinite(got))
  assert np.abs(expected).max() > 0.1  # a real output, not the zero of a fresh model
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_time_embedding_equals_jax(torch_dit):
  t = np.linspace(0, 1, 7, dtype=np.float32)
  for dim in (32, 33):
    np.testing.assert_allclose(torch_dit.timestep_embedding(torch.from_numpy(t), dim).numpy(),
                               np.asarray(dit.timestep_embedding(jnp.asarray(t), dim)),
                               rtol=1e-5, atol=1e-5)


def test_fresh_torch_dit_outputs_zero(torch_dit):
  """adaLN-Zero: the torch model's own initialisation also starts at exactly zero."""
  module = torch_dit.DiT(_DIM, _NUM_DOMAINS, width=32, depth=2, num_heads=2,
                         max_context=_CONTEXT)
  batch = torch_dit.to_torch(_inputs())
  out = module(batch["target"], torch.full((_BATCH,), 0.5), batch["context"],
               batch["context_mask"], batch["domain"])
  assert torch.equal(out, torch.zeros_like(out))


def test_load_jax_params_rejects_another_model(torch_dit):
  model = dit.tiny(_DIM, _NUM_DOMAINS, max_context=_CONTEXT)
  params = jax.device_get(dit.init_params(model, jax.random.PRNGKey(0), context_len=_CONTEXT))
  deeper = torch_dit.DiT(_DIM, _NUM_DOMAINS, width=32, depth=3, num_heads=2,
                         max_context=_CONTEXT)
  with pytest.raises(ValueError, match="torch only.*block2"):
    torch_dit.load_jax_params(deeper, params)


def _jax_draws(torch_dit, rng: jax.Array, cond_drop_prob: float):
  """What `diffusion.training_loss` draws from `rng` for a batch, as torch `Draws`."""
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  return torch_dit.Draws(
      torch.tensor(np.asarray(jax.random.uniform(t_rng, (_BATCH,), jnp.float32))),
      torch.tensor(np.asarray(jax.random.normal(noise_rng, (_BATCH, _DIM), jnp.float32))),
      torch.tensor(np.asarray(jax.random.bernoulli(drop_rng, cond_drop_prob, (_BATCH,)))))


def test_torch_loss_equals_jax_training_loss(torch_dit, fast_compile):
  """The same draws give the same loss as `models.denoising_loss_fn` (anchored, scaled)."""
  del fast_compile
  config = _tiny_config()
  config.diffusion.cond_drop_prob = 0.5  # so that the draws drop some domains and keep some
  assert config.diffusion.anchored
  model, params, module = _models(torch_dit, config)
  batch = _inputs()
  rng = jax.random.PRNGKey(3)
  expected, _ = models.denoising_loss_fn(model, config)(params, batch, rng)
  draws = _jax_draws(torch_dit, rng, 0.5)
  assert 0 < int(draws.drop.sum()) < _BATCH
  got = torch_dit.denoising_loss(module, torch_dit.to_torch(batch), draws,
                                 models.target_space(config, _DIM))
  assert float(expected) > 0.01
  np.testing.assert_allclose(got.item(), float(expected), rtol=1e-5, atol=1e-6)


def test_torch_train_step_equals_jax_train_step(torch_dit, fast_compile):
  """Two updates with the JAX step's draws: the same loss, grad norm, params and EMA.

  The clip is active (the grad norm is above it), the schedule is past its first warm-up
  value at the second step, and the EMA's bias-corrected weight is below 1 there.
  """
  del fast_compile
  config = _tiny_config()
  config.grad_clip_norm = 0.5
  config.warmup_steps = 1
  model, params, module = _models(torch_dit, config)
  tx = engine.make_optimizer(config)
  state = engine.create_train_state(params, tx)
  step_fn = jax.jit(functools.partial(
      engine.train_step, loss_fn=models.denoising_loss_fn(model, config), tx=tx,
      ema_decay=config.ema_decay))
  torch_step = torch_dit.TrainStep(module, config)
  batch, rng = _inputs(), jax.random.PRNGKey(5)
  torch_batch = torch_dit.to_torch(batch)
  for i in range(2):
    state, metrics = step_fn(state, batch, rng)
    draws = _jax_draws(torch_dit, jax.random.fold_in(rng, i), config.diffusion.cond_drop_prob)
    torch_metrics = torch_step(torch_batch, draws)
    assert float(metrics["grad_norm"]) > config.grad_clip_norm
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(float(torch_metrics[key]), float(metrics[key]), rtol=1e-4)
  # The JAX params, and the torch EMA, each in a torch DiT: compared parameter by parameter.
  torch_ema = torch_dit.DiT.like(model)
  with torch.no_grad():
    for param, ema in zip(torch_ema.parameters(), torch_step.ema_params):
      param.copy_(ema)
  reference = torch_dit.DiT.like(model)
  for got, jax_params in ((module, state.params), (torch_ema, state.ema_params)):
    torch_dit.load_jax_params(reference, jax_params)
    expected = dict(reference.named_parameters())
    for name, value in got.named_parameters():
      value, want = value.detach().numpy(), expected[name].detach().numpy()
      if name.endswith("attn.qkv.bias"):
        # The key bias adds the same logit to every key of a query, which softmax ignores: its
        # gradient is rounding noise, which Adam scales up to a full step of either sign.
        width = int(config.model.width)
        value, want = (np.delete(a, np.s_[width:2 * width]) for a in (value, want))
      # Adam moves every element by about the learning rate (1e-3), whatever its gradient's
      # size: where a gradient element is itself rounding noise, the two frameworks' steps
      # differ by up to that much. Elsewhere they agree to 1% of a step: a wrong schedule,
      # clip or EMA weight would move (almost) every element by more.
      diff = np.abs(value - want)
      assert np.mean(diff <= 1e-5 + 1e-4 * np.abs(want)) >= 0.99, (name, np.sort(diff)[-10:])
      assert diff.max() <= 2 * 2 * config.learning_rate, (name, diff.max())


def test_bench_runs_with_the_torch_peer():
  # PASSIVE: with libgomp's default policy torch's step slows ~100x while other jobs share the
  # cores (bench/train_step.py); this test measures nothing, so it need not wait for that.
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", OMP_WAIT_POLICY="PASSIVE")
  result = subprocess.run(
      [sys.executable, _BENCH, "--config=configs/pretrain.py:tiny", "--batch=16", "--steps=1",
       "--warmup=1", "--matmul_sizes=64", "--torch_peer"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"fraction_of_peak=\d+\.\d{3}", lines[-1]), lines[-1]
  values = {}
  for line in lines:
    found = re.fullmatch(r"(torch_\w+_ratio(?:_ceiling)?)=(\d+\.\d{3})", line)
    if found:
      values[found[1]] = float(found[2])
  assert {"torch_eager_ratio", "torch_compile_ratio"} <= set(values), lines[-6:]
  assert all(v > 0 for v in values.values()), values
  # The tiny step's matmuls may be lost in the dispatch; then the bench must say so and print
  # no ceiling, else a ceiling for both peers over the same matmul time.
  if "no ceiling to give" in result.stdout:
    assert set(values) == {"torch_eager_ratio", "torch_compile_ratio"}, values
  else:
    assert set(values) == {"torch_eager_ratio", "torch_compile_ratio",
                           "torch_eager_ratio_ceiling", "torch_compile_ratio_ceiling"}, values
    assert (values["torch_eager_ratio_ceiling"] / values["torch_compile_ratio_ceiling"]
            == pytest.approx(values["torch_eager_ratio"] / values["torch_compile_ratio"],
                             rel=2e-2))
  for name in ("torch eager step", "torch.compile step"):
    assert re.search(rf"^{re.escape(name)}: [\d.]+ examples/s, [\d.]+ GFLOP/s = \d+\.\d{{3}} of "
                     r"the float32 matmul peak", result.stdout, re.MULTILINE), name


def test_bench_without_torch_says_how_to_install_it():
  """A Python where `import torch` fails: the bench stops at once with a one-line hint."""
  # A finder ahead of all others that has no torch (sys.modules['torch'] = None would also
  # break libraries that merely look torch up there).
  code = f"""if True:
    import runpy, sys

    class NoTorch:
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
          raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

    sys.meta_path.insert(0, NoTorch())
    sys.argv = [{_BENCH!r}, "--torch_peer"]
    runpy.run_path({_BENCH!r}, run_name="__main__")
  """
  result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.strip() == ("--torch_peer needs PyTorch, a bench-only extra: "
                                   "pip install -e '.[bench]'")


def test_torch_device_follows_jax_and_refuses_what_it_cannot_compare():
  """auto is the CPU on a CPU backend; a bad name, or cuda where torch sees no GPU, stops."""
  spec = importlib.util.spec_from_file_location("bench_train_step_device", _BENCH)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  assert jax.default_backend() == "cpu"
  assert bench._torch_device("auto", "") == "cpu"  # pylint: disable=protected-access
  with pytest.raises(SystemExit, match="cpu, cuda or auto"):
    bench._torch_device("tpu", "")  # pylint: disable=protected-access
  if not torch.cuda.is_available():
    with pytest.raises(SystemExit, match="sees no GPU"):
      bench._torch_device("cuda", "highest")  # pylint: disable=protected-access


def test_draws_are_made_on_the_generator_device(torch_dit):
  """Draws follow their generator's device (the GPU peer draws there), and are seeded by it."""
  first = torch_dit.draw(4, 3, 0.5, torch.Generator(device="cpu").manual_seed(1))
  again = torch_dit.draw(4, 3, 0.5, torch.Generator(device="cpu").manual_seed(1))
  assert all(x.device.type == "cpu" for x in first)
  for a, b in zip(first, again):
    assert torch.equal(a, b)
  domains = torch_dit.to_torch({"domain": np.zeros(2, np.int32)}, "cpu")["domain"]
  assert domains.dtype == torch.int64
