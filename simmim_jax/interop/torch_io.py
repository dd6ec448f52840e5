"""PyTorch files <-> NumPy state dicts (torch imported lazily), and import of any supported layout into params.

bfloat16 tensors cross as their bits, so nothing is rounded on the way. A timm-layout export keeps the
SimMIM parts timm has no place for (mask token, decoder) in a sidecar `<name>.simmim.safetensors`.
"""
import collections
import os
import pickle
from typing import Any

import ml_dtypes
import numpy as np

from simmim_jax.interop import official, text, timm

SIDECAR = '.simmim.safetensors'


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('Reading or writing PyTorch files needs torch and safetensors: '
                      'pip install torch safetensors (or: pip install -e ".[interop]").') from e
  return torch


def to_numpy(tensor: Any) -> np.ndarray:
  """A torch tensor -> NumPy, bfloat16 as ml_dtypes.bfloat16 (bit-exact)."""
  torch = _torch()
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def to_tensor(array: np.ndarray) -> Any:
  """NumPy (incl. ml_dtypes.bfloat16) -> a contiguous torch tensor, bit-exact."""
  torch = _torch()
  array = np.ascontiguousarray(array)
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` file or a `.pth`/`.pt`/`.bin` checkpoint (state dict under 'model'/'state_dict' or bare)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist: give a .pth/.safetensors checkpoint file.')
  _torch()  # one clear message when torch is missing
  if path.endswith('.safetensors'):
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    state = load_file(path)
  else:
    state = _load_pth(path)
    for key in ('model', 'state_dict', 'module'):
      if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
  state = {k.removeprefix('module.'): v for k, v in state.items() if hasattr(v, 'dtype')}
  return {k: to_numpy(v) for k, v in state.items()}


def _load_pth(path: str) -> Any:
  """torch.load restricted to weights (no code from the file ever runs), also for official training checkpoints."""
  torch = _torch()
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError:
    pass
  # microsoft/SimMIM's save_checkpoint also pickles its yacs config (a dict subclass) beside the weights: read
  # such objects back as plain OrderedDicts, still with the weights-only unpickler.
  names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
  try:
    with torch.serialization.safe_globals([(collections.OrderedDict, name) for name in names]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f'{path} holds Python objects besides tensors ({", ".join(names)}) that cannot be read safely: '
                     "save its state dict alone (torch.save(checkpoint['model'], 'weights.pth')) and pass that.") from e


def write_safetensors(path: str, state_dict: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """NumPy state dict -> a safetensors file PyTorch loads with safetensors.torch.load_file."""
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: to_tensor(v) for k, v in state_dict.items()}, path, metadata=metadata)


def import_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
  """An official SimMIM, timm or text-layout state dict (detected from its names) -> params for this package."""
  if 'embedding.weight' in state_dict:
    return text.from_torch(state_dict)
  if official.is_official(state_dict):
    return official.from_official(state_dict)
  return timm.from_timm(state_dict)


def import_torch(path: str) -> dict[str, Any]:
  """A PyTorch checkpoint file -> params {'encoder': ..., and 'decoder'/'fc_norm'/'head' when present}.

  A timm-layout file written by tools/convert_to_torch.py brings its sidecar (mask token, decoder) along.
  """
  state = read_state_dict(path)
  sidecar = path.removesuffix('.safetensors') + SIDECAR
  if path.endswith('.safetensors') and not path.endswith(SIDECAR) and os.path.isfile(sidecar):
    state.update(read_state_dict(sidecar))
  return import_state_dict(state)
