"""Pytest set-up shared by every test; pytest imports this before any test module."""

import os

# Eight forced host devices for the whole session, so sharded code is exercised on CPU. This
# must happen before jax is imported anywhere: XLA reads the flag once, at backend start-up.
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()

# Imported after XLA_FLAGS is set above.
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from modit_jax import memo  # pylint: disable=g-import-not-at-top,wrong-import-position
from modit_jax import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(autouse=True)
def fresh_memos():
  """Every test starts with empty process-level memos (modit_jax/memo.py): a test that counts
  index builds or predictor fits, or compiles with other XLA options, sees its own."""
  memo.clear_all()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
  """The `configs/synthetic.py:tiny` catalog directory, generated once per session.

  Tests only read it; a test that needs a modified world writes its own.
  """
  out = tmp_path_factory.mktemp("tiny_world")
  synthetic.write_world(synthetic_config.get_config("tiny"), out)
  return out


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny models run for milliseconds; XLA optimisation would dominate the test time."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def perturb(params, seed=0, scale=0.3):
  """Adds Gaussian noise to every param so zero-initialised layers become active."""
  rng = np.random.default_rng(seed)  # NumPy: no per-shape XLA compilation of the noise.
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(p + scale * rng.normal(size=p.shape).astype(np.float32)), params)
