"""Params out and in: a flat `.npz` or `.safetensors` with `/`-joined names, and one loader for those, Orbax
checkpoints and PyTorch files.

`.npz` written here: one array per parameter and nothing else, named by its path (`encoder/blocks_0/attn/qkv/kernel`),
so `np.load` gives the params as they are. NumPy has no bfloat16 (or other ml_dtypes) type of its own, so such
arrays are stored as their raw bits (uint16/uint8) and the JSON written beside it (`model.npz` -> `model.json`,
the config) records their real dtype under the reserved key `__dtypes__` (`{name: 'bfloat16'}`); load_params
views the bits back, so the round trip is bit-exact (`np.load(f)[name].view(ml_dtypes.bfloat16)` by hand). Files
of earlier versions kept that record inside the `.npz` under the same key; they still load.
`.safetensors` written here (save_safetensors) is one self-contained file: bfloat16 stored as bfloat16 (the
format has the type), the config as JSON in its metadata (`config`, beside `producer: simmim_jax`); any
safetensors reader takes it (`safetensors.numpy` lacks bfloat16: use safetensors.torch or flax.serialization
there). Orbax checkpoints are those of checkpoint.Checkpointer: `workdir/checkpoints/<step>/` with a `state` item
({'step', 'params', 'opt_state'}) and a `meta` JSON item holding the config. PyTorch files (`.pth`,
`.safetensors` of another producer: official SimMIM, timm, or written by tools/convert_to_torch.py, and timm
folders: config.json + model.safetensors) load through simmim_jax.interop, which imports torch only then. Every
path may be local or a URL (gs://bucket/...: through etils.epath and Orbax; PyTorch files from a URL are copied
to a temporary folder first).
"""
import io
import json
import logging
import os
import shutil
import struct
import tempfile
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

from simmim_jax import storage
from simmim_jax.interop import torch_io

DTYPES_KEY = '__dtypes__'
NPZ_SUFFIX = '.npz'
SAFETENSORS_SUFFIX = '.safetensors'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
PRODUCER = 'simmim_jax'  # the safetensors metadata value that marks this package's layout ('/'-joined names)
# safetensors dtype names (the format's spec) <-> NumPy / ml_dtypes.
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8,
    'BOOL': np.bool_}


def config_path(npz_path: str) -> str:
  """Where the JSON config of an `.npz` lives: same name, `.json` suffix."""
  return os.path.splitext(npz_path)[0] + '.json'


def _config_json(config: Any) -> str:
  if hasattr(config, 'to_json_best_effort'):  # ml_collections.ConfigDict
    return config.to_json_best_effort(indent=2, sort_keys=True)
  return json.dumps(config, indent=2, sort_keys=True, default=str)


def _flat_numpy(params: Any) -> dict[str, np.ndarray]:
  """`/`-joined names -> host NumPy arrays (a jax.Array lands on the host here)."""
  return {name: np.asarray(value) for name, value in traverse_util.flatten_dict(params, sep='/').items()}


def save_npz(path: str, params: Any, config: Any = None) -> None:
  """Writes params (any nested mapping of arrays) as one `.npz` holding only them; bfloat16 and other ml_dtypes
  arrays are kept as their bits, their dtypes recorded in the JSON beside it (written with the config, or alone)."""
  if not path.endswith(NPZ_SUFFIX):
    raise ValueError(f'save_npz writes a {NPZ_SUFFIX} file; got {path!r}: give a path ending in {NPZ_SUFFIX}.')
  arrays, dtypes = {}, {}
  for name, value in _flat_numpy(params).items():
    if value.dtype.type.__module__.startswith('ml_dtypes'):  # NumPy cannot store these natively
      dtypes[name] = value.dtype.name
      value = value.view(np.dtype(f'uint{8 * value.dtype.itemsize}'))
    arrays[name] = value
  buffer = io.BytesIO()  # a file object: np.savez would otherwise append its own suffix
  np.savez(buffer, **arrays)
  storage.write_bytes(path, buffer.getvalue())  # whole: never a half-written file under the final name
  if config is not None or dtypes:
    sidecar = _plain(config) if config is not None else {}
    if dtypes:
      sidecar[DTYPES_KEY] = dtypes
    storage.write_text(config_path(path), json.dumps(sidecar, indent=2, sort_keys=True, default=str))
  elif storage.path(config_path(path)).exists():
    storage.path(config_path(path)).unlink()  # a stale sidecar of an earlier export would relabel these arrays


