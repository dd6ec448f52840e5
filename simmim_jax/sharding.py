"""The device mesh, the FSDP parameter rule and batch sharding (jit over a Mesh; no pmap)."""
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device


def make_mesh(mesh: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all); mesh.data = -1 takes what fsdp leaves."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = mesh.fsdp
  data = mesh.data if mesh.data != -1 else len(devices) // max(fsdp, 1)
  if fsdp < 1 or data < 1 or data * fsdp != len(devices):
    raise ValueError(f'mesh.data={mesh.data} x mesh.fsdp={mesh.fsdp} must multiply to the {len(devices)} '
                     'devices (use mesh.data=-1 to take the rest).')
  return Mesh(np.asarray(devices).reshape(data, fsdp), ('data', 'fsdp'))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, accum_steps: int = 1) -> None:
  """One clear error when the global batch cannot be split evenly over devices, hosts and micro-steps."""
  devices, processes = mesh.size, jax.process_count()
  unit = devices * accum_steps
  if batch_size % unit or batch_size % processes:
    raise ValueError(
        f'batch_size={batch_size} must be divisible by the device count ({devices}) x optim.accum_steps '
        f'({accum_steps}) = {unit}, and by the process count ({processes}). Set --config.batch_size to a '
        f'multiple of {np.lcm(unit, processes)}.')


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """Shard the largest dimension divisible by the fsdp size over 'fsdp'; small or indivisible arrays replicate."""
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[('fsdp' if d == dim else None) for d in range(len(shape))])
  return P()


def tree_shardings(abstract_tree: Any, mesh: Mesh, min_size: int) -> Any:
  """Shardings for a pytree of arrays (params, optimizer state) by the FSDP rule."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, min_size)), abstract_tree)
