"""Image pipelines: a tfds source -> this process's slice -> SimMIM augmentation -> numpy batches.

Batches are a pure function of (seed, process, batch number): epoch e is a shuffle seeded from
(seed, process, e), and each example's augmentation uses stateless ops seeded from (epoch, index within
the epoch). So resuming at batch k rebuilds exactly the batches k, k+1, ... without decoding the
examples before it. Each epoch drops its last partial batch, so batches never straddle two epochs.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simmim_jax.data.builders import digits

try:
  # The accelerators belong to JAX; TensorFlow only runs the host-side input pipeline.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices elsewhere; nothing left to hide.
  pass

_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 windows before its centre-crop fallback


class DatasetNotFoundError(ValueError):
  """The configured dataset is unknown or not prepared under data_dir."""


def _data_dir_text(data_dir: str | None) -> str:
  """The folder tfds reads for this data_dir, for messages."""
  return os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR


def dataset_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for data.name; never downloads (digits are prepared locally)."""
  if data.name == digits.NAME:
    return digits.ensure_prepared(data.data_dir)
  if data.name == 'image_folder':
    if not data.data_dir or not os.path.isdir(os.path.expanduser(data.data_dir)):
      raise DatasetNotFoundError(
          f'image_folder needs data.data_dir set to an existing folder laid out as '
          f'<data_dir>/<split>/<label>/*.jpg|png; got data_dir={data.data_dir!r}.')
    return tfds.ImageFolder(os.path.expanduser(data.data_dir))
  where = _data_dir_text(data.data_dir)
  try:
    builder = tfds.builder(data.name, data_dir=data.data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is neither a registered tfds dataset nor prepared under '
        f'data_dir={where}. Check data.name (or use sklearn_digits / image_folder).') from None
  if not builder.is_prepared():
    hint = (f' {data.name} needs files you fetch yourself: put them in {where}/downloads/manual first.'
            if builder.MANUAL_DOWNLOAD_INSTRUCTIONS else '')
    # Loading would start a download (minutes of DNS retries offline), so stop here instead.
    raise DatasetNotFoundError(
        f'Dataset {data.name!r} is not prepared under data_dir={where}.{hint} Prepare it with '
        f'`tfds build {data.name} --data_dir={where}` (or copy a prepared {where}/{data.name} '
        f'folder there), or set data.data_dir to where it is.')
  return builder


def _split_size(builder: tfds.core.DatasetBuilder, split) -> int:
  """Examples in a split or sub-split, with a clear error for a wrong split name."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Split {split!r} not available for {builder.name}; it has '
                     f'{list(builder.info.splits.keys())}. ({e})') from None


def num_examples(data: ml_collections.ConfigDict) -> int:
  """Examples in data.split, all processes together."""
  return _split_size(dataset_builder(data), data.split)


def _process_slice(builder: tfds.core.DatasetBuilder, split: str, index: int,
                   count: int) -> tuple[tf.data.Dataset, int]:
  """This process's equal-size slice of the split, images left encoded, and its size."""
  decoders = {'image': tfds.decode.SkipDecoding()}  # decode later, only what is not skipped
  if isinstance(builder, tfds.ImageFolder):  # no sub-split API: slice the (pre-shuffled) list
    size = _split_size(builder, split) // count
    ds = builder.as_dataset(split=split, decoders=decoders).skip(index * size).take(size)
    return ds, size
  sub = tfds.even_splits(split, n=count, drop_remainder=True)[index]
  return builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders), _split_size(builder, sub)


def random_resized_crop_window(seed: tf.Tensor, height, width, scale: Sequence[float],
                               ratio: Sequence[float]) -> tuple[tf.Tensor, ...]:
  """torchvision RandomResizedCrop.get_params with stateless ops: int32 (y, x, h, w)."""
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  u = tf.cast(tf.random.stateless_uniform([4, _CROP_ATTEMPTS], seed), tf.float64)
  target_area = height_f * width_f * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  w = tf.round(tf.sqrt(target_area * aspect))  # tf.round and Python round both round half to even
  h = tf.round(tf.sqrt(target_area / aspect))
  valid = (w > 0) & (w <= width_f) & (h > 0) & (h <= height_f)
  first = tf.argmax(tf.cast(valid, tf.int32))  # the first valid attempt, as the loop would return
  y = tf.floor(u[2, first] * (height_f - h[first] + 1))
  x = tf.floor(u[3, first] * (width_f - w[first] + 1))
  # Fallback: the whole image, its aspect ratio clamped into `ratio`, centred.
  in_ratio = width_f / height_f
  fw = tf.where(in_ratio > max(ratio), tf.round(height_f * max(ratio)), width_f)
  fh = tf.where(in_ratio < min(ratio), tf.round(width_f / min(ratio)), height_f)
  found = tf.reduce_any(valid)
  window = (tf.where(found, y, tf.floor((height_f - fh) / 2)), tf.where(found, x, tf.floor((width_f - fw) / 2)),
            tf.where(found, h[first], fh), tf.where(found, w[first], fw))
  return tuple(tf.cast(v, tf.int32) for v in window)


def _augment(key: tf.Tensor, encoded: tf.Tensor, data: ml_collections.ConfigDict,
             image_size: int) -> tf.Tensor:
  """SimMIM: RandomResizedCrop (bilinear) -> horizontal flip -> [0, 1] -> normalise."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)  # grayscale -> RGB
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.shape(image)
  y, x, h, w = random_resized_crop_window(crop_key, shape[0], shape[1], data.crop_scale,
                                          data.crop_ratio)
  # antialias=True follows PIL's bilinear resize, which the official (PIL-based) pipeline uses.
  image = tf.image.resize(image[y:y + h, x:x + w], [image_size, image_size], 'bilinear',
                          antialias=True)
  if data.flip:
    image = tf.where(tf.random.stateless_uniform([], flip_key) < 0.5, image[:, ::-1], image)
  mean = tf.constant(data.mean, tf.float32)
  std = tf.constant(data.std, tf.float32)
  return (image / 255.0 - mean) / std


def pretrain_batches(data: ml_collections.ConfigDict, *, image_size: int, batch_size: int,
                     seed: int, start_batch: int = 0, process_index: int | None = None,
                     process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process batches {'image': f32 (B, S, S, 3), 'label': i32 (B,)}, from batch start_batch."""
  return keyed_batches(data, lambda key, encoded: _augment(key, encoded, data, image_size),
                       batch_size=batch_size, seed=seed, start_batch=start_batch,
                       process_index=process_index, process_count=process_count)


def keyed_batches(data: ml_collections.ConfigDict,
                  transform: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], *, batch_size: int,
                  seed: int, start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches of transform(example key, encoded image) and labels: the scheme in the module doc."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  source, size = _process_slice(dataset_builder(data), data.split, index, count)
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
