"""The losses against NumPy: the masked L1 of the official formula, the classification cross-entropy."""
import jax
import jax.numpy as jnp
import numpy as np

from simmim_jax import losses, masking


def official_loss(x, x_rec, token_mask, patch):
  """SimMIM.forward in NumPy, NCHW as the PyTorch code: mean L1 over masked pixels / in_chans."""
  x, x_rec = x.transpose(0, 3, 1, 2), x_rec.transpose(0, 3, 1, 2)
  mask = token_mask.repeat(patch, 1).repeat(patch, 2)[:, None].astype(np.float64)
  loss_recon = np.abs(x - x_rec)
  return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / x.shape[1]


def test_masked_l1_matches_official_formula():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
  x_rec = rng.standard_normal((4, 32, 32, 3)).astype(np.float32)
  token_mask = np.asarray(masking.image_mask(jax.random.key(0), 4, 32, 8, 4, 0.6))
  got = losses.masked_l1(jnp.asarray(x_rec), jnp.asarray(x), masking.upsample(jnp.asarray(token_mask), 4))
  np.testing.assert_allclose(float(got), official_loss(x, x_rec, token_mask, 4), rtol=1e-5)


def test_unmasked_pixels_do_not_count():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  token_mask = np.asarray(masking.image_mask(jax.random.key(1), 2, 16, 8, 4, 0.5))
  pixel_mask = np.asarray(masking.upsample(jnp.asarray(token_mask), 4))
  wrong_where_visible = np.where(pixel_mask > 0, x, x + 100.0)
  assert float(losses.masked_l1(wrong_where_visible, x, pixel_mask)) < 1e-6


def test_cross_entropy_with_soft_and_one_hot_targets():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  targets = rng.dirichlet(np.ones(7), 5).astype(np.float32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  per_row = -(targets * log_p).sum(-1)
  loss = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(targets))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(losses.cross_entropy(logits, targets), per_row, rtol=1e-5)
  # One-hot targets: equal to the usual cross-entropy.
  labels = rng.integers(0, 7, 5)
  np.testing.assert_allclose(losses.cross_entropy(logits, np.eye(7)[labels]), -log_p[np.arange(5), labels],
                             rtol=1e-5)
