"""Classification pipelines for fine-tuning and linear probing: timm's train augmentation, exact evaluation.

Training batches follow sources.keyed_batches (a pure function of seed, process and batch number, so a
resumed run rebuilds the same batches). Evaluation reads every example of a split exactly once over all
processes; each process pads its slice to the same number of batches and marks padding with valid = 0.

Images leave the host as uint8 (the values PIL would hold); normalisation and the random-erasing fill run on
the device (finetune_step, simmim_jax/pixels.py), the erasing box drawn here ('erase': top, left, h, w).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from simmim_jax.data import augment, folders, images, sources

_INTERPOLATIONS = ('bicubic', 'bilinear')


def num_classes(data: ml_collections.ConfigDict) -> int:
  """Classes of data.name's 'label' feature, from the tfds info."""
  if data.name == sources.IMAGE_FOLDER:
    return len(_labelled_index(data, data.split).classes)
  builder = sources.prepared_builder(data)
  features = builder.info.features
  label = features['label'] if 'label' in features.keys() else None
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f'Dataset {data.name!r} has no ClassLabel feature "label"; fine-tuning and '
                     f'linear probing need labelled images.')
  return label.num_classes


def _labelled_index(data: ml_collections.ConfigDict, split: str) -> folders.FolderIndex:
  """The image_folder index of `split`, which must be a <split>/<label>/ folder: a root without it would be read
  as unlabelled images (every file under it, the other splits' too), and labels of -1 score nothing."""
  found = sources.folder_index(data, split)
  if not found.classes:
    raise ValueError(f'{data.data_dir!r} has no {split}/<label>/ folders; fine-tuning and linear probing need '
                     f'labelled images of the split {split!r} (data.split, data.eval_split).')
  return found


def split_examples(data: ml_collections.ConfigDict, split: str) -> int:
  """Labelled examples in `split`; fails at once where the split is missing (the trainer asks at set-up, before
  the first evaluation would)."""
  if data.name == sources.IMAGE_FOLDER:
    return len(_labelled_index(data, split))
  num_classes(data)
  return sources.split_size(sources.prepared_builder(data), split)


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
  """uint8 values -> [0, 1] -> (x - mean) / std, as ToTensor + Normalize (the device does this in training:
  simmim_jax/pixels.normalise; kept as the reference the tests compare it with)."""
  return (tf.cast(image, tf.float32) / 255.0 - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)


def train_transform(key: tf.Tensor, encoded: tf.Tensor, data: ml_collections.ConfigDict,
                    image_size: int) -> dict[str, tf.Tensor]:
  """timm create_transform(is_training=True) up to ToTensor: RandomResizedCrop -> flip -> RandAugment;
  {'image': uint8 (S, S, 3), 'erase': int32 (4,) RandomErasing('pixel')'s box, all 0 for none}. Normalise
  and the erasing fill follow on the device, in timm's order."""
  crop_key, flip_key, ra_key, erase_key = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  crop = images.decode_crop(crop_key, encoded, data.crop_scale, data.crop_ratio)  # only the window decoded
  image = augment.resize(crop, image_size, image_size, data.interpolation)
  if data.flip:
    # tf.reverse, not image[:, ::-1]: a negative-stride slice costs ~20x more (measured, TF 2.21 CPU).
    image = tf.cond(tf.random.stateless_uniform([], flip_key) < 0.5, lambda: tf.reverse(image, [1]), lambda: image)
  if data.rand_augment:
    params = augment.parse_rand_augment(data.rand_augment)
    image = augment.rand_augment(ra_key, image, params, fill_colour(data), data.interpolation)
  # random_erasing's key split: the box from the first key, as augment.random_erasing draws it on the host.
  box_key = tf.unstack(tf.random.experimental.stateless_split(erase_key, 3))[0]
  box = augment.erase_box(box_key, image_size, image_size, data.random_erasing)
  return {'image': images.to_uint8(image), 'erase': box}


