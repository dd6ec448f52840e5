"""Reconstruction figures: original | masked input | reconstruction | pasted | per-patch L1 error heat map.

One function draws them for everyone: `figure` (params + images + a mask seed) for tools/visualize.py and
the notebooks, `figure_from_arrays` for the trainer, which reconstructs on its own mesh. No TensorFlow; PIL
and matplotlib are imported only to draw, so importing this (as every image task does) needs neither.
"""
import dataclasses
import functools
import io
import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simmim_jax import losses, masking, models, storage

COLUMNS = ('original', 'masked input', 'reconstruction', 'pasted', 'L1 error')
VISIBLE_GREY = 200  # heat-map colour of visible patches: no error is scored there


@dataclasses.dataclass
class Figure:
  """A drawn grid and the numbers behind it (L1 in the loss's units: normalised pixels or norm_target)."""
  grid: np.ndarray  # (rows*H + gaps, 5*W + gaps, 3) uint8, one row per image
  l1: np.ndarray  # (B,) mean L1 over each image's masked pixels: the training loss, per image
  patch_l1: np.ndarray  # (B, h, w) mean L1 per model patch (visible patches included)
  token_mask: np.ndarray  # (B, h, w) int32, 1 = masked


def to_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Undo the input normalisation: (..., 3) float -> uint8."""
  pixels = np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)
  return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)


def draw_mask(config: ml_collections.ConfigDict, seed: int, batch_size: int) -> np.ndarray:
  """The token mask (B, h, w) for config.mask, drawn from `seed` alone so a figure can be reproduced."""
  m = config.mask
  return np.asarray(masking.image_mask(jax.random.key(seed), batch_size, config.model.image_size,
                                       m.mask_patch_size, m.model_patch_size, m.mask_ratio))


def init_params(config: ml_collections.ConfigDict, seed: int = 0) -> Any:
  """Randomly initialised SimMIM params for this config: the untrained baseline for the error."""
  size, grid = config.model.image_size, config.model.image_size // config.mask.model_patch_size
  images = jnp.zeros((1, size, size, config.model.in_chans), jnp.float32)
  return models.build_simmim(config.model).init(jax.random.key(seed), images, jnp.zeros((1, grid, grid), jnp.int32))['params']


@functools.lru_cache(maxsize=8)
def _apply(model_json: str) -> Callable:
  """jit(params, images, mask) -> reconstruction, compiled once per model config."""
  model = models.build_simmim(ml_collections.ConfigDict(json.loads(model_json)))
  return jax.jit(lambda params, images, mask: model.apply({'params': params}, images, mask, train=False))


def reconstruct(params: Any, config: ml_collections.ConfigDict, images: np.ndarray, token_mask: np.ndarray,
                chunk: int = 64) -> np.ndarray:
  """The model's output (B, H, W, C) float32, in chunks so many images fit in memory."""
  if 'decoder' not in params or 'encoder' not in params:
    raise ValueError(f'Reconstruction needs the SimMIM params (encoder and decoder); got top-level keys '
                     f'{sorted(params)}. Use a training checkpoint or an .npz exported with the decoder.')
  apply = _apply(config.model.to_json())
  out = [np.asarray(apply(params, jnp.asarray(images[i:i + chunk], jnp.float32), jnp.asarray(token_mask[i:i + chunk])))
         for i in range(0, len(images), chunk)]
  return np.concatenate(out).astype(np.float32)


