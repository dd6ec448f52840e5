"""Reconstruction figures: the numbers behind the grid against the loss, the mask seed, and tools/visualize.py on a
short real base.py run (a trained model reconstructs masked patches better than a random one)."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import matplotlib
import numpy as np
import pytest
from PIL import Image

from simmim_jax import config_io, losses, masking, params_io, visualize
from simmim_jax.data import samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
  spec = importlib.util.spec_from_file_location('visualize_tool', os.path.join(ROOT, 'tools', 'visualize.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def small_config(norm_target=False):
  return config_io.load_config(os.path.join(ROOT, 'configs/base.py'), {'loss.norm_target': norm_target,
                                                                        'loss.norm_target_window': 5})


@pytest.mark.parametrize('norm_target', [False, True])
def test_figure_numbers_match_the_loss_per_image(norm_target):
  config = small_config(norm_target)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  reconstruction = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  mask = visualize.draw_mask(config, 7, 3)
  fig = visualize.figure_from_arrays(images, mask, reconstruction, config, vmax=2.0)
  target = losses.normalize_target(images, 5) if norm_target else images
  for i in range(3):  # the training loss restricted to one image
    expected = losses.masked_l1(reconstruction[i:i + 1], target[i:i + 1], masking.upsample(mask[i:i + 1], 4))
    np.testing.assert_allclose(fig.l1[i], float(expected), rtol=1e-4)
  # One patch by hand: the mean |target - reconstruction| over its 4x4 pixels and 3 channels.
  np.testing.assert_allclose(fig.patch_l1[1, 2, 5], np.abs(np.asarray(target)[1, 8:12, 20:24] -
                                                           reconstruction[1, 8:12, 20:24]).mean(), rtol=1e-5)
  assert fig.grid.shape == (3 * 34 - 2, 5 * 34 - 2, 3) and fig.grid.dtype == np.uint8
  # Heat map column (the 5th): a masked patch has its colormap colour, a visible patch is grey.
  heat = fig.grid[:32, 4 * 34:4 * 34 + 32]
  masked_at, visible_at = np.argwhere(mask[0] == 1)[0], np.argwhere(mask[0] == 0)[0]
  colour = np.round(np.asarray(matplotlib.colormaps['inferno'](min(fig.patch_l1[0][tuple(masked_at)] / 2.0, 1.0))[:3]) * 255)
  np.testing.assert_array_equal(heat[masked_at[0] * 4, masked_at[1] * 4], colour)
  np.testing.assert_array_equal(heat[visible_at[0] * 4, visible_at[1] * 4], [visualize.VISIBLE_GREY] * 3)


def test_local_stats_undo_norm_target():
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  mean, std = losses.local_stats(x, 7)
  np.testing.assert_allclose((x - mean) / std, losses.normalize_target(x, 7), rtol=1e-4, atol=1e-4)


def test_mask_is_a_function_of_the_seed_and_overrides_apply():
  config = small_config()
  a, b, c = (visualize.draw_mask(config, s, 4) for s in (3, 3, 4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert (a.sum(axis=(1, 2)) == 39).all()  # ceil(0.6 * 64) cells of one 4x4 token (base.py's mask)
  params = visualize.init_params(config)
  images = np.zeros((2, 32, 32, 3), np.float32)
  fig = visualize.figure(params, config, images, seed=1, mask_ratio=0.25, mask_patch_size=16)
  assert (fig.token_mask.sum(axis=(1, 2)) == 16).all()  # one 16 px cell of 4x4 tokens
  assert config.mask.mask_ratio == 0.6  # the caller's config is not changed
  with pytest.raises(ValueError, match='model.image_size=32'):
    visualize.figure(params, config, np.zeros((2, 16, 16, 3)), seed=0)
  with pytest.raises(ValueError, match='encoder and decoder'):
    visualize.figure({'encoder': params['encoder']}, config, images, seed=0)


def test_file_images_center_crop_and_normalise(tmp_path):
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, 10:30] = 255  # the centre square is white, the sides black
  Image.fromarray(pixels).save(tmp_path / 'a.png')
  (tmp_path / 'notes.txt').write_text('not an image')
  out = samples.file_images([str(tmp_path)], 8, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
  assert out.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(out, 1.0)
  with pytest.raises(FileNotFoundError, match='neither an image file nor a folder'):
    samples.file_images([str(tmp_path / 'missing')], 8, 8, (0,) * 3, (1,) * 3)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The first 30 steps of base.py at batch 32 (its learning rate per image, a 10-step warmup), in this process."""
  from simmim_jax.trainers import pretrain  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp('vis_run')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = config_io.load_config(os.path.join(ROOT, 'configs/base.py'), {
      'data.data_dir': data_dir, 'batch_size': 32, 'optim.base_lr': 3.2e-2, 'optim.warmup_steps': 10,
      'log_every_steps': 10, 'checkpoint.every_steps': 30, 'image_every_steps': 30})
  pretrain.train(config, str(workdir), max_steps=30)
  return workdir, data_dir


