"""Model FLOPs of the CycleGAN train step, counted from the architecture, and accelerator peaks.

Model FLOPs utilisation (MFU) is the work a step must do, counted as direct convolutions
(2 FLOPs per multiply-add, the transposed convs per input pixel), over the step time and the
device's peak. Counting from the architecture, not from XLA's cost analysis, gives the same
number on every backend: on GPUs the analysis does not see the cuDNN/cuBLAS calls, and with
Winograd the executed count is lower than the work done. tests/test_bench.py checks the count
against XLA's analysis of the step lowered with direct (`matmul`) convs on the CPU.
"""

import ml_collections


def conv_flops(out_h: int, out_w: int, c_in: int, c_out: int, k: int) -> int:
  """FLOPs of a k x k conv producing `out_h x out_w x c_out` from `c_in` channels (no bias)."""
  return 2 * out_h * out_w * c_in * c_out * k * k


def generator_forward_flops(size: int, ngf: int, num_res_blocks: int) -> int:
  """One ResnetGenerator (1 channel in and out) on one `size x size` image."""
  half, quarter = size // 2, size // 4
  flops = conv_flops(size, size, 1, ngf, 7)                    # stem
  flops += conv_flops(half, half, ngf, 2 * ngf, 3)             # down_0 (stride 2)
  flops += conv_flops(quarter, quarter, 2 * ngf, 4 * ngf, 3)   # down_1
  flops += num_res_blocks * 2 * conv_flops(quarter, quarter, 4 * ngf, 4 * ngf, 3)
  # The transposed convs scatter each input pixel into 9 taps: counted per input pixel.
  flops += conv_flops(quarter, quarter, 4 * ngf, 2 * ngf, 3)   # up_0
  flops += conv_flops(half, half, 2 * ngf, ngf, 3)             # up_1
  flops += conv_flops(size, size, ngf, 1, 7)                   # head
  return flops


def discriminator_forward_flops(size: int, ndf: int, num_layers: int) -> int:
  """One PatchDiscriminator (4x4 convs, padding 1) on one `size x size` image."""
  def out(n: int, stride: int) -> int:
    return (n + 2 - 4) // stride + 1

  side = out(size, 2)
  flops = conv_flops(side, side, 1, ndf, 4)
  c_in = ndf
  for i in range(1, num_layers + 1):
    c_out = ndf * min(2 ** i, 8)
    side = out(side, 2 if i < num_layers else 1)
    flops += conv_flops(side, side, c_in, c_out, 4)
    c_in = c_out
  side = out(side, 1)
  return flops + conv_flops(side, side, c_in, 1, 4)


def train_step_flops(config: ml_collections.ConfigDict) -> int:
  """Model FLOPs of one train step of `config` (its image size and global batch).

  A pass with gradients for its parameters costs 3 forwards (forward, input gradient, kernel
  gradient); a discriminator inside the generators' loss 2 (no kernel gradient). The
  generators' update runs 4 generator passes (6 with the identity term) and 2 discriminator
  passes, the discriminators' update 4 discriminator passes.
  """
  model, size = config.model, int(config.data.image_size)
  g = generator_forward_flops(size, int(model.ngf), int(model.num_res_blocks))
  d = discriminator_forward_flops(size, int(model.ndf), int(model.num_disc_layers))
  g_passes = 6 if float(config.loss.identity_weight) else 4
  per_image = 3 * g_passes * g + 2 * 2 * d + 3 * 4 * d
  return int(config.train.batch_size) * per_image


# Dense peak TFLOP/s by device kind (substring of jax's `device_kind`, first match wins) and
# compute dtype; float32 is the TF32 tensor-core peak on GPUs, where XLA's default precision
# runs float32 convs and matmuls as TF32. From the vendors' data sheets (no sparsity).
PEAK_TFLOPS = (
    ('H200', {'bfloat16': 989.4, 'float32': 494.7}),
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    ('H100', {'bfloat16': 989.4, 'float32': 494.7}),   # SXM
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('L4', {'bfloat16': 121.0, 'float32': 60.0}),
    ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
    ('TPU v5e', {'bfloat16': 197.0, 'float32': 197.0}),
    ('TPU v5', {'bfloat16': 459.0, 'float32': 459.0}),  # v5p
    ('TPU v6', {'bfloat16': 918.0, 'float32': 918.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak in `dtype` ('float32' or 'bfloat16'), or None if unknown."""
  for name, peaks in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None
