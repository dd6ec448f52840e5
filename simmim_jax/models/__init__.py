"""Model registry: `build_encoder(config.model)`, the SimMIM wrapper (encoder + pixel decoder) and the
masked-LM wrapper for text (encoder + tied token head)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simmim_jax.models import heads, layers, text, vit


def build_encoder(model: ml_collections.ConfigDict) -> nn.Module:
  """The encoder named by model.name, its sizes decoded from model.variant."""
  dtype = jnp.dtype(model.dtype)
  # Configs saved before these fields build with their defaults.
  attention, remat = model.get('attention', 'auto'), model.get('remat', 'none')
  if attention not in layers.ATTENTION_CHOICES:
    raise ValueError(f'model.attention must be one of {layers.ATTENTION_CHOICES}, got {attention!r}.')
  if remat not in layers.REMAT_CHOICES:
    raise ValueError(f'model.remat must be one of {layers.REMAT_CHOICES}, got {remat!r}.')
  if model.name == 'vit':
    return vit.ViT(**vit.decode_variant(model.variant), image_size=model.image_size, style=model.style,
                   drop_path_rate=model.drop_path_rate, dtype=dtype, attention=attention, remat=remat)
  if model.name in ('swin', 'swinv2'):
    from simmim_jax.models import swin  # pylint: disable=import-outside-toplevel
    return swin.build(model, dtype)
  if model.name == 'text':
    return text.build(model, dtype)
  raise ValueError(f"Unknown model.name {model.name!r}: use 'vit', 'swin', 'swinv2' or 'text'.")


class SimMIM(nn.Module):
  """Encoder + pixel decoder: images and a token mask -> reconstructed images (float32)."""
  encoder: nn.Module
  in_chans: int = 3

  @nn.compact
  def __call__(self, images: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
    features = self.encoder(images, mask, train=train)
    return heads.PixelDecoder(self.encoder.stride, self.in_chans, name='decoder')(features)


def build_simmim(model: ml_collections.ConfigDict) -> SimMIM:
  """The pretraining model for this config."""
  return SimMIM(build_encoder(model), model.in_chans)


def build_masked_lm(model: ml_collections.ConfigDict) -> text.MaskedLM:
  """The text pretraining model for this config (model.name 'text')."""
  return text.MaskedLM(build_encoder(model))
