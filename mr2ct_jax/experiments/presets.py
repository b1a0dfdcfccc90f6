"""The study's cells and the presets that size them (tiny for tests, cpu_small, paper).

A cell is one arm of the paper's study on one prepared dataset:
  gc_small, nogc_small, gc_large, nogc_large  {small, large training set} x {GC on, off}
  gc_signed_large  beyond the paper: the large set with the paper's literal signed GC
  mr_baseline      the discussion's k-fold cross-validation of a 1-channel MR U-Net
  real_ct          the upper bound: gc_large's (seed 0's) 2-channel U-Net fed the paired test
                   subjects' real CT (in place of sCT) and real MR
Small and large are data.num_train_mr / num_train_ct subsets (nested, seeded) of the one
dataset's training splits.

A run is one cell trained with one seed: a synthesis cell can run several seeds (`--seeds`),
each in its own directory (`Run.name`: the cell's name for seed 0, `<cell>_seed<k>` for seed
k), and the report averages a cell's finished seeds per patient. The MR-only baseline and the
real-CT upper bound run once.
"""

import dataclasses
import functools
import importlib.util
import re
from types import ModuleType

import ml_collections

from mr2ct_jax.cli import commands


@dataclasses.dataclass(frozen=True)
class Cell:
  """One cell: what it runs and, for synthesis cells, its training set and GC setting."""
  name: str
  kind: str                 # 'synthesis', 'baseline' or 'real_ct'
  size: str = ''            # 'small' / 'large' (synthesis cells)
  gc: bool = False          # GC term on
  signed: bool = False      # loss.gc_signed
  needs: str = ''           # a cell whose outputs this one uses


CELLS = (
    Cell('gc_small', 'synthesis', 'small', gc=True),
    Cell('nogc_small', 'synthesis', 'small', gc=False),
    Cell('gc_large', 'synthesis', 'large', gc=True),
    Cell('nogc_large', 'synthesis', 'large', gc=False),
    Cell('gc_signed_large', 'synthesis', 'large', gc=True, signed=True),
    Cell('mr_baseline', 'baseline'),
    Cell('real_ct', 'real_ct', needs='gc_large'),
)
CELL_NAMES = tuple(c.name for c in CELLS)
BY_NAME = {c.name: c for c in CELLS}
SYNTHESIS = tuple(c.name for c in CELLS if c.kind == 'synthesis')


class PresetError(ValueError):
  """An unknown preset or cell name, or a preset used without the data it needs."""


SEED_SUFFIX = '_seed'  # run directory of seed k > 0: <cell>_seed<k>


@dataclasses.dataclass(frozen=True)
class Run:
  """One cell trained with one seed (an offset added to the preset's config.seed)."""
  cell: Cell
  seed: int = 0

  @property
  def name(self) -> str:
    """Its directory and lock name: the cell's name for seed 0, else `<cell>_seed<k>`."""
    return self.cell.name if self.seed == 0 else f'{self.cell.name}{SEED_SUFFIX}{self.seed}'


@dataclasses.dataclass(frozen=True)
class Preset:
  """A study size: the base config and the two training-set sizes (MR, CT volumes)."""
  name: str
  variant: str                     # configs/gc.py variant the cells start from
  small: tuple[int, int]
  large: tuple[int, int]
  baseline_folds: int
  needs_data: bool = False
  doc: str = ''


PRESETS = {
    'tiny': Preset('tiny', 'test', (2, 2), (4, 4), 2,
                   doc='tests: every cell and the whole report in about a minute (32 px)'),
    'cpu_small': Preset('cpu_small', 'quick', (6, 6), (24, 24), 3,
                        doc='the phantom on 2 CPU cores, about 90 minutes for all cells'),
    'paper': Preset('paper', 'paper', (20, 20), (302, 613), 5, needs_data=True,
                    doc="the paper's sizes and schedule (accelerators; --data required)"),
}


def get_preset(name: str) -> Preset:
  """The preset called `name`; PresetError names the choices."""
  if name not in PRESETS:
    raise PresetError(f'--preset={name}: unknown; choose one of {", ".join(PRESETS)}')
  return PRESETS[name]


