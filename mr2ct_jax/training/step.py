"""The CycleGAN + GC train step: a pure function, jitted over a data-parallel mesh.

One step, as the CycleGAN reference's `optimize_parameters`:
  1. forward both cycles: fake_ct = G_ct(mr), rec_mr = G_mr(fake_ct),
     fake_mr = G_mr(ct), rec_ct = G_ct(fake_mr);
  2. update both generators on LSGAN + lambda_cyc * cycle L1 + lambda_gc * (1 - GC)
     (+ lambda_idt * identity L1) with the discriminators fixed;
  3. pass the fakes of step 1 (pre-update generators, no gradient) through the image pools;
  4. update both discriminators on real vs pooled fakes.

The state is replicated and the batch sharded over the 'data' axis; XLA inserts the
gradient all-reduce. Instance norm makes every example's output independent of the rest of
the batch, so the numbers do not depend on the device count.

G_ct and G_mr share one architecture, as do D_ct and D_mr, and every pass of the step applies
both members of a pair to inputs of the same shape. With `fuse_pairs` each such pair runs as
one program vmapped over the two stacked parameter sets (`pair_apply`): half the kernels, each
twice as large, which is what a batch-1 step on a GPU, bound by kernel launches, needs. The
values are those of the separate calls up to float rounding (tests/test_train_step.py).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mr2ct_jax import parallel
from mr2ct_jax.parallel import Batch
from mr2ct_jax.training import image_pool
from mr2ct_jax.training import losses
from mr2ct_jax.training import state as state_lib
from mr2ct_jax.training.state import CycleGANState

PairFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

METRIC_KEYS = ('loss/g_total', 'loss/gan_ct', 'loss/gan_mr', 'loss/cycle', 'loss/gc',
               'loss/identity', 'loss/d_ct', 'loss/d_mr', 'lr')


def pair_apply(apply: Callable[[Any, jax.Array], jax.Array], fuse: bool) -> PairFn:
  """fn(params_a, params_b, x_a, x_b) -> (apply(params_a, x_a), apply(params_b, x_b)).

  With `fuse`, one call of `apply` vmapped over the two parameter sets stacked on a new
  leading axis (same tree and shapes: two networks of one architecture) and the two inputs
  stacked likewise (same shape); else two separate calls.
  """
  if not fuse:
    return lambda params_a, params_b, x_a, x_b: (apply(params_a, x_a), apply(params_b, x_b))

  def both(params_a, params_b, x_a, x_b):
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params_a, params_b)
    out = jax.vmap(apply)(stacked, jnp.stack([x_a, x_b]))
    return out[0], out[1]

  return both


def train_step(state: CycleGANState, batch: Batch, *, gen: Any, disc: Any,
               tx: dict[str, optax.GradientTransformation],
               learning_rate_fn: Callable[[jax.Array], jax.Array], cycle_weight: float,
               gc_weight: float, identity_weight: float, gc_signed: bool,
               gc_eps: float, ema_decay: float = 0.0, fuse_pairs: bool = False
               ) -> tuple[CycleGANState, dict[str, jax.Array]]:
  """One CycleGAN update of both generators and both discriminators.

  Args:
    state: the current train state.
    batch: {'mr': [B, S, S, 1], 'ct': [B, S, S, 1]} unpaired images in [-1, 1].
    gen: the generator module (shared architecture of G_ct and G_mr).
    disc: the discriminator module (of D_ct and D_mr).
    tx: {'g', 'd'} optimisers from `state.make_optimizers`.
    learning_rate_fn: the schedule (for the 'lr' metric only; tx has its own copy).
    cycle_weight: lambda_cycle.
    gc_weight: lambda_GC. At 0 the GC is still computed for the metric (cheap), but outside
      the gradient.
    identity_weight: weight of L1(G_ct(ct), ct) + L1(G_mr(mr), mr); at 0 the two extra
      generator passes are skipped and 'loss/identity' is 0. (The reference's
      lambda_identity = 0.5 corresponds to identity_weight = 0.5 * cycle_weight.)
    gc_signed: see `losses.gradient_correlation`.
    gc_eps: see `losses.normalized_cross_correlation`.
    ema_decay: decay of the generators' parameter averages (`state.ema_update`); used only
      when the state keeps them (params['ema']).
    fuse_pairs: run each G_ct/G_mr and D_ct/D_mr pair as one vmapped program (`pair_apply`).

  Returns:
    (new_state, metrics): scalar float32 metrics named by METRIC_KEYS; the loss terms are
    unweighted ('loss/cycle' sums both directions) and 'loss/g_total' is the weighted
    objective the generators minimise. Non-finite values are returned, not raised: the
    loop decides what to do.
  """
  mr, ct = batch['mr'], batch['ct']
  g_apply = lambda p, x: gen.apply({'params': p}, x)
  d_apply = lambda p, x: disc.apply({'params': p}, x)
  both_g, both_d = pair_apply(g_apply, fuse_pairs), pair_apply(d_apply, fuse_pairs)
  params = state.params

  def generator_loss(g_params):
    g_ct, g_mr = g_params['g_ct'], g_params['g_mr']
    fake_ct, fake_mr = both_g(g_ct, g_mr, mr, ct)
    rec_ct, rec_mr = both_g(g_ct, g_mr, fake_mr, fake_ct)
    judged_ct, judged_mr = both_d(params['d_ct'], params['d_mr'], fake_ct, fake_mr)
    gan_ct = losses.lsgan_generator_loss(judged_ct)
    gan_mr = losses.lsgan_generator_loss(judged_mr)
    cycle = losses.cycle_l1(rec_mr, mr) + losses.cycle_l1(rec_ct, ct)
    gc_args = (ct, fake_mr, mr, fake_ct)
    if gc_weight == 0:
      gc_args = jax.lax.stop_gradient(gc_args)
    gc = losses.gc_loss(*gc_args, signed=gc_signed, eps=gc_eps)
    if identity_weight:
      same_ct, same_mr = both_g(g_ct, g_mr, ct, mr)
      identity = losses.identity_l1(same_ct, ct) + losses.identity_l1(same_mr, mr)
    else:
      identity = jnp.zeros((), jnp.float32)
    total = gan_ct + gan_mr + cycle_weight * cycle + identity_weight * identity
    if gc_weight:
      total = total + gc_weight * gc
    terms = {'loss/g_total': total, 'loss/gan_ct': gan_ct, 'loss/gan_mr': gan_mr,
             'loss/cycle': cycle, 'loss/gc': gc, 'loss/identity': identity}
    return total, (terms, fake_ct, fake_mr)

  g_params = {k: params[k] for k in state_lib.GENERATORS}
  g_grads, (metrics, fake_ct, fake_mr) = jax.grad(generator_loss, has_aux=True)(g_params)
  g_updates, g_opt_state = tx['g'].update(g_grads, state.opt_state['g'], g_params)
  g_params = optax.apply_updates(g_params, g_updates)
  new_params = {**g_params}
  if state_lib.EMA in params:
    new_params[state_lib.EMA] = state_lib.ema_update(params[state_lib.EMA], g_params,
                                                     state.step, ema_decay)

  rng, ct_key, mr_key = jax.random.split(state.rng, 3)
  pool_ct, pooled_ct = image_pool.query(state.pools['ct'], jax.lax.stop_gradient(fake_ct),
                                        ct_key)
  pool_mr, pooled_mr = image_pool.query(state.pools['mr'], jax.lax.stop_gradient(fake_mr),
                                        mr_key)

  def discriminator_loss(d_params):
    on_real_ct, on_real_mr = both_d(d_params['d_ct'], d_params['d_mr'], ct, mr)
    on_fake_ct, on_fake_mr = both_d(d_params['d_ct'], d_params['d_mr'], pooled_ct, pooled_mr)
    d_ct = losses.lsgan_discriminator_loss(on_real_ct, on_fake_ct)
    d_mr = losses.lsgan_discriminator_loss(on_real_mr, on_fake_mr)
    return d_ct + d_mr, {'loss/d_ct': d_ct, 'loss/d_mr': d_mr}

  d_params = {k: params[k] for k in state_lib.DISCRIMINATORS}
  d_grads, d_metrics = jax.grad(discriminator_loss, has_aux=True)(d_params)
  d_updates, d_opt_state = tx['d'].update(d_grads, state.opt_state['d'], d_params)
  d_params = optax.apply_updates(d_params, d_updates)

  metrics.update(d_metrics)
  metrics['lr'] = learning_rate_fn(state.step)
  metrics = {k: jnp.asarray(metrics[k], jnp.float32) for k in METRIC_KEYS}
  new_state = state.replace(
      step=state.step + 1,
      params={**new_params, **d_params},
      opt_state={'g': g_opt_state, 'd': d_opt_state},
      pools={'ct': pool_ct, 'mr': pool_mr},
      rng=rng)
  return new_state, metrics


StepFn = Callable[[CycleGANState, Batch], tuple[CycleGANState, dict[str, jax.Array]]]


def make_train_step(gan: state_lib.CycleGAN, config: ml_collections.ConfigDict,
                    mesh: Mesh) -> StepFn:
  """The jitted `train_step` of `gan` (from `state.build(config)`) with config.loss's weights.

  The state is replicated and the batch sharded over `mesh`; the state argument is donated:
  do not use it after the call.
  """
  loss = config.loss
  step = functools.partial(
      train_step, gen=gan.generator, disc=gan.discriminator, tx=gan.tx,
      learning_rate_fn=gan.schedule, cycle_weight=float(loss.cycle_weight),
      gc_weight=float(loss.gc_weight), identity_weight=float(loss.identity_weight),
      gc_signed=bool(loss.gc_signed), gc_eps=float(loss.gc_eps),
      ema_decay=float(config.train.ema_decay),
      fuse_pairs=bool(config.train.get('fuse_pairs', False)))
  return jax.jit(step,
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=0)


def make_sample_fn(gan: state_lib.CycleGAN
                   ) -> Callable[[dict[str, Any], Batch], dict[str, jax.Array]]:
  """A jitted fn(params, batch) -> both cycles' images, for TensorBoard grids.

  Returns {'mr', 'fake_ct', 'rec_mr', 'ct', 'fake_mr', 'rec_ct'}, each [B, S, S, 1] in
  [-1, 1] (inputs included, so a grid row is MR | sCT | rec MR and CT | sMR | rec CT).
  """

  @jax.jit
  def sample(params: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
    g = lambda name, x: gan.generator.apply({'params': params[name]}, x)
    fake_ct = g('g_ct', batch['mr'])
    fake_mr = g('g_mr', batch['ct'])
    return {'mr': batch['mr'], 'fake_ct': fake_ct, 'rec_mr': g('g_mr', fake_ct),
            'ct': batch['ct'], 'fake_mr': fake_mr, 'rec_ct': g('g_ct', fake_mr)}

  return sample
