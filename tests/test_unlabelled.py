"""Pretraining on your own unlabelled images: a nested folder of mixed files (formats, modes, broken files),
its checked index, the layouts data_dir accepts, per-process slices, and a run that skips the bad files and
resumes exactly."""
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simmim_jax import config_io, defaults
from simmim_jax.data import folders, images, sources
from gcs_helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(height: int, width: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  base = np.stack([3 * y + 2 * x, 200 - 3 * x, 40 + 4 * y], -1) + rng.integers(0, 30, (height, width, 3))
  return np.clip(base, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, fmt, **kwargs)
  return out.getvalue()


GOOD = {  # relative path -> (PIL image, format)
    'a/rgb.jpg': lambda: (Image.fromarray(_photo(40, 52, 0)), 'JPEG'),
    'a/b/grey.jpeg': lambda: (Image.fromarray(_photo(36, 36, 1)[..., 0]), 'JPEG'),
    'a/b/cmyk.JPG': lambda: (Image.fromarray(_photo(44, 40, 2)).convert('CMYK'), 'JPEG'),
    'c/rgba.png': lambda: (Image.fromarray(_photo(30, 48, 3)).convert('RGBA'), 'PNG'),
    'c/d/e/sixteen.png': lambda: (Image.fromarray(_photo(32, 32, 4)[..., 0].astype(np.uint16) * 257), 'PNG'),
    'c/palette.png': lambda: (Image.fromarray(_photo(34, 30, 5)).convert('P'), 'PNG'),
    'f/bitmap.bmp': lambda: (Image.fromarray(_photo(33, 41, 6)), 'BMP'),
    'f/grey_alpha.webp': lambda: (Image.fromarray(_photo(38, 38, 7)).convert('LA').convert('RGBA'), 'WEBP'),
    'rgb2.jpg': lambda: (Image.fromarray(_photo(50, 40, 8)), 'JPEG'),
    'a/b/rgb3.jpg': lambda: (Image.fromarray(_photo(48, 64, 9)), 'JPEG'),
}
BAD = {'a/truncated.jpg': 'corrupt or truncated jpeg', 'c/d/truncated.png': 'corrupt or truncated png',
       'f/empty.jpg': 'empty file', 'f/notes_named.png': 'not an image (unknown format)'}
IGNORED = ('readme.txt', 'c/d/labels.json')


def make_folder(root) -> str:
  """The nested mixed folder: GOOD images, BAD files with image names, IGNORED files, a hidden file."""
  for name, make in GOOD.items():
    image, fmt = make()
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(_encode(image, fmt, **({'quality': 90} if fmt == 'JPEG' else {})))
  jpeg = _encode(Image.fromarray(_photo(64, 64, 10)), 'JPEG', quality=90)
  png = _encode(Image.fromarray(_photo(64, 64, 11)), 'PNG')
  contents = {'a/truncated.jpg': jpeg[:len(jpeg) // 2], 'c/d/truncated.png': png[:len(png) // 2],
              'f/empty.jpg': b'', 'f/notes_named.png': b'not an image at all\n' * 20,
              'readme.txt': b'my photos', 'c/d/labels.json': b'{}', 'a/.hidden.jpg': b''}
  for name, data in contents.items():
    with open(os.path.join(root, name), 'wb') as f:
      f.write(data)
  return str(root)


@pytest.fixture(scope='module')
def mixed(tmp_path_factory) -> str:
  return make_folder(tmp_path_factory.mktemp('photos'))


def _data(data_dir: str, **overrides):
  data = defaults.pretrain_config().data
  data.name, data.data_dir, data.shuffle_buffer, data.prefetch = 'image_folder', data_dir, 64, 1
  data.update(overrides)
  return data


def test_index_keeps_every_readable_image_and_skips_exactly_the_bad_files(mixed, capsys):
  folders.folder_index.cache_clear()
  index = sources.folder_index(_data(mixed))
  assert sorted(os.path.relpath(p, mixed) for p in index.paths) == sorted(GOOD)
  assert {os.path.relpath(p, mixed): r for p, r in index.skipped} == BAD
  assert index.ignored == len(IGNORED) and index.classes == () and set(index.labels) == {-1}
  out = capsys.readouterr().out
  assert f'skipped {len(BAD)} of {len(GOOD) + len(BAD)} files' in out and 'truncated.png' in out
  assert f'ignored {len(IGNORED)} files without an image extension' in out
  assert sources.num_examples(_data(mixed)) == len(GOOD)


def test_bad_images_fail_names_them(mixed):
  folders.folder_index.cache_clear()
  with pytest.raises(folders.BadImagesError, match='4 of 14 files') as error:
    sources.num_examples(_data(mixed, bad_images='fail'))
  assert all(name in str(error.value) for name in BAD)


def test_every_mode_decodes_to_rgb_like_pil(mixed):
  for name in GOOD:
    path = os.path.join(mixed, name)
    encoded = tf.constant(open(path, 'rb').read())
    with Image.open(path) as image:
      pil = image.convert('RGB')
      if image.mode.startswith('I;16'):  # PIL clips 16-bit to 8 bits; TF keeps the high byte, as 8-bit intends
        pil = Image.fromarray((np.asarray(image, np.uint16) >> 8).astype(np.uint8)).convert('RGB')
      expected = np.asarray(pil, int)
    crop = images.decode_crop(tf.constant([0, 0], tf.int64), encoded, (1.0, 1.0),
                              (expected.shape[1] / expected.shape[0],) * 2).numpy()
    assert crop.dtype == np.uint8 and crop.shape == expected.shape, name
    diff = np.abs(crop.astype(int) - expected)
    if name.lower().endswith(('.png', '.bmp')):
      assert diff.max() == 0, name
    else:  # lossy formats: TF's and PIL's decoders upsample chroma and round the colour conversion differently
      assert diff.max() <= 8 and diff.mean() < 1.5, (name, diff.max(), diff.mean())


def test_layouts_labelled_root_split_glob_and_lists(tmp_path, mixed):
  folders.folder_index.cache_clear()
  for split, label, n in (('train', 'cat', 3), ('train', 'dog', 2), ('val', 'cat', 1), ('val', 'eel', 1)):
    os.makedirs(tmp_path / 'labelled' / split / label)
    for i in range(n):
      Image.fromarray(_photo(20, 20, i)).save(tmp_path / 'labelled' / split / label / f'{i}.png')
  train = sources.folder_index(_data(str(tmp_path / 'labelled')))
  assert train.classes == ('cat', 'dog', 'eel') and sorted(train.labels) == [0, 0, 0, 1, 1]
  assert sorted(sources.folder_index(_data(str(tmp_path / 'labelled'), split='val')).labels) == [0, 2]
  # A split that is not there: one line naming those that are (reading the whole root would mix train and val).
  with pytest.raises(sources.DatasetNotFoundError, match=r"split folders train, val but no 'test'"):
    sources.folder_index(_data(str(tmp_path / 'labelled'), split='test'))
  # root/<split> holding images directly: unlabelled images of that folder only.
  shutil.copytree(os.path.join(mixed, 'c'), tmp_path / 'plain' / 'train')
  shutil.copytree(os.path.join(mixed, 'a'), tmp_path / 'plain' / 'other')
  assert len(sources.folder_index(_data(str(tmp_path / 'plain')))) == 3  # rgba, sixteen, palette
  # A glob, a comma-separated list, and a .txt list (paths relative to the list's folder).
  assert len(sources.folder_index(_data(os.path.join(mixed, '**', '*.png')))) == 3
  assert len(sources.folder_index(_data(f"{os.path.join(mixed, 'f')},{os.path.join(mixed, 'rgb2.jpg')}"))) == 3
  (tmp_path / 'list.txt').write_text('\n'.join(os.path.relpath(os.path.join(mixed, n), tmp_path) for n in GOOD))
  assert len(sources.folder_index(_data(str(tmp_path / 'list.txt')))) == len(GOOD)
  with pytest.raises(sources.DatasetNotFoundError, match='no_such'):
    sources.num_examples(_data(str(tmp_path / 'no_such')))


def test_process_slices_are_disjoint_and_never_read_other_slices(tmp_path):
  folders.folder_index.cache_clear()
  for i in range(24):
    Image.fromarray(_photo(16, 16, i)).save(tmp_path / f'{i:02d}.png')
  data = _data(str(tmp_path), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
  index = sources.folder_index(data)
  slices = [set(index.paths[i * 8:(i + 1) * 8]) for i in range(3)]
  for path in set(index.paths) - slices[1]:  # only process 1's files remain on disk
    os.remove(path)
  seen = set()
  batches = images.pretrain_batches(data, image_size=16, batch_size=4, seed=0, process_index=1, process_count=3)
  for batch in itertools.islice(batches, 6):  # three epochs of process 1's 8 images
    seen.update(image.tobytes() for image in batch['image'])
  expected = {np.asarray(Image.open(p).convert('RGB')).tobytes() for p in slices[1]}
  assert seen == expected


# One process of a two-process JAX job: builds the index of argv[3] and prints it with the files it checked itself.
_PROCESS = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from simmim_jax.data import folders
checked, check = [], folders.check
folders.check = lambda path: checked.append(path) or check(path)
try:
  index = folders.folder_index(sys.argv[3], 'train')
  print(json.dumps({'paths': index.paths, 'skipped': index.skipped, 'checked': checked}))
except FileNotFoundError as e:
  print(json.dumps({'error': str(e)}))
"""


def _two_processes(roots: Sequence[str]) -> list[dict]:
  address = f'127.0.0.1:{free_port()}'
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  procs = [subprocess.Popen([sys.executable, '-c', _PROCESS, address, str(i), root], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, root in enumerate(roots)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][1][-2000:] + outputs[1][1][-2000:]
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def test_two_processes_share_the_check_and_hold_the_same_index(mixed):
  folders.folder_index.cache_clear()
  alone = folders.folder_index(mixed, 'train')
  first, second = _two_processes([mixed, mixed])
  for run in (first, second):
    assert run['paths'] == list(alone.paths)
    assert [tuple(s) for s in run['skipped']] == list(alone.skipped)
  # Each file was checked once, by one of the two: half the reads per process.
  assert not set(first['checked']) & set(second['checked'])
  assert sorted(first['checked'] + second['checked']) == sorted([*alone.paths, *(p for p, _ in alone.skipped)])
  assert len(first['checked']) == len(second['checked']) == (len(GOOD) + len(BAD)) // 2


def test_processes_that_list_different_files_stop_with_one_message(mixed, tmp_path):
  grown = shutil.copytree(mixed, tmp_path / 'grown')
  Image.fromarray(_photo(20, 20, 99)).save(grown / 'new.png')
  for run in _two_processes([mixed, str(grown)]):
    assert 'the processes listed different files' in run['error'] and 'start the run again' in run['error']


def _pretrain(workdir: str, data_dir: str, **kwargs):
  from simmim_jax.trainers import pretrain  # pylint: disable=import-outside-toplevel
  config = config_io.load_config('configs/base.py', {
      'data.name': 'image_folder', 'data.data_dir': data_dir, 'batch_size': 8, 'total_steps': 6,
      'data.shuffle_buffer': 16, 'log_every_steps': 1, 'checkpoint.every_steps': 1000, 'image_every_steps': 1000,
      'checkpoint.enable_async': False})
  return pretrain.train(config, workdir, **kwargs)


def test_batches_of_the_mixed_folder_resume_exactly(mixed):
  data = _data(mixed)
  fresh = list(itertools.islice(images.pretrain_batches(data, image_size=16, batch_size=4, seed=0), 7))
  resumed = list(itertools.islice(images.pretrain_batches(data, image_size=16, batch_size=4, seed=0, start_batch=3), 4))
  for a, b in zip(fresh[3:], resumed, strict=True):  # 10 images: 2 batches per epoch, resumed mid-epoch 1
    np.testing.assert_array_equal(a['image'], b['image'])
  assert fresh[0]['image'].dtype == np.uint8 and fresh[0]['image'].shape == (4, 16, 16, 3)


@pytest.mark.slow  # three trainer runs (compiles) on 8 CPU devices: about 2.5 minutes on 2 cores
def test_pretraining_on_the_mixed_folder_skips_the_bad_files_and_resumes_exactly(mixed, tmp_path, capsys):
  folders.folder_index.cache_clear()
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    _pretrain(str(tmp_path / 'whole'), mixed)
    assert f'skipped {len(BAD)} of' in capsys.readouterr().out
    _pretrain(str(tmp_path / 'parts'), mixed, max_steps=3)
    _pretrain(str(tmp_path / 'parts'), mixed)
  finally:
    os.chdir(cwd)
  losses = []
  for run in ('whole', 'parts'):
    rows = [json.loads(line) for line in open(tmp_path / run / 'metrics.jsonl')]
    losses.append({r['step']: r['loss'] for r in rows if 'loss' in r})
  assert sorted(losses[1]) == list(range(1, 7))
  np.testing.assert_array_equal([losses[0][s] for s in range(1, 7)], [losses[1][s] for s in range(1, 7)])
  assert all(np.isfinite(v) for v in losses[0].values())
