"""Config checks that need nothing but the config, run by main before anything is compiled, read or written.

Each failure is one UserError line that names the field and says what to set. Checks that need the model
or the data (variant names, window tiling, mask geometry, the tokenizer's size) run where those are built:
tasks.build, models/, data/, all still before the first step is compiled.
"""
import jax.numpy as jnp
import ml_collections

from simmim_jax import storage
from simmim_jax.errors import UserError

TASKS = ('pretrain', 'finetune', 'linear_probe')
SCHEDULES = ('multistep', 'cosine', 'linear')


def check(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for the first value a run cannot start with."""
  if config.task not in TASKS:
    raise UserError(f'config.task={config.task!r} is not a task: use one of {", ".join(TASKS)}.')
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint.every_steps', 'optim.accum_steps'):
    value = _get(config, field)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise UserError(f'{field}={value!r} must be a whole number >= 1.')
  _check_duration(config, 'total_')
  _check_duration(config.optim, 'warmup_', allow_zero=True, prefix='optim.')
  total, warmup = config.get('total_steps'), config.optim.get('warmup_steps')
  if total is not None and warmup is not None and warmup >= total:
    raise UserError(f'optim.warmup_steps={warmup} must be below total_steps={total}.')
  if config.optim.schedule not in SCHEDULES:
    raise UserError(f'optim.schedule={config.optim.schedule!r}: use one of {", ".join(SCHEDULES)}.')
  clip = config.optim.get('clip_grad')
  if clip is not None and clip < 0:
    raise UserError(f'optim.clip_grad={clip} must be >= 0: the largest global gradient norm, 0 for no clipping.')
  ratio = config.mask.get('mask_ratio') if 'mask' in config else None
  if ratio is not None and not 0 < ratio < 1:
    raise UserError(f'mask.mask_ratio={ratio} must be in (0, 1): the fraction of the input that is masked.')
  try:
    dtype = jnp.dtype(config.model.dtype)
  except TypeError:
    dtype = None
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise UserError(f"model.dtype={config.model.dtype!r}: use 'float32', 'bfloat16' or 'float16'.")
  init_from = config.get('init_from')
  if config.task in ('finetune', 'linear_probe') and not init_from and not config.get('from_scratch'):
    raise UserError('init_from is not set: pass --config.init_from=PATH (your pretraining workdir, e.g. the one of '
                    'configs/base.py, or a checkpoint step, an exported .npz / .safetensors, a timm folder), or '
                    "--config.from_scratch=True to start from random init (the ':scratch' recipes set it).")
  if init_from and config.get('from_scratch'):
    raise UserError(f'init_from={init_from!r} and from_scratch=True: set one of them.')
  if init_from and not storage.path(init_from).exists():
    raise UserError(f'init_from={init_from!r} does not exist: give a pretraining workdir, a checkpoint step '
                    'directory, an exported .npz, or an official / timm .pth or .safetensors file.')


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for name in field.split('.'):
    if name not in node:
      return None
    node = node[name]
  return node


def _check_duration(node: ml_collections.ConfigDict, stem: str, allow_zero: bool = False, prefix: str = '') -> None:
  """`<stem>steps` (which wins) or `<stem>epochs`: one of them set, and positive (or zero where allowed)."""
  steps, epochs = node.get(f'{stem}steps'), node.get(f'{stem}epochs')
  if steps is None and epochs is None:
    raise UserError(f'Set {prefix}{stem}steps or {prefix}{stem}epochs.')
  name, value = (f'{stem}steps', steps) if steps is not None else (f'{stem}epochs', epochs)
  if value < 0 or (value == 0 and not allow_zero):
    raise UserError(f'{prefix}{name}={value} must be {">= 0" if allow_zero else "> 0"}.')
