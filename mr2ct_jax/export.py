"""Exports trained generator(s) of a workdir to a self-describing .npz for NumPy users.

  python -m mr2ct_jax.export --workdir=runs/gc --output=g_ct.npz [--step=N]
      [--direction=mr2ct|ct2mr|both] [--overwrite]

The file holds one array per parameter named '<network>/<layer>/<param>' ('g_ct/stem/kernel';
g_ct translates MR->CT, g_mr CT->MR), the run's config as a JSON string under '__config__'
and the intensity mapping under '__meta__' (JSON). `mr2ct_jax.inference.numpy_generator` runs it without
JAX; `mr2ct_jax.translate --npz=...` translates volumes with it.
"""

import json
import os
import sys
from typing import Any, Sequence

from absl import flags
import ml_collections
import numpy as np
from flax import traverse_util

from mr2ct_jax import atomic
from mr2ct_jax import checkpointing
from mr2ct_jax import storage
from mr2ct_jax.cli import commands
from mr2ct_jax.inference import generators
from mr2ct_jax.inference import numpy_generator

EXPORT_DIRECTIONS = ('mr2ct', 'ct2mr', 'both')


def networks_for(direction: str) -> tuple[str, ...]:
  """'mr2ct' -> ('g_ct',), 'ct2mr' -> ('g_mr',), 'both' -> ('g_ct', 'g_mr')."""
  if direction == 'both':
    return tuple(generators.DIRECTIONS.values())
  return (generators.network_for(direction),)


def make_meta(config: ml_collections.ConfigDict, networks: Sequence[str], step: int | None,
              workdir: str) -> dict[str, Any]:
  """The intensity mapping and provenance a user needs to feed the exported generator.

  A slice goes to the model range by: CT: clip HU to ct_window, map linearly to [0, 255], then
  x / 127.5 - 1. MR: scale so the mr_percentile percentile of the body is 100 (MR-normalised
  units), clip to mr_window, map to [0, 255], then x / 127.5 - 1; at spacing_mm in-plane.
  """
  data = config.data
  return {
      'format_version': numpy_generator.FORMAT_VERSION,
      'networks': list(networks),
      'directions': {name: direction for direction, name in generators.DIRECTIONS.items()
                     if name in networks},
      'step': step,
      'weights': generators.weights_kind(config),
      'workdir': storage.absolute(workdir),
      'ct_window': [float(v) for v in data.ct_window],
      'mr_window': [float(v) for v in data.mr_window],
      'mr_percentile': float(data.mr_percentile),
      'spacing_mm': float(data.spacing_mm),
      'image_size': int(data.image_size),
      'n4': bool(data.n4),
      'plane': str(data.get('plane', 'axial')),
      'model_range': [-1.0, 1.0],
      'mapping': ('CT: clip(HU, ct_window) -> [0, 255] -> x/127.5 - 1. MR: scale so the '
                  'mr_percentile percentile of the body = 100, clip(mr_window) -> [0, 255] -> '
                  'x/127.5 - 1. Inverse: (y + 1) * 127.5 -> window units.'),
  }


def write_export(path: str, params: dict[str, Any], config: ml_collections.ConfigDict,
                 meta: dict[str, Any], overwrite: bool = False) -> None:
  """Writes {network: params tree} + config + meta to `path` atomically (tmp file + rename).

  Raises:
    FileExistsError: `path` exists and not `overwrite`.
    ValueError: `path` does not end in .npz.
    atomic.OutputError: `path` cannot be written.
  """
  if not path.endswith('.npz'):
    raise ValueError(f'{path}: the export file name must end in .npz')
  if storage.exists(path) and not overwrite:
    raise FileExistsError(f'{path}: already exists (pass --overwrite to replace it)')
  arrays: dict[str, np.ndarray] = {}
  for network, tree in params.items():
    for name, leaf in traverse_util.flatten_dict(tree, sep='/').items():
      arrays[f'{network}/{name}'] = np.asarray(leaf, np.float32)
  arrays[numpy_generator.CONFIG_KEY] = np.array(checkpointing.config_to_json(config))
  arrays[numpy_generator.META_KEY] = np.array(json.dumps(meta, sort_keys=True))
  atomic.check_writable(path)
  if not storage.is_remote(path):  # an object store has no folders to make
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # A file object, so NumPy does not append a second '.npz' to the temporary name; a gs://
  # `path` is written locally and uploaded whole (`atomic.writing`).
  with atomic.writing(path, 'wb') as f:
    np.savez(f, **arrays)


def export(workdir: str, output: str, *, direction: str = 'mr2ct', step: int | None = None,
           overwrite: bool = False) -> dict[str, Any]:
  """Exports the generator(s) of `workdir` (latest checkpoint or `step`) to `output`.

  Args:
    workdir: a training workdir.
    output: the .npz path to write.
    direction: 'mr2ct' (g_ct), 'ct2mr' (g_mr) or 'both'.
    step: checkpoint step (None: the latest).
    overwrite: replace an existing `output`.

  Returns:
    The meta dict written under '__meta__'.

  Raises:
    generators.SourceError, FileExistsError, ValueError (atomic.OutputError: `output`
    cannot be written): one-line messages.
  """
  if direction not in EXPORT_DIRECTIONS:
    raise ValueError(f'direction={direction!r}: must be one of {EXPORT_DIRECTIONS}')
  if not output.endswith('.npz'):
    raise ValueError(f'{output}: the export file name must end in .npz')
  # Check the destination before the (slow) restore, so a mistake fails at once.
  if storage.exists(output) and not overwrite:
    raise FileExistsError(f'{output}: already exists (pass --overwrite to replace it)')
  if storage.isdir(output):
    raise ValueError(f'{output}: is a folder; name the output file')
  atomic.check_writable(output)
  networks = networks_for(direction)
  params, config, got_step = generators.restore_generators(workdir, networks, step)
  meta = make_meta(config, networks, got_step, workdir)
  write_export(output, params, config, meta, overwrite=overwrite)
  return meta


def _define_flags() -> flags.FlagValues:
  # A private FlagValues: the commands can be imported in one process (tests, a notebook)
  # without their flags colliding in the global registry.
  fv = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'Training workdir to export from.', flag_values=fv)
  flags.DEFINE_string('output', None, 'Output .npz path.', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).', flag_values=fv)
  flags.DEFINE_enum('direction', 'mr2ct', EXPORT_DIRECTIONS,
                    'Generator(s): mr2ct = g_ct, ct2mr = g_mr, or both.', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output file.', flag_values=fv)
  return fv


def _run(fv: flags.FlagValues) -> None:
  meta = export(fv.workdir, fv.output, direction=fv.direction, step=fv.step,
                overwrite=fv.overwrite)
  print(f'exported {", ".join(meta["networks"])} (step {meta["step"]}) from {fv.workdir} '
        f'to {fv.output}')


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns 0 or raises SystemExit with a one-line error."""
  fv = _define_flags()
  return commands.run(fv, argv, 'mr2ct_jax.export', lambda: _run(fv),
                      errors=(generators.SourceError, FileExistsError, ValueError,
                              OSError),
                      required=('workdir', 'output'), doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
