"""Entry point: `python -m simmim_jax.main --config=configs/base.py --workdir=DIR [--config.a.b=value]`."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported by the data pipeline

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from simmim_jax import cluster, validate
from simmim_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, optionally with :arg.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard events, figures; resumed if present.')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'Run at most this many steps in this call, checkpoint and exit '
                                  '(time-limited jobs); the next call resumes.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', None,
                                 'Default: join the job when a launcher started several processes (TPU slice, SLURM '
                                 'srun, Open MPI, or --coordinator_address). --distributed also asks JAX to detect '
                                 'others; --nodistributed refuses to start under a launcher of several processes.')
_PROCESS_PER_DEVICE = flags.DEFINE_bool('process_per_device', False,
                                        'One process per device (srun --ntasks-per-node=8, mpirun -npernode 8) '
                                        'instead of one per host using all its devices.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (when not auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Process count (when not auto-detected).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index (when not auto-detected).')
_PRINT_CONFIG = flags.DEFINE_bool('print_config', False, 'Print the resolved config (recipe + overrides) and exit.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of a user error (also: SIMMIM_DEBUG=1).')
flags.mark_flags_as_required(['config'])

# What a user can fix (a config value, a path, the data, a full disk): one line, no traceback, unless --debug.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, FloatingPointError)


def run(config, workdir: str, max_steps: int | None = None) -> None:
  """Checks the config, then runs the trainer its task names."""
  validate.check(config)
  if config.task == 'pretrain':
    from simmim_jax.trainers import pretrain  # pylint: disable=import-outside-toplevel  (TensorFlow-free imports)
    pretrain.train(config, workdir, max_steps=max_steps)
  else:
    from simmim_jax.trainers import finetune  # pylint: disable=import-outside-toplevel
    finetune.train(config, workdir, max_steps=max_steps)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _PRINT_CONFIG.value:
    print(_CONFIG.value)
    return
  try:
    plan = cluster.plan(os.environ, distributed=_DISTRIBUTED.value, tpu_chips=cluster.tpu_chips_present(),
                        process_per_device=_PROCESS_PER_DEVICE.value, coordinator_address=_COORDINATOR.value,
                        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except cluster.ClusterError as e:
    sys.exit(f'simmim_jax.main: refusing to start: {e}')
  if plan.distributed:
    print(f'jax.distributed: {plan.describe()}', flush=True)
    cluster.initialize(plan)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required: where checkpoints, metrics and figures go (a path or gs:// URL).')
  try:
    run(_CONFIG.value, _WORKDIR.value, _MAX_STEPS.value)
  except USER_ERRORS as e:
    if _DEBUG.value or os.environ.get('SIMMIM_DEBUG'):
      raise
    sys.exit(f'error: {" ".join(str(e).split())}  (--debug shows the traceback)')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a flag that does not parse (e.g. --config.total_steps=None on an int field) as one
  line, not absl's two with a usage hint."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e} (--helpshort lists the flags, --print_config the config fields and their values).')


def entry() -> None:
  """app.run(main), with a config override that names no field (parsed before main) as one line too."""
  try:
    app.run(main, flags_parser=parse_flags)
  except (AttributeError, KeyError, TypeError) as e:
    if _CONFIG.present or os.environ.get('SIMMIM_DEBUG') or '--debug' in sys.argv:
      raise  # raised inside the run, not by the override parser: a bug, keep the traceback
    sys.exit(f'error: a --config.* override does not fit the recipe ({type(e).__name__}: {e}); '
             '--print_config lists its fields.')


if __name__ == '__main__':
  entry()
