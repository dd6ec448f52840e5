"""SimMIM's pretraining augmentation: RandomResizedCrop (bilinear) -> horizontal flip -> normalise, as stateless
TF ops from a per-example key, and the endless pretraining batches (sources.keyed_batches) it makes.

random_resized_crop_window is torchvision's crop draw; classification's fine-tuning augmentation uses it too.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from simmim_jax.data import sources

_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 windows before its centre-crop fallback


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
  return sources.keyed_batches(data, lambda key, encoded: _augment(key, encoded, data, image_size),
                               batch_size=batch_size, seed=seed, start_batch=start_batch,
                               process_index=process_index, process_count=process_count)
