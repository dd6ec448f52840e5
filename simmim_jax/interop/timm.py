"""This package's params <-> timm state dicts, and the timm model (class + constructor arguments) that loads them.

| encoder (model.name / style) | timm class           | notes                                                      |
| vit / plain                  | VisionTransformer    | learned pos_embed, full qkv bias                           |
| vit / beit                   | Beit                 | no pos_embed, shared (pretraining) or per-block relative    |
|                              |                      | position table, q/v biases, layer scale (gamma_1, gamma_2) |
| swin                         | SwinTransformer      | timm merges patches at a stage's start: layers.{s+1}       |
| swinv2                       | SwinTransformerV2    | same, plus cosine attention / continuous position bias      |

Pretraining params give a headless model whose forward_features equals this package's encoder output
(ViT: (B, 1 + N, C) with the cls token first; Swin: (B, H, W, C)). Fine-tuning params ({'encoder', 'fc_norm',
'head'}) give the classifier with global_pool='avg' (ViT: fc_norm after mean pooling; Swin: head.fc).
timm models have no mask token and no SimMIM decoder: to_timm returns them apart, named as in the official
checkpoint (`mask_token`, `decoder.0.weight`, `decoder.0.bias`).
"""
from typing import Any

import numpy as np

from simmim_jax.interop import layout

CLASSES = {'vit_plain': 'VisionTransformer', 'vit_beit': 'Beit', 'swin': 'SwinTransformer',
           'swinv2': 'SwinTransformerV2'}
# Registered timm architectures of the standard sizes (same class; the kwargs, which override their defaults,
# are what counts). A guessed name is kept only when timm knows it.
_VIT_NAMES = {'Ti': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large', 'H': 'huge'}
_SWIN_NAMES = {'T': 'tiny', 'S': 'small', 'B': 'base', 'L': 'large'}


def to_timm(params: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Params (whole model or encoder alone) -> (timm state dict, SimMIM extras timm has no place for)."""
  encoder, rest = layout.split_model(params)
  fam = layout.family(encoder)
  encoder = dict(encoder)
  extras = {'mask_token': np.asarray(encoder.pop('mask_token'))} if 'mask_token' in encoder else {}
  state = layout.encoder_to_torch(encoder, vit=fam.startswith('vit'))
  if fam.startswith('swin'):
    state = layout.shift_downsample(state, +1)
  head, decoder = layout.heads_to_torch(rest, swin_head='head.fc.' if fam.startswith('swin') else 'head.')
  return {**state, **head}, {**extras, **decoder}


def from_timm(state_dict: dict[str, Any], extras: dict[str, Any] | None = None) -> dict[str, Any]:
  """A timm state dict (plus to_timm's extras) -> params {'encoder': ..., 'decoder'/'fc_norm'/'head' if present}."""
  state = {**state_dict, **(extras or {})}
  if any(k.startswith('layers.') for k in state):
    state = layout.shift_downsample(state, -1)
    state = {('head.' + k[len('head.fc.'):]) if k.startswith('head.fc.') else k: v for k, v in state.items()}
  return layout.assemble(state)


def timm_spec(model: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
  """{'class', 'kwargs', 'name'} of the timm model for a config's `model` section (a dict, e.g. from the JSON
  beside an export). `params` decides pretraining (headless) or fine-tuning (head size) layout."""
  spec = _spec(model, params)
  if spec['name'] is not None and not _registered(spec['name']):
    spec['name'] = None
  return spec


def _registered(name: str) -> bool:
  try:
    import timm as timm_lib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return timm_lib.is_model(name)


def _spec(model: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
  from simmim_jax.models import swin, vit  # pylint: disable=import-outside-toplevel
  rest = layout.split_model(params)[1] if params is not None else {}
  num_classes = int(np.shape(rest['head/kernel'])[-1]) if 'head/kernel' in rest else 0
  pool = 'avg' if num_classes else ''
  common = dict(img_size=model['image_size'], in_chans=model.get('in_chans', 3), num_classes=num_classes,
                global_pool=pool, drop_path_rate=0.0)
  name = model['name']
  if name == 'vit':
    sizes = vit.decode_variant(model['variant'])
    size, patch = model['variant'].split('/')
    kwargs = dict(common, patch_size=sizes['patch_size'], embed_dim=sizes['width'], depth=sizes['depth'],
                  num_heads=sizes['num_heads'], mlp_ratio=sizes['mlp_dim'] / sizes['width'], qkv_bias=True)
    if model.get('style', 'beit') == 'plain':
      kwargs.update(class_token=True, fc_norm=bool(num_classes))
      registered = f"vit_{_VIT_NAMES[size]}_patch{patch}_224" if size in _VIT_NAMES else None
      return dict(kwargs=kwargs, **{'class': 'VisionTransformer', 'name': registered})
    kwargs.update(use_abs_pos_emb=False, use_rel_pos_bias=bool(num_classes),
                  use_shared_rel_pos_bias=not num_classes, init_values=0.1)
    registered = f"beit_{_VIT_NAMES[size]}_patch{patch}_224" if size in ('B', 'L') else None
    return dict(kwargs=kwargs, **{'class': 'Beit', 'name': registered})
  if name in ('swin', 'swinv2'):
    sizes = swin.decode_variant(model['variant'])
    kwargs = dict(common, patch_size=4, embed_dim=sizes['embed_dim'], depths=list(sizes['depths']),
                  num_heads=list(sizes['num_heads']), window_size=model['window_size'])
    size = _SWIN_NAMES.get(model['variant'])
    if name == 'swinv2':
      pretrained = model.get('pretrained_window_sizes') or [0] * len(sizes['depths'])
      kwargs['pretrained_window_sizes'] = list(pretrained)
      registered = f"swinv2_{size}_window{model['window_size']}_{model['image_size']}" if size else None
      return dict(kwargs=kwargs, **{'class': 'SwinTransformerV2', 'name': registered})
    registered = f"swin_{size}_patch4_window{model['window_size']}_{model['image_size']}" if size else None
    return dict(kwargs=kwargs, **{'class': 'SwinTransformer', 'name': registered})
  raise ValueError(f'No timm model for model.name {name!r} (vision encoders only; text has its own layout).')


def build(spec: dict[str, Any], **overrides: Any) -> Any:
  """The timm model of a spec, randomly initialised (needs timm; never downloads)."""
  import timm.models  # pylint: disable=import-outside-toplevel
  return getattr(timm.models, spec['class'])(**{**spec['kwargs'], **overrides})
