"""The CycleGAN train state (one pytree) and its optimisers.

The state holds everything a resumed run needs besides the input iterator: the parameters
of the four networks, the two Adam states, the two image pools, the step and the rng. The
optimisers themselves (optax transformations) are not state: `make_optimizers(config)`
rebuilds them from the config.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mr2ct_jax import image_pool
from mr2ct_jax import models

GENERATORS = ('g_ct', 'g_mr')
DISCRIMINATORS = ('d_ct', 'd_mr')


@flax.struct.dataclass
class CycleGANState:
  """Train state.

  Attributes:
    step: int32 scalar, the number of completed train steps.
    params: {'g_ct', 'g_mr', 'd_ct', 'd_mr'} -> flax params. G_ct: MR->CT, G_mr: CT->MR;
      D_ct judges CT images, D_mr MR images.
    opt_state: {'g': Adam state of {'g_ct', 'g_mr'} jointly, 'd': of {'d_ct', 'd_mr'}}.
    pools: {'ct': pool of synthetic CTs (for D_ct), 'mr': of synthetic MRs (for D_mr)}.
    rng: raw uint32[2] PRNG key (not a typed key array, so checkpoints stay plain arrays)
      for the pools, split every step.
  """
  step: jax.Array
  params: dict[str, Any]
  opt_state: dict[str, Any]
  pools: dict[str, image_pool.ImagePool]
  rng: jax.Array


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The paper's schedule: `optim.lr` for decay_start_fraction * num_steps, then linear to 0.

  lr(t) = lr * min(1, (T - t) / (T - T0)) for T = train.num_steps, T0 = fraction * T,
  clipped at 0 after T; constant lr when T0 == T.
  """
  lr = float(config.optim.lr)
  total = int(config.train.num_steps)
  decay_start = float(config.optim.decay_start_fraction) * total
  decay_steps = total - decay_start

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    if decay_steps <= 0:
      return jnp.full_like(step, lr)
    fraction = jnp.clip((total - step) / decay_steps, 0.0, 1.0)
    return lr * fraction

  return schedule


def make_optimizers(config: ml_collections.ConfigDict) -> dict[str, optax.GradientTransformation]:
  """{'g': Adam for both generators jointly, 'd': Adam for both discriminators}.

  One optimiser per pair, as the reference (itertools.chain of the two networks' params);
  with Adam this equals one optimiser per network, since Adam is per-parameter.
  """
  schedule = learning_rate_schedule(config)
  make = lambda: optax.adam(schedule, b1=config.optim.b1, b2=config.optim.b2)
  return {'g': make(), 'd': make()}


def init_params(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """Initialises the four networks for [1, S, S, 1] inputs, S = config.data.image_size."""
  gen, disc = models.build(config.model)
  size = config.data.image_size
  dummy = jnp.zeros((1, size, size, 1), jnp.float32)
  # Every parameter is one random draw; with the partitionable threefry (JAX's default)
  # each draw compiles to an N-D counter program and XLA:CPU takes ~20x longer to compile
  # the init (minutes for the four networks). Init runs replicated, so the sharding-friendly
  # variant buys nothing here; the values stay a deterministic function of `rng`.
  with jax.threefry_partitionable(False):
    keys = jax.random.split(rng, 4)
    return {
        'g_ct': gen.init(keys[0], dummy)['params'],
        'g_mr': gen.init(keys[1], dummy)['params'],
        'd_ct': disc.init(keys[2], dummy)['params'],
        'd_mr': disc.init(keys[3], dummy)['params'],
    }


def create(config: ml_collections.ConfigDict, rng: jax.Array) -> CycleGANState:
  """A fresh train state: initialised networks, Adam states, empty pools, step 0.

  Args:
    config: a full config (model, data.image_size, optim, train.pool_size are read).
    rng: PRNG key (raw uint32[2] or typed); split into the parameter key and the state's
      running key.
  """
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  params_rng, state_rng = jax.random.split(rng)
  params = init_params(config, params_rng)
  tx = make_optimizers(config)
  opt_state = {
      'g': tx['g'].init({k: params[k] for k in GENERATORS}),
      'd': tx['d'].init({k: params[k] for k in DISCRIMINATORS}),
  }
  size = config.data.image_size
  pools = {name: image_pool.init(config.train.pool_size, (size, size, 1))
           for name in ('ct', 'mr')}
  return CycleGANState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       pools=pools, rng=state_rng)