def _plain(config: Any) -> dict[str, Any]:
  """A config (ConfigDict or mapping) as plain JSON data."""
  return json.loads(_config_json(config))


def _load_npz(path: str) -> dict[str, Any]:
  with storage.path(path).open('rb') as f:
    head = f.read(4)
  if head[:2] != b'PK':  # not a zip: np.load would take it for a pickle and talk about allow_pickle
    raise ValueError(f'{path} is not an .npz archive (it starts with {head!r}): give an .npz written by '
                     'tools/export_params.py or np.savez, a .safetensors file or a checkpoint directory.')
  with storage.path(path).open('rb') as f, np.load(f, allow_pickle=False) as data:
    dtypes = json.loads(str(data[DTYPES_KEY])) if DTYPES_KEY in data.files else {}  # files of earlier versions
    flat = {name: data[name] for name in data.files if name != DTYPES_KEY}
  sidecar = config_path(path)
  if storage.path(sidecar).is_file():
    dtypes.update(json.loads(storage.read_text(sidecar)).get(DTYPES_KEY, {}))
  elif any(v.dtype.kind == 'u' for v in flat.values()):
    logging.warning('%s has unsigned-integer arrays and no %s beside it: if they are bfloat16 bits from save_npz, '
                    'their dtype record was in that file (copy it along); they are returned as stored.', path,
                    os.path.basename(sidecar))
  for name, dtype in dtypes.items():
    flat[name] = flat[name].view(getattr(ml_dtypes, dtype))
  return traverse_util.unflatten_dict(flat, sep='/')


