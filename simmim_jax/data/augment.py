"""timm's fine-tune augmentations as stateless TF ops: RandAugment, random erasing, the eval crop.

timm runs PIL ops on uint8 images; here images are float32 tensors holding the same integer values
0..255, and every op reproduces the PIL arithmetic (lookup tables, float32 blends that truncate,
affine sampling with PIL's kernels), so the pipeline runs inside tf.data from a per-example key.
References: timm/data/auto_augment.py, timm/data/random_erasing.py, PIL ImageOps/ImageEnhance/Geometry.c.
"""
from __future__ import annotations

import dataclasses
import math
import re

import tensorflow as tf

_LEVEL_DENOM = 10.0  # timm: magnitudes are on a 0..10 scale
_TRANSLATE_PCT = 0.45  # timm hparams.get('translate_pct', 0.45)
_ERASE_ATTEMPTS = 10  # timm RandomErasing tries 10 boxes, then leaves the image as it is
EVAL_RESIZE_RATIO = 256 / 224  # SimMIM TEST.CROP: resize to int(256 / 224 * size), centre-crop size

# timm _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order (the op index is drawn over it).
RAND_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
                   'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
                   'TranslateXRel', 'TranslateYRel')
RAND_INCREASING_TRANSFORMS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                              'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                              'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
                              'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


@dataclasses.dataclass(frozen=True)
class RandAugmentParams:
  """timm rand_augment_transform's parameters, with timm's defaults."""
  num_layers: int = 2
  magnitude: float = _LEVEL_DENOM
  magnitude_std: float = 0.0  # inf: magnitude drawn uniformly from [0, magnitude]
  magnitude_max: float = _LEVEL_DENOM
  prob: float = 0.5
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    """The op names the layers choose from."""
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_augment(config_str: str) -> RandAugmentParams:
  """timm's 'rand-m9-mstd0.5-inc1' strings (sections m, n, mstd, mmax, inc, p) -> parameters."""
  parts = config_str.split('-')
  if parts[0] != 'rand':
    raise ValueError(f'RandAugment config {config_str!r} must start with "rand-" (timm syntax, e.g. '
                     f'"rand-m9-mstd0.5-inc1").')
  fields = {}
  for part in parts[1:]:
    key, value = (re.split(r'(\d.*)', part) + [''])[:2]
    try:
      if key == 'mstd':  # timm: above 100 means uniform in [0, magnitude]
        fields['magnitude_std'] = math.inf if float(value) > 100 else float(value)
      elif key == 'mmax':
        fields['magnitude_max'] = float(int(value))
      elif key == 'inc':  # timm tests bool(val), true even for 'inc0'; the intent is int(val) != 0
        fields['increasing'] = int(value) != 0
      elif key == 'm':
        fields['magnitude'] = float(int(value))
      elif key == 'n':
        fields['num_layers'] = int(value)
      elif key == 'p':
        fields['prob'] = float(value)
      else:  # 'w' (op weights) and 't' (op subsets) are not used by any SimMIM recipe
        raise ValueError(f'unknown section {part!r}')
    except ValueError as e:
      raise ValueError(f'RandAugment config {config_str!r}: {e}. Supported sections: m<int>, '
                       f'n<int>, mstd<float>, mmax<int>, inc<0|1>, p<float>.') from None
  return RandAugmentParams(**fields)


# ---------------------------------------------------------------------------------------------------
# Ops on float32 (H, W, 3) images holding integers 0..255, as the PIL functions timm calls. They come
# in three families (lookup table, blend with a degenerate image, affine resampling), so RandAugment
# switches between 3 branches rather than 15: a much smaller tf.data graph, traced in a fraction of the time.

def _f64(value) -> tf.Tensor:
  """float64 tensor; Python floats go in directly (tf.cast would round them through float32)."""
  return tf.cast(value, tf.float64) if tf.is_tensor(value) else tf.constant(value, tf.float64)


def _histogram(image: tf.Tensor) -> tf.Tensor:
  """Per-channel 256-bin histograms, int32 (3, 256)."""
  index = tf.cast(image, tf.int32) + 256 * tf.range(3)
  return tf.reshape(tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768), [3, 256])


