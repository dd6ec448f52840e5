"""tfds sources for every pipeline: the prepared builder, split sizes, and keyed per-process batches.

Batches from keyed_batches are a pure function of (seed, process, batch number): epoch e is a shuffle seeded
from (seed, process, e), and each example's transform gets a stateless key from (epoch, index within the
epoch). So resuming at batch k rebuilds exactly the batches k, k+1, ... without decoding the examples before
it. Each epoch drops its last partial batch, so batches never straddle two epochs.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simmim_jax.data.builders import digits, pydoc_topics

try:
  # The accelerators belong to JAX; TensorFlow only runs the host-side input pipeline.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices elsewhere; nothing left to hide.
  pass

IMAGE_FOLDER = 'image_folder'  # <data_dir>/<split>/<label>/*.jpg|png, read by tfds.ImageFolder
# Real datasets shipped inside installed packages: prepared locally, so they never need a download.
_EMBEDDED = {digits.NAME: digits.ensure_prepared, pydoc_topics.NAME: pydoc_topics.ensure_prepared}


class DatasetNotFoundError(ValueError):
  """The configured dataset is unknown or not prepared under data_dir."""


def prepared_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for data.name (images or text); never downloads."""
  if data.name in _EMBEDDED:
    return _EMBEDDED[data.name](data.data_dir)
  if data.name == IMAGE_FOLDER:
    if not data.data_dir or not os.path.isdir(os.path.expanduser(data.data_dir)):
      raise DatasetNotFoundError(
          f'{IMAGE_FOLDER} needs data.data_dir set to an existing folder laid out as '
          f'<data_dir>/<split>/<label>/*.jpg|png; got data_dir={data.data_dir!r}.')
    return tfds.ImageFolder(os.path.expanduser(data.data_dir))
  where = os.path.expanduser(data.data_dir) if data.data_dir else tfds.core.constants.DATA_DIR
  offline = (f'Without tfds: data.name={digits.NAME} or {IMAGE_FOLDER} for images, {pydoc_topics.NAME} or '
             'text_files for text.')
  try:
    builder = tfds.builder(data.name, data_dir=data.data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is neither a registered tfds dataset nor prepared under '
        f'data_dir={where}. Check data.name. {offline}') from None
  if not builder.is_prepared():
    hint = (f' {data.name} needs files you fetch yourself: put them in {where}/downloads/manual first.'
            if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else '')
    # Loading would start a download (minutes of DNS retries offline), so stop here instead.
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is not prepared under data_dir={where}.{hint} Prepare it with '
        f'`tfds build {data.name} --data_dir={where}` (or copy a prepared {where}/{data.name} '
        f'folder there), or set data.data_dir to where it is. {offline}')
  return builder


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a split or sub-split ('train', 'train[:10%]'), with a clear error for a wrong split name."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Split {split!r} not available for {builder.name}; it has '
                     f'{list(builder.info.splits.keys())}. ({e})') from None


def num_examples(data: ml_collections.ConfigDict) -> int:
  """Examples in data.split, all processes together."""
  return split_size(prepared_builder(data), data.split)


def _process_slice(builder: tfds.core.DatasetBuilder, split: str, index: int,
                   count: int) -> tuple[tf.data.Dataset, int]:
  """This process's equal-size slice of the split, images left encoded, and its size."""
  decoders = {'image': tfds.decode.SkipDecoding()}  # decode later, only what is not skipped
  if isinstance(builder, tfds.ImageFolder):  # no sub-split API: slice the (pre-shuffled) list
    size = split_size(builder, split) // count
    ds = builder.as_dataset(split=split, decoders=decoders).skip(index * size).take(size)
    return ds, size
  sub = tfds.even_splits(split, n=count, drop_remainder=True)[index]
  return builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders), split_size(builder, sub)


def keyed_batches(data: ml_collections.ConfigDict,
                  transform: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], *, batch_size: int,
                  seed: int, start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of transform(example key, encoded image) and labels: the scheme in the module doc."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  source, size = _process_slice(prepared_builder(data), data.split, index, count)
  epoch_batches = size // batch_size
  if epoch_batches == 0:
    raise ValueError(f'Process slice of {data.name}:{data.split} has {size} examples, fewer than '
                     f'the per-process batch size {batch_size}.')
  first_epoch, skip_batches = divmod(start_batch, epoch_batches)
  process_key = tf.constant([seed, index], tf.int64)

  def epoch_key(epoch: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(process_key, epoch)

  def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
    # -1 is no example index, so the shuffle seed never equals an example's key.
    shuffle_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(epoch_key(epoch), -1), minval=None,
        maxval=None, dtype=tf.int64)
    ds = source.shuffle(data.shuffle_buffer, seed=shuffle_seed).take(epoch_batches * batch_size)
    return ds.enumerate().map(lambda i, ex: (epoch, i, ex['image'], ex.get('label', -1)))

  def prepare(epoch, i, encoded, label) -> dict[str, tf.Tensor]:
    key = tf.random.experimental.stateless_fold_in(epoch_key(epoch), i)
    return {'image': transform(key, encoded), 'label': tf.cast(label, tf.int32)}

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  ds = ds.skip(skip_batches * batch_size)  # still encoded: skipping costs reading, not decoding
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(data.prefetch)
  return iter(tfds.as_numpy(ds))
