"""Compiled memory of the pretraining step per device, with and without model.remat (nothing runs: lower + compile).

  python tools/remat_memory.py --config configs/simmim_vit_base.py --set model.variant=L/16 \
      --per_device_batch 128 --remat none,block,dots_with_no_batch_dims_saveable
  python tools/remat_memory.py --config configs/simmim_swin_large.py --per_device_batch 128

Forces 8 CPU devices unless XLA_FLAGS already sets a device count (so the numbers are those of one device of
an 8-way data-parallel step), builds the project's train step for each remat mode and prints XLA's
memory_analysis(): temp (activations and scratch: what remat trades), arguments (state + batch), outputs.

XLA:CPU normally undoes remat: its cse_barrier_expander pass drops the optimization barriers jax.checkpoint
puts around the recomputation, and CSE then merges the recomputed forward back into the forward pass (temp
memory unchanged or higher, measured). This tool disables that pass (--xla_disable_hlo_passes=
cse_barrier_expander) so the CPU compile keeps remat as a GPU/TPU compile does; --cpu_default keeps it.
CPU figures: XLA:CPU keeps some bf16 intermediates in float32, so a GPU's differ; the ratio between remat
modes is the point.
"""
import argparse
import os
import sys

KEEP_REMAT = '--xla_disable_hlo_passes=cse_barrier_expander'  # XLA:CPU otherwise merges remat away (docstring)
if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
if '--cpu_default' not in sys.argv:  # before JAX reads XLA_FLAGS
  os.environ['XLA_FLAGS'] += ' ' + KEEP_REMAT
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io, pretrain_step, sharding, tasks  # pylint: disable=g-import-not-at-top

MiB = 2**20


def compiled_memory(config) -> dict[str, float]:
  """MiB per device of the compiled train step: temp, arguments, outputs, code."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, 10**6, 1000)
  step = pretrain_step.make_train_step(task, s)
  compiled = step.lower(s.abstract, task.batch_spec(config.batch_size)).compile()
  m = compiled.memory_analysis()
  return {'temp': m.temp_size_in_bytes / MiB, 'arguments': m.argument_size_in_bytes / MiB,
          'outputs': m.output_size_in_bytes / MiB, 'code': m.generated_code_size_in_bytes / MiB}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', action='append', required=True, help='configs/x.py[:arg]; repeat for more')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value, applied to every config')
  parser.add_argument('--per_device_batch', type=int, default=128, help='2048 over 16 GPUs in the paper')
  parser.add_argument('--remat', default='none,block,dots_with_no_batch_dims_saveable',
                      help='comma-separated model.remat modes; the first is the baseline of the ratio')
  parser.add_argument('--cpu_default', action='store_true',
                      help="keep XLA:CPU's cse_barrier_expander (it undoes remat; shows what a CPU run gets)")
  args = parser.parse_args()
  devices = jax.device_count()
  passes = 'XLA:CPU default passes (remat merged away)' if args.cpu_default else 'cse_barrier_expander off'
  print(f'{devices} x {jax.devices()[0].device_kind}, jax {jax.__version__}, {passes}; MiB per device', flush=True)
  print('| model | remat | per-device batch | temp | arguments | outputs | temp vs first |')
  print('|---|---|---|---|---|---|---|')
  for spec in args.config:
    base = None
    for mode in args.remat.split(','):
      config = config_io.load_config(spec, args.set + [f'batch_size={args.per_device_batch * devices}',
                                                       f'model.remat={mode}', 'data.name=synthetic'])
      m = compiled_memory(config)
      base = base or m['temp']
      name = f'{config.model.name} {config.model.variant} {config.model.image_size}px {config.model.dtype}'
      print(f'| {name} | {mode} | {args.per_device_batch} | {m["temp"]:,.0f} | {m["arguments"]:,.0f} | '
            f'{m["outputs"]:,.0f} | {m["temp"] / base:.2f}x |', flush=True)


if __name__ == '__main__':
  main()
