"""Device check: run on a new GPU/TPU machine to see that the package works there, and how fast.

  python tools/device_check.py            # ViT-B/16 224 px and Swin-B 192 px, bf16, 128 images per device
  python tools/device_check.py --quick    # tiny variants, small batches: minutes on a CPU (compilation)

Prints the devices; runs a few pretraining steps of each model in bfloat16 on synthetic data and prints compile
time, step time, images/s, model TFLOP/s, MFU (against the chip's dense bf16 peak from a table) and memory;
checks that one step's float32 loss and gradient norm on the devices equal those computed on the host CPU for
the same seed (full float32 matmuls on both, relative tolerance LOSS_RTOL / GRAD_RTOL); saves the trained state
with Orbax to a temporary directory, restores it onto the same shardings and checks it is bit-identical.
Exits 0 and prints 'device check passed' when every check holds.

Needs jax, flax, optax, orbax-checkpoint, numpy and ml_collections only: no TensorFlow (synthetic input).
"""
import argparse
import concurrent.futures
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from simmim_jax import config_io, feed, flops, pretrain_step, sharding, tasks  # pylint: disable=wrong-import-position

# Dense bf16 peak TFLOP/s per chip (vendor figures; H100/H200 SXM). Matched against device_kind, first hit wins.
PEAK_BF16_TFLOPS = (
    ('H200', 989.0), ('H100', 989.0), ('A100', 312.0),
    ('TPU v6 lite', 918.0), ('TPU v6e', 918.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v4', 275.0),
)
# Same seed, same batch, float32 with full-precision matmuls on both sides: what is left is the order of
# floating-point reductions (devices, kernels), measured at ~1e-6 relative between CPU meshes of 1 and 8 devices.
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3

MODELS = {  # name: (config, overrides, quick config, quick overrides)
    'vit_base': ('configs/simmim_vit_base.py', {}, 'configs/base.py', {}),
    'swin_base': ('configs/simmim_swin_base.py', {}, 'configs/swin_tiny_cpu.py', {}),
}


@dataclasses.dataclass
class Run:
  """One model's step on a mesh: what the timing, the reference and the checkpoint checks need."""
  name: str
  config: Any
  task: Any
  setup: Any
  mesh: Any
  step: Any  # compiled
  compile_s: float
  memory_bytes: int | None


def peak_tflops(device_kind: str) -> float | None:
  for key, peak in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


def load(name: str, quick: bool, batch_size: int, dtype: str) -> Any:
  path, overrides, quick_path, quick_overrides = MODELS[name]
  return config_io.load_config(quick_path if quick else path, {
      **(quick_overrides if quick else overrides), 'data.name': 'synthetic', 'batch_size': batch_size,
      'model.dtype': dtype, 'optim.accum_steps': 1})


def build(name: str, config: Any, devices: list[jax.Device]) -> Run:
  """Mesh, task, sharded state and the AOT-compiled step (compile time measured on its own)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=10_000, steps_per_epoch=1000)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                for k, v in task.batch_spec(config.batch_size).items()}
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), s.abstract, s.shardings)
  start = time.perf_counter()
  compiled = pretrain_step.make_train_step(task, s).lower(abstract, batch_spec).compile()
  compile_s = time.perf_counter() - start
  memory = None
  try:  # XLA's own account of the program: arguments + outputs + temporaries, less what is aliased (donated)
    m = compiled.memory_analysis()
    memory = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  except Exception:  # pylint: disable=broad-except
    pass
  return Run(name, config, task, s, mesh, compiled, compile_s, memory)


def batches(run: Run):
  """The synthetic source's batches on the mesh, with the keys the step was compiled for (no labels)."""
  keys = run.task.batch_spec(1).keys()
  source = ({k: b[k] for k in keys} for b in run.task.data().batches(0))
  return feed.prefetch(source, sharding.batch_sharding(run.mesh))


def first_step_metrics(run: Run) -> dict[str, float]:
  """Loss and gradient norm of step 1 from the initial state (init and masks drawn from the config's seed)."""
  _, metrics = run.step(run.setup.init(), next(batches(run)))
  return {k: float(metrics[k]) for k in ('loss', 'grad_norm')}


def gib(n: float | None) -> str:
  return 'n/a' if n is None else f'{n / 2**30:.2f} GiB'


def device_peak_memory(devices: list[jax.Device]) -> int | None:
  """Largest peak_bytes_in_use over the devices since the process started (GPU/TPU; None on CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    if 'peak_bytes_in_use' in stats:
      peaks.append(stats['peak_bytes_in_use'])
  return max(peaks) if peaks else None


def time_model(run: Run, args: argparse.Namespace, devices: list[jax.Device], peak: float | None) -> Any:
  """Warm-up, then `args.steps` timed steps; prints the model's line and returns the trained state."""
  config, task = run.config, run.task
  spec = task.batch_spec(config.batch_size)
  masks = jax.eval_shape(lambda b: task.sample(jax.random.key(0), b), spec)
  step_flops = flops.train_flops(flops.forward_flops(
      lambda p, b, m: task.model.apply({'params': p}, *task.model_inputs(b, m)), run.setup.abstract.params, spec,
      masks))
  state, data = run.setup.init(), batches(run)
  for _ in range(args.warmup):
    state, metrics = run.step(state, next(data))
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = run.step(state, next(data))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  loss = float(metrics['loss'])
  c, per_device = config.model, config.batch_size // len(devices)
  line = (f'[{run.name}] {c.name} {c.variant} {c.image_size}px bf16, batch {config.batch_size} ({per_device}/device): '
          f'compile {run.compile_s:.1f}s | step {step_s * 1e3:.1f} ms (median of {args.steps}) | '
          f'{config.batch_size / step_s:,.1f} img/s | {step_flops / 1e12:.3f} TFLOP/step | '
          f'{step_flops / step_s / 1e12:.2f} TFLOP/s')
  line += f' | MFU {100 * flops.mfu(step_flops, step_s, peak * len(devices)):.1f}%' if peak else ' | MFU n/a'
  line += f' | program memory {gib(run.memory_bytes)} | device peak {gib(device_peak_memory(devices))}'
  print(line + f' | loss {loss:.4f}', flush=True)
  if not np.isfinite(loss):
    raise CheckFailed(f'[{run.name}] loss is {loss} after {args.warmup + args.steps} steps')
  return state


class CheckFailed(RuntimeError):
  pass


def reference_batch_size(devices: list[jax.Device]) -> int:
  return len(devices) * (1 if len(devices) > 1 else 2)


def float32_step(name: str, args: argparse.Namespace, devices: list[jax.Device], batch_size: int
                 ) -> dict[str, float]:
  """Step 1's float32 loss and gradient norm on `devices`, full-precision matmuls (else TF32 on GPUs and bf16
  passes on TPUs), the same seed, init and batch wherever it runs."""
  config = load(name, args.quick, batch_size, 'float32')
  with jax.default_matmul_precision('highest'):  # thread-local: set in the thread that traces
    return first_step_metrics(build(name, config, devices))


def compare(name: str, on_devices: dict[str, float], on_cpu: dict[str, float], batch_size: int) -> None:
  diffs = {k: abs(on_devices[k] - on_cpu[k]) / max(abs(on_cpu[k]), 1e-12) for k in on_cpu}
  ok = diffs['loss'] <= LOSS_RTOL and diffs['grad_norm'] <= GRAD_RTOL
  print(f'[{name}] float32 step 1 vs CPU (batch {batch_size}): loss {on_devices["loss"]:.8f} vs {on_cpu["loss"]:.8f} '
        f'(rel {diffs["loss"]:.1e} <= {LOSS_RTOL:g}) | grad norm {on_devices["grad_norm"]:.6f} vs '
        f'{on_cpu["grad_norm"]:.6f} (rel {diffs["grad_norm"]:.1e} <= {GRAD_RTOL:g}): {"ok" if ok else "MISMATCH"}',
        flush=True)
  if not ok:
    raise CheckFailed(f'[{name}] float32 step differs from the CPU beyond tolerance')


def check_checkpoint(run: Run, state: Any) -> None:
  """Orbax save of the trained state, restore onto the same shardings, bit-for-bit comparison."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), run.setup.abstract,
                          run.setup.shardings)
  size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.setup.abstract))
  with tempfile.TemporaryDirectory(prefix='device_check_') as tmp:
    checkpointer = ocp.StandardCheckpointer()
    start = time.perf_counter()
    checkpointer.save(os.path.join(tmp, 'state'), state)
    checkpointer.wait_until_finished()
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    restored = checkpointer.restore(os.path.join(tmp, 'state'), abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    checkpointer.close()
  same_sharding = all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  equal = all(np.array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)))
              for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  ok = equal and same_sharding and int(restored.step) == int(state.step)
  print(f'[{run.name}] checkpoint (Orbax, step {int(state.step)}, {len(jax.tree.leaves(state))} arrays, {gib(size)}):'
        f' save {save_s:.1f}s, restore {restore_s:.1f}s, {"bit-identical" if equal else "DIFFERENT"}'
        f'{"" if same_sharding else ", shardings differ"}: {"ok" if ok else "FAILED"}', flush=True)
  if not ok:
    raise CheckFailed(f'[{run.name}] the restored checkpoint differs from the saved state')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='tiny ViT and Swin, 4 images per device (for CPUs)')
  parser.add_argument('--models', default='vit_base,swin_base', help=f'comma-separated, of {sorted(MODELS)}')
  parser.add_argument('--batch_per_device', type=int, default=None, help='default 128 (--quick: 4)')
  parser.add_argument('--steps', type=int, default=None, help='timed steps (default 10; --quick 3)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps before timing')
  parser.add_argument('--peak_tflops', type=float, default=None, help='bf16 peak per device, if not in the table')
  parser.add_argument('--no_reference', action='store_true', help='skip the float32 comparison with the CPU')
  args = parser.parse_args()
  args.steps = args.steps or (3 if args.quick else 10)
  start = time.perf_counter()

  devices = jax.devices()
  kind = devices[0].device_kind
  import flax, optax, orbax.checkpoint  # pylint: disable=import-outside-toplevel,multiple-imports
  print(f'jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, orbax-checkpoint '
        f'{orbax.checkpoint.__version__}, numpy {np.__version__}, Python {sys.version.split()[0]}')
  print(f'devices: {len(devices)} x {kind} ({jax.default_backend()}), {jax.process_count()} process(es), '
        f'{jax.local_device_count()} local')
  for d in jax.local_devices():
    print(f'  {d} | {d.device_kind} | process {d.process_index} | memory {gib((d.memory_stats() or {}).get("bytes_limit")) if d.platform != "cpu" else "host"}')
  peak = args.peak_tflops or peak_tflops(kind)
  print(f'bf16 peak: {f"{peak:g} TFLOP/s per device" if peak else f"unknown for {kind!r} (MFU n/a; --peak_tflops)"}',
        flush=True)
  if jax.default_backend() == 'cpu' and not args.quick:
    print('note: on a CPU the full-size models are slow; --quick runs tiny ones')

  names = args.models.split(',')
  try:
    cpu = jax.devices('cpu')[:1]
  except RuntimeError:
    cpu = None
    print(f'float32 vs CPU: skipped (no CPU backend; JAX_PLATFORMS={os.environ.get("JAX_PLATFORMS")})')
  reference = not args.no_reference and cpu is not None
  ref_batch = reference_batch_size(devices)
  # The CPU references compile and run in a thread while the devices' programs compile here; they finish before
  # any step is timed, so nothing competes with the timed loop.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  cpu_jobs = {n: pool.submit(float32_step, n, args, cpu, ref_batch) for n in names} if reference else {}
  per_device = args.batch_per_device or (4 if args.quick else 128)
  runs = {n: build(n, load(n, args.quick, per_device * len(devices), 'bfloat16'), devices) for n in names}
  on_devices = {n: float32_step(n, args, devices, ref_batch) for n in names} if reference else {}
  on_cpu = {n: job.result() for n, job in cpu_jobs.items()}
  pool.shutdown()
  print(f'compiled in {time.perf_counter() - start:.0f}s (device bf16 and float32 programs; CPU references '
        'alongside)', flush=True)

  failures = []
  for i, name in enumerate(names):
    try:
      state = time_model(runs[name], args, devices, peak)
      if i == 0:
        check_checkpoint(runs[name], state)
      del state
      runs[name] = None  # free its device memory before the next model
      if reference:
        compare(name, on_devices[name], on_cpu[name], ref_batch)
    except CheckFailed as e:
      failures.append(str(e))
      print(f'FAILED: {e}', flush=True)
  print(f'tensorflow imported: {"yes" if "tensorflow" in sys.modules else "no"}')
  elapsed = time.perf_counter() - start
  if failures:
    print(f'device check FAILED ({len(failures)} check(s), {elapsed:.0f}s)')
    sys.exit(1)
  print(f'device check passed ({elapsed:.0f}s)')


if __name__ == '__main__':
  main()
