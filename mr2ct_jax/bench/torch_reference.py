r"""The PyTorch CycleGAN(+GC) training step, timed on this machine, for `bench train`.

  python -m mr2ct_jax.bench.torch_reference --size=128 [--gc] [--ngf=64 --ndf=64 \
      --res_blocks=9 --disc_layers=3 --steps=5 --warmup=1 --threads=0 --device=cpu]

Prints one JSON line: {"step_time_s": median, "step_times_s": [...], "torch": version, ...}.

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


def run(size: int, gc: bool, ngf: int, ndf: int, res_blocks: int, disc_layers: int,
        steps: int, warmup: int, threads: int = 0, device: str = 'cpu',
        cudnn_benchmark: bool = False) -> dict[str, Any]:
  """Times the reference training step at batch 1; returns the measurements."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: only this benchmark needs it)
  if threads:
    torch.set_num_threads(threads)
  torch.backends.cudnn.benchmark = cudnn_benchmark
  if device == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('error: --device=cuda but this PyTorch sees no CUDA device')
  torch.manual_seed(0)
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
  real_a = torch.randn(1, 1, size, size).clamp(-1, 1).to(device)
  real_b = torch.randn(1, 1, size, size).clamp(-1, 1).to(device)
  discriminators = list(itertools.chain(d_a.parameters(), d_b.parameters()))

  def step() -> float:
    fake_b, fake_a = g_a(real_a), g_b(real_b)
    rec_a, rec_b = g_b(fake_b), g_a(fake_a)
    for p in discriminators:
      p.requires_grad_(False)
    opt_g.zero_grad()
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
    loss_d = 0.5 * (gan(d_a(real_b), 1.0) + gan(d_a(fake_b.detach()), 0.0)) + 0.5 * (
        gan(d_b(real_a), 1.0) + gan(d_b(fake_a.detach()), 0.0))
    loss_d.backward()
    opt_d.step()
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
          'torch': torch.__version__, 'threads': torch.get_num_threads(), 'device': device,
          'device_name': (torch.cuda.get_device_name() if device == 'cuda' else 'cpu'),
          'cudnn_benchmark': cudnn_benchmark,
          'generator_params': count(g_a), 'discriminator_params': count(d_a)}


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point: prints the measurements as one JSON line."""
  fv = _define_flags()
  commands.parse(fv, sys.argv if argv is None else argv, 'mr2ct_jax.bench.torch_reference')
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import  (optional dependency)
  except ImportError:
    raise SystemExit('error: PyTorch is not installed (pip install torch) - it is only '
                     'needed to time the reference step') from None
  print(json.dumps(run(fv.size, fv.gc, fv.ngf, fv.ndf, fv.res_blocks, fv.disc_layers,
                       fv.steps, fv.warmup, fv.threads, fv.device, fv.cudnn_benchmark)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
