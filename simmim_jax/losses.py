"""Every loss: masked L1 (SimMIM), masked-token sums (text) and the classification cross-entropy."""
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


def local_stats(images: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
  """(mean, std) of each pixel's window x window neighbourhood (stride 1; windows clipped at the border count
  only real pixels), per channel; as the official `norm_targets`: unbiased variance clamped at 0, eps 1e-6."""
  x = jnp.asarray(images, jnp.float32)
  pad = window // 2

  def window_sum(t):
    return jax.lax.reduce_window(t, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1),
                                 ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  count = window_sum(jnp.ones_like(x[:1, :, :, :1]))
  mean = window_sum(x) / count
  var = (window_sum(x * x) / count - mean**2) * (count / (count - 1))
  return mean, jnp.sqrt(jnp.maximum(var, 0.0) + 1e-6)


def normalize_target(images: jax.Array, window: int) -> jax.Array:
  """SwinV2's norm_target: each pixel normalised by its neighbourhood's local_stats. (B, H, W, C) -> same shape."""
  if window % 2 != 1:
    raise ValueError(f'loss.norm_target_window must be odd, got {window}.')
  mean, std = local_stats(images, window)
  return (jnp.asarray(images, jnp.float32) - mean) / std


def masked_token_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
  """Sums over the gathered (masked) positions: cross-entropy, correct argmax, and the weight count.

  logits (B, K, V), targets (B, K) int, weights (B, K) from the mask itself (never from `targets > 0`).
  Global sums under jit; divide once (loss = loss_sum / count) for a ratio over the whole batch.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {'loss_sum': jnp.sum((log_z - target_logit) * w), 'correct': jnp.sum(correct * w), 'count': jnp.sum(w)}


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per row, -sum(targets * log_softmax(logits)) in float32: (B, K), (B, K) -> (B,). targets are class
  probabilities: Mixup/CutMix with label smoothing in training (its mean is timm's SoftTargetCrossEntropy),
  one-hot labels in evaluation."""
  return -jnp.sum(targets.astype(jnp.float32) * jax.nn.log_softmax(logits.astype(jnp.float32)), -1)
