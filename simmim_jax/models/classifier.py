"""Fine-tuning and linear-probe models: an encoder, mean pooling over its patch tokens, a linear head (text:
models/text.TextClassifier, pooled over the real tokens).

ViT follows the official BEiT-style fine-tuning (and timm Beit with use_fc_norm): a relative position table
in every block, no final norm, mean pooling then a fresh `fc_norm`, head init HEAD_INIT x 0.001 (bias 0).
Swin keeps its final norm, mean pools and applies the head (HEAD_INIT, bias 0); its relative position tables
(SwinV2: cpb_mlp, logit_scale) are exempt from weight decay, as the official fine-tuning optimizer has them.
Params: {'encoder': ..., 'fc_norm': ... (ViT only), 'head': {'kernel', 'bias'}}.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from simmim_jax.models import build_encoder, layers, text

# timm's trunc_normal_(std=.02) with its default ABSOLUTE cut-offs a=-2, b=2 (100 std): the official
# fine-tuning head, before x0.001. Not the ViT's +-1 std rule, which only the SimMIM pretraining ViT applies.
HEAD_INIT = nn.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
HEAD_INIT_SCALE = 0.001  # the official VisionTransformer's init_scale on head weight and bias


class Classifier(nn.Module):
  """Images (B, H, W, C) -> logits (B, num_classes) in float32.

  frozen=True is the linear probe: the encoder runs in inference mode under stop_gradient (no backward pass
  through it), and an optional parameter-free BatchNorm (MAE's probe) standardises the pooled features.
  """
  encoder: nn.Module
  num_classes: int
  fc_norm: bool = False
  head_init: layers.Initializer = HEAD_INIT
  frozen: bool = False
  batch_norm: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    features = self.encoder(images, None, train=train and not self.frozen)
    if self.frozen:
      features = jax.lax.stop_gradient(features)
    x = features.astype(jnp.float32).mean(axis=(1, 2))
    if self.fc_norm:
      x = layers.layer_norm(1e-6, 'fc_norm')(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False, use_scale=False,
                       name='bn')(x)
    return nn.Dense(self.num_classes, kernel_init=self.head_init, name='head')(x)


def build_classifier(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
  """The model for config.task 'finetune' or 'linear_probe' (probe.block: ViT features after that block)."""
  encoder = build_encoder(config.model)
  probe = config.task == 'linear_probe'
  scale = config.get('head_init_scale', HEAD_INIT_SCALE)  # configs saved before the field: the official one
  head_init = layers.scaled_init(HEAD_INIT, 1.0 / scale)  # the bias is 0, so the scale leaves it 0
  if config.model.name == 'text':
    if config.pool not in text.POOLS:
      raise ValueError(f'pool must be one of {text.POOLS}, got {config.pool!r}.')
    return text.TextClassifier(encoder, num_classes, pool=config.pool, dropout=config.head_dropout,
                               head_init=head_init, frozen=probe, batch_norm=probe and config.probe.batch_norm)
  block = config.probe.block if probe else None
  if config.model.name == 'vit':
    beit = config.model.style == 'beit'
    overrides = dict(final_norm=False, rel_pos='per_block' if beit else 'shared')
    if block is not None:
      if not 1 <= block <= encoder.depth:
        raise ValueError(f'probe.block={block} must be in 1..{encoder.depth} (the ViT depth).')
      overrides['depth'] = block  # the first `block` blocks; later pretrained blocks are not loaded
    encoder = encoder.clone(**overrides)
    return Classifier(encoder, num_classes, fc_norm=not probe, head_init=head_init, frozen=probe,
                      batch_norm=probe and config.probe.batch_norm)
  if block is not None:
    raise ValueError('probe.block selects a ViT block; for Swin leave it None (the final stage is probed).')
  encoder = encoder.clone(exempt_keywords=True)  # the official fine-tuning optimizer sees the bare encoder
  return Classifier(encoder, num_classes, frozen=probe, batch_norm=probe and config.probe.batch_norm)