def _auto_contrast_lut(hist: tf.Tensor) -> tf.Tensor:
  """ImageOps.autocontrast(cutoff=0): each channel's [min, max] stretched to [0, 255], int() truncation."""
  levels = tf.range(256)
  lo = tf.reduce_min(tf.where(hist > 0, levels, 256), axis=1, keepdims=True)
  hi = tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1, keepdims=True)
  flat = hi <= lo
  # float64 in PIL's operation order (ix * scale + offset), so the truncation lands where Python's does.
  scale = 255.0 / tf.cast(tf.where(flat, 1, hi - lo), tf.float64)
  lut = tf.floor(tf.cast(levels, tf.float64) * scale - tf.cast(lo, tf.float64) * scale)
  return tf.where(flat, levels, tf.cast(tf.clip_by_value(lut, 0, 255), tf.int32))


def _equalize_lut(hist: tf.Tensor) -> tf.Tensor:
  """ImageOps.equalize: lut[i] = (step // 2 + pixels below i) // step, step from all but the top bin."""
  levels = tf.range(256)
  last_count = tf.gather(hist, tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1), batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_count) // 256
  identity = (tf.reduce_sum(tf.cast(hist > 0, tf.int32), axis=1) <= 1) | (step == 0)
  step = tf.maximum(step, 1)[:, None]
  lut = tf.clip_by_value((step // 2 + tf.cumsum(hist, axis=1, exclusive=True)) // step, 0, 255)
  return tf.where(identity[:, None], levels, lut)  # PIL clips table entries to 8 bits


def _lut_family(image: tf.Tensor, member, arg) -> tf.Tensor:
  """AutoContrast, Equalize, Invert, Posterize(bits), Solarize(threshold), SolarizeAdd(add): all
  tables are built (cheap), the chosen one is applied as PIL Image.point does."""
  levels = tf.broadcast_to(tf.range(256), [3, 256])
  hist = _histogram(image)
  arg = tf.cast(_f64(arg), tf.int32)
  shift = 8 - tf.clip_by_value(arg, 0, 8)  # keep the top `arg` bits; 0 bits -> black (see tests)
  tables = tf.stack([
      _auto_contrast_lut(hist), _equalize_lut(hist), 255 - levels,
      tf.bitwise.left_shift(tf.bitwise.right_shift(levels, shift), shift),
      tf.where(levels < arg, levels, 255 - levels),  # ImageOps.solarize
      tf.where(levels < 128, tf.minimum(levels + arg, 255), levels)])  # timm solarize_add
  index = tf.cast(image, tf.int32) + 256 * tf.range(3)
  return tf.cast(tf.gather(tf.reshape(tf.gather(tables, member), [-1]), index), tf.float32)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """Image.blend(degenerate, image, factor): float32 arithmetic, truncated and clipped to 0..255."""
  factor = tf.cast(factor, tf.float32)  # PIL passes alpha to C as a float
  return tf.clip_by_value(tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _blend_family(image: tf.Tensor, member, factor) -> tf.Tensor:
  """ImageEnhance Color, Contrast, Brightness, Sharpness: blend with grey / mean grey / black / SMOOTH."""
  rgb = tf.cast(image, tf.int32)  # PIL convert('L'): ITU-R 601 luma in 16-bit fixed point, rounded
  grey = tf.cast((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) // 65536,
                 tf.float32)[..., None]
  mean = tf.floor(tf.reduce_mean(tf.cast(grey, tf.float64)) + 0.5)  # int(ImageStat mean + 0.5)
  weights = tf.constant([1, 1, 1, 1, 5, 1, 1, 1, 1], tf.float32) / 13.0  # ImageFilter.SMOOTH
  kernel = tf.reshape(weights, [3, 3, 1, 1]) * tf.eye(3)[None, None]  # per channel, no mixing
  smooth = tf.nn.conv2d(image[None], kernel, strides=1, padding='VALID')[0]
  smooth = tf.pad(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), [[1, 1], [1, 1], [0, 0]])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  rows, cols = tf.range(height)[:, None, None], tf.range(width)[None, :, None]
  inner = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)  # PIL keeps the border
  degenerates = tf.stack([tf.broadcast_to(grey, tf.shape(image)),
                          tf.cast(mean, tf.float32) + tf.zeros_like(image), tf.zeros_like(image),
                          tf.where(inner, smooth, image)])
  return blend(tf.gather(degenerates, member), image, factor)


def _cubic(v1, v2, v3, v4, d):
  """PIL Geometry.c BICUBIC (a = -1, not the a = -0.5 of PIL's resize)."""
  return v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (-v1 + v2 - v3 + v4)))


