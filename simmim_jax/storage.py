"""Paths that are local or URLs (gs://bucket/run, or any other etils.epath scheme), for every file the trainers,
tools and notebooks write or read outside Orbax (which takes the same URLs itself).

etils.epath reaches gs:// through tf.io.gfile when TensorFlow is installed and through gcsfs (fsspec)
otherwise (EPATH_USE_TF=false forces gcsfs). Object stores have no append and no atomic rename, so writes
here replace whole files: an object upload is atomic by itself, a local file goes through a temporary
file and os.replace, so a reader never sees half a file under the final name.
"""
import glob as globlib
import os
import uuid

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """True for gs://..., s3://... and the like; False for filesystem paths."""
  return '://' in os.fspath(path)


def path(first: PathLike, *parts: str) -> epath.Path:
  """An epath.Path of first/parts...; '~' expanded for local paths."""
  return epath.Path(first if is_url(first) else os.path.expanduser(os.fspath(first)), *parts)


def absolute(path: PathLike) -> str:
  """The path as a string that stays valid from another working directory (URLs unchanged)."""
  return os.fspath(path) if is_url(path) else os.path.abspath(os.path.expanduser(os.fspath(path)))


def write_bytes(target: PathLike, data: bytes) -> None:
  """Replaces `target` with `data` whole (local parent folders created; object stores need none)."""
  target = path(target)
  if is_url(target):
    target.write_bytes(data)  # one object upload: atomic on GCS and S3
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.{target.name}.{uuid.uuid4().hex[:8]}.tmp'
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(target: PathLike, text: str) -> None:
  write_bytes(target, text.encode('utf-8'))


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern, local ('~/corpus/*.txt', '**' at any depth) or a URL
  ('gs://bucket/corpus/*.txt')."""
  if not is_url(pattern):
    return sorted(globlib.glob(os.path.expanduser(pattern), recursive=True))
  parts = pattern.split('/')
  wild = [i for i, part in enumerate(parts) if any(c in part for c in '*?[')]
  if not wild:
    return [pattern] if path(pattern).exists() else []
  base, rest = '/'.join(parts[:wild[0]]), '/'.join(parts[wild[0]:])
  return sorted(str(p) for p in path(base).glob(rest))


def read_bytes(source: PathLike) -> bytes:
  return path(source).read_bytes()


def read_text(source: PathLike) -> str:
  return path(source).read_text(encoding='utf-8')
