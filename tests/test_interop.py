"""Weights to PyTorch and back: timm gives this package's features, the SimMIM loss agrees in PyTorch, round trips
are bit-exact, full-size names and shapes match timm, timm's folder format loads with timm.create_model('local-dir:')
and gives the JAX outputs, and the command-line tools work on a checkpoint.

All on CPU with random weights (no hub downloads); tiny variants keep it fast, full sizes are checked by shapes.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm_models = pytest.importorskip('timm.models')
F = torch.nn.functional

# pylint: disable=g-import-not-at-top
from interop_helpers import (FAMILIES, TOLERANCE, assert_bit_exact, classifier_logits, encoder_features,
                             finetune_params, images_and_mask, load_timm, model_config, simmim_model, timm_features)
from simmim_jax import losses, masking, models, params_io
from simmim_jax.interop import layout, official, timm


@pytest.mark.parametrize('family', list(FAMILIES))
def test_timm_gives_the_same_features(family):
  _, params, cfg = simmim_model(family)
  images, _ = images_and_mask()
  ours = encoder_features(cfg, params['encoder'], images)
  state, extras = timm.to_timm(params)
  spec = timm.timm_spec(cfg, params)
  assert spec['class'] == timm.CLASSES[family] and set(extras) == {'mask_token', 'decoder.0.weight', 'decoder.0.bias'}
  theirs = timm_features(load_timm(spec, state), images, vit=family.startswith('vit'))
  diff = float(np.abs(theirs - ours).max())
  print(f'{family}: timm.models.{spec["class"]} max abs diff {diff:.2e} (features std {ours.std():.2f})')
  assert diff <= TOLERANCE


def torch_simmim_loss(family: str, model, extras: dict, images: np.ndarray, mask: np.ndarray, stride: int) -> float:
  """SimMIM's forward in PyTorch around a timm encoder (timm has no mask token, so the blend is done here, where
  the official code does it: ViT after the patch embedding, before cls; Swin after the embedding's norm)."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  w = torch.from_numpy(mask).float()
  token = torch.from_numpy(extras['mask_token'])
  with torch.no_grad():
    t = model.patch_embed(x)
    if family.startswith('vit'):
      wf = w.flatten(1)[..., None]
      t = t * (1 - wf) + token * wf
      if family == 'vit_beit':
        t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        shared = model.rel_pos_bias()
        for block in model.blocks:
          t = block(t, shared_rel_pos_bias=shared)
      else:
        t = model.blocks(model._pos_embed(t))  # pylint: disable=protected-access
      t = model.norm(t)[:, 1:]
      side = mask.shape[1]
      features = t.reshape(t.shape[0], side, side, -1)
    else:
      t = t * (1 - w[..., None]) + token * w[..., None]
      features = model.norm(model.layers(t))
    conv = F.conv2d(features.permute(0, 3, 1, 2), torch.from_numpy(extras['decoder.0.weight']),
                    torch.from_numpy(extras['decoder.0.bias']))
    reconstruction = F.pixel_shuffle(conv, stride)
    pixel_mask = w.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    return float(((x - reconstruction).abs() * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / x.shape[1])


@pytest.mark.parametrize('family', list(FAMILIES))
def test_simmim_loss_in_pytorch_equals_jax(family):
  model, params, cfg = simmim_model(family, seed=2)
  images, mask = images_and_mask(seed=3)
  reconstruction = jax.jit(lambda p, x, m: model.apply({'params': p}, x, m))(params, images, mask)
  ours = float(losses.masked_l1(reconstruction, images, masking.upsample(jnp.asarray(mask), 4)))
  state, extras = timm.to_timm(params)
  tm = load_timm(timm.timm_spec(cfg, params), state)
  theirs = torch_simmim_loss(family, tm, extras, images, mask, stride=model.encoder.stride)
  print(f'{family}: SimMIM loss JAX {ours:.6f} PyTorch {theirs:.6f}')
  assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(ours))



@pytest.mark.parametrize('family', list(FAMILIES))
@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_round_trip_through_files_is_bit_exact(family, dtype, tmp_path):
  _, params, cfg = simmim_model(family, seed=4)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  npz = str(tmp_path / 'model.npz')
  params_io.save_npz(npz, params, {'model': cfg})
  out = str(tmp_path / 'model.safetensors')
  from tools import convert_to_torch  # pylint: disable=import-outside-toplevel
  convert_to_torch.main(['--params', npz, '--out', out])
  assert_bit_exact(params_io.load_params(out), params)  # timm file + its .simmim sidecar
  if family != 'vit_plain':
    official_out = str(tmp_path / 'official.safetensors')
    convert_to_torch.main(['--params', npz, '--out', official_out, '--layout', 'official'])
    assert_bit_exact(params_io.load_params(official_out), params)
  else:
    with pytest.raises(ValueError, match='plain ViT'):
      official.to_official(params)



