"""The image pipeline: offline digits builder, determinism, resume, process slices, crops, errors, decoding only
the crop, uint8 batches normalised on device."""
import collections
import io
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simmim_jax import defaults, pixels
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
  assert batch['image'].shape == (64, 32, 32, 3) and batch['image'].dtype == np.uint8  # normalised on device
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert set(batch['label']) <= set(range(10))
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  assert batch['image'].min() == 0 and batch['image'].max() == 255


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
  # Full-image crop at the native 8x8 size, no flip: the raw pixels come back.
  data = _config(digits_dir, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
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
        raw = image[..., :1]
        seen[(raw.tobytes(), int(label))] += 1
  assert sum(seen.values()) == 2 * per_process
  assert not seen - everything  # no example twice and nothing foreign: the slices partition the split


def test_flip_mirrors_about_half_the_images(digits_dir):
  raw = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
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
  assert batch['image'].shape == (6, 4, 4, 3) and batch['image'].dtype == np.uint8
  normalised = np.asarray(pixels.normalise(jnp.asarray(batch['image']), data.mean, data.std))
  mean, std = np.array(data.mean, np.float32), np.array(data.std, np.float32)
  for image, label in zip(normalised, batch['label']):
    expected = (values['ab'[label]] / 255 - mean) / std
    np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=1e-6)
  assert sorted(batch['label']) == [0, 0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# Decoding only the crop, uint8 to the device.

def _jpeg(height: int, width: int, seed: int, quality: int = 90, mode: str = 'RGB') -> bytes:
  """A smooth random photo-like JPEG (low-frequency colour fields plus a little noise)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
  image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
  noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 13, (height, width, 3)), 0, 255)
  out = io.BytesIO()
  Image.fromarray(noisy.astype(np.uint8)).convert(mode).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def _full_decode_crop(key, encoded, scale, ratio) -> tf.Tensor:
  """The previous path: decode everything, then draw the window from the decoded shape and crop."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  shape = tf.shape(image)
  y, x, h, w = images.random_resized_crop_window(key, shape[0], shape[1], scale, ratio)
  return image[y:y + h, x:x + w]


@pytest.mark.parametrize('mode', ['RGB', 'L', 'CMYK'])
def test_jpeg_crop_decode_draws_the_same_window_and_matches_decode_then_crop(mode):
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  edge = []
  for i in range(60):
    encoded = tf.constant(_jpeg(120 + 7 * (i % 5), 160 + 13 * (i % 3), seed=i, mode=mode))
    key = tf.constant([i, 3], tf.int64)
    ours, theirs = (fn(key, encoded, scale, ratio).numpy() for fn in (images.decode_crop, _full_decode_crop))
    assert ours.shape == theirs.shape and ours.dtype == np.uint8  # the same window, to the pixel
    # libjpeg decodes whole blocks from the block column holding the window's left edge and upsamples chroma
    # across the window's left and right edge columns as edges of the image: only those two columns can differ.
    np.testing.assert_array_equal(ours[:, 1:-1], theirs[:, 1:-1])
    edge.append(np.abs(ours.astype(int) - theirs).max())
  assert max(edge) <= 32 and (mode == 'L' or np.mean(np.array(edge) == 0) > 0.1), edge
  if mode == 'L':  # no chroma: nothing to upsample, every pixel equal
    assert max(edge) == 0


def test_png_crop_is_exactly_decode_then_crop():
  out = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 4)).astype(np.uint8), 'RGBA').save(out, 'PNG')
  encoded = tf.constant(out.getvalue())
  for i in range(20):
    key = tf.constant([i, 1], tf.int64)
    np.testing.assert_array_equal(images.decode_crop(key, encoded, (0.2, 1.0), (3 / 4, 4 / 3)).numpy(),
                                  _full_decode_crop(key, encoded, (0.2, 1.0), (3 / 4, 4 / 3)).numpy())


def _host_normalised(key, encoded, data, size: int, rounded: bool) -> np.ndarray:
  """The previous host transform, float32 and normalised on the host (rounded: with PIL's uint8 output)."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  image = tf.image.resize(_full_decode_crop(crop_key, encoded, data.crop_scale, data.crop_ratio), [size, size],
                          'bilinear', antialias=True)
  if rounded:
    image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  image = tf.where(tf.random.stateless_uniform([], flip_key) < 0.5, image[:, ::-1], image)
  return ((image / 255.0 - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)).numpy()


def test_on_device_normalisation_equals_the_host_normalised_batch():
  data = defaults.pretrain_config().data
  encoded = [tf.constant(_jpeg(96, 128, seed=i)) for i in range(8)]
  keys = [tf.constant([5, i], tf.int64) for i in range(8)]
  batch = np.stack([images.augment_image(k, e, data, 64).numpy() for k, e in zip(keys, encoded)])
  assert batch.dtype == np.uint8 and batch.nbytes * 4 == batch.size * np.dtype(np.float32).itemsize
  device = np.asarray(jax.jit(lambda x: pixels.normalise(x, data.mean, data.std))(batch))
  # Decode-then-crop on the host to isolate the normalisation: the same window through the full decode.
  full = np.stack([images.to_uint8(tf.image.resize(_full_decode_crop(
      tf.unstack(tf.random.experimental.stateless_split(k, 2))[0], e, data.crop_scale, data.crop_ratio),
      [64, 64], 'bilinear', antialias=True)).numpy() for k, e in zip(keys, encoded)])
  flips = [bool(tf.random.stateless_uniform([], tf.unstack(tf.random.experimental.stateless_split(k, 2))[1]) < 0.5)
           for k in keys]
  full = np.stack([f[:, ::-1] if flip else f for f, flip in zip(full, flips)])
  host_rounded = np.stack([_host_normalised(k, e, data, 64, rounded=True) for k, e in zip(keys, encoded)])
  np.testing.assert_allclose(np.asarray(pixels.normalise(jnp.asarray(full), data.mean, data.std)), host_rounded,
                             rtol=0, atol=1e-6)  # normalisation on device == on the host
  # Against the float host path: PIL's uint8 rounding (half a level) plus the crop decode's block-edge levels.
  host = np.stack([_host_normalised(k, e, data, 64, rounded=False) for k, e in zip(keys, encoded)])
  assert np.abs(np.asarray(pixels.normalise(jnp.asarray(full), data.mean, data.std)) - host).max() <= (
      0.5 / 255 / min(data.std) + 1e-6)
  assert np.abs(device - host).max() < 12 / 255 / min(data.std)
  assert pixels.normalise(jnp.zeros((1, 2, 2, 3), jnp.float32), data.mean, data.std).dtype == jnp.float32


def test_pipeline_runs_on_a_private_pool_sized_to_the_host(digits_dir):
  data = _config(digits_dir)
  ds = sources.keyed_dataset(data, lambda key, encoded: images.augment_image(key, encoded, data, 8), batch_size=8,
                             seed=0)
  options = ds.options()
  assert options.threading.private_threadpool_size == len(os.sched_getaffinity(0)) == sources.host_threads(data)
  assert options.deterministic and options.autotune.enabled is not False
  data.threads = 3
  assert sources.keyed_dataset(data, lambda key, encoded: images.augment_image(key, encoded, data, 8), batch_size=8,
                               seed=0).options().threading.private_threadpool_size == 3
