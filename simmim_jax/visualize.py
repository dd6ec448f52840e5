"""Reconstruction figures: original | masked input | reconstruction | reconstruction pasted into the visible pixels."""
import os
from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Undo the input normalisation: (..., 3) float -> uint8."""
  pixels = np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)
  return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)


def reconstruction_grid(images: np.ndarray, pixel_mask: np.ndarray, reconstruction: np.ndarray,
                        mean: Sequence[float], std: Sequence[float], gap: int = 2) -> np.ndarray:
  """One row per example, four columns; masked pixels are drawn grey in the masked input."""
  images, reconstruction = np.asarray(images), np.asarray(reconstruction)
  m = np.asarray(pixel_mask, np.float32)
  original, recon = to_uint8(images, mean, std), to_uint8(reconstruction, mean, std)
  masked = np.where(m > 0, np.uint8(128), original)
  pasted = np.where(m > 0, recon, original)
  columns = np.stack([original, masked, recon, pasted], axis=1)  # (B, 4, H, W, 3)
  b, k, h, w, c = columns.shape
  canvas = np.full((b * (h + gap) - gap, k * (w + gap) - gap, c), 255, np.uint8)
  for i in range(b):
    for j in range(k):
      canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = columns[i, j]
  return canvas


def save_png(grid: np.ndarray, path: str, min_size: int = 256) -> str:
  """Writes the grid, upscaled by an integer factor (nearest) so small images stay visible."""
  factor = max(1, -(-min_size // min(grid.shape[:2])))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid).resize((grid.shape[1] * factor, grid.shape[0] * factor), Image.NEAREST).save(path)
  return path
