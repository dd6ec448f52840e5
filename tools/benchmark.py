"""Times the jitted SimMIM train step on synthetic input (no TensorFlow), one or more configs side by side.

  python tools/benchmark.py --config configs/simmim_vit_base.py --set batch_size=8 --set model.dtype=float32
  python tools/benchmark.py --config configs/simmim_vit_base.py --config configs/simmim_swin_base.py:100 \
      --set batch_size=8 --peak_tflops 989

Prints steps/s, images/s, model TFLOPs per step (forward counted by XLA x3), achieved TFLOP/s and MFU
against --peak_tflops. Configs run one after another in the same process, so their ratio is fair.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from simmim_jax import config_io, feed, flops, models, optim, pretrain_step, sharding


def benchmark(config, steps: int, warmup: int) -> dict[str, float]:
  """Compiles the step, runs `warmup` untimed steps, then times `steps` (blocking on the last)."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  model = models.build_simmim(config.model)
  schedule = optim.lr_schedule(config.optim, total_steps=10**6, steps_per_epoch=1000, batch_size=config.batch_size)
  tx = optim.make_optimizer(config.optim, schedule, model.encoder.no_weight_decay)
  init, abstract, shardings = pretrain_step.abstract_state(model, tx, config, mesh)
  state = init()
  train_step = pretrain_step.make_train_step(model, tx, schedule, config, mesh, shardings)
  batches = feed.prefetch(feed.synthetic_batches(config.batch_size, config.model.image_size, config.model.in_chans, pool=1),
                          sharding.batch_sharding(mesh))

  size, grid = config.model.image_size, config.model.image_size // config.mask.model_patch_size
  images = jax.ShapeDtypeStruct((config.batch_size, size, size, config.model.in_chans), jnp.float32)
  mask = jax.ShapeDtypeStruct((config.batch_size, grid, grid), jnp.int32)
  step_flops = flops.train_flops(flops.forward_flops(
      lambda p, x, m: model.apply({'params': p}, x, m), abstract.params, images, mask))

  start = time.perf_counter()
  for _ in range(warmup):
    state, metrics = train_step(state, next(batches))
  jax.block_until_ready(metrics)
  compile_and_warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, next(batches))
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  num_params = sum(x.size for x in jax.tree.leaves(abstract.params['encoder']))
  return {'params_M': num_params / 1e6, 'step_s': seconds, 'steps_per_s': 1 / seconds,
          'images_per_s': config.batch_size / seconds, 'model_tflops_per_step': step_flops / 1e12,
          'achieved_tflops': step_flops / seconds / 1e12, 'warmup_s': compile_and_warmup}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', action='append', required=True, help='configs/x.py[:arg]; repeat to compare')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value, applied to every config')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (the first compiles)')
  parser.add_argument('--peak_tflops', type=float, default=None, help='hardware peak for MFU, e.g. 989 (H100 bf16)')
  args = parser.parse_args()

  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  rows = []
  for spec in args.config:
    config = config_io.load_config(spec, args.set)
    r = benchmark(config, args.steps, args.warmup)
    rows.append(r)
    name = f'{spec} [{config.model.name} {config.model.variant} {config.model.image_size}px, batch {config.batch_size}, {config.model.dtype}]'
    line = (f'{name}\n  params {r["params_M"]:.2f}M | {r["steps_per_s"]:.3f} steps/s | {r["images_per_s"]:.1f} images/s'
            f' | {r["model_tflops_per_step"]:.4f} model TFLOPs/step | {r["achieved_tflops"]:.3f} TFLOP/s achieved')
    if args.peak_tflops:
      line += f' | MFU {100 * flops.mfu(r["model_tflops_per_step"] * 1e12, r["step_s"], args.peak_tflops):.1f}%'
    print(line + f' | compile+warmup {r["warmup_s"]:.1f}s', flush=True)
  if len(rows) > 1:
    base = rows[0]['step_s']
    print('step time relative to the first: ' + ', '.join(f'{r["step_s"] / base:.2f}x' for r in rows))


if __name__ == '__main__':
  main()
