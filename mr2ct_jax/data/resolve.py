"""The one rule every command uses to find a run's data: an explicit dir, else the phantom."""

import os

import jax
from jax.experimental import multihost_utils
import ml_collections

from mr2ct_jax.data import writer


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str,
                     data_dir: str | None = None) -> str:
  """Where a run's data is: `data_dir`, else config.data.dir, else WORKDIR/phantom's data.

  The phantom is generated and prepared under WORKDIR/phantom on first use (from
  config.data.phantom and config.seed) and reused afterwards. On several hosts (WORKDIR on a
  shared filesystem) process 0 builds it while the others wait at a barrier, then reuse the
  finished build instead of racing to rewrite it.
  """
  if data_dir:
    return data_dir
  if config.data.dir:
    return config.data.dir
  directory = os.path.join(workdir, 'phantom')
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      writer.prepare_phantom(directory, config)
    multihost_utils.sync_global_devices('mr2ct_jax: phantom prepared')
  return writer.prepare_phantom(directory, config)
