"""timm fine-tune augmentations in TF against PIL (what timm runs), determinism, parsing, erasing, eval
crop; the classification pipelines (exact evaluation on 8 simulated processes, resumable training)."""
import collections
import io
import itertools
import math

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from simmim_jax import defaults, pixels
from simmim_jax.data import augment, classification
from simmim_jax.data import images as images_lib
from simmim_jax.data.builders import digits

FILL = (124, 116, 104)  # timm img_mean for the ImageNet mean


def _photo(height: int = 12, width: int = 10, seed: int = 0) -> np.ndarray:
  """A small uint8 RGB image: smooth ramps plus noise, values inside [20, 230] so the ops have work."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  base = np.stack([10 * y + 5 * x, 200 - 8 * x, 60 + 6 * y], -1) + rng.integers(0, 40, (height, width, 3))
  return np.clip(base + 20, 20, 230).astype(np.uint8)


def _tf(op, image: np.ndarray) -> np.ndarray:
  """Runs a TF op on a uint8 image, returns uint8."""
  out = op(tf.constant(image, tf.float32)).numpy()
  assert np.all(out == np.round(out)) and out.min() >= 0 and out.max() <= 255
  return out.astype(np.uint8)


def _pil(fn, image: np.ndarray, *args, **kwargs) -> np.ndarray:
  """Runs a PIL function (as timm calls it) on a uint8 image."""
  return np.asarray(fn(Image.fromarray(image), *args, **kwargs))


def _solarize_add_pil(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
  """timm auto_augment.solarize_add, verbatim logic."""
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * 3)


def _op(name: str, *arg, interpolation: str = 'bicubic'):
  """augment.apply_op for one timm op name, as a function of the image."""
  return lambda image: augment.apply_op(name, image, *(arg or (0,)), FILL, interpolation)


@pytest.mark.parametrize('seed', [0, 1])
def test_lookup_table_ops_equal_pil_exactly(seed):
  image = _photo(seed=seed)
  cases = [('AutoContrast', ImageOps.autocontrast, ()), ('Equalize', ImageOps.equalize, ()),
           ('Invert', ImageOps.invert, ())]
  cases += [('Posterize', ImageOps.posterize, (b,)) for b in range(1, 5)]
  cases += [('Solarize', ImageOps.solarize, (t,)) for t in (0, 77, 128, 256)]
  cases += [('SolarizeAdd', _solarize_add_pil, (a,)) for a in (0, 49, 110)]
  for name, theirs, args in cases:
    np.testing.assert_array_equal(_tf(_op(name, *args), image), _pil(theirs, image, *args),
                                  err_msg=f'{name}{args}')
  # PosterizeIncreasing at level 10 keeps 0 bits: older Pillow gave black (i & ~255), Pillow 13 raises.
  assert not _tf(_op('Posterize', 0), image).any()


def test_auto_contrast_and_equalize_edge_cases_equal_pil():
  flat = np.full((5, 6, 3), 77, np.uint8)
  two = flat.copy()
  two[0, 0] = 200
  few = np.zeros((5, 6, 3), np.uint8)  # step == 0 in equalize (fewer than 256 pixels off the top bin)
  few[:2] = 9
  for image in (flat, two, few, _photo(40, 40, seed=3)):
    np.testing.assert_array_equal(_tf(_op('AutoContrast'), image), _pil(ImageOps.autocontrast, image))
    np.testing.assert_array_equal(_tf(_op('Equalize'), image), _pil(ImageOps.equalize, image))


@pytest.mark.parametrize('name, pil_cls', [('Color', ImageEnhance.Color),
                                           ('Contrast', ImageEnhance.Contrast),
                                           ('Brightness', ImageEnhance.Brightness),
                                           ('Sharpness', ImageEnhance.Sharpness)])
def test_enhance_ops_equal_pil(name, pil_cls):
  image = _photo(14, 11, seed=2)
  for factor in (0.1, 0.55, 1.0, 1.37, 1.9):
    ours = _tf(_op(name, factor), image).astype(int)
    theirs = _pil(lambda im, f: pil_cls(im).enhance(f), image, factor).astype(int)
    # Float32 rounding inside PIL's C code can differ by one at exact ties; nowhere by more.
    assert np.abs(ours - theirs).max() <= 1, (name, factor)
    assert np.mean(ours == theirs) >= 0.99, (name, factor)


def _timm_affine(name: str, arg: float, resample):
  """timm's rotate/shear/translate as PIL calls, with timm's fillcolor."""
  def fn(img):
    w, h = img.size
    if name == 'Rotate':
      return img.rotate(arg, resample=resample, fillcolor=FILL)
    matrix = {'ShearX': (1, arg, 0, 0, 1, 0), 'ShearY': (1, 0, 0, arg, 1, 0),
              'TranslateXRel': (1, 0, arg * w, 0, 1, 0),
              'TranslateYRel': (1, 0, 0, 0, 1, arg * h)}[name]
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)
  return fn


@pytest.mark.parametrize('interpolation, resample', [('bicubic', Image.BICUBIC),
                                                     ('bilinear', Image.BILINEAR)])
def test_geometric_ops_equal_pil(interpolation, resample):
  image = _photo(13, 16, seed=4)
  cases = [('Rotate', a) for a in (0.0, 17.3, -30.0, 8.1)]
  cases += [(k, v) for k in ('ShearX', 'ShearY') for v in (0.3, -0.21)]
  cases += [(k, v) for k in ('TranslateXRel', 'TranslateYRel') for v in (0.45, -0.137)]
  for name, arg in cases:
    ours = _tf(_op(name, arg, interpolation=interpolation), image)
    theirs = np.asarray(_timm_affine(name, arg, resample)(Image.fromarray(image)))
    np.testing.assert_array_equal(ours, theirs, err_msg=f'{name}({arg})')


def _timm_level_to_arg(name: str, level: float, negate: bool):
  """timm auto_augment level functions, as written there."""
  neg = (lambda v: -v) if negate else (lambda v: v)
  d = 10.0
  return {
      'Rotate': neg((level / d) * 30.),
      'ShearX': neg((level / d) * 0.3),
      'TranslateXRel': neg((level / d) * 0.45),
      'Color': (level / d) * 1.8 + 0.1,
      'ColorIncreasing': max(0.1, 1.0 + neg((level / d) * .9)),
      'Posterize': int((level / d) * 4),
      'PosterizeIncreasing': 4 - int((level / d) * 4),
      'Solarize': min(256, int((level / d) * 256)),
      'SolarizeIncreasing': 256 - min(256, int((level / d) * 256)),
      'SolarizeAdd': min(128, int((level / d) * 110)),
  }[name]


def test_level_to_argument_follows_timm():
  names = ['Rotate', 'ShearX', 'TranslateXRel', 'Color', 'ColorIncreasing', 'Posterize',
           'PosterizeIncreasing', 'Solarize', 'SolarizeIncreasing', 'SolarizeAdd']
  for name in names:
    for level in (0.0, 0.37, 2.5, 4.5, 7.5, 9.0, 9.99, 10.0):
      for negate in (False, True):
        ours = float(augment.op_argument(name, tf.constant(level, tf.float64), tf.constant(negate)))
        assert ours == pytest.approx(_timm_level_to_arg(name, level, negate), abs=1e-12), (name, level)


def test_parse_rand_augment():
  p = augment.parse_rand_augment('rand-m9-mstd0.5-inc1')
  assert (p.num_layers, p.magnitude, p.magnitude_std, p.magnitude_max, p.prob, p.increasing) == (
      2, 9.0, 0.5, 10.0, 0.5, True)
  assert p.ops == augment.RAND_INCREASING_TRANSFORMS and len(p.ops) == 15
  p = augment.parse_rand_augment('rand-n3-m7-p0.8-mmax12')
  assert (p.num_layers, p.magnitude, p.prob, p.magnitude_max, p.increasing) == (3, 7.0, 0.8, 12.0, False)
  assert augment.parse_rand_augment('rand-mstd101').magnitude_std == math.inf
  assert augment.parse_rand_augment('rand-m9-inc0').increasing is False
  for bad in ('rnd-m9', 'rand-m9-w0', 'rand-mx'):
    with pytest.raises(ValueError, match='RandAugment config'):
      augment.parse_rand_augment(bad)


def test_rand_augment_is_deterministic_in_eager_and_in_tf_data():
  params = augment.parse_rand_augment('rand-m9-mstd0.5-inc1')
  images = tf.constant(np.stack([_photo(16, 16, seed=s) for s in range(24)]), tf.float32)
  keys = tf.stack([tf.constant([7, i], tf.int64) for i in range(24)])
  eager = [augment.rand_augment(k, x, params, FILL).numpy() for k, x in zip(keys, images)]
  again = [augment.rand_augment(k, x, params, FILL).numpy() for k, x in zip(keys, images)]
  ds = tf.data.Dataset.from_tensor_slices((keys, images)).map(
      lambda k, x: augment.rand_augment(k, x, params, FILL), num_parallel_calls=4, deterministic=True)
  in_data = list(ds.as_numpy_iterator())
  for a, b, c in zip(eager, again, in_data):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  changed = [not np.array_equal(out, x) for out, x in zip(eager, images.numpy())]
  # Each of 2 layers applies an op with prob 0.5 (a few ops can be no-ops): most images change.
  assert 0.5 <= np.mean(changed) < 1.0 or np.mean(changed) == 1.0
  assert all(np.all(out == np.round(out)) and out.min() >= 0 and out.max() <= 255 for out in eager)


def test_rand_augment_skip_rate_and_every_op_changes_the_image():
  """One layer, prob 0.5, m9: no op is a no-op on this image, so exactly the skipped half is unchanged."""
  params = augment.RandAugmentParams(num_layers=1, magnitude=9, increasing=True, prob=0.5)
  image = tf.constant(_photo(20, 20), tf.float32)
  for name in params.ops:
    arg = augment.op_argument(name, 9.0, False)
    assert not np.array_equal(augment.apply_op(name, image, arg, FILL).numpy(), image.numpy()), name
  fn = tf.function(lambda k: augment.rand_augment(k, image, params, FILL))
  n = 600
  same = [np.array_equal(fn(tf.constant([1, i], tf.int64)).numpy(), image.numpy()) for i in range(n)]
  assert abs(np.mean(same) - 0.5) < 0.07  # 3.5 standard deviations


def _erase_boxes(probability: float, n: int, size=(20, 24)):
  """Erased masks of n zero images (erasing writes N(0,1) values, never exactly 0)."""
  fn = tf.function(lambda k: augment.random_erasing(k, tf.zeros(size + (3,)), probability))
  return np.stack([fn(tf.constant([3, i], tf.int64)).numpy() != 0 for i in range(n)])


def test_random_erasing_rate_box_bounds_and_values():
  masks = _erase_boxes(0.25, 800)
  erased = masks.any(axis=(1, 2, 3))
  assert abs(erased.mean() - 0.25) < 0.05
  area = 20 * 24
  for m in masks[erased]:
    rows, cols = np.nonzero(m[..., 0])
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert m[..., 0].sum() == h * w and np.all(m.all(-1) == m[..., 0])  # one full box, all channels
    assert h < 20 and w < 24
    # round() on both sides widens timm's [0.02, 1/3] area bounds slightly on a small image.
    assert 0.02 * area * 0.5 <= h * w <= area / 3 * 1.5
    assert 0.3 / 1.6 <= h / w <= 1.6 / 0.3
  noise = augment.random_erasing(tf.constant([0, 1], tf.int64), tf.zeros((64, 64, 3)), 1.0).numpy()
  values = noise[noise != 0]
  assert values.size > 0.02 * noise.size and abs(values.mean()) < 0.2 and abs(values.std() - 1) < 0.1
  assert not _erase_boxes(0.0, 50).any()


def test_resize_center_crop_shape_centre_and_values():
  size = 28
  image = np.zeros((60, 90, 3), np.uint8)
  image[25:35, 40:50] = 255  # a square at the centre
  out = augment.resize_center_crop(tf.constant(image), size).numpy()
  assert out.shape == (size, size, 3)
  ys, xs = np.nonzero(out[..., 0] > 128)
  assert abs(ys.mean() - (size - 1) / 2) < 0.6 and abs(xs.mean() - (size - 1) / 2) < 0.6
  # shorter side 60 -> int(256/224 * 28) = 32; longer 90 -> int(32 * 90 / 60) = 48; centre crop of
  # (32, 48) at (round(2.0), round(10.0)). Values against PIL's resize on a smooth image (TF's
  # antialiased bicubic is not PIL's fixed-point one: they differ by a few levels at hard edges).
  smooth = _photo(60, 90, seed=5)
  ours = augment.resize_center_crop(tf.constant(smooth), size).numpy().astype(int)
  theirs = np.asarray(Image.fromarray(smooth).resize((48, 32), Image.BICUBIC))[2:30, 10:38]
  assert np.abs(ours - theirs.astype(int)).mean() < 1.5
  tall = augment.resize_center_crop(tf.zeros((50, 20, 1)), 16)  # 20 -> 18, 50 -> 45; crop 16
  assert tall.shape == (16, 16, 1)


# ---------------------------------------------------------------------------------------------------
# classification.py on the embedded digits.

@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory) -> str:
  """One offline-prepared copy of the digits for the module."""
  path = str(tmp_path_factory.mktemp('tfds'))
  digits.ensure_prepared(path)
  return path


def _data(data_dir: str, **overrides):
  """Digits data config with the fine-tune augmentation fields (as finetune_config sets them)."""
  data = defaults.pretrain_config().data
  data.name, data.data_dir, data.shuffle_buffer, data.prefetch = 'sklearn_digits', data_dir, 256, 1
  data.crop_scale, data.interpolation = (0.08, 1.0), 'bicubic'
  data.rand_augment, data.random_erasing = 'rand-m9-mstd0.5-inc1', 0.25
  data.update(overrides)
  return data


def test_num_classes_and_bad_settings_fail_early(digits_dir):
  assert classification.num_classes(_data(digits_dir)) == 10
  for bad, match in ((dict(interpolation='lanczos'), 'interpolation'),
                     (dict(random_erasing=1.5), 'random_erasing'),
                     (dict(rand_augment='rand-q3'), 'RandAugment config')):
    with pytest.raises(ValueError, match=match):
      classification.train_batches(_data(digits_dir, **bad), image_size=16, batch_size=8, seed=0)


def _image_counter(batches) -> collections.Counter:
  """Multiset of (label, image bytes) over the valid rows."""
  return collections.Counter((int(l), x.tobytes()) for b in batches
                             for x, l, v in zip(b['image'], b['label'], b['valid']) if v)


def test_eval_batches_count_every_example_once_on_8_processes(digits_dir):
  data = _data(digits_dir)
  split, batch = 'train', 32  # 1437 = 5 x 180 + 3 x 179 per process: ragged, and not a batch multiple
  per_process = [list(classification.eval_batches(data, image_size=12, batch_size=batch, split=split,
                                                  process_index=i, process_count=8)) for i in range(8)]
  assert {len(b) for b in per_process} == {math.ceil(180 / batch)}  # same global step count everywhere
  for batches in per_process:
    for b in batches:
      assert b['image'].shape == (batch, 12, 12, 3) and b['valid'].dtype == np.int32
      assert not b['image'][b['valid'] == 0].any()
  assert sum(int(b['valid'].sum()) for bs in per_process for b in bs) == 1437
  single = list(classification.eval_batches(data, image_size=12, batch_size=batch, split=split,
                                            process_index=0, process_count=1))
  union = _image_counter(itertools.chain(*per_process))
  assert union == _image_counter(single) and sum(union.values()) == 1437
  labels = sorted(int(ex['label']) for ex in digits.ensure_prepared(digits_dir).as_dataset(
      split=split).as_numpy_iterator())
  assert sorted(l for l, _ in union.elements()) == labels
  # More processes than a batch can fill: some slices give only padding, still the same batch count.
  tiny = [list(classification.eval_batches(data, image_size=8, batch_size=4, split='test[:5]',
                                           process_index=i, process_count=8)) for i in range(8)]
  assert [len(b) for b in tiny] == [1] * 8
  assert [int(b[0]['valid'].sum()) for b in tiny] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_eval_images_are_the_deterministic_centre_crop(digits_dir):
  data = _data(digits_dir)
  (first, *_), again = [list(classification.eval_batches(data, image_size=16, batch_size=360,
                                                         split='test')) for _ in range(2)]
  np.testing.assert_array_equal(first['image'], again[0]['image'])
  raw = next(digits.ensure_prepared(digits_dir).as_dataset(split='test').as_numpy_iterator())
  expected = augment.resize_center_crop(tf.constant(raw['image']), 16).numpy()  # 8 -> 18 -> crop 16
  assert first['image'].dtype == np.uint8  # normalised on device (finetune_step.make_eval_step)
  np.testing.assert_array_equal(first['image'][0], np.repeat(expected, 3, -1))
  assert int(first['label'][0]) == int(raw['label'])


def _train(data, n: int, **kwargs):
  """The first n train batches."""
  kwargs = {'image_size': 16, 'batch_size': 16, 'seed': 0, **kwargs}
  return list(itertools.islice(classification.train_batches(data, **kwargs), n))


def test_train_batches_deterministic_resumable_and_augmented(digits_dir):
  data = _data(digits_dir, split='test')
  first = _train(data, 3)
  again = _train(data, 3)
  resumed = _train(data, 2, start_batch=23)  # 360 // 16 = 22 per epoch: resumes inside epoch 2
  later = _train(data, 25)[23:]
  for a, b in zip(first + resumed, again + later):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['image'], _train(data, 1, seed=1)[0]['image'])
  batch = first[0]
  assert batch['image'].shape == (16, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['erase'].shape == (16, 4) and batch['erase'].dtype == np.int32
  assert batch['label'].dtype == np.int32 and set(batch['label']) <= set(range(10))
  # Colour ops break the grey digits' R = G = B on some images but not all.
  images = np.concatenate([b['image'] for b in first]).astype(int)
  coloured = np.abs(images[..., 0] - images[..., 2]).max(axis=(1, 2)) > 5
  assert 0.1 < coloured.mean() < 0.9
  boxes = np.concatenate([b['erase'] for b in first])
  assert 0.1 < np.mean(boxes[:, 2] > 0) < 0.45  # random erasing 0.25: a box on about a quarter of the images
  plain = _train(_data(digits_dir, split='test', rand_augment=None, random_erasing=0.0), 1)[0]
  np.testing.assert_array_equal(plain['image'][..., 0], plain['image'][..., 2])
  assert not plain['erase'].any()


def _previous_train_transform(key, encoded, data, image_size: int) -> tf.Tensor:
  """The host transform before uint8 batches: full decode, crop, ..., normalise and erase on the host."""
  crop_key, flip_key, ra_key, erase_key = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  shape = tf.shape(image)
  y, x, h, w = images_lib.random_resized_crop_window(crop_key, shape[0], shape[1], data.crop_scale, data.crop_ratio)
  image = augment.resize(image[y:y + h, x:x + w], image_size, image_size, data.interpolation)
  image = tf.where(tf.random.stateless_uniform([], flip_key) < 0.5, image[:, ::-1], image)
  image = augment.rand_augment(ra_key, image, augment.parse_rand_augment(data.rand_augment),
                               classification.fill_colour(data), data.interpolation)
  image = (image / 255.0 - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)
  return augment.random_erasing(erase_key, image, data.random_erasing)


def test_finetune_batch_normalised_on_device_equals_the_host_transform():
  data = _data('', random_erasing=0.5)
  encoded = []
  for i in range(16):
    out = io.BytesIO()
    Image.fromarray(_photo(40 + i, 48, seed=i)).save(out, 'PNG')  # PNG: the crop decode is exact
    encoded.append(tf.constant(out.getvalue()))
  keys = [tf.constant([9, i], tf.int64) for i in range(16)]
  new = [classification.train_transform(k, e, data, 24) for k, e in zip(keys, encoded)]
  batch = {'image': np.stack([n['image'].numpy() for n in new]), 'erase': np.stack([n['erase'].numpy() for n in new])}
  host = np.stack([_previous_train_transform(k, e, data, 24).numpy() for k, e in zip(keys, encoded)])
  device = np.asarray(jax.jit(lambda b: pixels.erase(jax.random.key(0), pixels.normalise(
      b['image'], data.mean, data.std), b['erase']))(batch))
  top, left, h, w = batch['erase'].T
  rows, cols = np.arange(24)[None, :, None], np.arange(24)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) & (cols >= left[:, None, None])
            & (cols < (left + w)[:, None, None]))
  assert 0.2 < np.mean(h > 0) < 0.8 and inside.any()
  # The same box on the host (its noise is not 0 anywhere) and the same pixels outside it, to 1e-6.
  plain = np.asarray(jax.jit(lambda x: pixels.normalise(x, data.mean, data.std))(batch['image']))
  np.testing.assert_array_equal(np.any(np.abs(host - plain) > 1e-4, axis=-1), inside)
  np.testing.assert_allclose(device[~inside], host[~inside], rtol=0, atol=1e-6)
  noise = device[inside]
  assert abs(noise.mean()) < 0.2 and abs(noise.std() - 1) < 0.2
