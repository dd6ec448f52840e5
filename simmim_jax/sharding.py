"""The device mesh, the FSDP parameter rule and batch sharding (jit over a Mesh; no pmap)."""
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')  # the batch is split over every device


def make_mesh(mesh: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all); mesh.data = -1 takes what fsdp leaves.

  The device order comes from jax.experimental.mesh_utils, which follows the physical topology (TPU ICI rings,
  NVLink islands). Devices of several TPU slices, or of several processes on other platforms, form a hybrid
  mesh: 'fsdp' inside a slice/host where it fits, 'data' across them, so only the gradient all-reduce crosses
  the slower network between hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  fsdp = mesh.fsdp
  data = mesh.data if mesh.data != -1 else len(devices) // max(fsdp, 1)
  if fsdp < 1 or data < 1 or data * fsdp != len(devices):
    raise ValueError(f'mesh.data={mesh.data} x mesh.fsdp={mesh.fsdp} must multiply to the {len(devices)} '
                     'devices (use mesh.data=-1 to take the rest).')
  return Mesh(device_grid(devices, data, fsdp), ('data', 'fsdp'))


def device_grid(devices: Sequence[jax.Device], data: int, fsdp: int) -> np.ndarray:
  """The (data, fsdp) array of devices: topology-aware inside a granule (slice or process), hybrid across them."""
  granules = _granules(devices)
  if len(granules) > 1 and all(len(g) == len(granules[0]) for g in granules):
    ici, dcn = _hybrid_split(data, fsdp, len(granules), len(granules[0]))
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=not _multislice(devices))
  try:
    return mesh_utils.create_device_mesh((data, fsdp), devices)
  except (AssertionError, NotImplementedError, ValueError):
    # A subset of a TPU slice that is not a whole sub-topology (tests, odd device counts): keep the given order.
    return np.asarray(devices).reshape(data, fsdp)


def _multislice(devices: Sequence[jax.Device]) -> bool:
  return len({getattr(d, 'slice_index', 0) for d in devices}) > 1


def _granules(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
  """Devices grouped by TPU slice (multislice) or else by process; one group on a single host or slice.

  One multi-host TPU slice is one granule: its hosts share the ICI, which create_device_mesh lays out.
  """
  if _multislice(devices):
    key = lambda d: d.slice_index
  elif devices[0].platform == 'tpu':
    return [list(devices)]
  else:
    key = lambda d: d.process_index
  groups: dict[int, list[jax.Device]] = {}
  for d in devices:
    groups.setdefault(key(d), []).append(d)
  return list(groups.values())


def _hybrid_split(data: int, fsdp: int, granules: int, per_granule: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """(ici, dcn) shapes: ici the (data, fsdp) mesh inside a granule, dcn the granules' grid, fsdp kept inside a
  granule as far as it goes. Always exact when data * fsdp = granules * per_granule: per_granule / gcd(fsdp,
  per_granule) is coprime to fsdp / gcd, so it divides data."""
  ici_fsdp = math.gcd(fsdp, per_granule)
  ici_data = per_granule // ici_fsdp
  return (ici_data, ici_fsdp), (data // ici_data, fsdp // ici_fsdp)


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