@pytest.mark.parametrize('family', list(FAMILIES))
@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_timm_folder_loads_in_timm_and_round_trips(family, dtype, tmp_path):
  """convert_to_torch --out FOLDER: timm.create_model('local-dir:FOLDER', pretrained=True) builds the model from
  config.json alone and gives the JAX encoder's features; load_params reads the folder back bit-exactly."""
  from tools import convert_to_torch  # pylint: disable=import-outside-toplevel
  _, params, cfg = simmim_model(family, seed=11)
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  npz, folder = str(tmp_path / 'model.npz'), tmp_path / 'timm'
  params_io.save_npz(npz, params, {'model': cfg})
  convert_to_torch.main(['--params', npz, '--out', str(folder)])
  assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors', 'simmim.safetensors']
  hf_config = json.load(open(folder / 'config.json'))
  assert hf_config['model_args']['embed_dim'] == (128 if family.startswith('vit') else 48)
  assert hf_config['pretrained_cfg']['mean'] == [0.485, 0.456, 0.406] and 'license' not in hf_config['pretrained_cfg']
  model = timm_models.create_model(f'local-dir:{folder}', pretrained=True).eval()
  assert type(model).__name__ == timm.CLASSES[family]
  assert params_io.is_timm_folder(str(folder)) and params_io.load_config(str(folder)) is None
  assert_bit_exact(params_io.load_params(str(folder)), params)  # mask token and decoder from simmim.safetensors
  if dtype == np.float32:
    images, _ = images_and_mask(seed=12)
    ours = encoder_features(cfg, params['encoder'], images)
    diff = float(np.abs(timm_features(model, images, vit=family.startswith('vit')) - ours).max())
    print(f'{family}: local-dir timm folder max abs diff {diff:.2e}')
    assert diff <= TOLERANCE
  else:  # stored as bfloat16, as exported (timm's model itself is float32: the values are exact)
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    assert {v.dtype for v in load_file(str(folder / 'model.safetensors')).values()} == {torch.bfloat16}


def test_finetuned_timm_folder_gives_the_classifier_logits(tmp_path):
  from tools import convert_to_torch  # pylint: disable=import-outside-toplevel
  forward, params = finetune_params('swin')
  npz, folder = str(tmp_path / 'ft.npz'), str(tmp_path / 'ft_timm')
  params_io.save_npz(npz, params, {'model': model_config('swin'), 'task': 'finetune'})
  convert_to_torch.main(['--params', npz, '--out', folder])
  model = timm_models.create_model(f'local-dir:{folder}', pretrained=True).eval()
  assert model.num_classes == 5 and not os.path.exists(os.path.join(folder, 'simmim.safetensors'))
  images, _ = images_and_mask(seed=13)
  with torch.no_grad():
    theirs = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(theirs, classifier_logits(forward, params, images), atol=TOLERANCE, rtol=0)


def test_convert_refuses_what_has_no_folder_form(tmp_path):
  from tools import convert_to_torch  # pylint: disable=import-outside-toplevel
  _, params, cfg = simmim_model('vit_beit')
  npz = str(tmp_path / 'model.npz')
  params_io.save_npz(npz, params, {'model': cfg})
  with pytest.raises(SystemExit):
    convert_to_torch.main(['--params', npz, '--out', str(tmp_path / 'official'), '--layout', 'official'])


@pytest.mark.parametrize('family', list(FAMILIES))
def test_finetuned_classifier_matches_timm(family):
  model, params = finetune_params(family)
  images, _ = images_and_mask(seed=6)
  ours = classifier_logits(model, params, images)
  state, extras = timm.to_timm(params)
  spec = timm.timm_spec(model_config(family), params)
  assert not extras and spec['kwargs']['num_classes'] == 5 and spec['kwargs']['global_pool'] == 'avg'
  with torch.no_grad():
    theirs = load_timm(spec, state)(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  print(f'{family} fine-tuned: logits max abs diff {np.abs(theirs - ours).max():.2e}')
  np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)
  assert_bit_exact(timm.from_timm(state), params)
  if family != 'vit_plain':
    assert_bit_exact(official.from_official(official.to_official(params)), params)



