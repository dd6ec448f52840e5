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


def span_mask(key: jax.Array, valid: jax.Array, span: int, mask_ratio: float) -> jax.Array:
  """Text: block_mask on a 1-d grid of span-token cells that never masks padding. (B, L) int32.

  A cell is maskable when all its tokens are valid (segment id > 0). Each row masks exactly
  mask_count(its maskable cells, mask_ratio): counted from the real length, so padding neither receives
  masks nor inflates the count. A row without padding draws exactly what block_mask(key, B, (L/span,),
  (span,), mask_ratio) draws.
  """
  batch, length = valid.shape
  if length % span:
    raise ValueError(f'mask.span={span} must divide the sequence length {length}.')
  cells = length // span
  maskable = valid.reshape(batch, cells, span).all(axis=-1)
  # The count in Python's float64 arithmetic, as block_mask rounds it: a table over every possible cell count.
  counts = jnp.asarray([mask_count(n, mask_ratio) for n in range(cells + 1)], jnp.int32)
  count = counts[maskable.sum(axis=-1)]
  noise = jax.random.uniform(key, (batch, cells))
  noise = jnp.where(maskable, noise, 2.0)  # ranked after every maskable cell
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  mask = (ranks < count[:, None]).astype(jnp.int32)
  return jnp.repeat(mask, span, axis=1)


def max_masked(length: int, span: int, mask_ratio: float) -> int:
  """Masked tokens in a row without padding: the static count gathered before the output layer."""
  return mask_count(length // span, mask_ratio) * span


def masked_positions(mask: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
  """(B, L) {0,1} mask -> (positions (B, count) int32, weights (B, count) float32).

  The masked positions of each row in increasing order, then (rows with padding mask fewer) unmasked
  filler positions with weight 0, so the gather has a static shape.
  """
  positions = jnp.argsort(1 - mask, axis=-1, stable=True)[:, :count].astype(jnp.int32)
  return positions, jnp.take_along_axis(mask, positions, axis=-1).astype(jnp.float32)


def bert_corruption(key: jax.Array, tokens: jax.Array, selected: jax.Array, vocab_size: int,
                    first_random_id: int) -> tuple[jax.Array, jax.Array]:
  """BERT's 80/10/10: of the selected tokens 80 % become [MASK], 10 % a random id, 10 % stay.

  Returns (input ids with the random replacements, the {0,1} positions to blend with [MASK]). Random ids
  are drawn from [first_random_id, vocab_size), so never pad/eos/unk/[MASK]. The loss still covers every
  selected position (the caller weights by `selected`, never by the corrupted input).
  """
  u_key, id_key = jax.random.split(key)
  u = jax.random.uniform(u_key, tokens.shape)
  chosen = selected.astype(bool)
  to_mask = chosen & (u < 0.8)
  to_random = chosen & (u >= 0.8) & (u < 0.9)
  random_ids = jax.random.randint(id_key, tokens.shape, first_random_id, vocab_size, tokens.dtype)
  return jnp.where(to_random, random_ids, tokens), to_mask.astype(jnp.int32)
