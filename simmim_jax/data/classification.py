"""Classification pipelines for fine-tuning and linear probing: timm's train augmentation, exact evaluation.

Training batches follow sources.keyed_batches (a pure function of seed, process and batch number, so a
resumed run rebuilds the same batches). Evaluation reads every example of a split exactly once over all
processes; each process pads its slice to the same number of batches and marks padding with valid = 0.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simmim_jax.data import augment, images, sources

_INTERPOLATIONS = ('bicubic', 'bilinear')


def num_classes(data: ml_collections.ConfigDict) -> int:
  """Classes of data.name's 'label' feature, from the tfds info."""
  builder = sources.prepared_builder(data)
  features = builder.info.features
  label = features['label'] if 'label' in features.keys() else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'Dataset {data.name!r} has no ClassLabel feature "label"; fine-tuning and '
                     f'linear probing need labelled images.')
  return label.num_classes


def fill_colour(data: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """timm's img_mean: the normalisation mean in 0..255, which fills pixels moved in from outside."""
  return tuple(min(255, round(255 * m)) for m in data.mean)


def _check(data: ml_collections.ConfigDict) -> None:
  """Fail early on augmentation settings the pipeline cannot run."""
  if data.interpolation not in _INTERPOLATIONS:
    raise ValueError(f'data.interpolation must be one of {_INTERPOLATIONS}, got {data.interpolation!r}.')
  if not 0.0 <= data.random_erasing <= 1.0:
    raise ValueError(f'data.random_erasing is a probability in [0, 1], got {data.random_erasing}.')
  if data.rand_augment:
    augment.parse_rand_augment(data.rand_augment)


def _normalise(image: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """uint8 values -> [0, 1] -> (x - mean) / std, as ToTensor + Normalize."""
  return (image / 255.0 - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)


def train_transform(key: tf.Tensor, encoded: tf.Tensor, data: ml_collections.ConfigDict,
                    image_size: int) -> tf.Tensor:
  """timm create_transform(is_training=True): RandomResizedCrop -> flip -> RandAugment -> normalise ->
  RandomErasing('pixel'); float32 (S, S, 3)."""
  crop_key, flip_key, ra_key, erase_key = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)  # grayscale -> RGB
  shape = tf.shape(image)
  y, x, h, w = images.random_resized_crop_window(crop_key, shape[0], shape[1], data.crop_scale,
                                                 data.crop_ratio)
  image = augment.resize(image[y:y + h, x:x + w], image_size, image_size, data.interpolation)
  if data.flip:
    image = tf.where(tf.random.stateless_uniform([], flip_key) < 0.5, image[:, ::-1], image)
  if data.rand_augment:
    params = augment.parse_rand_augment(data.rand_augment)
    image = augment.rand_augment(ra_key, image, params, fill_colour(data), data.interpolation)
  image = _normalise(image, data)
  if data.random_erasing > 0:
    image = augment.random_erasing(erase_key, image, data.random_erasing)
  return image


def eval_transform(encoded: tf.Tensor, data: ml_collections.ConfigDict, image_size: int) -> tf.Tensor:
  """Resize the shorter side to int(256/224 * S), centre-crop S, normalise; float32 (S, S, 3)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return _normalise(augment.resize_center_crop(image, image_size, data.interpolation), data)


def train_batches(data: ml_collections.ConfigDict, *, image_size: int, batch_size: int, seed: int,
                  start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process batches {'image': f32 (B, S, S, 3) normalised, 'label': i32 (B,)}."""
  _check(data)
  num_classes(data)  # labels are required
  return sources.keyed_batches(
      data, lambda key, encoded: train_transform(key, encoded, data, image_size),
      batch_size=batch_size, seed=seed, start_batch=start_batch, process_index=process_index,
      process_count=process_count)


def _slice_bounds(total: int, count: int) -> list[tuple[int, int]]:
  """[start, end) of each process: sizes differ by at most one, the larger ones first."""
  base, extra = divmod(total, count)
  starts = [i * base + min(i, extra) for i in range(count + 1)]
  return list(zip(starts[:-1], starts[1:]))


def _eval_slice(builder: tfds.core.DatasetBuilder, split: str, index: int,
                count: int) -> tuple[tf.data.Dataset, int, int]:
  """This process's slice of the whole split (nothing dropped), its size, and the largest slice size."""
  decoders = {'image': tfds.decode.SkipDecoding()}
  if isinstance(builder, tfds.ImageFolder):  # no sub-split API: take a contiguous range
    bounds = _slice_bounds(sources.split_size(builder, split), count)
    start, end = bounds[index]
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    return ds.skip(start).take(end - start), end - start, max(e - s for s, e in bounds)
  subs = tfds.even_splits(split, n=count, drop_remainder=False)
  sizes = [sources.split_size(builder, sub) for sub in subs]
  # An empty sub-split (more processes than examples) cannot be read: take nothing from the split.
  sub, take = (subs[index], -1) if sizes[index] else (split, 0)
  ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders).take(take)
  return ds, sizes[index], max(sizes)


def eval_batches(data: ml_collections.ConfigDict, *, image_size: int, batch_size: int, split: str,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite per-process batches {'image', 'label', 'valid' (i32 1 real / 0 padding)}: every example
  of `split` once over all processes, and the same number of batches on every process."""
  _check(data)
  num_classes(data)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  source, size, largest = _eval_slice(sources.prepared_builder(data), split, index, count)
  num_batches = math.ceil(largest / batch_size)

  def prepare(example) -> dict[str, tf.Tensor]:
    return {'image': eval_transform(example['image'], data, image_size),
            'label': tf.cast(example['label'], tf.int32), 'valid': tf.constant(1, tf.int32)}

  ds = source.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.float32),
      'label': tf.constant(0, tf.int32), 'valid': tf.constant(0, tf.int32)})
  ds = ds.concatenate(padding.repeat(num_batches * batch_size - size))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(data.prefetch)
  return iter(tfds.as_numpy(ds))
