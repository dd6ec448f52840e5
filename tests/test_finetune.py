"""Fine-tuning parts against the reference: layer-decay tables, per-group LR, relative-table resizing,
loading a pretrained encoder, and evaluation counts that do not depend on the device count."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from simmim_jax import config_io, defaults, finetune_step, optim, pretrained, sharding
from simmim_jax.models import build_simmim
from simmim_jax.models.classifier import build_classifier


def classifier_config(name: str, variant: str, image_size: int, window: int = 7, task: str = 'finetune'):
  c = defaults.finetune_config()
  c.task = task
  c.model.name, c.model.variant, c.model.image_size, c.model.window_size = name, variant, image_size, window
  return c


def official_vit_layer(name: str, num_layers: int) -> int:
  """get_vit_layer of the official optimizer.py, on a PyTorch parameter name."""
  if name in ('cls_token', 'mask_token', 'pos_embed'):
    return 0
  if name.startswith('patch_embed'):
    return 0
  if name.startswith('rel_pos_bias'):
    return num_layers - 1
  if name.startswith('blocks'):
    return int(name.split('.')[1]) + 1
  return num_layers - 1


def official_swin_layer(name: str, num_layers: int, depths) -> int:
  """get_swin_layer of the official optimizer.py, on a PyTorch parameter name."""
  if name in ('mask_token',):
    return 0
  if name.startswith('patch_embed'):
    return 0
  if name.startswith('layers'):
    layer_id = int(name.split('.')[1])
    block_id = name.split('.')[3]
    if block_id in ('reduction', 'norm'):
      return sum(depths[:layer_id + 1])
    return sum(depths[:layer_id]) + int(block_id) + 1
  return num_layers - 1


def torch_name(path) -> str:
  """Flax path -> the PyTorch name: blocks_3 -> blocks.3, kernel/scale -> weight, encoder prefix dropped."""
  names = [str(getattr(k, 'key', k)) for k in path]
  names = names[1:] if names[0] == 'encoder' else names
  name = '.'.join(re.sub(r'^(blocks|layers)_(\d+)$', r'\1.\2', n) for n in names)
  return re.sub(r'\.(kernel|scale)$', '.weight', name)


@pytest.mark.parametrize('name,variant,size,decay', [('vit', 'B/16', 224, 0.65), ('swin', 'B', 224, 0.9)])
def test_layer_decay_table_equals_the_reference(name, variant, size, decay):
  config = classifier_config(name, variant, size)
  model = build_classifier(config, num_classes=1000)
  params = finetune_step.abstract_params(model, config)
  scales = optim.layer_decay_scales(params, model.encoder, decay)
  if name == 'vit':
    num_layers = model.encoder.depth + 2
    expected = lambda n: decay**(num_layers - 1 - official_vit_layer(n, num_layers))
  else:
    depths = model.encoder.depths
    num_layers = sum(depths) + 2
    expected = lambda n: decay**(num_layers - 1 - official_swin_layer(n, num_layers, depths))
  flat = jax.tree_util.tree_flatten_with_path(scales)[0]
  assert len(flat) > 100
  for path, scale in flat:
    assert scale == pytest.approx(expected(torch_name(path)), rel=1e-12), torch_name(path)
  values = sorted({round(s, 12) for _, s in flat})
  assert len(values) == num_layers  # every group 0 .. N + 1 is present
  assert values[0] == pytest.approx(decay**(num_layers - 1)) and values[-1] == 1.0


def test_groups_share_warmup_start_and_floor_and_scale_only_the_peak():
  config = classifier_config('vit', 'B/16', 224)
  config.optim.warmup_steps, config.optim.warmup_epochs, config.optim.lr_lag = 10, None, 0  # f itself
  schedule = optim.lr_schedule(config.optim, total_steps=100, steps_per_epoch=10, batch_size=512)
  base, warmup_lr, min_lr = config.optim.base_lr, config.optim.warmup_lr, config.optim.min_lr
  for s in (1.0, 0.65**13):
    assert float(schedule(0, s)) == pytest.approx(warmup_lr, rel=1e-5)
    assert float(schedule(10, s)) == pytest.approx(min_lr + 0.5 * (base * s - min_lr) * (1 + math.cos(math.pi * 0.1)),
                                                   rel=1e-5)
    assert float(schedule(100, s)) == pytest.approx(min_lr, rel=1e-5)


def test_relative_table_resize_is_exact_when_unchanged_and_accurate_on_a_smooth_table():
  """The 'bicubic' resize (Swin-Transformer's loader); SimMIM's default one: tests/test_official_recipe.py."""
  table = np.random.default_rng(0).standard_normal((11 * 11 + 3, 4)).astype(np.float32)
  assert pretrained.resize_relative_table(table, 124, extra=3) is table
  f = lambda y, x: np.cos(y / 4.0) + np.sin(x / 5.0) + 0.02 * x * y
  src, dst = 11, 13
  ys, xs = np.meshgrid(np.arange(src), np.arange(src), indexing='ij')
  smooth = np.stack([f(ys, xs), 2 * f(xs, ys)], axis=-1).reshape(-1, 2)
  resized = pretrained.resize_relative_table(smooth, dst * dst, extra=0, method='bicubic').reshape(dst, dst, 2)
  coord = (np.arange(dst) + 0.5) * src / dst - 0.5  # where each output sample sits on the input grid
  cy, cx = np.meshgrid(coord, coord, indexing='ij')
  truth = np.stack([f(cy, cx), 2 * f(cx, cy)], axis=-1)
  # Within 1 % of the table's range (PyTorch's A = -0.75 kernel does not reproduce linear ramps exactly, so
  # the error follows the slope rather than shrinking with smoothness); the border taps are clamped.
  inner = slice(2, -2)
  np.testing.assert_allclose(resized[inner, inner], truth[inner, inner], atol=0.01 * np.ptp(truth))
  assert np.abs(resized - truth).max() < 0.02 * np.ptp(truth)
  kept = pretrained.resize_relative_table(np.concatenate([smooth, np.ones((3, 2))]), dst * dst + 3, extra=3,
                                          method='bicubic')
  np.testing.assert_array_equal(kept[-3:], np.ones((3, 2)))


def test_resize_equals_torch_bicubic():
  torch = pytest.importorskip('torch')
  table = np.random.default_rng(1).standard_normal((11 * 11, 3)).astype(np.float32)
  ours = pretrained.resize_relative_table(table, 13 * 13, extra=0, method='bicubic')
  theirs = torch.nn.functional.interpolate(torch.from_numpy(table).T.reshape(1, 3, 11, 11), size=(13, 13),
                                           mode='bicubic', align_corners=False)
  np.testing.assert_allclose(ours, theirs.reshape(3, -1).T.numpy(), atol=1e-5)


def pretrained_params(name, variant, size, window=7):
  config = config_io.load_config('configs/base.py', {'model.name': name, 'model.variant': variant, 'model.style': 'beit',
                                                     'model.image_size': size, 'model.window_size': window})
  model = build_simmim(config.model)
  grid = size // model.encoder.patch_size
  return jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, size, size, 3)), jnp.zeros((1, grid, grid), jnp.int32))['params']


def test_vit_encoder_loads_with_the_shared_table_copied_into_every_block():
  source = jax.device_get(pretrained_params('vit', 'Mu/4', 32))
  source['encoder']['rel_pos_bias']['relative_position_bias_table'] = np.random.default_rng(0).standard_normal(
      source['encoder']['rel_pos_bias']['relative_position_bias_table'].shape).astype(np.float32)
  config = classifier_config('vit', 'Mu/4', 32)
  target = finetune_step.abstract_params(build_classifier(config, 10), config)['encoder']
  encoder, report = pretrained.adapt_encoder(source, target)
  shared = source['encoder']['rel_pos_bias']['relative_position_bias_table']
  for i in range(6):
    np.testing.assert_array_equal(encoder[f'blocks_{i}']['attn']['relative_position_bias_table'], shared)
  np.testing.assert_array_equal(encoder['blocks_3']['mlp']['fc1']['kernel'], source['encoder']['blocks_3']['mlp']['fc1']['kernel'])
  assert len(report['copied']) == 6
  assert {'mask_token', 'norm/scale', 'rel_pos_bias/relative_position_bias_table'} <= set(report['dropped'])
  assert not any(k.startswith('decoder') for k in traverse_util.flatten_dict(encoder, sep='/'))
  probe = classifier_config('vit', 'Mu/4', 32, task='linear_probe')
  probe.probe.block = 4
  target = finetune_step.abstract_params(build_classifier(probe, 10), probe)['encoder']
  _, report = pretrained.adapt_encoder(source, target)
  assert 'blocks_5/mlp/fc1/kernel' in report['dropped'] and 'blocks_3/mlp/fc1/kernel' not in report['dropped']


def test_swin_window_change_resizes_every_table_and_a_wrong_model_fails():
  source = jax.device_get(pretrained_params('swin', 'Mu', 48, window=3))
  config = classifier_config('swin', 'Mu', 48, window=6)  # 12x12 tokens: windows 3 -> 6 in stages 0-1
  target = finetune_step.abstract_params(build_classifier(config, 10), config)['encoder']
  encoder, report = pretrained.adapt_encoder(source, target)
  assert len(report['resized']) == 4  # stage 2 (3x3 tokens) keeps its 3x3 window
  assert encoder['layers_0']['blocks_1']['attn']['relative_position_bias_table'].shape[0] == 11 * 11
  with pytest.raises(ValueError, match='different model'):
    pretrained.adapt_encoder(source, finetune_step.abstract_params(build_classifier(
        classifier_config('vit', 'Mu/4', 48), 10), classifier_config('vit', 'Mu/4', 48))['encoder'])


def test_evaluation_counts_each_example_once_on_8_devices_as_on_1(tmp_path):
  from simmim_jax import feed  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import classification  # pylint: disable=import-outside-toplevel
  config = config_io.load_config('configs/finetune_cpu.py:scratch', {'data.data_dir': str(tmp_path)})
  model = build_classifier(config, 10)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(config.mesh, devices)
    tx = finetune_step.make_optimizer(model, config, lambda step, scale=1.0: 1e-3,
                                      finetune_step.abstract_params(model, config))
    init, _, shardings = finetune_step.abstract_state(model, tx, config, mesh)
    batches = classification.eval_batches(config.data, image_size=32, batch_size=48, split='test')  # 360 = 7.5 x 48
    global_batches = (feed.to_global(b, sharding.batch_sharding(mesh)) for b in batches)
    results.append(finetune_step.evaluate(finetune_step.make_eval_step(model, mesh, shardings), init(), global_batches))
  assert results[0]['count'] == results[1]['count'] == 360
  assert results[0]['top1'] == results[1]['top1'] and results[0]['top5'] == results[1]['top5']
  assert results[0]['loss'] == pytest.approx(results[1]['loss'], rel=1e-5)


@pytest.mark.parametrize('spec,name,size,window,decay', [
    ('finetune_vit_base.py', 'vit', 224, 7, 0.65),
    ('finetune_swin_base.py:192', 'swin', 192, 6, 0.9),
    ('finetune_swin_base.py:224,800', 'swin', 224, 7, 0.8),
    ('finetune_swin_large.py', 'swin', 224, 14, 0.7),
])
def test_finetune_recipe_lowers_at_the_real_per_device_batch(spec, name, size, window, decay):
  config = config_io.load_config(f'configs/{spec}')
  assert (config.model.name, config.model.image_size, config.optim.layer_decay) == (name, size, decay)
  assert name == 'vit' or config.model.window_size == window
  assert config.batch_size == 2048 and config.total_epochs == 100 and config.optim.warmup_epochs == 20
  assert (config.optim.base_lr, config.optim.warmup_lr, config.optim.min_lr) == (1.25e-3, 2.5e-7, 2.5e-7)
  assert config.data.rand_augment == 'rand-m9-mstd0.5-inc1' and config.data.random_erasing == 0.25
  assert (config.mixup.mixup_alpha, config.mixup.cutmix_alpha, config.mixup.label_smoothing) == (0.8, 1.0, 0.1)
  config.batch_size = 128  # per device of the reference's 16
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build_classifier(config, 1000)
  schedule = optim.lr_schedule(config.optim, total_steps=62_500, steps_per_epoch=625, batch_size=2048)
  tx = finetune_step.make_optimizer(model, config, schedule, finetune_step.abstract_params(model, config))
  _, abstract, shardings = finetune_step.abstract_state(model, tx, config, mesh)
  step = finetune_step.make_train_step(model, tx, schedule, config, mesh, 1000, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((128, size, size, 3), jnp.float32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((128,), jnp.int32, sharding=batch_sharding)}
  state_out, metrics = step.lower(abstract, batch).out_info
  assert metrics['loss'].shape == () and jax.tree.structure(state_out) == jax.tree.structure(abstract)
  assert abstract.params['head']['kernel'].shape[-1] == 1000 and ('fc_norm' in abstract.params) == (name == 'vit')


def test_a_missing_evaluation_split_fails_at_set_up_not_at_the_first_evaluation(tmp_path):
  # A labelled root without test/ used to be read as unlabelled images (train/ included) at the first evaluation,
  # which then scored top-1 0 against labels of -1.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import classification, folders  # pylint: disable=import-outside-toplevel
  from simmim_jax.trainers import finetune  # pylint: disable=import-outside-toplevel
  for label in ('cat', 'dog'):
    (tmp_path / 'photos' / 'train' / label).mkdir(parents=True)
    for i in range(8):
      Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(tmp_path / 'photos' / 'train' / label / f'{i}.png')
  folders.folder_index.cache_clear()
  config = config_io.load_config('configs/finetune_cpu.py:scratch', {
      'data.name': 'image_folder', 'data.data_dir': str(tmp_path / 'photos'), 'data.eval_split': 'test',
      'batch_size': 8})
  assert classification.split_examples(config.data, 'train') == 16
  with pytest.raises(ValueError, match=r"has split folders train but no 'test'"):
    finetune.train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  (tmp_path / 'photos' / 'test').mkdir()  # there, but without a label level: no labels to score
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'photos' / 'test' / 'unlabelled.png')
  folders.folder_index.cache_clear()
  with pytest.raises(ValueError, match=r"has no test/<label>/ folders"):
    finetune.train(config, str(tmp_path / 'run'))
  (tmp_path / 'photos' / 'test' / 'unlabelled.png').unlink()
  (tmp_path / 'photos' / 'test' / 'cat').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'photos' / 'test' / 'cat' / '0.png')
  folders.folder_index.cache_clear()
  assert classification.split_examples(config.data, 'test') == 1
