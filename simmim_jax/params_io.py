"""Params out and in: a flat `.npz` with `/`-joined names, and one loader for `.npz` files and Orbax checkpoints.

Layout of an `.npz` written here: one array per parameter, named by its path (`encoder/blocks_0/attn/qkv/kernel`).
NumPy has no bfloat16 (or other ml_dtypes) type of its own, so such arrays are stored as their raw bits
(uint16/uint8) and the reserved entry `__dtypes__` (a JSON string) records their real dtype; load_params
views the bits back, so the round trip is bit-exact. The config is written beside it as JSON
(`model.npz` -> `model.json`). Orbax checkpoints are those of checkpoint.Checkpointer: `workdir/checkpoints/<step>/`
with a `state` item ({'step', 'params', 'opt_state'}) and a `meta` JSON item holding the config. PyTorch files
(`.pth`, `.safetensors`: official SimMIM, timm, or written by tools/convert_to_torch.py) load through
simmim_jax.interop, which imports torch only then. Every path may be local or a URL (gs://bucket/...: through
etils.epath and Orbax; PyTorch files from a URL are copied to a temporary folder first).
"""
import io
import json
import os
import shutil
import tempfile
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

from simmim_jax import storage
from simmim_jax.interop import torch_io

DTYPES_KEY = '__dtypes__'
NPZ_SUFFIX = '.npz'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')


def config_path(npz_path: str) -> str:
  """Where the JSON config of an `.npz` lives: same name, `.json` suffix."""
  return os.path.splitext(npz_path)[0] + '.json'


def _config_json(config: Any) -> str:
  if hasattr(config, 'to_json_best_effort'):  # ml_collections.ConfigDict
    return config.to_json_best_effort(indent=2, sort_keys=True)
  return json.dumps(config, indent=2, sort_keys=True, default=str)


def save_npz(path: str, params: Any, config: Any = None) -> None:
  """Writes params (any nested mapping of arrays) as one `.npz`; bfloat16 kept as bits + a dtype record."""
  if not path.endswith(NPZ_SUFFIX):
    raise ValueError(f'save_npz writes a {NPZ_SUFFIX} file; got {path!r}: give a path ending in {NPZ_SUFFIX}.')
  arrays, dtypes = {}, {}
  for name, value in traverse_util.flatten_dict(params, sep='/').items():
    value = np.asarray(value)  # a jax.Array lands on the host here
    if value.dtype.type.__module__.startswith('ml_dtypes'):  # NumPy cannot store these natively
      dtypes[name] = value.dtype.name
      value = value.view(np.dtype(f'uint{8 * value.dtype.itemsize}'))
    arrays[name] = value
  arrays[DTYPES_KEY] = np.array(json.dumps(dtypes))
  buffer = io.BytesIO()  # a file object: np.savez would otherwise append its own suffix
  np.savez(buffer, **arrays)
  storage.write_bytes(path, buffer.getvalue())  # whole: never a half-written file under the final name
  if config is not None:
    storage.write_text(config_path(path), _config_json(config))


def _load_npz(path: str) -> dict[str, Any]:
  with storage.path(path).open('rb') as f, np.load(f, allow_pickle=False) as data:
    dtypes = json.loads(str(data[DTYPES_KEY])) if DTYPES_KEY in data.files else {}
    flat = {name: data[name] for name in data.files if name != DTYPES_KEY}
  for name, dtype in dtypes.items():
    flat[name] = flat[name].view(getattr(ml_dtypes, dtype))
  return traverse_util.unflatten_dict(flat, sep='/')


def _steps(checkpoints_dir: str) -> list[int]:
  return sorted(int(p.name) for p in storage.path(checkpoints_dir).iterdir() if p.name.isdigit())


def _latest_step(checkpoints_dir: str) -> int:
  """The newest finished step (Orbax writes unfinished ones under a temporary, non-numeric name)."""
  steps = _steps(checkpoints_dir)
  if not steps:
    raise FileNotFoundError(f'No checkpoint steps in {checkpoints_dir}: train first or point at another workdir.')
  return max(steps)