def patch_l1(reconstruction: np.ndarray, target: np.ndarray, patch: int) -> np.ndarray:
  """Mean |target - reconstruction| per patch x patch block and all channels: (B, H/p, W/p)."""
  err = np.abs(np.asarray(target, np.float32) - np.asarray(reconstruction, np.float32))
  b, h, w, c = err.shape
  return err.reshape(b, h // patch, patch, w // patch, patch, c).mean(axis=(2, 4, 5))


def error_heatmap(errors: np.ndarray, token_mask: np.ndarray, patch: int, vmax: float,
                  cmap: str = 'inferno') -> np.ndarray:
  """Per-patch errors -> (B, H, W, 3) uint8 colours from 0 (dark) to vmax (bright); visible patches grey."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  colours = matplotlib.colormaps[cmap](np.clip(errors / vmax, 0.0, 1.0))[..., :3]
  colours = np.where(np.asarray(token_mask)[..., None] > 0, np.round(colours * 255), VISIBLE_GREY).astype(np.uint8)
  return np.repeat(np.repeat(colours, patch, axis=1), patch, axis=2)


def tile(columns: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
  """Columns of (B, H, W, 3) uint8 images -> one white-separated grid, one row per example."""
  stacked = np.stack(columns, axis=1)  # (B, K, H, W, 3)
  b, k, h, w, c = stacked.shape
  canvas = np.full((b * (h + gap) - gap, k * (w + gap) - gap, c), 255, np.uint8)
  for i in range(b):
    for j in range(k):
      canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = stacked[i, j]
  return canvas


def figure_from_arrays(images: np.ndarray, token_mask: np.ndarray, reconstruction: np.ndarray,
                       config: ml_collections.ConfigDict, vmax: float = 2.0) -> Figure:
  """The grid and errors for images already reconstructed under token_mask (the trainer's path).

  The error is scored against the training target; with loss.norm_target the reconstruction is drawn in
  pixels by undoing the normalisation with the original's local statistics (it predicts only their shape).
  The heat map's colour scale is fixed (0..vmax) so figures from different steps and runs compare.
  """
  images, reconstruction = np.asarray(images, np.float32), np.asarray(reconstruction, np.float32)
  token_mask = np.asarray(token_mask)
  patch = config.mask.model_patch_size
  target, drawn = images, reconstruction
  if config.loss.norm_target:
    mean, std = (np.asarray(a) for a in losses.local_stats(images, config.loss.norm_target_window))
    target = (images - mean) / std  # losses.normalize_target, keeping the stats to draw pixels back
    drawn = reconstruction * std + mean
  errors = patch_l1(reconstruction, target, patch)
  masked = token_mask > 0
  # Every patch has the same pixel count, so the mean over masked patches is the loss's masked-pixel mean.
  l1 = (errors * masked).sum(axis=(1, 2)) / np.maximum(masked.sum(axis=(1, 2)), 1)
  pixel_mask = np.asarray(masking.upsample(token_mask, patch)) > 0
  mean_rgb, std_rgb = config.data.mean, config.data.std
  original, recon = to_uint8(images, mean_rgb, std_rgb), to_uint8(drawn, mean_rgb, std_rgb)
  grid = tile([original, np.where(pixel_mask, np.uint8(128), original), recon, np.where(pixel_mask, recon, original),
               error_heatmap(errors, token_mask, patch, vmax)])
  return Figure(grid=grid, l1=l1, patch_l1=errors, token_mask=token_mask)


def figure(params: Any, config: ml_collections.ConfigDict, images: np.ndarray, seed: int = 0, *,
           mask_ratio: float | None = None, mask_patch_size: int | None = None, vmax: float = 2.0) -> Figure:
  """Masks `images` (normalised, (B, S, S, C)) with a mask drawn from `seed`, reconstructs, draws the grid.

  mask_ratio / mask_patch_size override the config's for this figure (the model's patch size stays).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's config is left alone
  if mask_ratio is not None:
    config.mask.mask_ratio = mask_ratio
  if mask_patch_size is not None:
    config.mask.mask_patch_size = mask_patch_size
  images = np.asarray(images, np.float32)
  size = config.model.image_size
  if images.ndim != 4 or images.shape[1:3] != (size, size):
    raise ValueError(f'images must be (B, {size}, {size}, C) for model.image_size={size}; got {images.shape}.')
  token_mask = draw_mask(config, seed, len(images))
  return figure_from_arrays(images, token_mask, reconstruct(params, config, images, token_mask), config, vmax)


def save_png(grid: np.ndarray, path: str, min_size: int = 256, title: str | None = None) -> str:
  """Writes the grid as a PNG at `path` (local or a URL such as gs://), upscaled by an integer factor (nearest)
  so small images stay visible; title on top."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
  factor = max(1, -(-min_size // min(grid.shape[:2])))
  image = Image.fromarray(grid).resize((grid.shape[1] * factor, grid.shape[0] * factor), Image.NEAREST)
  if title:
    font = ImageFont.load_default()
    lines = title.split('\n')
    height = 4 + 14 * len(lines)
    framed = Image.new('RGB', (image.width, image.height + height), (255, 255, 255))
    framed.paste(image, (0, height))
    ImageDraw.Draw(framed).multiline_text((4, 2), title, fill=(0, 0, 0), font=font, spacing=3)
    image = framed
  png = io.BytesIO()
  image.save(png, format='PNG')
  storage.write_bytes(path, png.getvalue())
  return path


def caption(fig: Figure, vmax: float = 2.0) -> str:
  """The header line: what the columns are and the mean masked-patch L1."""
  return (f"{' | '.join(COLUMNS)}\nheat map: L1 per masked patch, 0 (dark) to {vmax:g} (bright); grey: visible\n"
          f'mean masked-patch L1 {float(np.mean(fig.l1)):.4f} over {len(fig.l1)} images')
