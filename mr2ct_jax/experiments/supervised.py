r"""The paired supervised reference: what the config's G_ct reaches when the pairs are known.

  python -m mr2ct_jax.experiments.supervised --config=configs/gc.py:quick --workdir=runs/sup
  python -m mr2ct_jax.experiments.supervised --config=configs/gc.py --workdir=runs/sup \
      --config.data.dir=DATA --paired_data=PAIRED

The CycleGAN learns MR->CT from unpaired volumes. A generator of the same architecture trained
with an L1 loss on *registered* MR/CT slices (same optimiser, learning-rate schedule, batch,
augmentation and number of steps) shows what the data and the model allow at that budget:
the unpaired run should not be expected to beat it, so it tells whether a target is reachable
before anyone tunes the GAN for it.

Training pairs: on the built-in phantom (config.data.dir empty) the run's own training-MR
subjects rendered with their registered CT (the phantom draws the same anatomy on the MR
grid), prepared with the run's settings under WORKDIR/paired_train. With --paired_data, the
`test` split of that prepared dataset (its patients must not be among the evaluated ones).

Outputs: WORKDIR/g_ct.npz (an export: `translate --npz`, `evaluate --source` and the NumPy
generator read it) and WORKDIR/eval, the same evaluation as a CycleGAN run's WORKDIR/eval on
the same test split, so the two summaries compare line by line. A finished run is not redone
(its summary is printed again); a rerun with more or fewer steps trains again, and one with
another model, data or optimiser config is refused (WORKDIR/config.json).
"""

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from mr2ct_jax.cli import commands

COMMAND = 'mr2ct_jax.experiments.supervised'
EXPORT_FILE = 'g_ct.npz'
PAIRED_DIR = 'paired_train'


class SupervisedError(ValueError):
  """The paired training data cannot be used (missing, overlapping the test subjects)."""


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/gc.py:quick.',
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string('workdir', None, 'Output directory (g_ct.npz, eval/).', flag_values=fv)
  flags.DEFINE_string('paired_data', None, 'Prepared dataset whose `test` split holds the '
                      'paired training subjects (default: the phantom\'s training-MR subjects '
                      'with their CT).', flag_values=fv)
  return fv


def phantom_pairs(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The phantom's training-MR subjects with their registered CT, prepared (idempotent).

  Returns the data dir whose `test` split holds them (WORKDIR/paired_train/data).
  """
  # Imported here: --help and flag errors should not wait for JAX.
  from mr2ct_jax.data import writer  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data.phantom import cohort  # pylint: disable=g-import-not-at-top
  p = config.data.phantom
  directory = os.path.join(workdir, PAIRED_DIR)
  data_dir = os.path.join(directory, 'data')
  if os.path.isfile(os.path.join(data_dir, 'dataset_meta.json')):
    return data_dir
  raw = os.path.join(directory, 'raw')
  indices = cohort.split_indices(p.num_train_mr, p.num_train_ct, p.num_labeled, p.num_test)
  for split in ('paired', 'mr', 'ct'):
    os.makedirs(os.path.join(raw, split), exist_ok=True)
  for index in indices['mr']:
    cohort.write_subject(raw, 'paired', cohort.subject(config.seed, index), config.seed,
                         p.num_slices)
  # `prepare` needs unpaired training folders: the run's first training-CT subject, as MR and
  # as CT, fills them (not trained on here; a paired patient there would be refused).
  filler = cohort.subject(config.seed, indices['ct'][0])
  for split in ('mr', 'ct'):
    cohort.write_subject(raw, split, filler, config.seed, p.num_slices)
  writer.prepare(os.path.join(raw, 'mr'), os.path.join(raw, 'ct'), data_dir,
                 paired_dir=os.path.join(raw, 'paired'), overwrite=True,
                 **writer.preparation_settings(config))
  return data_dir


def paired_slices(data_dir: str, config: ml_collections.ConfigDict,
                  exclude: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(MR, CT) float32 [N, S, S] in the model range, and the patients, of `data_dir`'s test split.

  Slices outside the CT's field of view (empty mask) are left out: their CT is fill, not
  anatomy. Raises SupervisedError if a patient is in `exclude` or no slice is left.
  """
  # Imported here: --help and flag errors should not wait for JAX.
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import intensity  # pylint: disable=g-import-not-at-top
  if not dataset.has_split(data_dir, 'test'):
    raise SupervisedError(f'{data_dir}: no paired `test` split to train on (prepare '
                          '--paired_dir)')
  mr, ct, patients = [], [], []
  for volume in dataset.iterate_volumes(data_dir, 'test'):
    pid = volume['patient_id']
    if pid in exclude:
      raise SupervisedError(f'{data_dir}: paired training patient {pid!r} is also a test '
                            'patient of the evaluated data')
    keep = np.asarray(volume['mask']).reshape(len(volume['mask']), -1).any(axis=1)
    mr.append(intensity.mr_to_model(volume['image'][keep], config.data.mr_window))
    ct.append(intensity.ct_hu_to_model(volume['paired'][keep], config.data.ct_window))
    patients.append(pid)
  mr, ct = np.concatenate(mr), np.concatenate(ct)
  if not len(mr):
    raise SupervisedError(f'{data_dir}: the paired test split has no slice inside the CT')
  return mr.astype(np.float32), ct.astype(np.float32), patients


def train_generator(config: ml_collections.ConfigDict, mr: np.ndarray,
                    ct: np.ndarray) -> Any:
  """G_ct trained with L1(G_ct(MR), CT) on the pairs; returns its parameters.

  The optimiser and schedule are the CycleGAN's generator optimiser (`state.build`), the
  batches are config.train.batch_size pairs drawn with config.seed, each augmented by one
  crop/flip draw applied to both images (`pipeline.crop_and_flip`). With
  config.train.ema_decay > 0 it returns the parameters' moving average (`state.ema_update`),
  as the CycleGAN's translate and export do, so the two are compared like for like.
  """
  # Imported here: --help and flag errors should not wait for JAX.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import tb_logging  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  gan = state_lib.build(config)
  size = mr.shape[1]
  params = state_lib.init_params(gan, size, jax.random.PRNGKey(config.seed))['g_ct']
  tx = gan.tx['g']
  opt_state = tx.init(params)
  ema_decay = float(config.train.ema_decay)
  ema = {'g_ct': params}

  @jax.jit
  def step(params, opt_state, ema, x, y, t):
    loss_fn = lambda p: jnp.mean(jnp.abs(gan.generator.apply({'params': p}, x) - y))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema_decay > 0:
      ema = state_lib.ema_update(ema, {'g_ct': params}, t, ema_decay)
    return params, opt_state, ema, loss

  rng = np.random.default_rng(pipeline.derive_seed(config.seed, 'supervised'))
  pad = int(round(float(config.data.crop_pad_fraction) * size))
  flip = bool(config.data.flip_lr)
  batch, num_steps = int(config.train.batch_size), int(config.train.num_steps)
  progress = tb_logging.Progress(0, num_steps)
  start = time.perf_counter()
  for i in range(1, num_steps + 1):
    pairs = [pipeline.crop_and_flip([mr[j], ct[j]], size, pad, flip, rng)
             for j in rng.integers(0, len(mr), batch)]
    x = np.stack([p[0] for p in pairs])
    y = np.stack([p[1] for p in pairs])
    params, opt_state, ema, loss = step(params, opt_state, ema, x, y, jnp.int32(i - 1))
    if i % config.train.log_every == 0 or i in (1, num_steps):
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f'step {i}: the L1 loss is {loss}')
      tb_logging.log_line(progress.line(i, progress.rate(i), {'loss/l1': loss},
                                        compiling=i == 1))
  tb_logging.log_line(f'Trained {num_steps} steps in {time.perf_counter() - start:.0f} s.')
  return jax.device_get(ema['g_ct'] if ema_decay > 0 else params)


