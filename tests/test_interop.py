"""Weights to PyTorch and back: timm gives this package's features, the SimMIM loss agrees in PyTorch, round trips
are bit-exact, and official-layout checkpoints import to the model timm (an independent reader) sees in them.

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

from simmim_jax import losses, masking, models, params_io  # pylint: disable=g-import-not-at-top
from simmim_jax.interop import layout, official, timm, torch_io

FAMILIES = {
    'vit_plain': dict(name='vit', variant='Mu/4', style='plain'),
    'vit_beit': dict(name='vit', variant='Mu/4', style='beit'),
    'swin': dict(name='swin', variant='Mu', window_size=4),
    'swinv2': dict(name='swinv2', variant='Mu', window_size=4),
}
TOLERANCE = 1e-4  # float32, max abs difference
MEASURED = {}  # family -> max abs difference, printed at the end (pytest -s) for the record


def model_config(family: str, **overrides) -> dict:
  base = dict(style='beit', image_size=32, in_chans=3, drop_path_rate=0.0, window_size=7, dtype='float32',
              pretrained_window_sizes=None)
  return {**base, **FAMILIES.get(family, {}), **overrides}


def random_like(abstract, seed: int, dtype=np.float32):
  """Random values for every param (norm scales near 1): no init compile, every weight matters."""
  rng = np.random.default_rng(seed)
  flat = params_io.flatten(abstract)
  return params_io.unflatten({k: ((1.0 if k.endswith('scale') else 0.0) + 0.2 * rng.standard_normal(v.shape)).astype(dtype)
                              for k, v in flat.items()})


def simmim_model(family: str, seed: int = 0, **overrides):
  """(SimMIM module, random params {'encoder', 'decoder'}, config dict)."""
  cfg = model_config(family, **overrides)
  model = models.build_simmim(ml_collections.ConfigDict(cfg))
  size, grid = cfg['image_size'], cfg['image_size'] // model.encoder.patch_size
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, grid, grid)))
  return model, random_like(abstract['params'], seed), cfg


def encoder_features(cfg: dict, encoder_params, images: np.ndarray) -> np.ndarray:
  encoder = models.build_encoder(ml_collections.ConfigDict(cfg))
  return np.asarray(jax.jit(lambda p, x: encoder.apply({'params': p}, x))(encoder_params, images))


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
  MEASURED[family] = diff
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


def assert_bit_exact(got, want):
  got, want = params_io.flatten(got), params_io.flatten(want)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k


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


def finetune_params(family: str, num_classes: int = 5, seed: int = 5):
  """(encoder config, random classifier params) in the fine-tuning layout {'encoder', 'fc_norm' (ViT), 'head'}."""
  cfg = model_config(family)
  encoder = models.build_encoder(ml_collections.ConfigDict(cfg))
  vit = family.startswith('vit')
  if vit:
    encoder = encoder.clone(final_norm=False, rel_pos='per_block' if family == 'vit_beit' else 'shared')
  abstract = {'encoder': jax.eval_shape(encoder.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']}
  width = 128 if vit else 192
  abstract['head'] = {'kernel': jax.ShapeDtypeStruct((width, num_classes), jnp.float32),
                      'bias': jax.ShapeDtypeStruct((num_classes,), jnp.float32)}
  if vit:
    abstract['fc_norm'] = {'scale': jax.ShapeDtypeStruct((width,), jnp.float32),
                           'bias': jax.ShapeDtypeStruct((width,), jnp.float32)}
  return encoder, random_like(abstract, seed)


def classifier_logits(encoder, params, images) -> np.ndarray:
  """The fine-tuning forward: mean pool the patch features, fc_norm (ViT, eps 1e-6), linear head."""

  def forward(params, images):
    x = encoder.apply({'params': params['encoder']}, images).mean(axis=(1, 2))
    if 'fc_norm' in params:
      x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
      x = x * params['fc_norm']['scale'] + params['fc_norm']['bias']
    return x @ params['head']['kernel'] + params['head']['bias']

  return np.asarray(jax.jit(forward)(params, images))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_finetuned_classifier_matches_timm(family):
  encoder, params = finetune_params(family)
  images, _ = images_and_mask(seed=6)
  ours = classifier_logits(encoder, params, images)
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


def official_state(family: str, finetune: bool, rng: np.random.Generator, num_classes: int = 5) -> dict:
  """A state dict with the official SimMIM key names and shapes (reference section 8) for the tiny variants,
  random values, buffers included (filled with junk: an importer must ignore them)."""
  sd = {}

  def put(name, *shape):
    sd[name] = (0.2 * rng.standard_normal(shape) + (1.0 if name.endswith('norm.weight') or '.norm1.w' in name
                                                    or '.norm2.w' in name else 0.0)).astype(np.float32)

  def buffer(name, *shape):
    sd[name] = rng.integers(0, 7, shape).astype(np.int64)

  if family == 'vit_beit':
    c, depth, heads, mlp, grid = 128, 6, 4, 512, 8
    rows, n = (2 * grid - 1)**2 + 3, grid * grid + 1
    put('cls_token', 1, 1, c)
    put('patch_embed.proj.weight', c, 3, 4, 4)
    put('patch_embed.proj.bias', c)
    for i in range(depth):
      b = f'blocks.{i}.'
      for name, shape in [('gamma_1', (c,)), ('gamma_2', (c,)), ('norm1.weight', (c,)), ('norm1.bias', (c,)),
                          ('norm2.weight', (c,)), ('norm2.bias', (c,)), ('attn.qkv.weight', (3 * c, c)),
                          ('attn.q_bias', (c,)), ('attn.v_bias', (c,)), ('attn.proj.weight', (c, c)),
                          ('attn.proj.bias', (c,)), ('mlp.fc1.weight', (mlp, c)), ('mlp.fc1.bias', (mlp,)),
                          ('mlp.fc2.weight', (c, mlp)), ('mlp.fc2.bias', (c,))]:
        put(b + name, *shape)
      if finetune:
        put(b + 'attn.relative_position_bias_table', rows, heads)
        buffer(b + 'attn.relative_position_index', n, n)
    if finetune:
      put('fc_norm.weight', c)
      put('fc_norm.bias', c)
    else:
      put('mask_token', 1, 1, c)
      put('rel_pos_bias.relative_position_bias_table', rows, heads)
      buffer('rel_pos_bias.relative_position_index', n, n)
      put('norm.weight', c)
      put('norm.bias', c)
    stride = 4
  else:  # swin 'Mu' at 32 px, window 4: stages of 8, 4, 2 tokens; only stage 0 shifts
    c, depths, heads = 48, (2, 2, 2), (3, 6, 12)
    put('patch_embed.proj.weight', c, 3, 4, 4)
    put('patch_embed.proj.bias', c)
    put('patch_embed.norm.weight', c)
    put('patch_embed.norm.bias', c)
    for s, (depth, h) in enumerate(zip(depths, heads)):
      dim, window = c * 2**s, min(4, 8 // 2**s)
      for j in range(depth):
        b = f'layers.{s}.blocks.{j}.'
        for name, shape in [('norm1.weight', (dim,)), ('norm1.bias', (dim,)), ('norm2.weight', (dim,)),
                            ('norm2.bias', (dim,)), ('attn.relative_position_bias_table', ((2 * window - 1)**2, h)),
                            ('attn.qkv.weight', (3 * dim, dim)), ('attn.qkv.bias', (3 * dim,)),
                            ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
                            ('mlp.fc1.weight', (4 * dim, dim)), ('mlp.fc1.bias', (4 * dim,)),
                            ('mlp.fc2.weight', (dim, 4 * dim)), ('mlp.fc2.bias', (dim,))]:
          put(b + name, *shape)
        buffer(b + 'attn.relative_position_index', window**2, window**2)
        if s == 0 and j % 2:
          sd[b + 'attn_mask'] = -100.0 * rng.integers(0, 2, (4, 16, 16)).astype(np.float32)
      if s < len(depths) - 1:
        put(f'layers.{s}.downsample.reduction.weight', 2 * dim, 4 * dim)
        put(f'layers.{s}.downsample.norm.weight', 4 * dim)
        put(f'layers.{s}.downsample.norm.bias', 4 * dim)
    put('norm.weight', 4 * c)
    put('norm.bias', 4 * c)
    if not finetune:
      put('mask_token', 1, 1, c)
    c, stride = 4 * c, 16
  if finetune:
    put('head.weight', num_classes, c)
    put('head.bias', num_classes)
    return sd
  sd = {'encoder.' + k: v for k, v in sd.items()}
  put('decoder.0.weight', stride * stride * 3, c, 1, 1)
  put('decoder.0.bias', stride * stride * 3)
  return sd


def timm_reads_official(family: str, sd: dict, spec: dict):
  """The timm model loaded by timm's own converter for official checkpoints: an independent reading."""
  reader = timm_models.beit if family == 'vit_beit' else timm_models.swin_transformer
  sd = {k.removeprefix('encoder.'): torch.from_numpy(v) for k, v in sd.items()
        if not k.startswith('decoder.') and k != 'encoder.mask_token'}
  model = timm.build(spec).eval()
  model.load_state_dict(reader.checkpoint_filter_fn(sd, model), strict=True)
  return model


