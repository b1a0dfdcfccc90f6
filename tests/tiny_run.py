"""A tiny "trained" workdir for tests of translate / export / evaluate, made in about a second.

The train state is built from `jax.eval_shape(train_state.create)` and filled with NumPy
random numbers instead of running the networks' init: flax init compiles the RNG for every
parameter shape, which takes minutes on a loaded 2-core machine. The weights are random
(std 0.1, biases too), which is what a numerics/geometry test needs.
"""

import os

import jax
import ml_collections
import numpy as np

from mr2ct_jax import checkpointing
from mr2ct_jax.training import state as train_state


def random_params(config: ml_collections.ConfigDict, seed: int = 0) -> dict:
  """{'g_ct', 'g_mr', 'd_ct', 'd_mr'} parameter trees of `config` with random float32 values."""
  gan = train_state.build(config)
  abstract = jax.eval_shape(
      lambda: train_state.init_params(gan, config.data.image_size, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0.0, 0.1, x.shape).astype(x.dtype), abstract)


def make_workdir(workdir: str, config: ml_collections.ConfigDict, step: int = 2,
                 seed: int = 0) -> dict:
  """Writes WORKDIR/config.json and a checkpoint at `step`; returns the saved params."""
  gan = train_state.build(config)
  abstract = jax.eval_shape(lambda: train_state.create(gan, config, jax.random.PRNGKey(0)))
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  params = random_params(config, seed)
  state = state.replace(params=params, step=np.asarray(step, np.int32))
  os.makedirs(workdir, exist_ok=True)
  checkpointing.save_config(workdir, config)
  manager = checkpointing.make_manager(workdir)
  checkpointing.save(manager, step, state, {'note': 'tiny test run'})
  manager.wait_until_finished()
  manager.close()
  return params
