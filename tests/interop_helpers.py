"""Shared by the interop tests: tiny models of every family with random params, timm loading, images, masks."""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from flax import traverse_util

from simmim_jax import models
from simmim_jax.interop import timm, torch_io
from simmim_jax.models import classifier

FAMILIES = {
    'vit_plain': dict(name='vit', variant='Mu/4', style='plain'),
    'vit_beit': dict(name='vit', variant='Mu/4', style='beit'),
    'swin': dict(name='swin', variant='Mu', window_size=4),
    'swinv2': dict(name='swinv2', variant='Mu', window_size=4),
}
TOLERANCE = 1e-4  # float32, max abs difference


def model_config(family: str, **overrides) -> dict:
  base = dict(style='beit', image_size=32, in_chans=3, drop_path_rate=0.0, window_size=7, dtype='float32',
              pretrained_window_sizes=None)
  return {**base, **FAMILIES.get(family, {}), **overrides}


def random_like(abstract, seed: int, dtype=np.float32):
  """Random values for every param (norm scales near 1): no init compile, every weight matters."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract, sep='/')
  return traverse_util.unflatten_dict(
      {k: ((1.0 if k.endswith('scale') else 0.0) + 0.2 * rng.standard_normal(v.shape)).astype(dtype)
       for k, v in flat.items()}, sep='/')


def simmim_model(family: str, seed: int = 0, **overrides):
  """(SimMIM module, random params {'encoder', 'decoder'}, config dict)."""
  cfg = model_config(family, **overrides)
  model = models.build_simmim(ml_collections.ConfigDict(cfg))
  size, grid = cfg['image_size'], cfg['image_size'] // model.encoder.patch_size
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, grid, grid)))
  return model, random_like(abstract['params'], seed), cfg


@functools.cache
def _encoder_forward(cfg_json: str):
  """One jitted encoder per config for the whole session: the tests share compilations (Swin's take seconds)."""
  encoder = models.build_encoder(ml_collections.ConfigDict(json.loads(cfg_json)))
  return jax.jit(lambda p, x: encoder.apply({'params': p}, x))


def encoder_features(cfg: dict, encoder_params, images: np.ndarray) -> np.ndarray:
  return np.asarray(_encoder_forward(json.dumps(cfg, sort_keys=True))(encoder_params, images))


def load_timm(spec: dict, state: dict):
  model = timm.build(spec).eval()
  model.load_state_dict({k: torch_io.to_tensor(v) for k, v in state.items()}, strict=True)
  return model


def timm_features(model, images: np.ndarray, vit: bool) -> np.ndarray:
  """forward_features as this package lays them out: (B, h, w, C), ViT's cls token dropped."""
  with torch.no_grad():
    out = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  if vit:
    b, n, c = out.shape
    side = int(np.sqrt(n - 1))
    out = out[:, 1:].reshape(b, side, side, c)
  return out


def images_and_mask(batch: int = 2, size: int = 32, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, size, size, 3)).astype(np.float32),
          (rng.random((batch, size // 4, size // 4)) < 0.6).astype(np.int32))



def assert_bit_exact(got, want):
  got, want = traverse_util.flatten_dict(got, sep='/'), traverse_util.flatten_dict(want, sep='/')
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k



@functools.cache
def _classifier(family: str, num_classes: int):
  config = ml_collections.ConfigDict({'task': 'finetune', 'model': model_config(family)})
  model = classifier.build_classifier(config, num_classes)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  return jax.jit(lambda p, x: model.apply({'params': p}, x)), abstract


def finetune_params(family: str, num_classes: int = 5, seed: int = 5):
  """(the fine-tuning Classifier's jitted forward, random params in its layout {'encoder', 'fc_norm' (ViT), 'head'})."""
  forward, abstract = _classifier(family, num_classes)
  return forward, random_like(abstract, seed)


def classifier_logits(forward, params, images) -> np.ndarray:
  """The fine-tuning forward (mean pooling, fc_norm for ViT, head) of this package's Classifier."""
  return np.asarray(forward(params, images))