def checkpoint_step_dir(path: str, step: int | None = None) -> str:
  """A workdir, its `checkpoints` dir, or one step dir -> the step dir (latest step unless `step` is given)."""
  path = storage.absolute(path)
  path = path.rstrip('/') if storage.is_url(path) else path  # gs://b/run/ names gs://b/run
  if storage.path(path, 'state').is_dir():
    return path
  if storage.path(path, 'checkpoints').is_dir():
    path = os.path.join(path, 'checkpoints')
  if not storage.path(path).is_dir():
    raise FileNotFoundError(f'{path} does not exist: give an .npz file, a workdir, its checkpoints dir or a step dir.')
  step_dir = os.path.join(path, str(_latest_step(path) if step is None else step))
  if not storage.path(step_dir, 'state').is_dir():
    steps = _steps(path)
    raise FileNotFoundError(f"{step_dir} holds no checkpoint 'state' item (steps in {path}: {steps}): give a "
                            'workdir, its checkpoints dir or a step dir written by simmim_jax training.')
  return step_dir


def _load_checkpoint(step_dir: str) -> dict[str, Any]:
  """Only the params of the state item, as NumPy on the host: no model, no devices, no optimizer state."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  checkpointer = ocp.PyTreeCheckpointer()
  state_dir = os.path.join(step_dir, 'state')
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  if 'params' not in tree:
    raise ValueError(f"{state_dir} has no 'params' (found {sorted(tree)}): not a simmim_jax train state.")
  params = tree['params']
  restore_args = _tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item={'params': params}, restore_args={'params': restore_args}, partial_restore=True))
  return _tree_map(np.asarray, restored['params'])


def _tree_map(fn: Any, tree: Any) -> Any:
  return {k: _tree_map(fn, v) if hasattr(v, 'items') else fn(v) for k, v in tree.items()}


def select(params: dict[str, Any], subtree: str | None) -> dict[str, Any]:
  """params['a']['b'] for subtree 'a/b'; the whole tree for None."""
  node = params
  for part in subtree.strip('/').split('/') if subtree else []:
    if not hasattr(node, 'items') or part not in node:
      found = sorted(node) if hasattr(node, 'items') else type(node).__name__
      raise KeyError(f'No params sub-tree {subtree!r} (at {part!r} found {found}).')
    node = node[part]
  return node


def load_params(path: str, subtree: str | None = None, step: int | None = None) -> dict[str, Any]:
  """Nested dict of NumPy arrays from an `.npz` (save_npz) or an Orbax checkpoint (workdir, checkpoints dir,
  step dir), or a PyTorch `.pth`/`.safetensors` (official SimMIM or timm layout: simmim_jax.interop, needs
  torch); `subtree` ('encoder', 'encoder/blocks_0') selects part of it."""
  if path.endswith(NPZ_SUFFIX):
    if not storage.path(path).is_file():
      raise FileNotFoundError(f'{path} does not exist: give the .npz written by tools/export_params.py.')
    params = _load_npz(path)
  elif path.endswith(TORCH_SUFFIXES) and storage.is_url(path):
    with tempfile.TemporaryDirectory() as tmp:
      params = torch_io.import_torch(_local_copy(path, tmp))
  elif path.endswith(TORCH_SUFFIXES):
    params = torch_io.import_torch(path)
  else:
    params = _load_checkpoint(checkpoint_step_dir(path, step))
  return select(params, subtree)


def _local_copy(url: str, folder: str) -> str:
  """Copies a PyTorch file (and the SimMIM sidecar beside a timm .safetensors, if any) into `folder`:
  torch and safetensors read local files only."""
  names = [os.path.basename(url)]
  if url.endswith('.safetensors') and not url.endswith(torch_io.SIDECAR):
    names.append(os.path.basename(url.removesuffix('.safetensors') + torch_io.SIDECAR))
  for name in names:
    source = storage.path(os.path.dirname(url), name)
    if name == names[0] or source.exists():
      with source.open('rb') as src, open(os.path.join(folder, name), 'wb') as dst:
        shutil.copyfileobj(src, dst)
  return os.path.join(folder, names[0])


def load_config(path: str, step: int | None = None) -> dict[str, Any] | None:
  """The config beside an `.npz` (None when absent), or the one stored in an Orbax checkpoint; None for
  PyTorch files (they carry no config of this package)."""
  if path.endswith(TORCH_SUFFIXES):
    return None
  if path.endswith(NPZ_SUFFIX):
    json_path = config_path(path)
    if not storage.path(json_path).is_file():
      return None
    return json.loads(storage.read_text(json_path))
  step_dir = checkpoint_step_dir(path, step)
  meta_dir = os.path.join(step_dir, 'meta')
  if storage.path(meta_dir).is_dir():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir).get('config')
    if config is not None:
      return config
  workdir_json = os.path.join(os.path.dirname(os.path.dirname(step_dir)), 'config.json')
  if storage.path(workdir_json).is_file():
    return json.loads(storage.read_text(workdir_json))
  return None
