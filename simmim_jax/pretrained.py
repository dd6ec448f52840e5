"""Pretrained encoder params -> the fine-tuning encoder: what is kept, copied, resized and dropped.

The official recipe (reference section 5): keep the encoder, drop the decoder; ViT copies the shared relative
position table into every block; Swin resizes each relative position table when the window changes
(6 -> 7, 12 -> 14). Resizing is PyTorch's bicubic interpolation (align_corners=False, A = -0.75), as the
official Swin loader calls F.interpolate, written as one NumPy matrix per axis so no torch is needed.
"""
import math
from typing import Any

import numpy as np
from flax import traverse_util

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


def resize_relative_table(table: np.ndarray, rows: int, extra: int) -> np.ndarray:
  """A ((2w-1)^2 + extra, heads) table -> (rows, heads): the offset grid resized bicubically, the `extra`
  rows (ViT's 3 cls rows) kept as they are. An unchanged size returns the table itself."""
  if table.shape[0] == rows:
    return table
  src, dst = math.isqrt(table.shape[0] - extra), math.isqrt(rows - extra)
  if src * src + extra != table.shape[0] or dst * dst + extra != rows:
    raise ValueError(f'Relative position tables of {table.shape[0]} and {rows} rows are not square offset grids.')
  w = cubic_weights(src, dst)
  grid = table[:src * src].astype(np.float64).reshape(src, src, -1)
  resized = np.einsum('ij,jkh,lk->ilh', w, grid, w).reshape(dst * dst, -1)
  return np.concatenate([resized, table[src * src:]]).astype(table.dtype)


def adapt_encoder(pretrained: dict[str, Any], target: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """Pretrained encoder params shaped to `target` (the fine-tuning encoder's params or their shapes).

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
      value = resize_relative_table(value, like.shape[0], extra)
      report['resized'].append(key)
    if value.shape != tuple(like.shape):
      raise ValueError(f'Pretrained {key!r} has shape {value.shape}, the model needs {tuple(like.shape)}: check '
                       'model.variant, model.image_size and model.window_size against the pretraining config.')
    out[key] = value
  report['dropped'] = outside + sorted(set(src) - set(dst))
  return traverse_util.unflatten_dict(out, sep='/'), report
