"""uint8 pixels -> the model's float input, on the device inside the jitted steps (TF-free).

The input pipelines ship uint8 (B, S, S, 3): a quarter of float32's bytes over the host->device link and in
the prefetch buffers. ToTensor + Normalize happen here, in float32, as the host did them before. Floating
images are taken as already normalised (synthetic tests, tools that prepare their own arrays), so a float
batch passes through unchanged.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def normalise(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 0..255 -> (x / 255 - mean) / std in float32; a floating array is returned as it is."""
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  x = images.astype(jnp.float32) / 255.0  # the same float32 ops, in the same order, as the host transform
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def erase(key: jax.Array, images: jax.Array, boxes: jax.Array) -> jax.Array:
  """timm RandomErasing(mode='pixel') applied: each image's box (top, left, height, width; height 0: none)
  filled with standard-normal noise, on normalised (B, H, W, C) images. The box is drawn on the host."""
  _, h, w, _ = images.shape
  top, left, height, width = (boxes[:, i, None, None] for i in range(4))
  rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)
