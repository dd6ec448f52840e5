"""Import from PyTorch: official SimMIM checkpoints (random values, official key names and buffers) and timm state
dicts become params whose JAX model computes what timm, reading the same file independently, computes."""
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip('torch')
timm_models = pytest.importorskip('timm.models')

# pylint: disable=g-import-not-at-top
from interop_helpers import (FAMILIES, TOLERANCE, classifier_logits, encoder_features, finetune_params,
                             images_and_mask, model_config, simmim_model, timm_features)
from simmim_jax import params_io
from simmim_jax.interop import timm

class CfgNode(dict):
  """Stands for yacs' CfgNode, which microsoft/SimMIM's save_checkpoint pickles into every .pth."""


def official_state(family: str, finetune: bool, rng: np.random.Generator, num_classes: int = 5) -> dict:
  """A state dict with the official SimMIM / Swin-Transformer key names and shapes (docs/REFERENCE.md section 8;
  SwinV2 as microsoft/Swin-Transformer's swin_transformer_v2.py) for the tiny variants,
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
    c, depths, heads, v2 = 48, (2, 2, 2), (3, 6, 12), family == 'swinv2'
    put('patch_embed.proj.weight', c, 3, 4, 4)
    put('patch_embed.proj.bias', c)
    put('patch_embed.norm.weight', c)
    put('patch_embed.norm.bias', c)
    for s, (depth, h) in enumerate(zip(depths, heads)):
      dim, window = c * 2**s, min(4, 8 // 2**s)
      for j in range(depth):
        b = f'layers.{s}.blocks.{j}.'
        if v2:  # cosine attention: q/v biases, logit scale, continuous position bias MLP (2 -> 512 -> heads)
          attn = [('attn.qkv.weight', (3 * dim, dim)), ('attn.q_bias', (dim,)), ('attn.v_bias', (dim,)),
                  ('attn.logit_scale', (h, 1, 1)), ('attn.cpb_mlp.0.weight', (512, 2)), ('attn.cpb_mlp.0.bias', (512,)),
                  ('attn.cpb_mlp.2.weight', (h, 512))]
          sd[b + 'attn.relative_coords_table'] = rng.standard_normal((1, 2 * window - 1, 2 * window - 1, 2))
        else:
          attn = [('attn.relative_position_bias_table', ((2 * window - 1)**2, h)), ('attn.qkv.weight', (3 * dim, dim)),
                  ('attn.qkv.bias', (3 * dim,))]
        for name, shape in attn + [('norm1.weight', (dim,)), ('norm1.bias', (dim,)), ('norm2.weight', (dim,)),
                                   ('norm2.bias', (dim,)), ('attn.proj.weight', (dim, dim)), ('attn.proj.bias', (dim,)),
                                   ('mlp.fc1.weight', (4 * dim, dim)), ('mlp.fc1.bias', (4 * dim,)),
                                   ('mlp.fc2.weight', (dim, 4 * dim)), ('mlp.fc2.bias', (dim,))]:
          put(b + name, *shape)
        buffer(b + 'attn.relative_position_index', window**2, window**2)
        if s == 0 and j % 2:
          sd[b + 'attn_mask'] = -100.0 * rng.integers(0, 2, (4, 16, 16)).astype(np.float32)
      if s < len(depths) - 1:
        put(f'layers.{s}.downsample.reduction.weight', 2 * dim, 4 * dim)
        put(f'layers.{s}.downsample.norm.weight', (2 if v2 else 4) * dim)  # V2 normalises after the reduction
        put(f'layers.{s}.downsample.norm.bias', (2 if v2 else 4) * dim)
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
  reader = {'vit_beit': timm_models.beit, 'swin': timm_models.swin_transformer,
            'swinv2': timm_models.swin_transformer_v2}[family]
  sd = {k.removeprefix('encoder.'): torch.from_numpy(v) for k, v in sd.items()
        if not k.startswith('decoder.') and k != 'encoder.mask_token'}
  model = timm.build(spec).eval()
  model.load_state_dict(reader.checkpoint_filter_fn(sd, model), strict=True)
  return model


@pytest.mark.parametrize('family', ['vit_beit', 'swin', 'swinv2'])
@pytest.mark.parametrize('finetune', [False, True])
def test_official_checkpoint_imports_to_the_same_model(family, finetune, tmp_path):
  sd = official_state(family, finetune, np.random.default_rng(7))
  path = str(tmp_path / 'simmim.pth')
  config = CfgNode(MODEL=CfgNode(TYPE=family), AMP_OPT_LEVEL='O1')  # pickled beside the weights, as officially
  torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}, 'epoch': 99, 'config': config}, path)
  params = params_io.load_params(path)
  images, _ = images_and_mask(seed=8)
  cfg = model_config(family)
  if finetune:
    model, expected = finetune_params(family)
    ours = classifier_logits(model, params, images)
  else:
    model, expected, _ = simmim_model(family)
    ours = encoder_features(cfg, params['encoder'], images)
    np.testing.assert_array_equal(params['decoder']['conv']['kernel'], sd['decoder.0.weight'].transpose(2, 3, 1, 0))
  # Exactly the params the JAX model has, in its shapes: nothing missing, no buffer taken for a param.
  assert {k: v.shape for k, v in traverse_util.flatten_dict(params, sep='/').items()} == \
      {k: v.shape for k, v in traverse_util.flatten_dict(expected, sep='/').items()}
  reference = timm_reads_official(family, sd, timm.timm_spec(cfg, params))
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    theirs = reference(x).numpy() if finetune else timm_features(reference, images, vit=family == 'vit_beit')
  diff = float(np.abs(theirs - ours).max())
  print(f'official {family} {"fine-tuned" if finetune else "pretrained"} import: max abs diff {diff:.2e}')
  assert diff <= TOLERANCE



@pytest.mark.parametrize('family', list(FAMILIES))
def test_timm_state_dict_imports_to_the_same_model(family, tmp_path):
  """A state dict made by timm itself (buffers and all, random weights), saved as a .pth, read back by load_params."""
  cfg = model_config(family)
  torch.manual_seed(11)  # timm's own init, then noise so zero-initialised tables and biases matter too
  reference = timm.build(timm.timm_spec(cfg)).eval()
  with torch.no_grad():
    for p in reference.parameters():
      p.add_(0.2 * torch.randn(p.shape))
  path = str(tmp_path / 'timm.pth')
  torch.save(reference.state_dict(), path)
  params = params_io.load_params(path)
  _, expected, _ = simmim_model(family)
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(expected['encoder'], sep='/').items()
              if k != 'mask_token'}
  assert {k: v.shape for k, v in traverse_util.flatten_dict(params['encoder'], sep='/').items()} == expected
  images, _ = images_and_mask(seed=12)
  diff = np.abs(timm_features(reference, images, vit=family.startswith('vit'))
                - encoder_features(cfg, params['encoder'], images)).max()
  print(f'timm {family} state dict import: max abs diff {diff:.2e}')
  assert diff <= TOLERANCE


def test_fine_tuning_starts_from_an_official_pretrained_checkpoint(tmp_path):
  """Released SimMIM ViT weights -> load_params -> pretrained.adapt_encoder -> the fine-tuning Classifier."""
  from simmim_jax import pretrained  # pylint: disable=import-outside-toplevel
  sd = official_state('vit_beit', False, np.random.default_rng(13))
  path = str(tmp_path / 'simmim_pretrain.pth')
  torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  model, fresh = finetune_params('vit_beit', num_classes=10)
  encoder, report = pretrained.adapt_encoder(params_io.load_params(path), fresh['encoder'])
  shared = sd['encoder.rel_pos_bias.relative_position_bias_table']
  assert len(report['copied']) == 6 and 'rel_pos_bias/relative_position_bias_table' in report['dropped']
  for i in range(6):  # the shared table copied into every block, as the official fine-tuning loader does
    np.testing.assert_array_equal(encoder[f'blocks_{i}']['attn']['relative_position_bias_table'], shared)
  np.testing.assert_array_equal(encoder['blocks_5']['mlp']['fc2']['kernel'], sd['encoder.blocks.5.mlp.fc2.weight'].T)
  logits = classifier_logits(model, {**fresh, 'encoder': encoder}, images_and_mask(seed=14)[0])
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