def resize_center_crop(image: tf.Tensor, size: int, crop_pct: float, interpolation: str) -> tf.Tensor:
  """timm's eval view: Resize(floor(size / crop_pct)) on the shorter side, then CenterCrop(size). At crop_pct
  0.875 it is SimMIM's int(256/224 * size) (augment.resize_center_crop, equal for every size up to 1024);
  at 1.0 the whole image is resized to size, the view a full-frame training crop sees."""
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f'data.eval_crop_pct is the share of the shorter side kept, in (0, 1], got {crop_pct}.')
  short_target = math.floor(size / crop_pct)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  # torchvision: new_long = int(new_short * long / short)
  new_long = tf.cast(tf.floor(tf.cast(short_target * long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
  new_h = tf.where(height <= width, short_target, new_long)
  new_w = tf.where(height <= width, new_long, short_target)
  image = augment.resize(image, new_h, new_w, interpolation)
  # torchvision CenterCrop: int(round((H - size) / 2.0)); Python's and tf.round both round half to even.
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, None])


def eval_transform(encoded: tf.Tensor, data: ml_collections.ConfigDict, image_size: int) -> tf.Tensor:
  """Resize the shorter side to floor(S / data.eval_crop_pct), centre-crop S; uint8 (S, S, 3), normalised on
  device."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  crop_pct = data.get('eval_crop_pct', 0.875)  # configs saved before the field: the fixed crop they ran with
  return images.to_uint8(resize_center_crop(image, image_size, crop_pct, data.interpolation))


def train_batches(data: ml_collections.ConfigDict, *, image_size: int, batch_size: int, seed: int,
                  start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-process batches {'image': uint8 (B, S, S, 3), 'erase': i32 (B, 4), 'label': i32 (B,)}."""
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


def _eval_slice(data: ml_collections.ConfigDict, split: str, index: int,
                count: int) -> tuple[tf.data.Dataset, int, int]:
  """This process's slice of the whole split (nothing dropped), its size, and the largest slice size."""
  if data.name == sources.IMAGE_FOLDER:  # a contiguous range of the index; only those files are read
    found = _labelled_index(data, split)
    bounds = _slice_bounds(len(found), count)
    start, end = bounds[index]
    ds = tf.data.Dataset.from_tensor_slices((list(found.paths[start:end]) or [''], found.labels[start:end]
                                             if end > start else np.zeros([1], np.int32))).take(end - start)
    return sources.read_files(ds), end - start, max(e - s for s, e in bounds)
  builder = sources.prepared_builder(data)
  decoders = {'image': tfds.decode.SkipDecoding()}
  subs = tfds.even_splits(split, n=count, drop_remainder=False)
  sizes = [sources.split_size(builder, sub) for sub in subs]
  # An empty sub-split (more processes than examples) cannot be read: take nothing from the split.
  sub, take = (subs[index], -1) if sizes[index] else (split, 0)
  ds = builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders,
                          read_config=sources.read_config()).take(take)
  return ds, sizes[index], max(sizes)


def eval_batches(data: ml_collections.ConfigDict, *, image_size: int, batch_size: int, split: str,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite per-process batches {'image' uint8, 'label', 'valid' (i32 1 real / 0 padding)}: every example
  of `split` once over all processes, and the same number of batches on every process."""
  _check(data)
  num_classes(data)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  source, size, largest = _eval_slice(data, split, index, count)
  num_batches = math.ceil(largest / batch_size)

  def prepare(example) -> dict[str, tf.Tensor]:
    return {'image': eval_transform(example['image'], data, image_size),
            'label': tf.cast(example['label'], tf.int32), 'valid': tf.constant(1, tf.int32)}

  ds = source.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([image_size, image_size, 3], tf.uint8),
      'label': tf.constant(0, tf.int32), 'valid': tf.constant(0, tf.int32)})
  ds = ds.concatenate(padding.repeat(num_batches * batch_size - size))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(data.prefetch)
  return iter(tfds.as_numpy(sources.with_options(ds, data)))