FULL_SIZE = {
    'vit_plain': dict(variant='B/16', image_size=224),
    'vit_beit': dict(variant='B/16', image_size=224),
    'swin': dict(variant='B', image_size=192, window_size=6),
    'swinv2': dict(variant='B', image_size=192, window_size=12),
}


def zeros_like(abstract):
  """Shape-only stand-ins (no memory): enough to check names and layouts of full-size models."""
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), abstract)


@pytest.mark.parametrize('family', list(FULL_SIZE))
def test_full_size_names_and_shapes_match_timm(family):
  cfg = model_config(family, **FULL_SIZE[family])
  model = models.build_simmim(ml_collections.ConfigDict(cfg))
  size, grid = cfg['image_size'], cfg['image_size'] // model.encoder.patch_size
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, grid, grid)))
  layouts = [zeros_like(abstract['params'])]
  if family.startswith('vit'):  # the fine-tuning layout too: per-block tables, fc_norm, a 1000-way head
    encoder = model.encoder.clone(final_norm=False, rel_pos='per_block' if family == 'vit_beit' else 'shared')
    enc = jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
    layouts.append(zeros_like({'encoder': enc, 'fc_norm': {'scale': jax.ShapeDtypeStruct((768,), jnp.float32),
                                                             'bias': jax.ShapeDtypeStruct((768,), jnp.float32)},
                               'head': {'kernel': jax.ShapeDtypeStruct((768, 1000), jnp.float32),
                                        'bias': jax.ShapeDtypeStruct((1000,), jnp.float32)}}))
  for params in layouts:
    state, _ = timm.to_timm(params)
    spec = timm.timm_spec(cfg, params)
    with torch.device('meta'):
      reference = timm.build(spec)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items() if k.split('.')[-1] not in layout.BUFFERS}
    assert {k: v.shape for k, v in state.items()} == want
  assert spec['name'] in timm_models.list_models() or spec['name'] is None
  print(f'{family} full size: {len(want)} tensors match timm.models.{spec["class"]} ({spec["name"]})')


def test_command_line_tools_on_a_checkpoint(tmp_path):
  """export_params -> convert_to_torch -> the README's three lines give the JAX encoder's features."""
  from simmim_jax import checkpoint, config_io  # pylint: disable=import-outside-toplevel
  from tools import convert_to_torch, export_params  # pylint: disable=import-outside-toplevel
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  config = config_io.load_config('configs/base.py', {'model.style': 'beit'})  # the official ViT, as the test model
  _, params, cfg = simmim_model('vit_beit', seed=9)
  assert {k: config.model[k] for k in ('name', 'variant', 'style', 'image_size')} == \
      {k: cfg[k] for k in ('name', 'variant', 'style', 'image_size')}
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), config.checkpoint)
  ckpt.save(7, {'step': np.int32(7), 'params': params, 'opt_state': {}},
            {'step': 7, 'config': checkpoint.config_dict(config)})
  ckpt.wait()
  ckpt.close()
  npz, out = str(tmp_path / 'enc.npz'), str(tmp_path / 'enc.safetensors')
  export_params.main(['--checkpoint', str(tmp_path / 'run'), '--out', npz, '--encoder_only'])
  # The README's way: the workdir -> timm's folder format -> timm.create_model('local-dir:...').
  convert_to_torch.main(['--params', str(tmp_path / 'run'), '--out', str(tmp_path / 'run' / 'timm')])
  model = timm_models.create_model(f'local-dir:{tmp_path / "run" / "timm"}', pretrained=True).eval()
  images, _ = images_and_mask(seed=10)
  diff = np.abs(timm_features(model, images, vit=True) - encoder_features(cfg, params['encoder'], images)).max()
  assert diff <= TOLERANCE
  convert_to_torch.main(['--params', npz, '--out', out])
  spec = json.load(open(str(tmp_path / 'enc.timm.json')))
  model = getattr(timm_models, spec['class'])(**spec['kwargs']).eval()
  model.load_state_dict(load_file(out))
  diff = np.abs(timm_features(model, images, vit=True) - encoder_features(cfg, params['encoder'], images)).max()
  assert diff <= TOLERANCE
  assert os.path.isfile(str(tmp_path / 'enc.simmim.safetensors'))  # the mask token travels beside it
