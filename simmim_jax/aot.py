"""Ahead-of-time compilation of the train steps for accelerators that are not attached (the TPU compiler in
libtpu runs on any CPU host): per-device memory against the chip's HBM, XLA's FLOPs, the collectives.

Nothing here runs a step: the steps are lowered with abstract inputs and compiled for the target's devices.
No TensorFlow: the batches are ShapeDtypeStructs (tasks' batch_spec). tools/aot_check.py is the command line.
"""
import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from simmim_jax import finetune_step, flops, optim, pretrain_step, sharding, tasks
from simmim_jax.models.classifier import build_classifier

GiB = 2**30
# HBM per chip. JAX shows a v2 / v3 chip as two devices (its TensorCores), each with half; the others as one.
TPU_HBM_GIB = {'v2': 16, 'v3': 32, 'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
# Cloud TPU names count TensorCores on v2 / v3 / v4 / v5p (v4-8: 4 chips) and chips on v5e / v6e (v5e-16).
CORES_IN_NAME = {'v2': 2, 'v3': 2, 'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}
MEGACORE = ('v4', 'v5p')  # one JAX device per chip (both TensorCores), as on a real slice
SINGLE_HOST_CHIPS = {'v5e': 8, 'v6e': 8}  # slices up to this size are one host (v5e-8, v6e-8); else 4 per host
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
STEPS = ('pretrain', 'finetune')


class TargetError(ValueError):
  """A topology name the tool or libtpu cannot build, or libtpu missing; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices of a topology to compile for, with each device's HBM."""
  name: str  # as asked: 'v5e:4x4' or 'v5e-16'
  cloud_name: str  # 'v5e-16'
  generation: str  # 'v5e'
  slices: int
  devices: tuple[Any, ...]
  hbm_bytes: int  # per device

  @property
  def label(self) -> str:
    return self.cloud_name + (f' x{self.slices} slices' if self.slices > 1 else '')


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5e:4x4' -> ('v5e', (4, 4)); a Cloud name 'v5e-16' / 'v4-8' -> the same form (its usual shape)."""
  match = re.fullmatch(r'(v\d[a-z]?)[:-](.+)', name.strip().lower())
  if not match or match.group(1) not in TPU_HBM_GIB:
    raise TargetError(f'Unknown TPU topology {name!r}: use GENERATION:SHAPE (v4:2x2x1, v5e:4x4, v5p:2x2x2, '
                      f'v6e:2x4) or a Cloud name (v4-8, v5e-16); generations {sorted(TPU_HBM_GIB)}.')
  generation, rest = match.groups()
  if ':' in name:
    try:
      return generation, tuple(int(x) for x in rest.split('x'))
    except ValueError:
      raise TargetError(f'Topology {name!r}: the shape after ":" is like 4x4 or 2x2x1.') from None
  count = int(rest) if rest.isdigit() else 0
  chips = count // CORES_IN_NAME[generation]
  if chips < 1 or chips & (chips - 1) or count % CORES_IN_NAME[generation]:
    raise TargetError(f'Topology {name!r}: the number after "-" counts '
                      f'{"TensorCores (2 per chip)" if CORES_IN_NAME[generation] == 2 else "chips"} and must give a '
                      'power of two chips; or give the shape, e.g. v5e:4x4.')
  return generation, _usual_shape(generation, chips)


def _usual_shape(generation: str, chips: int) -> tuple[int, ...]:
  """The shape Cloud TPU gives a slice of `chips` chips: 2-D for v5e / v6e (2 -> 1x2, 8 -> 2x4, 32 -> 4x8), 3-D
  (at least 2x2x1) for the others, doubling the last axes first (8 -> 2x2x2, 32 -> 2x4x4)."""
  if generation in SINGLE_HOST_CHIPS or generation in ('v2', 'v3'):
    a = 2 ** (int(math.log2(chips)) // 2)
    return a, chips // a
  shape = [2, 2, 1] if chips <= 4 else [2, 2, 2]
  axis = 2
  while math.prod(shape) < chips:
    shape[axis] *= 2
    axis = (axis - 1) % 3
  return tuple(shape)


def tpu_target(name: str, slices: int = 1) -> Target:
  """The compile-only devices of a TPU topology from libtpu (no TPU needed), `slices` slices over DCN."""
  generation, shape = parse_topology(name)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    import libtpu  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise TargetError("The TPU compiler (libtpu) is not installed: pip install -e '.[aot]' "
                      "(or '.[tpu]'); it compiles for TPUs on any CPU host.") from None
  chips = math.prod(shape)
  kwargs: dict[str, Any] = {'num_slices': slices} if slices > 1 else {}
  if generation in MEGACORE:
    kwargs['chip_config_name'] = 'megacore'
  if chips <= SINGLE_HOST_CHIPS.get(generation, 0):
    kwargs['chips_per_host_bounds'] = (*shape, 1)[:3] if len(shape) == 2 else shape
  elif chips < 4:
    kwargs['chips_per_host_bounds'] = (*shape, 1, 1)[:3]
  topology = f'{generation}:{"x".join(map(str, shape))}'
  try:
    devices = topologies.get_topology_desc(platform='tpu', topology_name=topology, **kwargs).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu's own words say what it cannot build)
    raise TargetError(f'libtpu cannot build the topology {topology!r}: {str(e).splitlines()[0]}') from None
  per_chip = len(devices) // (chips * slices)
  cloud = f'{generation}-{chips * CORES_IN_NAME[generation]}'
  return Target(name, cloud, generation, slices, tuple(devices), TPU_HBM_GIB[generation] * GiB // per_chip)


# GPUs compile without a GPU through JAX's CUDA plugin given a target description (XLA's GpuTargetConfigProto):
# written here from NVIDIA's datasheets (SXM parts); memory is what nvidia-smi reports (81,559 / 143,771 MiB), of
# which a program gets XLA_PYTHON_CLIENT_MEM_FRACTION (JAX's default 0.75).
GPU_SPECS = {
    'h100': {'name': 'NVIDIA H100 80GB HBM3', 'memory': 81_559 * 2**20, 'bandwidth': 3.35e12, 'sms': 132},
    'h200': {'name': 'NVIDIA H200', 'memory': 143_771 * 2**20, 'bandwidth': 4.8e12, 'sms': 132},
}
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth:.0f} l2_cache_size: 52428800 clock_rate_ghz: 1.98 device_memory_size: {memory}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 8 }} device_description_str: "{name}"
"""


def gpu_target(name: str) -> Target:
  """'h100x8' / 'h200x8' (GPUs per host; 'x2h' after it for hosts, e.g. h100x8x2h): compile-only CUDA devices."""
  match = re.fullmatch(r'(h100|h200)(?:x(\d+))?(?:x(\d+)h)?', name.strip().lower())
  if not match:
    raise TargetError(f'Unknown GPU target {name!r}: use h100x8 or h200x8 (GPUs per host), e.g. h100x8x2h for 2 '
                      f'hosts; GPUs {sorted(GPU_SPECS)}.')
  kind, per_host, hosts = match.group(1), int(match.group(2) or 8), int(match.group(3) or 1)
  spec = GPU_SPECS[kind]
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = topologies.get_topology_desc(platform='cuda', topology_name='', target_config=_GPU_TARGET.format(**spec),
                                           topology=f'1x{hosts}x{per_host}').devices
  except Exception as e:  # pylint: disable=broad-except
    raise TargetError("Compiling for a GPU without one needs JAX's CUDA plugin: pip install 'jax-cuda12-plugin[with-"
                      "cuda]' (or '.[cuda12]') beside this jax, best in its own environment; it says: "
                      f'{str(e).splitlines()[0]}') from None
  # JAX's allocator takes this share of a GPU's memory at start-up and every buffer comes from it.
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.75'))
  return Target(name, f'{kind}x{per_host}' + (f'x{hosts}h' if hosts > 1 else ''), kind, 1, tuple(devices),
                int(spec['memory'] * fraction))


def target(name: str, slices: int = 1) -> Target:
  """A TPU topology (v5e:4x4, v4-8) or a GPU host (h100x8)."""
  return gpu_target(name) if name.strip().lower().startswith('h') else tpu_target(name, slices)


@dataclasses.dataclass
class Program:
  """One step compiled for a target, or the compiler's refusal; sizes in bytes per device."""
  step: str
  per_device_batch: int
  mesh: dict[str, int]
  remat: str
  accum_steps: int
  compile_s: float
  hbm_bytes: int
  arguments: int = 0
  outputs: int = 0
  temp: int = 0
  alias: int = 0
  xla_flops: float = 0.0  # per device per step, XLA's count of the compiled program (recomputation included)
  model_flops: float = 0.0  # per device per step, flops.py: 3x the forward of the unsharded model
  collectives: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # op -> (count, bytes)
  refused: str = ''  # the compiler's RESOURCE_EXHAUSTED line when the program does not fit
  failed: str = ''  # the compiler's first line when it failed otherwise (a libtpu INTERNAL check): no verdict

  @property
  def total(self) -> int:
    """What the program holds at its peak by XLA's account: arguments + outputs + temporaries, less what the
    donated state lets outputs share with arguments."""
    return self.arguments + self.outputs + self.temp - self.alias

  @property
  def fits(self) -> bool:
    return not self.refused and not self.failed and self.total <= self.hbm_bytes

  @property
  def margin(self) -> int:
    return self.hbm_bytes - self.total


def _with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def pretrain_program(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> tuple[Any, tuple, float]:
  """(jitted step, abstract arguments, model FLOPs per step) of the config's pretraining step on `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, total_steps=10**6, steps_per_epoch=1000)
  spec = task.batch_spec(config.batch_size)
  masks = jax.eval_shape(lambda b: task.sample(jax.random.key(0), b), spec)
  model_flops = flops.train_flops(flops.forward_flops(
      lambda p, b, m: task.model.apply({'params': p}, *task.model_inputs(b, m)), s.abstract.params, spec, masks))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh)) for k, v in spec.items()}
  return pretrain_step.make_train_step(task, s), (_with_sharding(s.abstract, s.shardings), batch), model_flops


def finetune_program(config: ml_collections.ConfigDict, devices: Sequence[Any],
                     num_classes: int) -> tuple[Any, tuple, float]:
  """The same for the fine-tuning (or linear-probe) step: uint8 images, labels and random-erasing boxes."""
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh)
  model = build_classifier(config, num_classes)
  schedule = optim.lr_schedule(config.optim, total_steps=10**6, steps_per_epoch=1000, batch_size=config.batch_size)
  tx = finetune_step.make_optimizer(model, config, schedule, finetune_step.abstract_params(model, config))
  _, abstract, shardings = finetune_step.abstract_state(model, tx, config, mesh)
  b, size, chans = config.batch_size, config.model.image_size, config.model.in_chans
  images = jax.ShapeDtypeStruct((b, size, size, chans), jnp.float32)
  forward = flops.forward_flops(lambda p, s, x: model.apply({'params': p, 'batch_stats': s}, x),
                                abstract.params, abstract.batch_stats, images)
  # A probe's frozen encoder runs forward only; fine-tuning is forward + backward (3x).
  model_flops = forward if model.frozen else flops.train_flops(forward)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((b, size, size, chans), jnp.uint8, sharding=batch_sharding),
           'erase': jax.ShapeDtypeStruct((b, 4), jnp.int32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
  step = finetune_step.make_train_step(model, tx, schedule, config, mesh, num_classes, shardings)
  return step, (_with_sharding(abstract, shardings), batch), model_flops


def compile_step(config: ml_collections.ConfigDict, target: Target, step: str, num_classes: int = 1000) -> Program:
  """Lowers and compiles the config's `step` ('pretrain' or 'finetune') for the target's devices."""
  devices = list(target.devices)
  build = pretrain_program if step == 'pretrain' else lambda c, d: finetune_program(c, d, num_classes)
  accum = config.optim.accum_steps if step == 'pretrain' else 1
  mesh = sharding.make_mesh(config.mesh, devices)
  program = Program(step, config.batch_size // len(devices), dict(mesh.shape), config.model.remat, accum, 0.0,
                    target.hbm_bytes)
  start = time.perf_counter()
  jitted, args, model_flops = build(config, devices)
  program.model_flops = model_flops / len(devices)
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except  (the compiler's own words, kept on the program)
    program.compile_s = time.perf_counter() - start
    if 'RESOURCE_EXHAUSTED' in str(e):
      program.refused = next((l.strip() for l in str(e).splitlines() if 'RESOURCE_EXHAUSTED' in l), str(e))
    elif isinstance(e, jax.errors.JaxRuntimeError):  # e.g. libtpu 0.0.42.1 on Swin-L fine-tuning for v6e
      program.failed = str(e).strip().splitlines()[0]
    else:
      raise
    return program
  program.compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  program.arguments, program.outputs = m.argument_size_in_bytes, m.output_size_in_bytes
  program.temp, program.alias = m.temp_size_in_bytes, m.alias_size_in_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per computation
  # XLA counts a loop's body once: with accumulation the step runs its micro-batch body accum times. The CUDA
  # compiler without a GPU gives no count at all.
  program.xla_flops = float((cost or {}).get('flops', 0.0)) * accum
  program.collectives = collectives(compiled.as_text())
  return program


_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
_OP = re.compile(r'=\s*(.*?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')


def _shape_bytes(shapes: list[tuple[str, str]]) -> list[int]:
  return [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x) for d, dims in shapes]


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
  """{op: (count, bytes)} of the collectives in a compiled module's text, counted where they appear (an op in
  a loop body counts once). Bytes are each op's result per device: the gathered array of an all-gather, the
  scattered shard of a reduce-scatter, the array of an all-reduce (whose async -start has the results' shape)."""
  found: dict[str, list[int]] = {}
  for line in hlo.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    shapes = _SHAPE.findall(match.group(1))
    if match.group(3) and match.group(2) != 'all-reduce':
      # An async start's shape is (operands..., results...[, u32[] contexts of a permute]): keep the results.
      shapes = [shape for shape in shapes if shape[1]]
      shapes = shapes[len(shapes) // 2:]
    sizes = _shape_bytes(shapes)
    count, total = found.get(match.group(2), [0, 0])
    found[match.group(2)] = [count + 1, total + sum(sizes)]
  return {k: (c, b) for k, (c, b) in found.items()}
