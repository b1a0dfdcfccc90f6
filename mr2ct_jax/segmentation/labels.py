"""Label maps as users have them: the number of U-Net classes, structure names, value checks.

The paper trained its U-Net on 22 labels (19 muscles, pelvis, femur, sacrum) and scored the 4
that its MR ground truth held. So:

- The number of classes comes from the data: the largest label value of the training label
  maps + 1 (`config.seg.num_classes` None, the default), or `config.seg.num_classes` set
  explicitly, which must be at least that (else a ConfigError naming seg.num_classes).
- A label value the U-Net has no class for, in any label map (labeled CT, labeled MR, paired
  test), is a one-line SegDataError naming the patient's source file (the path `prepare`
  recorded in dataset_meta.json).
- Structure names come from a label table, `config.seg.label_table` = path to either
    * a text file, one structure per line: `<value> <name>`, e.g. `3 gluteus_medius`
      (the name is the rest of the line; blank lines and lines starting with '#' are
      skipped), or
    * a JSON object {"<value>": "<name>", ...}, e.g. {"1": "pelvis", "2": "femur"}
  (a file ending in .json is read as JSON, any other as text). Values are integers 0..255;
  0 is the background and is not a structure. Values without a name are called
  `label_<value>`. Without a table: the phantom's names (1 pelvis, 2 femur,
  3 gluteus_medius, 4 gluteus_minimus).
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from mr2ct_jax.config_checks import ConfigError
from mr2ct_jax.data.phantom import anatomy as phantom_anatomy

MAX_LABEL = 255  # label maps are stored as uint8


class SegDataError(ValueError):
  """The data cannot train/test the segmentation; the one-line message names the dir/key."""


def default_table() -> dict[int, str]:
  """The phantom's structure names (background excluded)."""
  return {k: v for k, v in phantom_anatomy.LABELS.items() if k}


def _table_value(text: Any, where: str) -> int:
  try:
    value = int(str(text).strip())
  except ValueError:
    raise ConfigError(f'{where}: label value {text!r} is not an integer') from None
  if not 0 <= value <= MAX_LABEL:
    raise ConfigError(f'{where}: label value {value} outside 0..{MAX_LABEL}')
  return value


def parse_label_table(path: str) -> dict[int, str]:
  """Label value -> structure name of a label table file (format: the module docstring).

  Raises:
    ConfigError: the file is missing or unreadable, or an entry is malformed, out of range,
      repeated or has an empty name (the message names config.seg.label_table, the path and
      the line).
  """
  where = f'config.seg.label_table={path}'
  try:
    # utf-8-sig: a leading byte-order mark (Windows Notepad writes one) is not part of line 1.
    with open(path, encoding='utf-8-sig') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ConfigError(f'{where}: cannot read ({getattr(e, "strerror", None) or e})') from e
  entries: list[tuple[str, Any, Any]] = []
  if path.lower().endswith('.json'):
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{where}: not valid JSON ({e})') from e
    if not isinstance(obj, dict):
      raise ConfigError(f'{where}: expected a JSON object {{"<value>": "<name>"}}')
    entries = [(f'{where}: key {k!r}', k, v) for k, v in obj.items()]
  else:
    for number, line in enumerate(text.splitlines(), 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      parts = line.split(None, 1)
      if len(parts) < 2:
        raise ConfigError(f'{where}: line {number}: expected "<value> <name>", got {line!r}')
      entries.append((f'{where}: line {number}', parts[0], parts[1]))
  table: dict[int, str] = {}
  for entry_where, key, name in entries:
    value = _table_value(key, entry_where)
    if not isinstance(name, str) or not name.strip():
      raise ConfigError(f'{entry_where}: the name of label {value} is empty or not text')
    if value in table:
      raise ConfigError(f'{entry_where}: label value {value} appears twice')
    if name.strip() in table.values():
      raise ConfigError(f'{entry_where}: structure name {name.strip()!r} appears twice')
    table[value] = name.strip()
  table.pop(0, None)  # the background is not a structure
  if not table:
    raise ConfigError(f'{where}: names no structure (label values >= 1)')
  return table


def label_table(seg: Mapping[str, Any]) -> dict[int, str]:
  """The label table of a `seg` config section: its `label_table` file, else the default."""
  path = seg.get('label_table') if hasattr(seg, 'get') else None
  return parse_label_table(os.fspath(path)) if path else default_table()


def structure_names(num_classes: int, table: Mapping[int, str] | None = None) -> dict[int, str]:
  """Label value -> name of the U-Net's structures 1..num_classes-1 (`label_<k>` if unnamed)."""
  table = default_table() if table is None else table
  return {k: table.get(k, f'label_{k}') for k in range(1, int(num_classes))}


def source_file(meta: Mapping[str, Any], split: str, pid: str, role: str = 'label') -> str:
  """The patient's input file of `role` recorded by `prepare` (any of its files, else a name)."""
  files = meta.get('splits', {}).get(split, {}).get('patients', {}).get(pid, {}).get('files')
  if files:
    return str(files.get(role) or next(iter(files.values())))
  return f'{split} patient {pid}'


def check_label_map(label: np.ndarray, num_classes: int, where: str, *,
                    allow_empty: bool = False) -> int:
  """The largest value of a label map, after checking it; `where` names the file.

  Raises:
    SegDataError: a value >= num_classes (the U-Net has no class for it), or an empty map
      (all background) unless `allow_empty`: an empty ground truth would score every
      predicted structure 0 instead of saying nothing.
  """
  top = int(np.max(label)) if label.size else 0
  if top >= num_classes:
    raise SegDataError(f'{where}: label value {top}, but the U-Net has {num_classes} classes '
                       f'(0..{num_classes - 1}); set config.seg.num_classes >= {top + 1} or '
                       'leave it None to take it from the labeled data')
  if not allow_empty and top == 0:
    raise SegDataError(f'{where}: the label map is empty (all background); a ground truth '
                       'without structures cannot be scored, remove this subject or its label')
  return top


def resolve_num_classes(configured: int | None, maxima: Mapping[str, int]) -> int:
  """The U-Net's number of classes: max label of the training label maps + 1, or the config's.

  Args:
    configured: config.seg.num_classes (None: from the data).
    maxima: source file -> largest label value of its label map (the training split).

  Raises:
    ConfigError: the configured value is smaller than the data needs (names
      seg.num_classes and the file with the largest label).
    SegDataError: no training label map holds a structure.
  """
  if not maxima or max(maxima.values()) == 0:
    raise SegDataError('the training label maps hold no structure (all background)')
  where, top = max(maxima.items(), key=lambda kv: (kv[1], kv[0]))
  needed = top + 1
  if configured is None:
    return needed
  if int(configured) < needed:
    raise ConfigError(f'config.seg.num_classes={configured}: {where} has label value {top}, '
                      f'so at least {needed} classes are needed (or leave it None: from the '
                      'data)')
  return int(configured)


def present_labels(truth: np.ndarray) -> list[int]:
  """The structure values (>= 1) a label map contains, sorted."""
  return [int(v) for v in np.unique(truth) if v]
