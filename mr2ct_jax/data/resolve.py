"""The one rule every command uses to find a run's data (an explicit dir, else the phantom)
and to take its preprocessing from that data (config.data fields left None)."""

import os

import jax
from jax.experimental import multihost_utils
import ml_collections

from mr2ct_jax.data import dataset
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


def resolve_preprocessing(config: ml_collections.ConfigDict,
                          data_dir: str) -> ml_collections.ConfigDict:
  """`config` with the preprocessing fields left None taken from the prepared dataset.

  config.data.{spacing_mm, image_size, mr_percentile, n4, plane} (`dataset.PREPROCESSING_KEYS`)
  default to None, "as the dataset was prepared": a run fills them from dataset_meta.json and
  records the filled config (its config.json), which translate and evaluate then apply to
  new volumes. A value set explicitly must equal the dataset's.

  Returns:
    A copy of `config` with every preprocessing field set.

  Raises:
    DatasetError: the data dir is not a prepared dataset, or a set value differs from it
      (one line naming the key and both values).
  """
  meta = dataset.load_meta(data_dir)
  found = dataset.preprocessing_mismatch(meta, config.data)
  if found is not None:
    key, recorded, value = found
    raise dataset.DatasetError(
        f'{data_dir}: prepared with {key}={recorded} but config.data.{key}={value}; leave '
        f'config.data.{key} unset to use the dataset\'s value, or prepare the data again')
  recorded = dataset.preprocessing(meta)
  missing = [k for k in dataset.PREPROCESSING_KEYS if k not in recorded]
  if missing:
    raise dataset.DatasetError(f'{data_dir}: {dataset.META_FILE} records no {missing[0]}; '
                               'prepare the data again')
  config = config.copy_and_resolve_references()
  for key in dataset.PREPROCESSING_KEYS:
    if config.data.get(key) is None:
      config.data[key] = recorded[key]
  return config


def resolve_training_subset(config: ml_collections.ConfigDict,
                            data_dir: str) -> ml_collections.ConfigDict:
  """`config` with data.train_patients set: the training patients of each unpaired split.

  config.data.num_train_mr / num_train_ct (0 = all) pick a seeded, nested subset
  (`dataset.training_subset`, seed config.data.subset_seed); the chosen ids are recorded in
  the run's config.json, so a resumed run, and anyone reading the run, see exactly which
  patients trained it. A config that already lists them (a run's own config.json) must list
  the patients the rule picks from this dataset.

  Raises:
    DatasetError: a subset larger than the split, or recorded ids that differ.
  """
  meta = dataset.load_meta(data_dir)
  chosen = {}
  for split, key in (('train_mr', 'num_train_mr'), ('train_ct', 'num_train_ct')):
    if split not in meta['splits']:
      continue  # pipeline.check_data_dir names the missing split
    chosen[split] = dataset.training_subset(meta, split, int(config.data.get(key, 0)),
                                            int(config.data.get('subset_seed', 0)), data_dir)
  recorded = config.data.get('train_patients')
  if recorded is not None:
    recorded = {k: list(v) for k, v in recorded.items()}
    if recorded != chosen:
      raise dataset.DatasetError(
          f'{data_dir}: config.data.train_patients lists other patients than this dataset '
          'holds for data.num_train_mr/num_train_ct and data.subset_seed; was the data '
          'prepared again? Use a new workdir')
  config = config.copy_and_resolve_references()
  config.data.train_patients = chosen
  return config
