"""SimMIM's pretraining augmentation: RandomResizedCrop (bilinear) -> horizontal flip, as stateless TF ops from a
per-example key, and the endless pretraining batches (sources.keyed_batches) it makes.

Only the crop is decoded: a JPEG's size comes from its header (extract_jpeg_shape), the window is drawn from it
exactly as from the decoded image, and decode_and_crop_jpeg decodes just those rows and blocks; other formats
decode whole and are cropped. Batches leave the host as uint8 (PIL's resize output, as the official transform);
ToTensor + Normalize run on the device (simmim_jax/pixels.py), with data.mean / data.std.

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


def decode_crop(key: tf.Tensor, encoded: tf.Tensor, scale: Sequence[float],
                ratio: Sequence[float]) -> tf.Tensor:
  """The RandomResizedCrop window of an encoded image, decoded to uint8 RGB (h, w, 3).

  The window is drawn from the image size with `key` as random_resized_crop_window always does, so it is the
  window a full decode would give; JPEGs decode only that window. Grayscale, RGBA, CMYK and 16-bit -> RGB.
  """
  def jpeg() -> tf.Tensor:
    shape = tf.image.extract_jpeg_shape(encoded)
    y, x, h, w = random_resized_crop_window(key, shape[0], shape[1], scale, ratio)
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x, h, w]), channels=3)

  def other() -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = random_resized_crop_window(key, shape[0], shape[1], scale, ratio)
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Float pixels -> uint8, rounded (half to even) and clipped to 0..255: the bytes that go to the device."""
  return tf.saturate_cast(tf.round(image), tf.uint8)


def augment_image(key: tf.Tensor, encoded: tf.Tensor, data: ml_collections.ConfigDict,
                  image_size: int) -> tf.Tensor:
  """SimMIM: RandomResizedCrop (bilinear) -> horizontal flip; uint8 (S, S, 3), normalised later on device."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  crop = decode_crop(crop_key, encoded, data.crop_scale, data.crop_ratio)
  # Antialiased bilinear, rounded to uint8: PIL's resize, which the official (PIL-based) pipeline uses.
  image = to_uint8(tf.image.resize(crop, [image_size, image_size], 'bilinear', antialias=True))
  if data.flip:
    # tf.reverse, not image[:, ::-1]: a negative-stride slice costs ~20x more (measured, TF 2.21 CPU).
    image = tf.cond(tf.random.stateless_uniform([], flip_key) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)
  return image


def pretrain_batches(data: ml_collections.ConfigDict, *, image_size: int, batch_size: int,
                     seed: int, start_batch: int = 0, process_index: int | None = None,
                     process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process batches {'image': uint8 (B, S, S, 3), 'label': i32 (B,)}, from batch start_batch."""
  return sources.keyed_batches(data, lambda key, encoded: augment_image(key, encoded, data, image_size),
                               batch_size=batch_size, seed=seed, start_batch=start_batch,
                               process_index=process_index, process_count=process_count)
