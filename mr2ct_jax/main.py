r"""Trains the CycleGAN + gradient-consistency model, then evaluates it on the test split.

  python -m mr2ct_jax.main --config=configs/gc.py --workdir=runs/gc
  python -m mr2ct_jax.main --config=configs/gc.py:quick --workdir=runs/quick
  python -m mr2ct_jax.main --config=configs/gc.py --config.loss.gc_weight=0 --workdir=runs/nogc

Running the same command again resumes from the latest checkpoint in --workdir. SIGTERM or
SIGINT (Ctrl-C) finish the current step, save a checkpoint and exit with status 75.
This is the only module that reads flags for training.
"""


from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mr2ct_jax.cli import commands
from mr2ct_jax.cli import distributed
from mr2ct_jax.cli import hugepages

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/gc.py or configs/gc.py:quick.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
distributed.define_flags()
_VERBOSE = flags.DEFINE_bool('verbose', False, 'On an error, print its traceback too (for a '
                             'bug report).')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with one-line errors: a bad flag or value (naming it), an unknown
  --config.X key, a config file that fails to load."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    raise SystemExit(f'error: {commands.flag_error(e)}') from e
  except Exception as e:  # pylint: disable=broad-except
    # Only --config runs user code while parsing: its file failed, or an override names a
    # field the config lacks (ml_collections raises KeyError/AttributeError).
    raise SystemExit(f'error: {commands.config_error(e, argv)}') from e
  commands.load_config_flag(flags.FLAGS, argv)
  return rest


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Library INFO logs (Orbax, TFDS) would drown the progress lines; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  # JAX and the library are imported here, not at the top: the huge-page re-exec must happen
  # before JAX loads (see `__main__` below), and `--help` should not wait for them.
  distributed.initialize()
  # grain worker processes re-import modules that define absl flags.
  flags.FLAGS.mark_as_parsed()
  # The library, likewise after the re-exec (it imports JAX).
  from mr2ct_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from mr2ct_jax import config_checks  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import dataset  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import volume  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.inference import generators  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.training import loop  # pylint: disable=g-import-not-at-top
  # One line, no traceback: these are the user's inputs, not our bugs. A signal while training
  # exits 75 (`preemption`); during the evaluation after it, 143 with no partial output.
  errors = (config_checks.ConfigError, checkpointing.CheckpointError, volume.VolumeError,
            dataset.DatasetError, loop.NonFiniteLossError, scoring.EvaluateError,
            reports.ReportError, generators.SourceError)
  with commands.terminate_unwinds(), commands.one_line_errors(errors, verbose=_VERBOSE.value):
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  hugepages.reexec_with_hugepages()  # Before JAX is imported; see mr2ct_jax/cli/hugepages.py.
  app.run(main, flags_parser=parse_flags)
