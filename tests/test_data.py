"""The image pipeline: offline digits builder, determinism, resume, process slices, crops, errors."""
import collections
import itertools
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simmim_jax import defaults
from simmim_jax.data import images, sources
from simmim_jax.data.builders import digits


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory) -> str:
  """One offline-prepared copy of the digits for the whole module."""
  path = str(tmp_path_factory.mktemp('tfds'))
  digits.ensure_prepared(path)
  return path


def _config(data_dir: str, **overrides):
  """Data config for the digits with a small shuffle buffer."""
  data = defaults.pretrain_config().data
  data.name, data.data_dir, data.shuffle_buffer, data.prefetch = 'sklearn_digits', data_dir, 256, 1
  data.update(overrides)
  return data


def _take(data, n: int, **kwargs) -> list[dict[str, np.ndarray]]:
  """The first n batches of pretrain_batches."""
  kwargs = {'image_size': 16, 'batch_size': 64, 'seed': 0, **kwargs}
  return list(itertools.islice(images.pretrain_batches(data, **kwargs), n))


def test_digits_builder_prepares_offline(digits_dir):
  builder = digits.ensure_prepared(digits_dir)  # already prepared: reused
  assert builder.info.splits['train'].num_examples == 1437
  assert builder.info.splits['test'].num_examples == 360
  assert sources.num_examples(_config(digits_dir, split='test')) == 360
  examples = list(builder.as_dataset(split='train').as_numpy_iterator())
  pixels = np.stack([ex['image'] for ex in examples])
  assert pixels.shape == (1437, 8, 8, 1) and pixels.dtype == np.uint8
  assert pixels.min() == 0 and pixels.max() == 255
  assert sorted({int(ex['label']) for ex in examples}) == list(range(10))


def test_batches_shape_dtype_and_grayscale_to_rgb(digits_dir):
  data = _config(digits_dir)
  (batch,) = _take(data, 1, image_size=32)
  assert batch['image'].shape == (64, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert set(batch['label']) <= set(range(10))
  pixels = batch['image'] * np.array(data.std, np.float32) + np.array(data.mean, np.float32)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
  assert -1e-5 <= pixels.min() and pixels.max() <= 1 + 1e-5


def test_same_seed_same_batches_other_seed_differs(digits_dir):
  data = _config(digits_dir)
  first, again, other = _take(data, 3), _take(data, 3), _take(data, 3, seed=1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['label'], other[0]['label'])
  assert not np.allclose(first[0]['image'], other[0]['image'])


def test_start_batch_resumes_exactly_across_epochs(digits_dir):
  data = _config(digits_dir)
  per_epoch = 1437 // 64  # 22: each epoch drops its last partial batch
  fresh = _take(data, per_epoch + 4)
  for start in (per_epoch - 2, per_epoch + 1):  # resume before and after the epoch boundary
    resumed = _take(data, len(fresh) - start, start_batch=start)
    for a, b in zip(fresh[start:], resumed, strict=True):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # A new epoch is a new order, not a replay of the last one.
  assert not np.array_equal(fresh[0]['label'], fresh[per_epoch]['label'])


def test_process_slices_are_disjoint_and_cover_the_split(digits_dir):
  # Full-image crop at the native 8x8 size, no flip, no normalisation: the raw pixels come back.
  data = _config(digits_dir, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  builder = digits.ensure_prepared(digits_dir)
  everything = collections.Counter(
      (ex['image'].tobytes(), int(ex['label']))
      for ex in builder.as_dataset(split='train').as_numpy_iterator())
  per_process = 1437 // 2
  seen = collections.Counter()
  for index in range(2):
    batches = _take(data, per_process // 2, image_size=8, batch_size=2, process_index=index,
                    process_count=2)
    for batch in batches:
      for image, label in zip(batch['image'], batch['label']):
        raw = np.round(image[..., :1] * 255).astype(np.uint8)
        seen[(raw.tobytes(), int(label))] += 1
  assert sum(seen.values()) == 2 * per_process
  assert not seen - everything  # no example twice and nothing foreign: the slices partition the split


def test_flip_mirrors_about_half_the_images(digits_dir):
  raw = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), mean=(0.0,) * 3, std=(1.0,) * 3)
  kept = _take(_config(digits_dir, flip=False, **raw), 2, image_size=8)
  maybe = _take(_config(digits_dir, flip=True, **raw), 2, image_size=8)
  plain = np.concatenate([b['image'] for b in kept])
  flipped = np.concatenate([b['image'] for b in maybe])
  same = np.all(np.isclose(flipped, plain), axis=(1, 2, 3))
  mirrored = np.all(np.isclose(flipped, plain[:, :, ::-1]), axis=(1, 2, 3))
  assert (same | mirrored).all()
  assert 0.3 < mirrored.mean() < 0.7


