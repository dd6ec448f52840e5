"""Block masking: exact counts, block structure, uniform coverage (docs/REFERENCE.md section 1)."""
import jax
import numpy as np
import pytest

from simmim_jax import masking


@pytest.mark.parametrize('image_size,mask_patch,model_patch,cells,masked,tokens', [
    (224, 32, 16, 49, 30, 14),   # ViT-B/16 at 224
    (192, 32, 4, 36, 22, 48),    # Swin at 192
])
def test_paper_counts_and_blocks(image_size, mask_patch, model_patch, cells, masked, tokens):
  mask = np.asarray(masking.image_mask(jax.random.key(0), 16, image_size, mask_patch, model_patch, 0.6))
  assert mask.shape == (16, tokens, tokens)
  scale = mask_patch // model_patch
  # Every scale x scale block is constant, and its corner reproduces the coarse mask.
  coarse = mask[:, ::scale, ::scale]
  np.testing.assert_array_equal(np.repeat(np.repeat(coarse, scale, 1), scale, 2), mask)
  assert coarse.shape[1] * coarse.shape[2] == cells
  np.testing.assert_array_equal(coarse.reshape(16, -1).sum(-1), masked)
  assert set(np.unique(mask)) == {0, 1}


def test_every_position_masked_about_equally_often():
  draws = np.asarray(masking.image_mask(jax.random.key(1), 4000, 224, 32, 16, 0.6))[:, ::2, ::2].reshape(4000, -1)
  frequency = draws.mean(0)
  expected = 30 / 49
  # Binomial std of a frequency over 4000 draws is ~0.0077; 5 std bounds every cell.
  assert np.all(np.abs(frequency - expected) < 0.04), frequency
  # Different examples get different masks (not one mask repeated over the batch).
  assert len({row.tobytes() for row in draws[:100]}) == 100


def test_one_d_spans_and_keys():
  a = np.asarray(masking.block_mask(jax.random.key(2), 8, (10,), (3,), 0.15))
  assert a.shape == (8, 30)
  np.testing.assert_array_equal(a.sum(-1), 3 * 2)  # ceil(10 * 0.15) = 2 spans of 3
  b = np.asarray(masking.block_mask(jax.random.key(3), 8, (10,), (3,), 0.15))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, masking.block_mask(jax.random.key(2), 8, (10,), (3,), 0.15))


def test_divisibility_is_checked():
  with pytest.raises(ValueError, match='mask_patch_size'):
    masking.image_mask(jax.random.key(0), 1, 224, 24, 16, 0.6)
