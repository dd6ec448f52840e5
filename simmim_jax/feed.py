"""Per-process NumPy batches -> global jax.Arrays on the mesh, prefetched."""
import collections
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

Batch = dict[str, np.ndarray]


def to_global(batch: Batch, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Each process passes its local slice; together they form one global array sharded on the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch(batches: Iterator[Batch], sharding: NamedSharding, size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Transfers `size` batches ahead so host-to-device copies overlap the running step."""
  queue = collections.deque()
  for batch in batches:
    queue.append(to_global(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