def test_missing_tfds_dataset_fails_fast_with_a_clear_message(tmp_path):
  data = _config(str(tmp_path), name='mnist')
  start = time.time()
  with pytest.raises(sources.DatasetNotFoundError) as error:
    sources.num_examples(data)
  assert time.time() - start < 10
  assert 'mnist' in str(error.value) and str(tmp_path) in str(error.value)
  assert 'tfds build' in str(error.value)
  with pytest.raises(sources.DatasetNotFoundError, match='no_such_dataset_xyz'):
    sources.prepared_builder(_config(str(tmp_path), name='no_such_dataset_xyz'))


def _windows(height: int, width: int, scale, ratio, n: int = 2000) -> np.ndarray:
  """n crop windows (y, x, h, w) from seeds (i, 7)."""
  ds = tf.data.Dataset.range(n).map(lambda i: tf.stack(images.random_resized_crop_window(
      tf.stack([i, tf.constant(7, tf.int64)]), height, width, scale, ratio)))
  return np.stack(list(ds.as_numpy_iterator()))


@pytest.mark.parametrize('height,width', [(224, 224), (180, 300)])
def test_crop_window_respects_bounds(height, width):
  scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
  y, x, h, w = _windows(height, width, scale, ratio).T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  centre_full = (h == min(height, round(width / ratio[0]))) & (w == min(width, round(height * ratio[1])))
  fallback = centre_full & (y == (height - h) // 2) & (x == (width - w) // 2)
  assert fallback.mean() < 0.05
  area, aspect = (h * w / (height * width))[~fallback], (w / h)[~fallback]
  assert (area >= scale[0] * 0.98).all() and (area <= scale[1] * 1.02).all()
  assert (aspect >= ratio[0] * 0.98).all() and (aspect <= ratio[1] * 1.02).all()
  # The draws fill the ranges (uniform area, log-uniform ratio), not one corner of them.
  largest_fit = min(height, width / ratio[0]) * min(width, height * ratio[1]) / (height * width)
  assert area.min() < scale[0] + 0.05 and area.max() > 0.95 * min(largest_fit, scale[1])
  assert aspect.min() < ratio[0] * 1.05 and aspect.max() > ratio[1] * 0.95
  if height == width:  # log-uniform ratio is symmetric; on a wide image tall windows fail more often
    assert 0.45 < np.mean(aspect > 1) < 0.55


def test_crop_window_falls_back_to_a_clamped_centre_crop():
  # Full-area windows never fit a 100x300 image at these ratios: torchvision's fallback applies.
  windows = _windows(100, 300, (1.0, 1.0), (3 / 4, 4 / 3), n=20)
  np.testing.assert_array_equal(windows, np.tile([[0, 83, 100, 133]], (20, 1)))


def test_image_folder_constant_images_normalise(tmp_path):
  values = {'a': 40, 'b': 200}
  for label, value in values.items():
    (tmp_path / 'train' / label).mkdir(parents=True)
    for i, (size, mode) in enumerate([((12, 10), 'RGB'), ((9, 9), 'L'), ((20, 16), 'RGB')]):
      Image.new(mode, size, value if mode == 'L' else (value,) * 3).save(
          tmp_path / 'train' / label / f'{i}.png')
  data = defaults.pretrain_config().data
  data.name, data.data_dir, data.shuffle_buffer, data.prefetch = 'image_folder', str(tmp_path), 8, 1
  assert sources.num_examples(data) == 6
  (batch,) = list(itertools.islice(
      images.pretrain_batches(data, image_size=4, batch_size=6, seed=0), 1))
  assert batch['image'].shape == (6, 4, 4, 3) and batch['image'].dtype == np.float32
  mean, std = np.array(data.mean, np.float32), np.array(data.std, np.float32)
  for image, label in zip(batch['image'], batch['label']):
    expected = (values['ab'[label]] / 255 - mean) / std
    np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=1e-4)
  assert sorted(batch['label']) == [0, 0, 0, 1, 1, 1]
