"""The CycleGAN train state (one pytree) and its optimisers.

The state holds everything a resumed run needs besides the input iterator: the parameters
of the four networks (and the running averages of the generators' parameters when
`train.ema_decay` > 0), the two Adam states, the two image pools, the step and the rng. What
is not state (the flax modules, the learning-rate schedule, the optax optimisers) is built
once per run by `build(config)` and passed to `create`, the step and the sampler.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mr2ct_jax.models import cyclegan
from mr2ct_jax.training import image_pool

GENERATORS = ('g_ct', 'g_mr')
DISCRIMINATORS = ('d_ct', 'd_mr')
EMA = 'ema'  # params[EMA]: the generators' parameter averages, when the run keeps them


@flax.struct.dataclass
class CycleGANState:
  """Train state.

  Attributes:
    step: int32 scalar, the number of completed train steps.
    params: {'g_ct', 'g_mr', 'd_ct', 'd_mr'} -> flax params. G_ct: MR->CT, G_mr: CT->MR;
      D_ct judges CT images, D_mr MR images. With train.ema_decay > 0 also 'ema':
      {'g_ct', 'g_mr'} -> exponential moving averages of the generators' parameters
      (`ema_update`), which translation, evaluation and export use (`inference_params`).
      (Inside params, not a field of its own, so runs without averages keep the checkpoint
      layout of earlier versions and resume from their checkpoints.)
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


@dataclasses.dataclass(frozen=True)
class CycleGAN:
  """What a run computes with besides its state, built once by `build(config)`.

  Attributes:
    generator: the flax module of G_ct and G_mr (one architecture, two parameter sets).
    discriminator: the module of D_ct and D_mr.
    schedule: the learning-rate schedule (step -> lr).
    tx: {'g': Adam of both generators jointly, 'd': of both discriminators}.
  """
  generator: Any
  discriminator: Any
  schedule: optax.Schedule
  tx: dict[str, optax.GradientTransformation]


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The paper's schedule: `optim.lr` for decay_start_fraction * num_steps, then linear to 0.

  lr(t) = lr * min(1, (T - t) / (T - T0)) for T = train.num_steps, T0 = fraction * T,
  0 after T; constant lr when T0 == T.
  """
  lr = float(config.optim.lr)
  total = int(config.train.num_steps)
  decay_start = float(config.optim.decay_start_fraction) * total
  if total - decay_start <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.constant_schedule(lr),
       optax.linear_schedule(lr, 0.0, transition_steps=total - decay_start)],
      boundaries=[decay_start])


def ema_update(ema: dict[str, Any], params: dict[str, Any], step: jax.Array,
               decay: float) -> dict[str, Any]:
  """One step of the generators' parameter average: ema <- d * ema + (1 - d) * params.

  d = min(decay, (1 + t) / (10 + t)) at step t (the number of updates before this one), so
  the average forgets the random initialisation within the first few dozen steps instead of
  over 1 / (1 - decay) steps; short runs get an average of their late weights too.
  """
  t = step.astype(jnp.float32)
  d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema,
                      {name: params[name] for name in ema})


def inference_params(params: dict[str, Any]) -> dict[str, Any]:
  """The four networks' parameters to translate with: the generators' averages if kept."""
  params = dict(params)
  averages = params.pop(EMA, {})
  return {**params, **averages}


def make_optimizers(optim: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> dict[str, optax.GradientTransformation]:
  """{'g': Adam for both generators jointly, 'd': Adam for both discriminators}.

  One optimiser per pair, as the reference (itertools.chain of the two networks' params);
  with Adam this equals one optimiser per network, since Adam is per-parameter.
  """
  make = lambda: optax.adam(schedule, b1=optim.b1, b2=optim.b2)
  return {'g': make(), 'd': make()}


def build(config: ml_collections.ConfigDict) -> CycleGAN:
  """The modules, schedule and optimisers of `config` (once per run)."""
  generator, discriminator = cyclegan.build(config.model)
  schedule = learning_rate_schedule(config)
  return CycleGAN(generator=generator, discriminator=discriminator, schedule=schedule,
                  tx=make_optimizers(config.optim, schedule))


def init_params(gan: CycleGAN, image_size: int, rng: jax.Array) -> dict[str, Any]:
  """Initialises the four networks for [1, S, S, 1] inputs, S = `image_size`."""
  dummy = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
  # Every parameter is one random draw; with the partitionable threefry (JAX's default)
  # each draw compiles to an N-D counter program and XLA:CPU compiles the init far slower.
  # Init runs replicated, so the sharding-friendly variant buys nothing here; the values stay
  # a deterministic function of `rng`.
  with jax.threefry_partitionable(False):
    keys = jax.random.split(rng, 4)
    return {
        'g_ct': gan.generator.init(keys[0], dummy)['params'],
        'g_mr': gan.generator.init(keys[1], dummy)['params'],
        'd_ct': gan.discriminator.init(keys[2], dummy)['params'],
        'd_mr': gan.discriminator.init(keys[3], dummy)['params'],
    }


def create(gan: CycleGAN, config: ml_collections.ConfigDict, rng: jax.Array) -> CycleGANState:
  """A fresh train state: initialised networks, Adam states, empty pools, step 0.

  Args:
    gan: from `build(config)`.
    config: the run's config (data.image_size and train.pool_size are read).
    rng: PRNG key (raw uint32[2] or typed); split into the parameter key and the state's
      running key.
  """
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  params_rng, state_rng = jax.random.split(rng)
  size = config.data.image_size
  params = init_params(gan, size, params_rng)
  opt_state = {
      'g': gan.tx['g'].init({k: params[k] for k in GENERATORS}),
      'd': gan.tx['d'].init({k: params[k] for k in DISCRIMINATORS}),
  }
  pools = {name: image_pool.init(config.train.pool_size, (size, size, 1))
           for name in ('ct', 'mr')}
  if config.train.ema_decay > 0:
    # A copy, not the same buffers: the train step donates the state.
    params[EMA] = {k: jax.tree.map(jnp.copy, params[k]) for k in GENERATORS}
  return CycleGANState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                       pools=pools, rng=state_rng)
