r"""Generates the built-in phantom as NIfTI folders (the layout `prepare` reads).

  python -m mr2ct_jax.data.phantom OUT [--seed=0] [--num_train_mr=20] [--num_train_ct=20] \
      [--num_labeled=4] [--num_test=3] [--num_val=0] [--num_test_mr=0] [--num_test_ct=0] \
      [--num_labeled_mr=0] [--num_slices=24] [--overwrite]

The layout and the anatomy are described in `mr2ct_jax.data.phantom.cohort`.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import nibabel as nib

from mr2ct_jax.data.phantom import cohort

_SEED = flags.DEFINE_integer('seed', 0, 'Random seed (the data set is deterministic from it).')
_NUM_TRAIN_MR = flags.DEFINE_integer('num_train_mr', 20, 'Unpaired MR training subjects.')
_NUM_TRAIN_CT = flags.DEFINE_integer('num_train_ct', 20,
                                     'Unpaired CT training subjects (other subjects).')
_NUM_LABELED = flags.DEFINE_integer('num_labeled', 4, 'CT subjects with label maps.')
_NUM_TEST = flags.DEFINE_integer('num_test', 3,
                                 'Paired test subjects (MR + registered CT + mask + labels).')
_NUM_VAL = flags.DEFINE_integer('num_val', 0, 'Paired validation subjects (as --num_test).')
_NUM_TEST_MR = flags.DEFINE_integer('num_test_mr', 0, 'Unpaired test MR subjects.')
_NUM_TEST_CT = flags.DEFINE_integer('num_test_ct', 0, 'Unpaired test CT subjects.')
_NUM_LABELED_MR = flags.DEFINE_integer('num_labeled_mr', 0,
                                       'MR subjects with label maps (no CT).')
_NUM_SLICES = flags.DEFINE_integer('num_slices', 24, 'Axial slices per volume.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a non-empty OUT.')


def summary(out_dir: str) -> str:
  """A few lines describing a generated phantom folder (counts, shapes, spacings)."""
  with open(os.path.join(out_dir, 'subjects.json'), encoding='utf-8') as f:
    meta = json.load(f)
  lines = [f'{out_dir}: phantom, seed {meta["seed"]}, {meta["num_slices"]} slices/volume']
  for name, ids in meta['subjects'].items():
    files = sorted(os.listdir(os.path.join(out_dir, name)))
    line = f'  {name + "/":12s} {len(ids):3d} subjects, {len(files):3d} files'
    if files:
      img = nib.load(os.path.join(out_dir, name, files[0]))
      line += (f'; e.g. {files[0]}: {img.shape} {img.get_data_dtype()}, '
               f'{"".join(nib.aff2axcodes(img.affine))}, '
               f'spacing {tuple(round(float(v), 2) for v in img.header.get_zooms())} mm')
    lines.append(line)
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m mr2ct_jax.data.phantom OUT [--flags]')
  start = time.time()
  try:
    cohort.generate(argv[1], _NUM_TRAIN_MR.value, _NUM_TRAIN_CT.value, _NUM_LABELED.value,
                    _NUM_TEST.value, _NUM_SLICES.value, _SEED.value, overwrite=_OVERWRITE.value,
                    num_val=_NUM_VAL.value, num_test_mr=_NUM_TEST_MR.value,
                    num_test_ct=_NUM_TEST_CT.value, num_labeled_mr=_NUM_LABELED_MR.value)
  except (ValueError, FileExistsError) as e:
    sys.exit(f'error: {e}')
  print(summary(os.path.abspath(argv[1])))
  print(f'generated in {time.time() - start:.1f} s')


if __name__ == '__main__':
  app.run(main)
