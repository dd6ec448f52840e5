"""Device check of model.attention and model.remat: one prepared run per (model, attention, remat), each in its own
process (so peak memory is its own), on synthetic input (no TensorFlow).

  python tools/attention_check.py                       # H200: ViT-B/16 and Swin-B, bf16, 128 per device
  python tools/attention_check.py --per_device_batch 256 --peak_tflops 790
  python tools/attention_check.py --rows vit:auto:none,vit:xla:block --per_device_batch 1 --steps 1 \
      --set model.variant=Ti/16 --set model.image_size=64   # CPU smoke run

Per row: which attention each block shape gets (layers.select_attention), img/s, model TFLOP/s and MFU against
--peak_tflops (forward counted by XLA x3), compiled temp memory and the device's peak bytes in use, and the
first step's loss (the same params, batch and masks in every row: cuDNN and XLA rows must agree to bf16
rounding).
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {'vit': 'configs/simmim_vit_base.py', 'swin': 'configs/simmim_swin_base.py'}
DEFAULT_ROWS = ('vit:auto:none', 'vit:xla:none', 'vit:auto:block', 'swin:auto:none', 'swin:xla:none',
                'swin:auto:block')


def run_one(row: str, per_device_batch: int, steps: int, peak_tflops: float, overrides: list[str]) -> dict:
  """Compiles and times one row in this process; returns its figures."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from simmim_jax import config_io, feed, flops, pretrain_step, sharding, tasks
  from simmim_jax.models import layers  # pylint: disable=import-outside-toplevel

  family, attention, remat = row.split(':')
  config = config_io.load_config(os.path.join(ROOT, CONFIGS[family]), overrides + [
      f'batch_size={per_device_batch * jax.device_count()}', f'model.attention={attention}',
      f'model.remat={remat}', 'data.name=synthetic'])
  choices = {}  # what each attention shape gets, recorded at trace time
  original = layers.select_attention

  def recording(requested, dtype, head_dim, lead, bias=None, platform=None):
    choice = original(requested, dtype, head_dim, lead, bias, platform)
    shapes = [tuple(np.shape(t)) for t in layers.bias_terms(bias)]
    choices[f'lead {tuple(lead)} bias {shapes}'] = choice
    return choice

  layers.select_attention = recording
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, 10**6, 1000)
  state = s.init()
  step = pretrain_step.make_train_step(task, s)
  batches = feed.prefetch(task.data().batches(0), sharding.batch_sharding(mesh))
  spec = task.batch_spec(config.batch_size)
  batch = next(batches)
  start = time.perf_counter()
  compiled = step.lower(s.abstract, batch).compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  state, metrics = compiled(state, batch)
  first_loss = float(metrics['loss'])
  state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  masks = jax.eval_shape(lambda b: task.sample(jax.random.key(0), b), spec)
  step_flops = flops.train_flops(flops.forward_flops(
      lambda p, b, m: task.model.apply({'params': p}, *task.model_inputs(b, m)), s.abstract.params, spec, masks))
  stats = jax.devices()[0].memory_stats() or {}
  return {'row': row, 'device': jax.devices()[0].device_kind, 'devices': jax.device_count(),
          'batch': config.batch_size, 'dtype': config.model.dtype, 'img_s': config.batch_size / seconds,
          'tflops': step_flops / seconds / 1e12, 'mfu': flops.mfu(step_flops, seconds, peak_tflops),
          'temp_gib': temp / 2**30, 'peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30,
          'first_loss': first_loss, 'compile_s': compile_s, 'attention': choices}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rows', default=','.join(DEFAULT_ROWS), help='model:attention:remat, comma-separated')
  parser.add_argument('--per_device_batch', type=int, default=128)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--peak_tflops', type=float, default=790.0, help='measured bf16 matmul peak (H200: ~790)')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value for every row')
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)  # internal: run this row, print JSON
  args = parser.parse_args()
  if args.one:
    print('RESULT ' + json.dumps(run_one(args.one, args.per_device_batch, args.steps, args.peak_tflops, args.set)),
          flush=True)
    return
  print('| row | device | batch | dtype | img/s | TFLOP/s | MFU | temp GiB | peak GiB | first loss | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for row in args.rows.split(','):
    cmd = [sys.executable, os.path.abspath(__file__), '--one', row, '--per_device_batch', str(args.per_device_batch),
           '--steps', str(args.steps), '--peak_tflops', str(args.peak_tflops)] + [f'--set={s}' for s in args.set]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    if out.returncode or not lines:
      print(f'| {row} | failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]} |', flush=True)
      continue
    r = json.loads(lines[-1][len('RESULT '):])
    print(f'| {row} | {r["devices"]} x {r["device"]} | {r["batch"]} | {r["dtype"]} | {r["img_s"]:,.1f} | '
          f'{r["tflops"]:.1f} | {100 * r["mfu"]:.1f}% | {r["temp_gib"]:.2f} | {r["peak_gib"]:.2f} | '
          f'{r["first_loss"]:.5f} | {r["compile_s"]:.0f} |', flush=True)
    for shape, (choice, why) in r['attention'].items():
      print(f'|   | {shape}: {choice} ({why}) |', flush=True)


if __name__ == '__main__':
  main()
