"""Per-process NumPy batches -> global jax.Arrays on the mesh, prefetched; a synthetic source."""
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


def synthetic_batches(batch_size: int, image_size: int, in_chans: int = 3, seed: int = 0) -> Iterator[Batch]:
  """Endless normalised-looking random images: for benchmarks and machines without TensorFlow."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, image_size, image_size, in_chans), dtype=np.float32)
  labels = np.zeros((batch_size,), np.int32)
  while True:
    yield {'image': images, 'label': labels}
