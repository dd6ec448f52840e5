"""timm fine-tune augmentations in TF against PIL (what timm runs), determinism, parsing, erasing, eval crop."""
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from simmim_jax.data import augment

FILL = (124, 116, 104)  # timm img_mean for the ImageNet mean


def _photo(height: int = 12, width: int = 10, seed: int = 0) -> np.ndarray:
  """A small uint8 RGB image: smooth ramps plus noise, values inside [20, 230] so the ops have work."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  base = np.stack([10 * y + 5 * x, 200 - 8 * x, 60 + 6 * y], -1) + rng.integers(0, 40, (height, width, 3))
  return np.clip(base + 20, 20, 230).astype(np.uint8)


def _tf(op, image: np.ndarray, *args, **kwargs) -> np.ndarray:
  """Runs a TF op on a uint8 image, returns uint8."""
  out = op(tf.constant(image, tf.float32), *args, **kwargs).numpy()
  assert np.all(out == np.round(out)) and out.min() >= 0 and out.max() <= 255
  return out.astype(np.uint8)


def _pil(fn, image: np.ndarray, *args, **kwargs) -> np.ndarray:
  """Runs a PIL function (as timm calls it) on a uint8 image."""
  return np.asarray(fn(Image.fromarray(image), *args, **kwargs))


def _solarize_add_pil(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
  """timm auto_augment.solarize_add, verbatim logic."""
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * 3)


@pytest.mark.parametrize('seed', [0, 1])
def test_pointwise_ops_equal_pil_exactly(seed):
  image = _photo(seed=seed)
  cases = [(augment.auto_contrast, ImageOps.autocontrast, ()), (augment.equalize, ImageOps.equalize, ()),
           (augment.invert, ImageOps.invert, ())]
  cases += [(augment.posterize, ImageOps.posterize, (b,)) for b in range(1, 5)]
  cases += [(augment.solarize, ImageOps.solarize, (t,)) for t in (0, 77, 128, 256)]
  cases += [(augment.solarize_add, _solarize_add_pil, (a,)) for a in (0, 49, 110)]
  for ours, theirs, args in cases:
    np.testing.assert_array_equal(_tf(ours, image, *args), _pil(theirs, image, *args),
                                  err_msg=f'{ours.__name__}{args}')
  # PosterizeIncreasing at level 10 keeps 0 bits: older Pillow gave black (i & ~255), Pillow 13 raises.
  assert not _tf(augment.posterize, image, 0).any()


def test_auto_contrast_and_equalize_edge_cases_equal_pil():
  flat = np.full((5, 6, 3), 77, np.uint8)
  two = flat.copy()
  two[0, 0] = 200
  few = np.zeros((5, 6, 3), np.uint8)  # step == 0 in equalize (fewer than 256 pixels off the top bin)
  few[:2] = 9
  for image in (flat, two, few, _photo(40, 40, seed=3)):
    np.testing.assert_array_equal(_tf(augment.auto_contrast, image), _pil(ImageOps.autocontrast, image))
    np.testing.assert_array_equal(_tf(augment.equalize, image), _pil(ImageOps.equalize, image))


@pytest.mark.parametrize('name, pil_cls', [('color', ImageEnhance.Color),
                                           ('contrast', ImageEnhance.Contrast),
                                           ('brightness', ImageEnhance.Brightness),
                                           ('sharpness', ImageEnhance.Sharpness)])
def test_enhance_ops_equal_pil(name, pil_cls):
  image = _photo(14, 11, seed=2)
  for factor in (0.1, 0.55, 1.0, 1.37, 1.9):
    ours = _tf(getattr(augment, name), image, factor).astype(int)
    theirs = _pil(lambda im, f: pil_cls(im).enhance(f), image, factor).astype(int)
    # Float32 rounding inside PIL's C code can differ by one at exact ties; nowhere by more.
    assert np.abs(ours - theirs).max() <= 1, (name, factor)
    assert np.mean(ours == theirs) >= 0.99, (name, factor)


def _timm_affine(kind: str, arg: float, resample):
  """timm's shear/translate/rotate as PIL calls, with timm's fillcolor."""
  def fn(img):
    w, h = img.size
    if kind == 'rotate':
      return img.rotate(arg, resample=resample, fillcolor=FILL)
    matrix = {'shear_x': (1, arg, 0, 0, 1, 0), 'shear_y': (1, 0, 0, arg, 1, 0),
              'translate_x_rel': (1, 0, arg * w, 0, 1, 0),
              'translate_y_rel': (1, 0, 0, 0, 1, arg * h)}[kind]
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)
  return fn


@pytest.mark.parametrize('interpolation, resample', [('bicubic', Image.BICUBIC),
                                                     ('bilinear', Image.BILINEAR)])
def test_geometric_ops_equal_pil(interpolation, resample):
  image = _photo(13, 16, seed=4)
  cases = [('rotate', a) for a in (0.0, 17.3, -30.0, 8.1)]
  cases += [(k, v) for k in ('shear_x', 'shear_y') for v in (0.3, -0.21)]
  cases += [(k, v) for k in ('translate_x_rel', 'translate_y_rel') for v in (0.45, -0.137)]
  for kind, arg in cases:
    ours = _tf(getattr(augment, kind), image, arg, FILL, interpolation).astype(int)
    theirs = np.asarray(_timm_affine(kind, arg, resample)(Image.fromarray(image))).astype(int)
    np.testing.assert_array_equal(ours, theirs, err_msg=f'{kind}({arg})')


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
    out = augment.apply_op(name, image, tf.constant(9.0, tf.float64), tf.constant(False), FILL)
    assert not np.array_equal(out.numpy(), image.numpy()), name
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