def affine(image: tf.Tensor, matrix, fill, interpolation: str = 'bicubic') -> tf.Tensor:
  """Image.transform(size, AFFINE, matrix, resample, fillcolor): output (x, y) reads input at
  (a x + b y + c, d x + e y + f) with pixel centres at +0.5; samples outside the image get `fill`."""
  a, b, c, d, e, f = tf.unstack(_f64(matrix))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  ys = tf.cast(tf.range(height), tf.float64)[:, None] + 0.5
  xs = tf.cast(tf.range(width), tf.float64)[None, :] + 0.5
  x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  inside = (x_in >= 0) & (x_in < w_f) & (y_in >= 0) & (y_in < h_f)
  x_in, y_in = x_in - 0.5, y_in - 0.5
  x0, y0 = tf.floor(x_in), tf.floor(y_in)
  dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  pixels = tf.reshape(image, [height * width, -1])  # flat rows: tf.gather beats tf.gather_nd here

  def tap(oy, ox):  # neighbours past the border repeat the edge pixel (PIL XCLIP/YCLIP)
    yy = tf.clip_by_value(y0 + oy, 0, height - 1)
    xx = tf.clip_by_value(x0 + ox, 0, width - 1)
    return tf.cast(tf.gather(pixels, yy * width + xx), tf.float64)

  if interpolation == 'bicubic':
    value = _cubic(*[_cubic(*[tap(oy, ox) for ox in (-1, 0, 1, 2)], dx) for oy in (-1, 0, 1, 2)], dy)
  elif interpolation == 'bilinear':
    rows = [tap(oy, 0) + (tap(oy, 1) - tap(oy, 0)) * dx for oy in (0, 1)]
    value = rows[0] + (rows[1] - rows[0]) * dy
  else:
    raise ValueError(f'interpolation must be "bicubic" or "bilinear", got {interpolation!r}.')
  value = tf.cast(tf.clip_by_value(tf.floor(value), 0, 255), tf.float32)  # (UINT8) v truncates
  return tf.where(inside[..., None], value, tf.constant(fill, tf.float32))


def _affine_family(image: tf.Tensor, member, arg, fill, interpolation: str) -> tf.Tensor:
  """Rotate(degrees), ShearX/Y(factor), TranslateX/YRel(fraction of the size), as timm's PIL calls."""
  arg = _f64(arg)
  height = tf.cast(tf.shape(image)[0], tf.float64)
  width = tf.cast(tf.shape(image)[1], tf.float64)
  # Image.rotate: counter-clockwise about (w/2, h/2); PIL rounds the matrix to 15 decimals.
  angle = -arg * (math.pi / 180.0)
  cos, sin = [tf.round(v * 1e15) / 1e15 for v in (tf.cos(angle), tf.sin(angle))]
  cx, cy = width / 2, height / 2
  zero, one = tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64)
  matrices = tf.stack([
      tf.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]),
      tf.stack([one, arg, zero, zero, one, zero]),  # timm shear_x
      tf.stack([one, zero, zero, arg, one, zero]),  # timm shear_y
      tf.stack([one, zero, arg * width, zero, one, zero]),  # timm translate_x_rel
      tf.stack([one, zero, zero, zero, one, arg * height])])  # timm translate_y_rel
  return affine(image, tf.gather(matrices, member), fill, interpolation)


