"""Block masking (SimMIM's MaskGenerator) as a pure, jittable function on an N-d token grid.

Images use a 2-d grid (mask_patch_size cells, each scale x scale model tokens); text uses 1-d (spans).
"""
import math

import jax
import jax.numpy as jnp


def mask_count(num_cells: int, mask_ratio: float) -> int:
  """Cells masked per example: ceil(num_cells * mask_ratio), exactly as the official generator."""
  return int(math.ceil(num_cells * mask_ratio))


def block_mask(key: jax.Array, batch_size: int, grid: tuple[int, ...], scale: tuple[int, ...],
               mask_ratio: float) -> jax.Array:
  """A {0,1} int32 mask of shape (batch, *(g*s for g, s in zip(grid, scale))).

  Each example masks exactly mask_count(prod(grid), mask_ratio) coarse cells, chosen uniformly without
  replacement, and each cell covers `scale` tokens per axis.
  """
  num_cells = math.prod(grid)
  count = mask_count(num_cells, mask_ratio)
  noise = jax.random.uniform(key, (batch_size, num_cells))
  # The rank of each cell in a uniformly random order; the `count` lowest ranks are masked. Ranks
  # (not a threshold on the noise) keep the count exact even if two noise values tie.
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  mask = (ranks < count).astype(jnp.int32).reshape(batch_size, *grid)
  for axis, s in enumerate(scale):
    mask = jnp.repeat(mask, s, axis=axis + 1)
  return mask


def image_mask(key: jax.Array, batch_size: int, image_size: int, mask_patch_size: int,
               model_patch_size: int, mask_ratio: float) -> jax.Array:
  """SimMIM's image mask at model-token resolution: (batch, image_size/model_patch_size, same)."""
  check_image_mask(image_size, mask_patch_size, model_patch_size)
  cells = image_size // mask_patch_size
  scale = mask_patch_size // model_patch_size
  return block_mask(key, batch_size, (cells, cells), (scale, scale), mask_ratio)


def check_image_mask(image_size: int, mask_patch_size: int, model_patch_size: int) -> None:
  """The official generator's divisibility requirements, as one clear error."""
  if image_size % mask_patch_size or mask_patch_size % model_patch_size:
    raise ValueError(
        f'mask.mask_patch_size={mask_patch_size} must divide model.image_size={image_size} and be a '
        f'multiple of mask.model_patch_size={model_patch_size}.')


def upsample(mask: jax.Array, factor: int) -> jax.Array:
  """Token mask (B, h, w) -> pixel mask (B, h*factor, w*factor, 1)."""
  mask = jnp.repeat(jnp.repeat(mask, factor, axis=1), factor, axis=2)
  return mask[..., None]
