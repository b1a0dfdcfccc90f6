r"""The PyTorch CycleGAN(+GC) step or generator inference, timed here, for `bench`.

  python -m mr2ct_jax.bench.torch_reference --size=128 [--gc] [--ngf=64 --ndf=64 \
      --res_blocks=9 --disc_layers=3 --steps=5 --warmup=1 --threads=0 --device=cpu] [--bf16]
  python -m mr2ct_jax.bench.torch_reference --mode=inference --size=256 --batch=8 \
      [--slices=32 --repeats=5 --warmup=1 --bf16 ...]

Prints one JSON line: {"step_time_s": median, "step_times_s": [...], "torch": version, ...}
(--mode=train, for `bench train`), or {"slices_per_s": ..., "run_times_s": [...], ...}
(--mode=inference, for `bench translate`: G alone over a volume of --slices slices in
batches of --batch, the last batch padded with -1 as mr2ct_jax.inference.slices pads it,
under `torch.inference_mode`). --bf16 runs the forward passes under
`torch.autocast(device, dtype=torch.bfloat16)` (PyTorch's mixed precision: parameters and
optimiser in float32, the backward pass outside autocast as PyTorch recommends).

The networks and the step restate junyanz/pytorch-CycleGAN-and-pix2pix, the implementation
the paper builds on: `ResnetGenerator` (reflection padding, `InstanceNorm2d` without affine,
`ConvTranspose2d` upsampling, tanh) and `NLayerDiscriminator` (4x4 convs, LeakyReLU 0.2),
LSGAN losses, cycle L1 x lambda, the optional gradient-correlation term on |central
differences| (yuta-hi/pytorch_similarity), and `optimize_parameters`: generators' step with
the discriminators frozen, then the discriminators' step on detached fakes (at batch 1 the
image pool returns its input until it fills, so it is left out). Parameter counts are checked
against ours (11,365,633 and 2,762,689 at 64 filters). PyTorch is not a dependency of
mr2ct_jax: this module is only run when it is installed (`pip install torch`).
"""

import contextlib
import itertools
import json
import statistics
import sys
import time
from typing import Any, Sequence

from absl import flags

from mr2ct_jax.cli import commands


def _define_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_integer('size', 128, 'Image size (square).', flag_values=fv)
  flags.DEFINE_bool('gc', False, 'Add the gradient-correlation term (lambda 0.3).',
                    flag_values=fv)
  flags.DEFINE_integer('ngf', 64, 'Generator base filters.', flag_values=fv)
  flags.DEFINE_integer('ndf', 64, 'Discriminator base filters.', flag_values=fv)
  flags.DEFINE_integer('res_blocks', 9, 'Generator residual blocks.', flag_values=fv)
  flags.DEFINE_integer('disc_layers', 3, 'Discriminator stride-2 layers.', flag_values=fv)
  flags.DEFINE_integer('steps', 5, 'Steps timed.', flag_values=fv)
  flags.DEFINE_integer('warmup', 1, 'Untimed steps first.', flag_values=fv)
  flags.DEFINE_integer('threads', 0, 'torch.set_num_threads (0: PyTorch default).',
                       flag_values=fv)
  flags.DEFINE_enum('device', 'cpu', ['cpu', 'cuda'], 'Where the step runs (eager, as the '
                    'reference runs).', flag_values=fv)
  flags.DEFINE_enum('mode', 'train', ['train', 'inference'], 'Time the training step or '
                    'the generator\'s inference over a volume.', flag_values=fv)
  flags.DEFINE_integer('batch', None, 'Batch: images per training step (default 1) or slices '
                       'per generator call (--mode=inference, default 8).', flag_values=fv)
  flags.DEFINE_integer('slices', 32, 'Slices of the volume translated (--mode=inference).',
                       flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'Timed translations of the volume (--mode=inference).',
                       flag_values=fv)
  flags.DEFINE_bool('bf16', False, 'Forward passes under torch.autocast(dtype=bfloat16).',
                    flag_values=fv)
  flags.DEFINE_bool('cudnn_benchmark', False, 'Set torch.backends.cudnn.benchmark (off by '
                    'default: cuDNN picks conv algorithms without timing them).', flag_values=fv)
  return fv