def test_tool_on_a_trained_checkpoint_beats_random_init(trained, tmp_path):
  workdir, data_dir = trained
  run = subprocess.run([sys.executable, 'tools/visualize.py', f'--checkpoint={workdir}', '--split=test',
                        f'--data_dir={data_dir}', '--num_images=8', '--seed=5', f'--out={tmp_path / "trained"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.load(open(tmp_path / 'trained' / 'l1.json'))
  assert f"{result['mean_masked_l1']:.4f}" in run.stdout and len(result['l1']) == 8
  png = Image.open(result['png'])
  # 8 rows of 32 px + gaps, upscaled x4 (512 / 128 wide... min side), plus the 3-line caption on top.
  assert png.width == (5 * 34 - 2) * 4 and png.height > (8 * 34 - 2) * 4
  assert len(np.unique(np.asarray(png).reshape(-1, 3), axis=0)) > 50  # a real picture, not a blank canvas
  # The trainer drew its step-30 figure with the same function.
  assert (workdir / 'reconstructions' / 'step_0000030.png').exists()

  tool = load_tool()
  untrained = tool.main([f'--checkpoint={workdir}', '--random_init', f'--data_dir={data_dir}', '--seed=5',
                         f'--out={tmp_path / "random"}'])
  # After 20-60 steps the model predicts the digits' typical pixels, not yet each one's strokes (masked L1 about
  # 1.24 against 1.46 at random init; the full 600-step base.py run reaches about 0.48).
  assert result['mean_masked_l1'] < 0.9 * untrained['mean_masked_l1'], (result, untrained)

  # The same figure from an exported .npz (config beside it) and from image files in a folder.
  npz = str(tmp_path / 'simmim.npz')
  params_io.save_npz(npz, params_io.load_params(str(workdir)), params_io.load_config(str(workdir)))
  again = tool.main([f'--checkpoint={npz}', f'--data_dir={data_dir}', '--seed=5', f'--out={tmp_path / "npz"}'])
  np.testing.assert_allclose(again['l1'], result['l1'], rtol=1e-5)
  folder = tmp_path / 'pngs'
  folder.mkdir()
  for i in range(3):
    Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(folder / f'{i}.png')
  files = tool.main([f'--checkpoint={npz}', '--images', str(folder), '--num_images=8', f'--out={tmp_path / "files"}'])
  assert len(files['l1']) == 3

  with pytest.raises(FileNotFoundError, match='does not exist'):
    tool.main([f'--checkpoint={tmp_path / "nowhere"}', f'--out={tmp_path / "x"}'])
  with pytest.raises(ValueError, match="Split 'nope' not available"):
    tool.main([f'--checkpoint={npz}', f'--data_dir={data_dir}', '--split=nope', f'--out={tmp_path / "x"}'])
  encoder_only = str(tmp_path / 'encoder.npz')
  params_io.save_npz(encoder_only, params_io.load_params(str(workdir), 'encoder'), params_io.load_config(str(workdir)))
  with pytest.raises(ValueError, match='encoder and decoder'):
    tool.main([f'--checkpoint={encoder_only}', f'--data_dir={data_dir}', f'--out={tmp_path / "x"}'])
  jax.clear_caches()