def run(config: ml_collections.ConfigDict, workdir: str,
        paired_data: str | None = None) -> dict[str, Any]:
  """Trains the supervised G_ct (unless WORKDIR/g_ct.npz exists), evaluates it; the summary."""
  # Imported here: --help and flag errors should not wait for JAX.
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import export  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import resolve  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import paired  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data_dir = resolve.resolve_data_dir(config, workdir)
  config = resolve.resolve_preprocessing(config, data_dir)
  # WORKDIR/config.json: a rerun with another model, data, loss or optimiser is refused (its
  # paired_train data and export would be another run's); only the step count may change.
  checkpointing.save_config(workdir, config)
  test_patients = sorted(dataset.load_meta(data_dir)['splits'].get('test', {}).get(
      'patients', {}))
  npz = os.path.join(workdir, EXPORT_FILE)
  num_steps = int(config.train.num_steps)
  trained = _trained_steps(npz)
  if trained != num_steps:
    if trained is not None:
      print(f'{npz}: trained {trained} steps, the config asks {num_steps}: training again.',
            flush=True)
    pairs_dir = paired_data or phantom_pairs(config, workdir)
    mr, ct, patients = paired_slices(pairs_dir, config, exclude=test_patients)
    print(f'Supervised G_ct on {len(mr)} paired slices of {len(patients)} patients '
          f'({pairs_dir}); evaluated on {data_dir}.', flush=True)
    params = train_generator(config, mr, ct)
    meta = export.make_meta(config, ('g_ct',), num_steps, workdir)
    meta['supervised_on'] = patients
    export.write_export(npz, {'g_ct': params}, config, meta, overwrite=True)
  eval_dir = os.path.join(workdir, 'eval')
  summary_file = os.path.join(eval_dir, 'summary.json')
  if trained == num_steps and os.path.isfile(summary_file):
    with open(summary_file, encoding='utf-8') as f:
      summary = json.load(f)
    if summary.get('step') == num_steps:
      print(summary['summary_markdown'], flush=True)
      return summary
  return paired.evaluate(npz, data_dir, eval_dir, overwrite=True)


def _trained_steps(npz: str) -> int | None:
  """The steps recorded in the export `npz`; None if there is none (or it is unreadable)."""
  # Imported here: --help and flag errors should not wait for JAX.
  from mr2ct_jax.inference import numpy_generator  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(npz):
    return None
  try:
    step = numpy_generator.read_export(npz).meta.get('step')
  except numpy_generator.ExportError:
    return None  # a damaged export is trained again, not trusted
  return int(step) if step is not None else None


def _known_errors() -> tuple[type[Exception], ...]:
  # Called only after a failure, when the modules that raise them are loaded.
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  return (SupervisedError, checkpointing.CheckpointError, config_checks.ConfigError,
          dataset.DatasetError, scoring.EvaluateError, reports.ReportError,
          generators.SourceError, FloatingPointError)


def main(argv: Sequence[str] | None = None) -> int:
  fv = _define_flags()

  def body() -> None:
    # Imported here: --help and flag errors should not wait for JAX.
    from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
    config_checks.validate(fv.config, num_devices=1, num_processes=1)
    run(fv.config, fv.workdir, fv.paired_data)

  return commands.run(fv, argv, COMMAND, body, errors=_known_errors,
                      required=('config', 'workdir'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