_FAMILIES = (('AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize', 'SolarizeAdd'),
             ('Color', 'Contrast', 'Brightness', 'Sharpness'),
             ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'))


def _family_of(name: str) -> tuple[int, int]:
  """(family, member) of an op; the 'Increasing' variants differ only in their level function."""
  base = name[:-len('Increasing')] if name.endswith('Increasing') else name
  for family, members in enumerate(_FAMILIES):
    if base in members:
      return family, members.index(base)
  raise ValueError(f'Unknown RandAugment op {name!r}.')


def _family_fns(member, image, arg, fill, interpolation: str):
  """The three families' op calls for one member index, as thunks."""
  return [lambda: _lut_family(image, member, arg), lambda: _blend_family(image, member, arg),
          lambda: _affine_family(image, member, arg, fill, interpolation)]


# ---------------------------------------------------------------------------------------------------
# timm's magnitude (level, float64 in 0..10) -> op argument, each with its timm function name.

def op_argument(name: str, level, negate) -> tf.Tensor:
  """The argument timm's level function gives op `name` (negate: _randomly_negate's coin came up);
  0 for the ops that take none."""
  level = _f64(level) / _LEVEL_DENOM
  sign = tf.where(negate, tf.constant(-1.0, tf.float64), 1.0)
  trunc = tf.floor  # Python int() of a non-negative float
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return tf.zeros([], tf.float64)
  if name == 'Rotate':  # _rotate_level_to_arg: +-30 degrees
    return sign * level * 30.0
  if name in ('ShearX', 'ShearY'):  # _shear_level_to_arg: +-0.3
    return sign * level * 0.3
  if name in ('TranslateXRel', 'TranslateYRel'):  # _translate_rel_level_to_arg: +-0.45
    return sign * level * _TRANSLATE_PCT
  if name in _FAMILIES[1]:  # _enhance_level_to_arg: 0.1..1.9
    return level * 1.8 + 0.1
  if name.endswith('Increasing') and name[:-len('Increasing')] in _FAMILIES[1]:
    return tf.maximum(1.0 + sign * level * 0.9, 0.1)  # _enhance_increasing_level_to_arg
  if name == 'Posterize':  # _posterize_level_to_arg: keep 0..4 bits
    return trunc(level * 4)
  if name == 'PosterizeIncreasing':  # _posterize_increasing_level_to_arg: 4 - the above
    return 4 - trunc(level * 4)
  if name == 'Solarize':  # _solarize_level_to_arg: threshold min(256, int(level * 256))
    return tf.minimum(trunc(level * 256), 256.0)
  if name == 'SolarizeIncreasing':  # _solarize_increasing_level_to_arg: 256 - the above
    return 256 - tf.minimum(trunc(level * 256), 256.0)
  if name == 'SolarizeAdd':  # _solarize_add_level_to_arg: add min(128, int(level * 110))
    return tf.minimum(trunc(level * 110), 128.0)
  raise ValueError(f'Unknown RandAugment op {name!r}.')


def apply_op(name: str, image: tf.Tensor, arg, fill=(128, 128, 128),
             interpolation: str = 'bicubic') -> tf.Tensor:
  """The PIL op behind timm op `name` with its argument (degrees, factor, bits, threshold, ...)."""
  family, member = _family_of(name)
  return _family_fns(member, tf.cast(image, tf.float32), arg, fill, interpolation)[family]()


# No Python control flow on tensors inside: skipping autograph's conversion saves seconds per trace.
@tf.autograph.experimental.do_not_convert
def rand_augment(key: tf.Tensor, image: tf.Tensor, params: RandAugmentParams, fill,
                 interpolation: str = 'bicubic') -> tf.Tensor:
  """timm RandAugment: num_layers ops drawn uniformly with replacement, each applied with prob,
  its magnitude ~ N(magnitude, magnitude_std) clipped to [0, magnitude_max] (timm AugmentOp)."""
  families, members = zip(*[_family_of(name) for name in params.ops])
  for layer_key in tf.unstack(tf.random.experimental.stateless_split(key, params.num_layers)):
    keys = tf.unstack(tf.random.experimental.stateless_split(layer_key, 3))
    op = tf.random.stateless_uniform([], keys[0], 0, len(params.ops), dtype=tf.int32)
    u = tf.random.stateless_uniform([2], keys[1], dtype=tf.float64)
    if params.magnitude_std == math.inf:
      level = tf.random.stateless_uniform([], keys[2], 0, params.magnitude, dtype=tf.float64)
    elif params.magnitude_std > 0:
      level = params.magnitude + params.magnitude_std * tf.random.stateless_normal(
          [], keys[2], dtype=tf.float64)
    else:
      level = tf.constant(params.magnitude, tf.float64)
    level = tf.clip_by_value(level, 0.0, params.magnitude_max)
    negate = u[1] > 0.5  # timm _randomly_negate: -v if random() > 0.5
    arg = tf.gather(tf.stack([op_argument(name, level, negate) for name in params.ops]), op)
    image = tf.cond(  # timm: skip the op when random() > prob
        u[0] > params.prob, lambda image=image: image,
        lambda image=image, arg=arg, op=op: tf.switch_case(tf.gather(families, op), _family_fns(
            tf.gather(members, op), image, arg, fill, interpolation)))
  return image


# ---------------------------------------------------------------------------------------------------
# Random erasing (after normalisation) and the evaluation crop.

def erase_box(key: tf.Tensor, height, width, probability: float, min_area: float = 0.02,
              max_area: float = 1 / 3, min_aspect: float = 0.3) -> tf.Tensor:
  """timm RandomErasing(mode='pixel', max_count=1)'s box: int32 (top, left, h, w), h = w = 0 for no erasing.
  With `probability`; area fraction U(min_area, max_area), log aspect U(log 0.3, log 1/0.3), 10 tries."""
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  u = tf.random.stateless_uniform([5, _ERASE_ATTEMPTS], key, dtype=tf.float64)
  target_area = (min_area + (max_area - min_area) * u[0]) * h_f * w_f
  log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  h = tf.round(tf.sqrt(target_area * aspect))  # timm: h from area * aspect, w from area / aspect
  w = tf.round(tf.sqrt(target_area / aspect))
  fits = (w < w_f) & (h < h_f)
  first = tf.argmax(tf.cast(fits, tf.int32))
  top = tf.floor(u[2, first] * (h_f - h[first] + 1))  # random.randint(0, img_h - h)
  left = tf.floor(u[3, first] * (w_f - w[first] + 1))
  erase = (u[4, 0] <= probability) & tf.reduce_any(fits)  # timm: skip when random() > probability
  box = tf.cast(tf.stack([top, left, h[first], w[first]]), tf.int32)
  return tf.where(erase, box, tf.zeros([4], tf.int32))


def random_erasing(key: tf.Tensor, image: tf.Tensor, probability: float, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> tf.Tensor:
  """erase_box's box filled with standard-normal pixels, on the host (the pipelines ship the box instead and
  fill it on the device: simmim_jax/pixels.erase)."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  box_key, noise_key, _ = tf.unstack(tf.random.experimental.stateless_split(key, 3))
  top, left, h, w = tf.unstack(erase_box(box_key, height, width, probability, min_area, max_area, min_aspect))
  rows, cols = tf.range(height)[:, None, None], tf.range(width)[None, :, None]
  box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  # The noise is drawn only for erased images (tf.cond), a full-image draw would cost every image.
  return tf.cond(h > 0, lambda: tf.where(box, tf.random.stateless_normal(
      tf.shape(image), noise_key, dtype=image.dtype), image), lambda: image)


def resize(image: tf.Tensor, height, width, interpolation: str) -> tf.Tensor:
  """PIL-like resize (antialiased, a = -0.5 cubic for bicubic), rounded to 0..255 as uint8 would be."""
  if interpolation not in ('bicubic', 'bilinear'):
    raise ValueError(f'interpolation must be "bicubic" or "bilinear", got {interpolation!r}.')
  image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]), interpolation,
                          antialias=True)
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def resize_center_crop(image: tf.Tensor, size: int, interpolation: str = 'bicubic') -> tf.Tensor:
  """torchvision Resize(int(256/224 * size)) on the shorter side, then CenterCrop(size): (size, size, C)."""
  short_target = int(EVAL_RESIZE_RATIO * size)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  # torchvision: new_long = int(new_short * long / short)
  new_long = tf.cast(tf.floor(tf.cast(short_target * long, tf.float64) / tf.cast(short, tf.float64)),
                     tf.int32)
  new_h = tf.where(height <= width, short_target, new_long)
  new_w = tf.where(height <= width, new_long, short_target)
  image = resize(image, new_h, new_w, interpolation)
  # torchvision CenterCrop: int(round((H - size) / 2.0)); Python's and tf.round both round half to even.
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float64) / 2.0), tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, None])
