"""Mixup / CutMix against a NumPy copy of timm's algorithm; label sums, lam, box area, switch rate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import mixup

B, H, W, K = 6, 10, 12, 7


def _timm_mix(x: np.ndarray, target: np.ndarray, lam: float, use_cutmix: bool, cy: int, cx: int,
              smoothing: float) -> tuple[np.ndarray, np.ndarray]:
  """timm Mixup._mix_batch (mode 'batch', correct_lam) + mixup_target, NHWC, with drawn values given."""
  x = x.copy()
  if use_cutmix:  # rand_bbox with np.random.randint replaced by (cy, cx); cutmix_bbox_and_lam
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    yl, yh = np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H)
    xl, xh = np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W)
    lam = 1. - (yh - yl) * (xh - xl) / float(H * W)
    x[:, yl:yh, xl:xh] = x[::-1][:, yl:yh, xl:xh]
  else:
    x = x * lam + x[::-1] * (1. - lam)
  off = smoothing / K
  on = 1. - smoothing + off
  y1 = np.full((len(target), K), off)
  y1[np.arange(len(target)), target] = on
  return x, y1 * lam + y1[::-1] * (1. - lam)


def _batch(seed: int = 0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, H, W, 3)).astype(np.float32), rng.integers(0, K, B)


@pytest.mark.parametrize('lam, use_cutmix, cy, cx', [
    (0.37, False, 0, 0), (1.0, False, 3, 3), (0.37, True, 4, 6), (0.05, True, 0, 11),
    (0.8, True, 9, 0), (0.999, True, 5, 5), (0.0, True, 5, 6)])
def test_mix_equals_timm_for_fixed_draws(lam, use_cutmix, cy, cx):
  x, y = _batch()
  ours_x, ours_t = mixup.mix(jnp.asarray(x), jnp.asarray(y), K, jnp.float32(lam), jnp.asarray(use_cutmix),
                             jnp.array([cy, cx]), 0.1)
  ref_x, ref_t = _timm_mix(x, y, lam, use_cutmix, cy, cx, 0.1)
  np.testing.assert_allclose(np.asarray(ours_x), ref_x, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours_t), ref_t, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours_t).sum(-1), 1.0, atol=1e-6)


def test_mixup_cutmix_is_mix_of_its_draws_and_jits():
  x, y = _batch(1)
  fn = jax.jit(lambda k: mixup.mixup_cutmix(k, jnp.asarray(x), jnp.asarray(y), K))
  draw = jax.jit(lambda k: mixup.draw(k, H, W))
  mix = jax.jit(lambda *d: mixup.mix(jnp.asarray(x), jnp.asarray(y), K, *d, 0.1))
  for i in range(4):
    key = jax.random.key(i)
    expected = mix(*draw(key))
    for a, b in zip(fn(key), expected):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _many(n: int = 2000, **kwargs):
  """Outcomes of n keys on images where image i is constant i (so mixing is visible per pixel)."""
  x = jnp.broadcast_to(jnp.arange(B, dtype=jnp.float32)[:, None, None, None], (B, H, W, 1))
  y = jnp.arange(B) % K  # row 0 label 0, reversed row 0 label 5: distinct
  fn = jax.jit(jax.vmap(lambda k: mixup.mixup_cutmix(k, x, y, K, **kwargs)))
  images, targets = fn(jax.random.split(jax.random.key(0), n))
  return np.asarray(images), np.asarray(targets)


def test_targets_sum_to_one_and_lam_follows_beta():
  images, targets = _many(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
  off, on = 0.1 / K, 0.9 + 0.1 / K
  lam = (targets[:, 0, 0] - off) / (on - off)  # row 0's own label carries lam
  assert abs(lam.mean() - 0.5) < 0.02
  assert abs(lam.var() - 0.64 / (2.56 * 2.6)) < 0.01  # Beta(0.8, 0.8) variance 0.0962
  np.testing.assert_allclose(images[:, 0, 0, 0, 0], (1 - lam) * (B - 1), atol=1e-4)


def test_cutmix_box_area_matches_lam_and_switch_rate():
  images, targets = _many(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
  first = images[:, 0, ..., 0]  # image 0 (zeros) mixed with image B-1 (all B-1)
  is_cut = np.all((first == 0) | (first == B - 1), axis=(1, 2))
  assert abs(is_cut.mean() - 0.5) < 0.04
  lam = targets[:, 0, 0]
  pasted = (first == B - 1).mean(axis=(1, 2))
  np.testing.assert_allclose(pasted[is_cut], 1 - lam[is_cut], atol=1e-6)  # correct_lam
  for image in first[is_cut][:200]:  # the pasted region is one axis-aligned box
    rows, cols = np.nonzero(image)
    if rows.size:
      assert image.sum() == (B - 1) * (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)


def test_prob_leaves_batches_unchanged_and_no_alpha_gives_smoothed_labels():
  images, targets = _many(n=1000, prob=0.3)
  unchanged = np.all(images == np.arange(B)[:, None, None, None], axis=(1, 2, 3, 4))
  assert abs(unchanged.mean() - 0.7) < 0.05
  labels = np.arange(B) % K
  smooth = np.full((B, K), 0.1 / K)
  smooth[np.arange(B), labels] += 0.9
  np.testing.assert_allclose(targets[unchanged], np.broadcast_to(smooth, targets[unchanged].shape),
                             atol=1e-6)
  x, y = _batch()
  out_x, out_t = mixup.mixup_cutmix(jax.random.key(0), jnp.asarray(x), jnp.asarray(y), K,
                                    mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.2)
  np.testing.assert_array_equal(np.asarray(out_x), x)
  np.testing.assert_allclose(np.asarray(out_t)[np.arange(B), y], 0.8 + 0.2 / K, rtol=1e-6)
  assert out_t.dtype == jnp.float32
