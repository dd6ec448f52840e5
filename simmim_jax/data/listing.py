"""The one folder walk (image folders, figure samples): local with os.walk, a bucket listed one depth at a time.

Here, in data/, because a bucket is listed through tf.io.gfile, the file system tf.data then reads the listed files
with; TensorFlow is imported only for a URL, so local figures need none.
"""
import concurrent.futures
import os

from simmim_jax import storage

_LIST_THREADS = 16  # folders of a bucket listed concurrently: one request (page) each, latency-bound


def entries(folder: str) -> tuple[list[str], list[str]]:
  """(sub-folder names, file names) of one folder, hidden ones left out."""
  if storage.is_url(folder):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (buckets only: local listing stays light)
    # An object store's listing names folders with a trailing '/': one request per folder, where
    # tf.io.gfile.walk would ask isdir of every file (one request per image). tf.io.gfile, not gcsfs: it is
    # the file system tf.data reads the listed files with.
    names = [n for n in tf.io.gfile.listdir(folder) if not n.startswith('.')]
    return [n.rstrip('/') for n in names if n.endswith('/')], [n for n in names if not n.endswith('/')]
  names = [n for n in os.listdir(folder) if not n.startswith('.')]
  subs = [n for n in names if os.path.isdir(os.path.join(folder, n))]
  return subs, [n for n in names if n not in set(subs)]


def walk(root: str) -> list[str]:
  """Every file under root (recursive, following links; hidden ones left out), sorted; local or a URL."""
  if not storage.is_url(root):
    return sorted(os.path.join(d, name) for d, _, names in os.walk(root, followlinks=True)
                  for name in names if not name.startswith('.'))
  join = lambda folder, name: os.fspath(storage.path(folder, name))  # pylint: disable=unnecessary-lambda-assignment
  files, level = [], [root.rstrip('/')]
  with concurrent.futures.ThreadPoolExecutor(_LIST_THREADS) as pool:
    while level:  # one depth at a time, its folders listed concurrently
      below = []
      for folder, (subs, names) in zip(level, pool.map(entries, level)):
        files += [join(folder, n) for n in names]
        below += [join(folder, n) for n in subs]
      level = below
  return sorted(files)
