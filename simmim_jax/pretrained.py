"""Pretrained encoder params -> the fine-tuning encoder: what is kept, copied, resized and dropped.

The official recipe (docs/REFERENCE.md section 5): keep the encoder, drop the decoder; ViT copies the shared relative
position table into every block; Swin resizes each relative position table when the window changes
(6 -> 7, 12 -> 14). Two resizes, each one NumPy matrix per axis (no SciPy or torch needed):
- 'geometric' (default), SimMIM's loader (utils.py remap_pretrained_keys_*): the source offsets are placed on
  a geometric progression that spans the target's, and a cubic interpolating spline (scipy interp2d
  kind='cubic', i.e. FITPACK with s=0) is evaluated at the integer target offsets;
- 'bicubic', the Swin-Transformer repository's loader: F.interpolate bicubic (align_corners=False, A = -0.75).
"""
import math
from typing import Any

import numpy as np
from flax import traverse_util

from simmim_jax.errors import UserError

SHARED_TABLE = 'rel_pos_bias/relative_position_bias_table'
TABLE = 'relative_position_bias_table'


def cubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """(out, in) matrix of torch's bicubic upsampling along one axis (align_corners=False, edges clamped)."""

  def kernel(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  weights = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    x = (i + 0.5) * scale - 0.5
    base = math.floor(x)
    for tap in range(base - 1, base + 3):
      weights[i, min(max(tap, 0), in_size - 1)] += kernel(x - tap)
  return weights


def geometric_offsets(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
  """SimMIM's (source, target) offset coordinates along one axis for a src -> dst table side (both odd).

  The source offsets from the centre are 1, 1 + q, 1 + q + q^2, ...: their ratio q in [1.01, 1.5] is found by
  bisection (to 1e-6, the last midpoint kept) so that the outermost one reaches dst // 2; the targets are
  the integers -(dst // 2) .. dst // 2.
  """
  half = src // 2
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if (1.0 - q**half) / (1.0 - q) > dst // 2:  # the sum of the progression 1, q, .., q^(half-1)
      right = q
    else:
      left = q
  outward = np.cumsum(q**np.arange(half, dtype=np.float64))
  source = np.concatenate([-outward[::-1], [0.0], outward])
  target = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
  return source, target


def spline_weights(nodes: np.ndarray, at: np.ndarray) -> np.ndarray:
  """(len(at), len(nodes)) matrix: values at `nodes` -> the cubic interpolating spline's values at `at`.

  FITPACK's s=0 cubic spline (what interp2d kind='cubic' and RectBivariateSpline(kx=3, ky=3, s=0) fit on a
  grid) has its knots at the interior nodes except the second and second-last: the not-a-knot spline. On a
  grid the 2-d spline is this matrix applied along each axis. `at` is clamped to the nodes' range, as
  FITPACK's evaluation does. Fewer than 4 nodes (FITPACK refuses): the polynomial through them.
  """
  n = len(nodes)
  at = np.clip(at, nodes[0], nodes[-1])
  if n < 4:  # Lagrange basis
    basis = np.ones((len(at), n))
    for j in range(n):
      for k in range(n):
        if k != j:
          basis[:, j] *= (at - nodes[k]) / (nodes[j] - nodes[k])
    return basis
  h = np.diff(nodes)
  # Second derivatives M at the nodes: lhs @ M = rhs @ values (C2 continuity inside, not-a-knot at both ends).
  lhs, rhs = np.zeros((n, n)), np.zeros((n, n))
  for i in range(1, n - 1):
    lhs[i, i - 1:i + 2] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
    rhs[i, i - 1:i + 2] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
  lhs[0, :3] = -h[1], h[0] + h[1], -h[0]  # equal third derivatives on both sides of nodes[1]
  lhs[-1, -3:] = -h[-1], h[-2] + h[-1], -h[-2]  # and of nodes[-2]
  moments = np.linalg.solve(lhs, rhs)
  weights = np.zeros((len(at), n))
  for row, t in enumerate(at):
    i = min(max(int(np.searchsorted(nodes, t, side='right')) - 1, 0), n - 2)
    a, b, hi = nodes[i + 1] - t, t - nodes[i], h[i]
    weights[row] += moments[i] * (a**3 / hi - a * hi) / 6 + moments[i + 1] * (b**3 / hi - b * hi) / 6
    weights[row, i] += a / hi
    weights[row, i + 1] += b / hi
  return weights


RESIZE_METHODS = ('geometric', 'bicubic')


def resize_relative_table(table: np.ndarray, rows: int, extra: int, method: str = 'geometric') -> np.ndarray:
  """A ((2w-1)^2 + extra, heads) table -> (rows, heads): the offset grid resized by `method` (RESIZE_METHODS,
  see the module docstring), the `extra` rows (ViT's 3 cls rows) kept as they are. An unchanged size returns
  the table itself."""
  if table.shape[0] == rows:
    return table
  if method not in RESIZE_METHODS:
    raise ValueError(f'rel_pos_resize must be one of {RESIZE_METHODS}, got {method!r}.')
  src, dst = math.isqrt(table.shape[0] - extra), math.isqrt(rows - extra)
  if src * src + extra != table.shape[0] or dst * dst + extra != rows:
    raise ValueError(f'Relative position tables of {table.shape[0]} and {rows} rows are not square offset grids.')
  w = spline_weights(*geometric_offsets(src, dst)) if method == 'geometric' else cubic_weights(src, dst)
  grid = table[:src * src].astype(np.float64).reshape(src, src, -1)
  resized = np.einsum('ij,jkh,lk->ilh', w, grid, w).reshape(dst * dst, -1)
  return np.concatenate([resized, table[src * src:]]).astype(table.dtype)


def adapt_encoder(pretrained: dict[str, Any], target: dict[str, Any],
                  resize: str = 'geometric') -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Pretrained encoder params shaped to `target` (the fine-tuning encoder's params or their shapes);
  relative position tables of another window are resized by `resize` (config.rel_pos_resize).

  Returns the params and a report {'copied', 'resized', 'dropped'}. Every target param must come from the
  checkpoint: a missing one or a shape that cannot be adapted means a different model, one clear error.
  """
  src, dst = traverse_util.flatten_dict(pretrained, sep='/'), traverse_util.flatten_dict(target, sep='/')
  outside = []
  if 'encoder' in {k.split('/')[0] for k in src} and not any(k.startswith('encoder/') for k in dst):
    outside = sorted(k for k in src if not k.startswith('encoder/'))  # a whole SimMIM tree: the decoder goes
    src = {k.removeprefix('encoder/'): v for k, v in src.items() if k.startswith('encoder/')}
  report: dict[str, list[str]] = {'copied': [], 'resized': [], 'dropped': []}
  if SHARED_TABLE in src and SHARED_TABLE not in dst:
    for key in dst:
      if key.endswith(f'attn/{TABLE}') and key not in src:
        src[key] = src[SHARED_TABLE]
        report['copied'].append(key)
  out = {}
  for key, like in dst.items():
    if key not in src:
      raise ValueError(f'The pretrained params have no {key!r}: they come from a different model. Set model.* '
                       '(name, variant, style) to the pretraining config.')
    value = np.asarray(src[key])
    if value.shape != tuple(like.shape) and key.endswith(TABLE):
      extra = 3 if key.startswith('blocks_') or key.startswith('rel_pos_bias') else 0  # ViT tables have cls rows
      value = resize_relative_table(value, like.shape[0], extra, resize)
      report['resized'].append(key)
    if value.shape != tuple(like.shape):
      raise ValueError(f'Pretrained {key!r} has shape {value.shape}, the model needs {tuple(like.shape)}: check '
                       'model.variant, model.image_size and model.window_size against the pretraining config.')
    out[key] = value
  report['dropped'] = outside + sorted(set(src) - set(dst))
  return traverse_util.unflatten_dict(out, sep='/'), report



# Model fields that change no parameter shape: a continued run may set them differently from its source.
FREE_MODEL_FIELDS = ('dtype', 'attention', 'remat', 'drop_path_rate', 'exempt_keywords_in_pretraining')


def continued(source: dict[str, Any], target: Any, init_from: str,
              differences: str = '') -> tuple[dict[str, Any], list[str]]:
  """A source run's params for continued pretraining of the same model: every target array with its shape.

  Returns (params, parts left to initialise): an encoder-only export gives the encoder, and the other top-level
  parts (image decoder, text token head) are named for a fresh init. Anything else that differs is a different
  model: one error naming the first array, and `differences` (the model fields that differ from the source's)."""
  src, dst = traverse_util.flatten_dict(source, sep='/'), traverse_util.flatten_dict(target, sep='/')
  fresh: list[str] = []
  if not any(k.startswith('encoder/') for k in src):  # an --encoder_only export
    src = {f'encoder/{k}': v for k, v in src.items()}
    fresh = sorted({k.split('/')[0] for k in dst} - {'encoder'})
  wanted = {k: v for k, v in dst.items() if k.split('/')[0] not in fresh}
  problem = next((f'it has no {k!r}' if k not in src else f'{k!r} is {tuple(np.shape(src[k]))}, not {tuple(like.shape)}'
                  for k, like in wanted.items() if k not in src or tuple(np.shape(src[k])) != tuple(like.shape)), None)
  if problem is None and set(src) - set(wanted):
    problem = f'it has {sorted(set(src) - set(wanted))[0]!r}, which this model has not'
  if problem:
    raise UserError(f'init_from={init_from!r} holds a different model ({problem}'
                     f'{"; " + differences if differences else ""}): set model.* to the source run\'s (its '
                     'config.json), or leave init_from unset to start from random weights.')
  params = {k: np.asarray(src[k]).astype(like.dtype) for k, like in wanted.items()}
  return traverse_util.unflatten_dict(params, sep='/'), fresh