def build_networks(torch: Any, ngf: int, ndf: int, res_blocks: int, disc_layers: int):
  """(generator factory, discriminator factory) as in the reference, 1 channel in and out."""
  nn = torch.nn

  class ResnetBlock(nn.Module):

    def __init__(self, dim: int):
      super().__init__()
      self.block = nn.Sequential(
          nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
          nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x):
      return x + self.block(x)

  def generator() -> Any:
    layers = [nn.ReflectionPad2d(3), nn.Conv2d(1, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for i in range(2):
      c = ngf * 2 ** i
      layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
    layers += [ResnetBlock(4 * ngf) for _ in range(res_blocks)]
    for i in range(2):
      c = 4 * ngf // 2 ** i
      layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, 1), nn.InstanceNorm2d(c // 2),
                 nn.ReLU(True)]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 1, 7), nn.Tanh()]
    return nn.Sequential(*layers)

  def discriminator() -> Any:
    layers = [nn.Conv2d(1, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    width = ndf
    for i in range(1, disc_layers + 1):
      out = ndf * min(2 ** i, 8)
      stride = 2 if i < disc_layers else 1
      layers += [nn.Conv2d(width, out, 4, stride, 1), nn.InstanceNorm2d(out),
                 nn.LeakyReLU(0.2, True)]
      width = out
    layers += [nn.Conv2d(width, 1, 4, 1, 1)]
    return nn.Sequential(*layers)

  return generator, discriminator


def _gradient_correlation(torch: Any, a: Any, b: Any, eps: float = 1e-8) -> Any:
  """Per-image GC of |central differences| (replicate padding), as mr2ct_jax.training.losses."""
  def grads(x):
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode='replicate')
    return ((p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]).abs(),
            (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]).abs())

  def ncc(x, y):  # mr2ct_jax.training.losses.normalized_cross_correlation
    x = x - x.mean((1, 2, 3), keepdim=True)
    y = y - y.mean((1, 2, 3), keepdim=True)
    sxy, sxx, syy = ((u * v).sum((1, 2, 3)) for u, v in ((x, y), (x, x), (y, y)))
    return sxy * torch.rsqrt((sxx + eps) * (syy + eps))

  (ax, ay), (bx, by) = grads(a), grads(b)
  return 0.5 * (ncc(ax, bx) + ncc(ay, by))


