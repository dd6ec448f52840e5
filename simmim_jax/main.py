"""Entry point: `python -m simmim_jax.main --config=configs/base.py --workdir=DIR [--config.a.b=value]`."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported by the data pipeline

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, optionally with :arg.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events, figures; resumed if present.')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'Run at most this many steps in this call, checkpoint and exit '
                                  '(time-limited jobs); the next call resumes.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False,
                                 'Call jax.distributed.initialize() (multi-host: TPU pods, SLURM, Open MPI).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (when not auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Process count (when not auto-detected).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (when not auto-detected).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
  config = _CONFIG.value
  if '://' in _WORKDIR.value:
    # Checkpoints, metrics.jsonl and figures are written through the local filesystem.
    raise app.UsageError(f'--workdir={_WORKDIR.value}: give a filesystem path (a shared one for multi-host runs, '
                         'e.g. a bucket mounted with gcsfuse); URLs such as gs:// are not supported.')
  if config.task == 'pretrain':
    from simmim_jax.trainers import pretrain  # pylint: disable=import-outside-toplevel
    pretrain.train(config, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  elif config.task in ('finetune', 'linear_probe'):
    from simmim_jax.trainers import finetune  # pylint: disable=import-outside-toplevel
    finetune.train(config, _WORKDIR.value, max_steps=_MAX_STEPS.value)
  else:
    raise app.UsageError(f"Unknown config.task {config.task!r}: use 'pretrain', 'finetune' or 'linear_probe'.")


if __name__ == '__main__':
  app.run(main)
