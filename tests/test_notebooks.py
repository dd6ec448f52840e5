"""The Colab notebooks run top to bottom on CPU, offline, with tiny parameters injected after their parameters cell
(as papermill does); a failing cell fails the test. Then the figures they wrote are checked. Their install cell,
left as it is, finds the checkout they run from (as `jupyter execute notebooks/...` does) and clones nothing."""
import importlib.util
import json
import os
import time

import nbformat
import numpy as np
import pytest
from flax import traverse_util
from nbclient import NotebookClient
from PIL import Image

from simmim_jax import params_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')


def run_notebook(name: str, parameters: dict, out_dir, cells: int | None = None,
                 cwd: str = ROOT) -> tuple[nbformat.NotebookNode, float]:
  """Executes notebooks/<name> (its first `cells` cells, or all) with `parameters` injected, in a kernel started in
  `cwd`; returns the executed notebook and its seconds."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nb.cells = nb.cells[:cells]
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name} must have exactly one cell tagged "parameters"'
  assert all(c.cell_type == 'markdown' for c in nb.cells[:tagged[0]]), 'the parameters cell is the first code cell'
  injected = nbformat.v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in parameters.items()))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(tagged[0] + 1, injected)
  start = time.perf_counter()
  try:
    # The kernel inherits this process's environment: CPU only, 8 forced devices (conftest.py).
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': cwd}}).execute()
  finally:
    nbformat.write(nb, os.path.join(out_dir, name))  # the executed copy, outputs and errors included
  return nb, time.perf_counter() - start


def assert_picture(path: str, min_colours: int = 50) -> np.ndarray:
  assert os.path.exists(path), path
  pixels = np.asarray(Image.open(path).convert('RGB'))
  assert min(pixels.shape[:2]) >= 100 and len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours, path
  return pixels


def assert_same_params(npz: str, expected: dict) -> None:
  """The .npz holds exactly the expected arrays, bit for bit."""
  got = traverse_util.flatten_dict(params_io.load_params(npz), sep='/')
  want = traverse_util.flatten_dict(expected, sep='/')
  assert got.keys() == want.keys() and len(got) > 10
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """The pretraining notebook on the embedded digits: 20 steps of 16 images in two chunks."""
  out = tmp_path_factory.mktemp('notebooks')
  workdir = out / 'workdir'
  # INSTALL and REPO_DIR as they are: the notebook finds this checkout itself.
  params = dict(WORKDIR=str(workdir), BACKUP='', DATA_DIR=str(tmp_path_factory.mktemp('tfds')), PROFILE='cpu',
                TOTAL_STEPS=20, CHUNK_STEPS=10, NUM_FIGURE_IMAGES=4, COMPILATION_CACHE=str(out / 'jax_cache'),
                OVERRIDES={'batch_size': 16, 'log_every_steps': 5, 'checkpoint.every_steps': 10,
                           'image_every_steps': 10, 'optim.warmup_steps': 5})
  nb, seconds = run_notebook('pretrain_colab_tpu.ipynb', params, out)
  print(f'pretrain_colab_tpu.ipynb ran in {seconds:.0f} s')
  return nb, workdir, params, out


def test_pretrain_notebook_trains_draws_and_exports(pretrained):
  nb, workdir, params, _ = pretrained
  assert sorted(os.listdir(workdir / 'checkpoints'), key=int)[-1] == '20'
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  # The second chunk resumed from the first one's checkpoint (a fresh start would log steps 1..10 twice).
  assert [r['step'] for r in rows] == [1, 5, 10, 11, 15, 20]
  figures = workdir / 'figures'
  assert_picture(str(figures / 'progress.png'))
  for step in (10, 20):  # one reconstruction grid per chunk, 4 rows of 32 px upscaled, with a caption
    pixels = assert_picture(str(figures / f'reconstructions_step_{step:07d}.png'))
    assert pixels.shape[1] == (5 * 34 - 2) * 4
  # The notebook showed its figure inline (the live plot), not only on disk.
  assert any(o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
             for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
  assert_same_params(str(workdir / 'export' / 'encoder.npz'), params_io.load_params(str(workdir), 'encoder'))
  assert params_io.load_config(str(workdir / 'export' / 'encoder.npz'))['total_steps'] == 20


def test_explore_notebook_on_the_exported_checkpoint(pretrained, tmp_path):
  _, workdir, params, out = pretrained
  images = tmp_path / 'mine'
  images.mkdir()
  for i in range(3):  # "one's own images": files of another size and colour mode than the training data
    Image.fromarray((np.random.default_rng(i).random((40, 48, 3)) * 255).astype(np.uint8)).save(images / f'{i}.png')
  nb, seconds = run_notebook('explore_checkpoint.ipynb', dict(
      CHECKPOINT=str(workdir / 'export' / 'simmim.npz'), IMAGES=[str(images)],
      UPLOAD=False, NUM_IMAGES=3, OUT_DIR=str(tmp_path / 'explore'), MASK_RATIOS=[0.25, 0.5, 0.75],
      MASK_PATCH_SIZES=[4, 8, 16]), out)
  print(f'explore_checkpoint.ipynb ran in {seconds:.0f} s')
  explore = tmp_path / 'explore'
  assert_picture(str(explore / 'reconstructions.png'))
  assert_picture(str(explore / 'mask_ratios.png'))
  assert_picture(str(explore / 'mask_patch_sizes.png'))
  summary = json.load(open(explore / 'summary.json'))
  ratios = summary['mask_ratios']
  assert list(ratios) == ['0.25', '0.5', '0.75'] and all(np.isfinite(v) for v in ratios.values())
  assert list(summary['mask_patch_sizes']) == ['4', '8', '16']
  assert_same_params(str(explore / 'encoder.npz'), params_io.load_params(str(workdir), 'encoder'))
  if importlib.util.find_spec('torch') and importlib.util.find_spec('timm'):
    assert sorted(os.listdir(explore / 'encoder_timm')) == ['config.json', 'model.safetensors', 'simmim.safetensors']
    assert os.path.getsize(explore / 'encoder_timm' / 'model.safetensors') > 100_000  # 1.2M float32 parameters


def install_output(nb: nbformat.NotebookNode) -> str:
  """What the install cell printed."""
  cell = next(c for c in nb.cells if c.cell_type == 'code' and 'find_checkout' in c.source)
  return ''.join(o.get('text', '') for o in cell.outputs if o.get('output_type') == 'stream')


@pytest.mark.parametrize('name', ['pretrain_colab_tpu.ipynb', 'explore_checkpoint.ipynb'])
def test_install_cell_as_is_finds_the_checkout(name, tmp_path):
  """Parameters untouched (REPO still the placeholder), a kernel in notebooks/ as `jupyter execute` starts it: the
  checkout is found, nothing is cloned or installed, the outputs default to runs/ in it."""
  # The explore cell creates its output folder: kept out of the checkout here.
  given = {} if name.startswith('pretrain') else {'CHECKPOINT': str(tmp_path), 'OUT_DIR': str(tmp_path / 'out')}
  nb, _ = run_notebook(name, given, tmp_path, cells=4, cwd=NOTEBOOKS)
  printed = install_output(nb)
  assert f'simmim_jax from {ROOT}\n' in printed, printed
  if name.startswith('pretrain'):
    assert f"workdir {os.path.join(ROOT, 'runs', 'notebook_pretrain')}, dataset sklearn_digits" in printed
  assert not os.path.exists('/content')