def select_runs(names: str | None, num_seeds: int = 1) -> list[Run]:
  """The runs of a comma-separated list of cells (None / '': all), seed by seed.

  Args:
    names: cell names, each meaning all its seeds (synthesis cells: 0 .. num_seeds - 1; the
      others: one run), or `<synthesis cell>@<k>` for seed k alone, whatever num_seeds (e.g.
      to run seeds side by side).
    num_seeds: seeds per synthesis cell (`--seeds`).

  Returns:
    Every cell's seed 0 in study order, then every seed 1, ...: an interrupted study has
    whole seeds of every cell rather than many seeds of the first cells.

  Raises:
    PresetError: an unknown cell, a bad seed, or num_seeds < 1.
  """
  if num_seeds < 1:
    raise PresetError(f'--seeds={num_seeds}: must be at least 1')
  tokens = [n.strip() for n in (names or ','.join(CELL_NAMES)).split(',') if n.strip()]
  if not tokens:  # e.g. --cells=, : not "all cells", and not a job with nothing to do
    raise PresetError(f'--cells={names!r}: names no cell; choose from {", ".join(CELL_NAMES)} '
                      '(or leave it out for all)')
  wanted: set[tuple[str, int]] = set()
  for token in tokens:
    name, at, seed_text = token.partition('@')
    if name not in BY_NAME:
      raise PresetError(f'--cells: unknown cell {name!r}; choose from {", ".join(CELL_NAMES)}')
    synthesis = BY_NAME[name].kind == 'synthesis'
    seeds = list(range(num_seeds if synthesis else 1))
    if at:
      if not re.fullmatch(r'[0-9]+', seed_text) or (not synthesis and int(seed_text) != 0):
        raise PresetError(f'--cells: {token!r}: the seed must be a number >= 0'
                          + ('' if synthesis else f' and 0 for {name} (it runs once)'))
      seeds = [int(seed_text)]
    wanted.update((name, k) for k in seeds)
  return [Run(c, k) for k in sorted({k for _, k in wanted}) for c in CELLS
          if (c.name, k) in wanted]


@functools.lru_cache(maxsize=1)
def _gc_configs() -> ModuleType:
  """configs/gc.py of this checkout (configs/ lies beside the package, it is not installed)."""
  spec = importlib.util.spec_from_file_location('mr2ct_jax_configs_gc',
                                                commands.default_config_path())
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config(preset: Preset) -> ml_collections.ConfigDict:
  """The config every cell of `preset` starts from (the phantom's sizes included)."""
  config = _gc_configs().get_config(preset.variant)
  p = config.data.phantom
  if preset.name == 'tiny':
    # Several paired / unpaired / labeled MR subjects, so every t-test has n >= 2.
    p.num_train_mr, p.num_train_ct = preset.large
    p.num_labeled, p.num_test, p.num_val = 2, 2, 0
    p.num_test_mr, p.num_test_ct, p.num_labeled_mr = 2, 2, 2
    p.num_slices = 4
    config.train.num_steps = 2
    config.train.log_every = config.train.image_every = config.train.checkpoint_every = 2
    config.seg.num_steps = 2
    config.model.conv_impl = 'xla'
  elif preset.name == 'cpu_small':
    # The quick model, a large set 4x the small one, several subjects per test split.
    p.num_train_mr, p.num_train_ct = preset.large
    p.num_labeled, p.num_test, p.num_val = 4, 4, 0
    p.num_test_mr, p.num_test_ct, p.num_labeled_mr = 4, 4, 6
    p.num_slices = 12
    config.train.num_steps = 1600
    config.train.checkpoint_every = 400
    # 64 px at 5 mm, 4 slices per step: quick's grid before it moved to 96 px. The README's
    # cpu_small numbers (two seeds per cell, ~90 minutes) were measured on it.
    config.data.prepare_defaults.image_size = 64
    config.data.prepare_defaults.spacing_mm = 5.0
    config.train.batch_size = 4
    config.eval.flip_average = False  # its numbers are of the plain generator outputs
    config.seg.num_steps = 800
    # The paper's lambda_cycle, not quick's 1.0: the study asks the paper's question at its
    # loss balance, and its README numbers (two seeds per cell) were measured with 3.0.
    config.loss.cycle_weight = _gc_configs().get_config('paper').loss.cycle_weight
  config.seg.baseline_folds = preset.baseline_folds
  return config


def cell_config(preset: Preset, cell: Cell, data_dir: str,
                seed: int = 0) -> ml_collections.ConfigDict:
  """The full config of a cell's run: base config on `data_dir`, its subset, loss and seed.

  The seed changes the networks' initialisation, the shuffling and the augmentation, not the
  data: the dataset is prepared once and the training subsets depend on data.subset_seed only.
  """
  config = base_config(preset)
  config.data.dir = data_dir
  config.seed = int(config.seed) + seed
  if cell.kind == 'synthesis':
    config.data.num_train_mr, config.data.num_train_ct = getattr(preset, cell.size)
    config.loss.gc_weight = _gc_configs().get_config('paper').loss.gc_weight if cell.gc else 0.0
    config.loss.gc_signed = bool(cell.signed)
  return config
