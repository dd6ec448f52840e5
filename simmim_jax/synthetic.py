"""Synthetic sources: endless random batches for benchmarks, machines without TensorFlow and multi-process
tests. The global batch at step s is the same for any process count, so runs on different layouts agree."""
import itertools
from typing import Iterator

import numpy as np

from simmim_jax.feed import Batch


def image_batches(batch_size: int, image_size: int, in_chans: int = 3, seed: int = 0, start_batch: int = 0,
                  process_index: int = 0, process_count: int = 1, pool: int = 4) -> Iterator[Batch]:
  """Endless random uint8 images (B, S, S, C), as the real pipelines ship them (normalised on device).
  batch_size is global; this process yields its rows of it, from a pool of `pool` global batches drawn once
  from the seed and cycled."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (pool, batch_size, image_size, image_size, in_chans), dtype=np.uint8)
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  labels = np.zeros((local,), np.int32)
  for step in itertools.count(start_batch):
    yield {'image': images[step % pool, rows], 'label': labels}


def token_batches(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0, start_batch: int = 0,
                  process_index: int = 0, process_count: int = 1, pool: int = 4) -> Iterator[Batch]:
  """Endless random packed text rows (ids from 4: never pad/eos/unk/[MASK]), as image_batches.

  Each row holds three segments of random lengths, so the step meets segment boundaries as with real data;
  the global batch at step s is the same for any process count.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab_size, (pool, batch_size, seq_len), dtype=np.int32)
  cuts = np.sort(rng.integers(1, seq_len, (pool, batch_size, 2)), axis=-1)
  idx = np.arange(seq_len)
  segment_ids = 1 + (idx >= cuts[..., :1]).astype(np.int32) + (idx >= cuts[..., 1:]).astype(np.int32)
  starts = np.where(segment_ids == 1, 0, np.where(segment_ids == 2, cuts[..., :1], cuts[..., 1:]))
  positions = (idx - starts).astype(np.int32)
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  for step in itertools.count(start_batch):
    yield {'tokens': tokens[step % pool, rows], 'segment_ids': segment_ids[step % pool, rows],
           'positions': positions[step % pool, rows]}