@pytest.mark.parametrize('family', ['vit_beit', 'swin'])
@pytest.mark.parametrize('finetune', [False, True])
def test_official_checkpoint_imports_to_the_same_model(family, finetune, tmp_path):
  sd = official_state(family, finetune, np.random.default_rng(7))
  path = str(tmp_path / 'simmim.pth')
  torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}, 'epoch': 99}, path)
  params = params_io.load_params(path)
  images, _ = images_and_mask(seed=8)
  cfg = model_config(family)
  if finetune:
    encoder, expected = finetune_params(family)
    ours = classifier_logits(encoder, params, images)
  else:
    model, expected, _ = simmim_model(family)
    ours = encoder_features(cfg, params['encoder'], images)
    np.testing.assert_array_equal(params['decoder']['conv']['kernel'], sd['decoder.0.weight'].transpose(2, 3, 1, 0))
  # Exactly the params the JAX model has, in its shapes: nothing missing, no buffer taken for a param.
  assert {k: v.shape for k, v in params_io.flatten(params).items()} == \
      {k: v.shape for k, v in params_io.flatten(expected).items()}
  reference = timm_reads_official(family, sd, timm.timm_spec(cfg, params))
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    theirs = reference(x).numpy() if finetune else timm_features(reference, images, vit=family == 'vit_beit')
  diff = float(np.abs(theirs - ours).max())
  print(f'official {family} {"fine-tuned" if finetune else "pretrained"} import: max abs diff {diff:.2e}')
  assert diff <= TOLERANCE


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
  config = config_io.load_config('configs/base.py')
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
  convert_to_torch.main(['--params', npz, '--out', out])
  spec = json.load(open(str(tmp_path / 'enc.timm.json')))
  model = getattr(timm_models, spec['class'])(**spec['kwargs']).eval()
  model.load_state_dict(load_file(out))
  images, _ = images_and_mask(seed=10)
  diff = np.abs(timm_features(model, images, vit=True) - encoder_features(cfg, params['encoder'], images)).max()
  assert diff <= TOLERANCE
  assert os.path.isfile(str(tmp_path / 'enc.simmim.safetensors'))  # the mask token travels beside it
