"""Model FLOPs counted by XLA equal a hand count for the ViT forward pass."""
import jax
import jax.numpy as jnp

from simmim_jax import defaults, flops, models


def vit_forward_flops_by_hand(batch, width, depth, mlp, patch, image, chans, stride):
  """2 FLOPs per multiply-add of every matmul/conv: patch embed, qkv, attention, proj, MLP, decoder."""
  n_patches = (image // patch)**2
  n = n_patches + 1  # cls token
  embed = 2 * n_patches * (patch * patch * chans) * width
  per_block = 2 * n * width * 3 * width + 2 * 2 * n * n * width + 2 * n * width * width + 2 * 2 * n * width * mlp
  decoder = 2 * n_patches * width * stride * stride * chans
  return batch * (embed + depth * per_block + decoder)


def test_vit_forward_flops_match_hand_count():
  c = defaults.pretrain_config().model
  c.update(variant='S/16', image_size=64)
  model = models.build_simmim(c)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((2, 4, 4), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), images, mask)
  counted = flops.forward_flops(lambda p, x, m: model.apply(p, x, m), params, images, mask)
  by_hand = vit_forward_flops_by_hand(2, 384, 12, 1536, 16, 64, 3, 16)
  # Elementwise ops (norms, softmax, GELU, biases) add a few percent on top of the matmuls.
  assert by_hand <= counted <= 1.08 * by_hand, (counted, by_hand)
  assert flops.train_flops(counted) == 3 * counted
