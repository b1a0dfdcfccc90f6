r"""One markdown table of `bench train` reports (e.g. a sweep of batch, dtype and fused pairs).

  python -m mr2ct_jax.bench summary OUT/train_*.json [--output=OUT/summary.md]

A row per report, in the order given: the device (a CPU by its model name), size, batch,
compute dtype, fused pairs, our step time, the PyTorch reference's (measured in the same run)
and the speedup, the model TFLOP/s, and the MFU against the device's peak (a CPU, which has
no peak in the table, shows '-').
"""

import json
import sys
from typing import Any, Sequence

from absl import flags

from mr2ct_jax import atomic
from mr2ct_jax.cli import commands

HEADER = ('| device | size | batch | dtype | fuse_pairs | ours ms | PyTorch ms | speedup | '
          'model TFLOP/s | MFU |')


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
  return '-' if value is None else format(value * scale, spec)


def row(report: dict[str, Any]) -> str:
  """The table row of one `bench train` report."""
  if not isinstance(report, dict) or report.get('benchmark') != 'train':
    kind = report.get('benchmark') if isinstance(report, dict) else type(report).__name__
    raise ValueError(f'not a `bench train` report (benchmark={kind!r})')
  torch_s = (report.get('pytorch_measured') or {}).get('step_time_s')
  device = report.get('device_kind') or '?'
  if device == 'cpu':
    device = report.get('machine', {}).get('cpu', device)
  return (f'| {device} | {report["size"]} | {report["batch_size"]} | {report["dtype"]} | '
          f'{report.get("fuse_pairs", False)} | {_fmt(report["step_time_s"], ".2f", 1e3)} | '
          f'{_fmt(torch_s, ".2f", 1e3)} | {_fmt(report.get("speedup_vs_pytorch_measured"), ".2f")}'
          f' | {_fmt(report.get("model_tflops"), ".2f")} | '
          f'{_fmt(report.get("mfu"), ".1%")} |')


def table(reports: Sequence[dict[str, Any]]) -> str:
  """The markdown table (header, separator, one row per report)."""
  separator = '|' + '---|' * (HEADER.count('|') - 1)
  return '\n'.join([HEADER, separator, *(row(r) for r in reports)]) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: prints the table (and writes it with --output)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('output', None, 'Also write the table to this file.', flag_values=fv)
  paths = commands.parse(fv, sys.argv if argv is None else argv, 'mr2ct_jax.bench summary',
                         positional=True, doc=__doc__)
  if not paths:
    raise SystemExit('error: give one or more `bench train` JSON reports')
  reports = []
  for path in paths:
    try:
      with open(path, encoding='utf-8') as f:
        reports.append(json.load(f))
      row(reports[-1])  # checked here, so that the message names the file
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
      raise SystemExit(f'error: {path}: {e}') from None
  out = table(reports)
  print(out, end='')
  if fv.output:
    atomic.write_text(fv.output, out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
