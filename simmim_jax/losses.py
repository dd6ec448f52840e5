"""Losses scored on masked positions only."""
import jax
import jax.numpy as jnp


def masked_l1(reconstruction: jax.Array, target: jax.Array, pixel_mask: jax.Array) -> jax.Array:
  """SimMIM's loss: sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / channels.

  Arrays are (B, H, W, C) and (B, H, W, 1). Under jit the sums run over the global batch, so the result is
  one global ratio across all devices and hosts, never a mean of per-device means.
  """
  l1 = jnp.abs(target.astype(jnp.float32) - reconstruction.astype(jnp.float32))
  mask = pixel_mask.astype(jnp.float32)
  return jnp.sum(l1 * mask) / (jnp.sum(mask) + 1e-5) / target.shape[-1]


def normalize_target(images: jax.Array, window: int) -> jax.Array:
  """SwinV2's norm_target: each pixel normalised by the mean and unbiased variance of its window x window
  neighbourhood (stride 1; windows clipped at the border count only real pixels), per channel.

  (B, H, W, C) -> same shape; as the official `norm_targets`: variance clamped at 0, eps 1e-6.
  """
  if window % 2 != 1:
    raise ValueError(f'loss.norm_target_window must be odd, got {window}.')
  x = images.astype(jnp.float32)
  pad = window // 2

  def window_sum(t):
    return jax.lax.reduce_window(t, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  count = window_sum(jnp.ones_like(x[:1, :, :, :1]))
  mean = window_sum(x) / count
  var = (window_sum(x * x) / count - mean**2) * (count / (count - 1))
  return (x - mean) / jnp.sqrt(jnp.maximum(var, 0.0) + 1e-6)
