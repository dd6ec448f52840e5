"""Model FLOPs per step and MFU (no TensorFlow: used by the benchmark on accelerator machines)."""
from typing import Any, Callable

import jax


def forward_flops(apply_fn: Callable, *args: Any) -> float:
  """FLOPs of one forward pass counted by XLA on the lowered (unoptimised, unsharded) HLO.

  Counting the HLO before optimisation gives model FLOPs (2 per multiply-add of every matmul and conv),
  independent of fusion, rematerialisation or the device; tests check it against a hand formula for ViT.
  """
  analysis = jax.jit(apply_fn).lower(*args).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per computation
    analysis = analysis[0]
  return float(analysis['flops'])


def train_flops(forward: float) -> float:
  """Forward + backward ~ 3x forward (the backward pass costs two matmuls per forward matmul)."""
  return 3.0 * forward


def mfu(flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
  return flops_per_step / seconds_per_step / (peak_tflops * 1e12)
