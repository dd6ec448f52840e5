"""Mixup / CutMix on device with timm's 'batch' mode semantics, and the soft-target cross-entropy.

timm (timm/data/mixup.py, Mixup with mode='batch', correct_lam=True): one lam per batch; with prob the
batch is mixed with its reverse x.flip(0), by CutMix with switch_prob, else by Mixup; the targets are
lam * smooth(y) + (1 - lam) * smooth(flip(y)). Static shapes: the CutMix box is an iota mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm one_hot(on = 1 - smoothing + smoothing / K, off = smoothing / K), float32 (B, K)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def draw(key: jax.Array, height: int, width: int, *, mixup_alpha: float = 0.8,
         cutmix_alpha: float = 1.0, prob: float = 1.0,
         switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
  """timm Mixup._params_per_batch plus rand_bbox's centre: (lam, use_cutmix, (cy, cx)).

  Not applied (probability 1 - prob): lam = 1 and no CutMix, which leaves the batch unchanged."""
  key_apply, key_switch, key_mix, key_cut, key_y, key_x = jax.random.split(key, 6)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  # Both Beta draws are made and one is kept: static shapes, and each draw's key is fixed by its role.
  lam_mix = jax.random.beta(key_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(key_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  apply = jax.random.uniform(key_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
  centre = jnp.stack([jax.random.randint(key_y, (), 0, height),  # np.random.randint(0, img_h)
                      jax.random.randint(key_x, (), 0, width)])
  return lam, use_cutmix & apply, centre


def cutmix_box(lam: jax.Array, centre: jax.Array, height: int,
               width: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """timm rand_bbox: sides int(size * sqrt(1 - lam)) about centre, clipped to the image: (yl, yh, xl, xh)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  cy, cx = centre[0], centre[1]
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return yl, yh, xl, xh


def mix(images: jax.Array, labels: jax.Array, num_classes: int, lam: jax.Array,
        use_cutmix: jax.Array, centre: jax.Array,
        label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """timm Mixup._mix_batch + mixup_target for given draws: the batch mixed with its reverse."""
  height, width = images.shape[1:3]
  yl, yh, xl, xh = cutmix_box(lam, centre, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
  # correct_lam=True: lam becomes the share of the image left outside the clipped box.
  lam_box = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
  flipped = images[::-1]
  cut = jnp.where(box[None, :, :, None], flipped, images)
  mixed = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)
  images = jnp.where(use_cutmix, cut, mixed)
  lam = jnp.where(use_cutmix, lam_box, lam)
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  return images, lam * targets + (1.0 - lam) * targets[::-1]


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """Mixed images (B, H, W, C) and soft targets float32 (B, num_classes), as timm Mixup(mode='batch')."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, smooth_one_hot(labels, num_classes, label_smoothing)
  lam, use_cutmix, centre = draw(key, images.shape[1], images.shape[2], mixup_alpha=mixup_alpha,
                                 cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob)
  return mix(images, labels, num_classes, lam, use_cutmix, centre, label_smoothing)