def save_safetensors(path: str, params: Any, config: Any = None) -> None:
  """Writes params as one `.safetensors` (`/`-joined names, every dtype stored as itself, bfloat16 included) with
  the config as JSON in its metadata. Written here by the format's spec (8-byte header length, JSON header,
  data), so that bfloat16 needs neither torch nor a NumPy type."""
  if not path.endswith(SAFETENSORS_SUFFIX):
    raise ValueError(f'save_safetensors writes a {SAFETENSORS_SUFFIX} file; got {path!r}.')
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, chunks, offset = {}, [], 0
  for name, value in sorted(_flat_numpy(params).items()):
    if value.dtype not in names:
      raise ValueError(f'{name}: dtype {value.dtype} has no safetensors type.')
    data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': names[value.dtype], 'shape': list(value.shape),
                    'data_offsets': [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  metadata = {'format': 'flax', 'producer': PRODUCER}
  if config is not None:
    metadata['config'] = json.dumps(_plain(config), sort_keys=True)  # metadata values are strings
  header['__metadata__'] = metadata
  encoded = json.dumps(header, separators=(',', ':')).encode('utf-8')
  encoded += b' ' * (-len(encoded) % 8)  # the spec's alignment: data starts on an 8-byte boundary
  storage.write_bytes(path, struct.pack('<Q', len(encoded)) + encoded + b''.join(chunks))


def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """(the JSON header, where the data starts) of a `.safetensors` file, reading only the header."""
  with storage.path(path).open('rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    return json.loads(f.read(size)), 8 + size


def _is_own_safetensors(path: str) -> bool:
  return _safetensors_header(path)[0].get('__metadata__', {}).get('producer') == PRODUCER


def _load_safetensors(path: str) -> dict[str, Any]:
  header, start = _safetensors_header(path)
  header.pop('__metadata__', None)
  data = storage.read_bytes(path)[start:]
  flat = {}
  for name, info in header.items():
    begin, end = info['data_offsets']
    dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
    flat[name] = np.frombuffer(data[begin:end], dtype).astype(dtype.newbyteorder('='), copy=True).reshape(info['shape'])
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
  """Only the params of the state item, as NumPy on the host: no model, no devices, no optimizer state.

  Read with Orbax's item handler: an ocp.Checkpointer would look for a step's `_CHECKPOINT_METADATA` inside the
  item folder, where it never is (the step folder holds it), and log a warning on every read."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state_dir = storage.path(step_dir, 'state')
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(state_dir).tree
    if 'params' not in tree:
      raise ValueError(f"{state_dir} has no 'params' (found {sorted(tree)}): not a simmim_jax train state.")
    params = tree['params']
    restore_args = _tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
    restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={'params': params}, restore_args={'params': restore_args}, partial_restore=True))
  finally:
    handler.close()
  return _tree_map(np.asarray, restored['params'])


TIMM_CONFIG, TIMM_WEIGHTS = 'config.json', 'model.safetensors'  # timm's folder format (save_for_hf, local-dir:)
TIMM_EXTRAS = 'simmim.safetensors'  # beside them: the SimMIM parts timm has no place for (mask token, decoder)


def is_timm_folder(path: str) -> bool:
  """A folder in timm's format: config.json naming an architecture, and model.safetensors."""
  folder = storage.path(path)
  if not (folder.is_dir() and (folder / TIMM_CONFIG).is_file() and (folder / TIMM_WEIGHTS).is_file()):
    return False
  return 'architecture' in json.loads((folder / TIMM_CONFIG).read_text())


def _import_timm_folder(path: str) -> dict[str, Any]:
  """A timm folder (tools/convert_to_torch.py or timm.models.save_for_hf) -> params, its SimMIM extras included."""
  with tempfile.TemporaryDirectory() as tmp:
    names = [TIMM_WEIGHTS] + ([TIMM_EXTRAS] if storage.path(path, TIMM_EXTRAS).is_file() else [])
    state = {}
    for name in names:
      local = os.path.join(path, name)
      if storage.is_url(path):
        local = os.path.join(tmp, name)
        storage.write_bytes(local, storage.read_bytes(os.path.join(path, name)))
      state.update(torch_io.read_state_dict(local))
    return torch_io.import_state_dict(state)


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
  """Nested dict of NumPy arrays from an `.npz` (save_npz) or `.safetensors` (save_safetensors), an Orbax
  checkpoint (workdir, checkpoints dir, step dir), a PyTorch `.pth`/`.safetensors` (official SimMIM or timm
  layout) or a timm folder (config.json + model.safetensors, tools/convert_to_torch.py): the last two through
  simmim_jax.interop, which needs torch. `subtree` ('encoder', 'encoder/blocks_0') selects part of it."""
  if path.endswith((NPZ_SUFFIX, SAFETENSORS_SUFFIX)) and not storage.path(path).is_file():
    raise FileNotFoundError(f'{path} does not exist: give the file written by tools/export_params.py.')
  if path.endswith(NPZ_SUFFIX):
    params = _load_npz(path)
  elif path.endswith(SAFETENSORS_SUFFIX) and _is_own_safetensors(path):
    params = _load_safetensors(path)
  elif path.endswith(TORCH_SUFFIXES) and storage.is_url(path):
    with tempfile.TemporaryDirectory() as tmp:
      params = torch_io.import_torch(_local_copy(path, tmp))
  elif path.endswith(TORCH_SUFFIXES):
    params = torch_io.import_torch(path)
  elif is_timm_folder(path):
    params = _import_timm_folder(path)
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
  """The config beside an `.npz` or inside a `.safetensors` of this package (None when absent), or the one
  stored in an Orbax checkpoint; None for PyTorch files and timm folders (they carry no config of this package)."""
  if path.endswith(SAFETENSORS_SUFFIX) and storage.path(path).is_file() and _is_own_safetensors(path):
    config = _safetensors_header(path)[0]['__metadata__'].get('config')
    return json.loads(config) if config is not None else None
  if path.endswith(TORCH_SUFFIXES) or is_timm_folder(path):
    return None
  if path.endswith(NPZ_SUFFIX):
    json_path = config_path(path)
    if not storage.path(json_path).is_file():
      return None
    config = json.loads(storage.read_text(json_path))
    config.pop(DTYPES_KEY, None)  # the dtype record of the arrays, not part of the config
    return config or None
  step_dir = checkpoint_step_dir(path, step)
  meta_dir = storage.path(step_dir, 'meta')
  if meta_dir.is_dir():
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    config = ocp.JsonCheckpointHandler().restore(meta_dir).get('config')  # the handler: no metadata warning
    if config is not None:
      return config
  workdir_json = os.path.join(os.path.dirname(os.path.dirname(step_dir)), 'config.json')
  if storage.path(workdir_json).is_file():
    return json.loads(storage.read_text(workdir_json))
  return None