def _setup(threads: int, device: str, cudnn_benchmark: bool) -> Any:
  """Imports and configures PyTorch; returns the module."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: only this benchmark needs it)
  if threads:
    torch.set_num_threads(threads)
  torch.backends.cudnn.benchmark = cudnn_benchmark
  if device == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('error: --device=cuda but this PyTorch sees no CUDA device')
  torch.manual_seed(0)
  return torch


def _autocast(torch: Any, device: str, bf16: bool) -> Any:
  """`torch.autocast` to bfloat16 on `device` when `bf16`, else a no-op context."""
  if not bf16:
    return contextlib.nullcontext()
  return torch.autocast(device, dtype=torch.bfloat16)


def _about(torch: Any, device: str, bf16: bool, cudnn_benchmark: bool) -> dict[str, Any]:
  return {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'device': device,
          'device_name': (torch.cuda.get_device_name() if device == 'cuda' else 'cpu'),
          'cudnn_benchmark': cudnn_benchmark,
          'precision': 'autocast_bfloat16' if bf16 else 'float32'}


def run(size: int, gc: bool, ngf: int, ndf: int, res_blocks: int, disc_layers: int,
        steps: int, warmup: int, threads: int = 0, device: str = 'cpu',
        cudnn_benchmark: bool = False, bf16: bool = False, batch: int = 1) -> dict[str, Any]:
  """Times the reference training step on `batch` images per domain; returns the
  measurements.

  With `bf16` the forward passes and losses run under bfloat16 autocast.
  """
  torch = _setup(threads, device, cudnn_benchmark)
  autocast = lambda: _autocast(torch, device, bf16)
  generator, discriminator = build_networks(torch, ngf, ndf, res_blocks, disc_layers)
  g_a, g_b, d_a, d_b = (net().to(device) for net in
                        (generator, generator, discriminator, discriminator))
  count = lambda m: sum(p.numel() for p in m.parameters())
  opt_g = torch.optim.Adam(itertools.chain(g_a.parameters(), g_b.parameters()), 2e-4,
                           betas=(0.5, 0.999))
  opt_d = torch.optim.Adam(itertools.chain(d_a.parameters(), d_b.parameters()), 2e-4,
                           betas=(0.5, 0.999))
  mse, l1 = torch.nn.MSELoss(), torch.nn.L1Loss()
  gan = lambda pred, target: mse(pred, torch.full_like(pred, target))
  real_a = torch.randn(batch, 1, size, size).clamp(-1, 1).to(device)
  real_b = torch.randn(batch, 1, size, size).clamp(-1, 1).to(device)
  discriminators = list(itertools.chain(d_a.parameters(), d_b.parameters()))
  seen = {}  # the generators' output dtype: torch.bfloat16 under autocast

  def step() -> float:
    for p in discriminators:
      p.requires_grad_(False)
    opt_g.zero_grad()
    with autocast():
      fake_b, fake_a = g_a(real_a), g_b(real_b)
      rec_a, rec_b = g_b(fake_b), g_a(fake_a)
      loss_g = (gan(d_a(fake_b), 1.0) + gan(d_b(fake_a), 1.0)
                + 3.0 * (l1(rec_a, real_a) + l1(rec_b, real_b)))
      if gc:
        loss_g = loss_g + 0.3 * 0.5 * (
            (1 - _gradient_correlation(torch, real_a, fake_b)).mean()
            + (1 - _gradient_correlation(torch, real_b, fake_a)).mean())
    loss_g.backward()
    opt_g.step()
    for p in discriminators:
      p.requires_grad_(True)
    opt_d.zero_grad()
    with autocast():
      loss_d = 0.5 * (gan(d_a(real_b), 1.0) + gan(d_a(fake_b.detach()), 0.0)) + 0.5 * (
          gan(d_b(real_a), 1.0) + gan(d_b(fake_a.detach()), 0.0))
    loss_d.backward()
    opt_d.step()
    seen['activation_dtype'] = str(fake_b.dtype)
    # .item() waits for the device, so a CUDA step is timed to its end.
    return loss_g.item() + loss_d.item()

  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {'step_time_s': statistics.median(times), 'step_times_s': times,
          **_about(torch, device, bf16, cudnn_benchmark), **seen, 'batch': batch,
          'generator_params': count(g_a), 'discriminator_params': count(d_a)}


def run_inference(size: int, batch: int, slices: int, repeats: int, warmup: int, ngf: int,
                  res_blocks: int, threads: int = 0, device: str = 'cpu',
                  cudnn_benchmark: bool = False, bf16: bool = False) -> dict[str, Any]:
  """Times G over a volume of `slices` slices in batches of `batch`; returns slices/s.

  Each run translates the whole volume: every batch (the last padded with -1) through G and
  back to a float32 NumPy array, as `mr2ct_jax.inference.slices.translate_slices` does.
  """
  torch = _setup(threads, device, cudnn_benchmark)
  generator, _ = build_networks(torch, ngf, 1, res_blocks, 1)
  g = generator().to(device).eval()
  volume = torch.randn(slices, 1, size, size).clamp(-1, 1)
  batch = max(1, min(batch, slices))
  seen = {}  # G's output dtype: torch.bfloat16 under autocast

  def translate() -> None:
    with torch.inference_mode(), _autocast(torch, device, bf16):
      for start in range(0, slices, batch):
        chunk = volume[start:start + batch]
        if chunk.shape[0] < batch:
          chunk = torch.cat([chunk, torch.full((batch - chunk.shape[0], 1, size, size), -1.0)])
        out = g(chunk.to(device))
        seen['activation_dtype'] = str(out.dtype)
        out = out.float().cpu().numpy()
        assert out.shape == (batch, 1, size, size)

  for _ in range(warmup):
    translate()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    translate()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {'slices_per_s': slices / median, 'run_time_s': median, 'run_times_s': times,
          'slices': slices, 'batch': batch, **_about(torch, device, bf16, cudnn_benchmark), **seen,
          'generator_params': sum(p.numel() for p in g.parameters())}


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: prints the measurements as one JSON line."""
  fv = _define_flags()
  commands.parse(fv, sys.argv if argv is None else argv, 'mr2ct_jax.bench.torch_reference')
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import  (optional dependency)
  except ImportError:
    raise SystemExit('error: PyTorch is not installed (pip install torch) - it is only '
                     'needed to time the reference step') from None
  batch = fv.batch if fv.batch is not None else (8 if fv.mode == 'inference' else 1)
  if batch < 1:
    raise SystemExit(f'error: --batch={batch}: must be >= 1')
  if fv.mode == 'inference':
    if fv.slices < 1 or fv.repeats < 1:
      raise SystemExit('error: --slices and --repeats must be >= 1')
    result = run_inference(fv.size, batch, fv.slices, fv.repeats, fv.warmup, fv.ngf,
                           fv.res_blocks, fv.threads, fv.device, fv.cudnn_benchmark, fv.bf16)
  else:
    result = run(fv.size, fv.gc, fv.ngf, fv.ndf, fv.res_blocks, fv.disc_layers, fv.steps,
                 fv.warmup, fv.threads, fv.device, fv.cudnn_benchmark, fv.bf16, batch)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
