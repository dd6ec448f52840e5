"""image_folder in a bucket: `data.name=image_folder data.data_dir=gs://bucket/photos`, labelled or not, read
through tf.io.gfile from the GCS emulator of tests/gcs_helpers.py, gives the index, the skipped files, the
batches and the figures' sample images (tools/visualize.py; bit for bit) that the same folder gives from a local disk.

This file is also the driver run in the emulator's environment (`python tests/test_gcs_folders.py ROOT OUT`).
"""
import json
import os
import sys

import numpy as np

import pytest

import gcs_helpers
from gcs_helpers import BUCKET, ROOT, gcs, ok  # pylint: disable=unused-import  (gcs: the fixture)
from test_unlabelled import BAD, GOOD, IGNORED, _photo, make_folder

PROCESSES = 2  # the batches compared are process 1's slice of 2


def make_labelled(root: str) -> str:
  """<root>/{train,val}/<label>/ with PNGs and JPEGs, and a hidden file the walk leaves out."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for split, label, n in (('train', 'cat', 5), ('train', 'dog', 4), ('val', 'cat', 1), ('val', 'eel', 1)):
    os.makedirs(os.path.join(root, split, label))
    for i in range(n):
      Image.fromarray(_photo(24, 20, i)).save(os.path.join(root, split, label, f'{i}.{"png" if i % 2 else "jpg"}'))
  open(os.path.join(root, 'train', 'cat', '.DS_Store'), 'wb').close()
  return root


def test_image_folders_in_a_bucket_read_like_their_local_copy(gcs, tmp_path):
  photos = make_folder(tmp_path / 'photos')
  with open(os.path.join(photos, 'list.txt'), 'w') as f:  # a list of files, relative to its folder
    f.write('\n'.join(sorted(GOOD)[:4]) + '\n')
  labelled = make_labelled(str(tmp_path / 'labelled'))
  gcs.upload(photos, 'photos')
  gcs.upload(labelled, 'labelled')

  ok(gcs_helpers.drive(gcs.env('tf'), f'gs://{BUCKET}', str(tmp_path / 'bucket'), script=__file__))
  summarise(str(tmp_path), str(tmp_path / 'local'))
  bucket, local = (json.load(open(tmp_path / name / 'summary.json')) for name in ('bucket', 'local'))
  assert bucket == local
  assert sorted(bucket['photos']['paths']) == sorted(GOOD) and bucket['photos']['skipped'] == BAD
  assert bucket['photos']['ignored'] == len(IGNORED) + 1  # + list.txt
  assert bucket['labelled']['classes'] == ['cat', 'dog', 'eel'] and len(bucket['labelled']['paths']) == 9
  assert bucket['glob'] == 2 and bucket['list'] == 4 and bucket['labelled_val'] == 2
  for name in ('photos', 'labelled'):
    with np.load(tmp_path / 'bucket' / f'{name}.npz') as got, np.load(tmp_path / 'local' / f'{name}.npz') as want:
      assert got.files == want.files and got['image'].shape == (3, 4, 16, 16, 3)
      assert got['figure_split'].shape == got['figure_files'].shape == (3, 16, 16, 3)
      for key in want.files:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f'{name} {key}')


@pytest.mark.slow  # two short trainer runs (compiles) in subprocesses: minutes on 2 cores
def test_pretraining_from_a_bucket_folder_equals_pretraining_from_its_local_copy(gcs, tmp_path):
  photos = make_folder(tmp_path / 'photos')
  gcs.upload(photos, 'train-photos')
  losses = []
  for name, data_dir in (('bucket', f'gs://{BUCKET}/train-photos'), ('local', photos)):
    workdir = str(tmp_path / name)
    result = ok(gcs_helpers.drive(
        gcs.env('tf'), 'train', 'configs/base.py', workdir, 'data.name=image_folder', f'data.data_dir={data_dir}',
        'batch_size=8', 'total_steps=3', 'data.shuffle_buffer=16', 'log_every_steps=1', 'checkpoint.every_steps=1000',
        'image_every_steps=1000', script=os.path.join(ROOT, 'tests', 'test_gcs.py')))
    assert f'skipped {len(BAD)} of' in result.stdout, result.stdout[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    losses.append({r['step']: r['loss'] for r in rows if 'loss' in r})
  assert sorted(losses[0]) == [1, 2, 3] and losses[0] == losses[1]


def summarise(root: str, out: str) -> None:
  """The index and process 1's first three batches of the folders under root (a path or gs:// URL), written
  to out/summary.json (paths relative to their folder) and out/<folder>.npz."""
  import itertools  # pylint: disable=import-outside-toplevel
  from simmim_jax import defaults  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import images, samples, sources  # pylint: disable=import-outside-toplevel

  def data(data_dir: str, **overrides):
    config = defaults.pretrain_config().data
    config.name, config.data_dir, config.shuffle_buffer, config.prefetch = 'image_folder', data_dir, 16, 1
    config.update(overrides)
    return config

  os.makedirs(out, exist_ok=True)
  summary = {}
  for name in ('photos', 'labelled'):
    folder = f'{root}/{name}'
    index = sources.folder_index(data(folder))
    relative = lambda p, folder=folder: p.removeprefix(folder + '/')  # pylint: disable=cell-var-from-loop
    summary[name] = {'paths': [relative(p) for p in index.paths], 'labels': index.labels.tolist(),
                     'classes': list(index.classes), 'skipped': {relative(p): r for p, r in index.skipped},
                     'ignored': index.ignored, 'layout': index.layout.replace(folder, '<folder>')}
    batches = images.pretrain_batches(data(folder), image_size=16, batch_size=4, seed=0, process_index=1,
                                      process_count=PROCESSES)
    first = list(itertools.islice(batches, 3))
    figure = {'figure_split': samples.split_images(data(folder), 3, 16),  # visualize.py --split on the folder
              'figure_files': samples.file_images([f'{folder}/c/rgba.png', f'{folder}/a'] if name == 'photos' else [folder],
                                                  3, 16, (0.5,) * 3, (0.25,) * 3)}  # visualize.py --images
    np.savez(os.path.join(out, f'{name}.npz'), **{k: np.stack([b[k] for b in first]) for k in first[0]}, **figure)
  summary['labelled_val'] = len(sources.folder_index(data(f'{root}/labelled', split='val')))
  summary['glob'] = len(sources.folder_index(data(f'{root}/photos/c/*.png')))  # rgba, palette
  summary['list'] = len(sources.folder_index(data(f'{root}/photos/list.txt')))
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  summarise(*sys.argv[1:])
