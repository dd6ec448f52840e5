"""Entry point: `python -m simmim_jax.main --config=configs/base.py --workdir=DIR [--config.a.b=value]`."""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow is imported by the data pipeline

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from simmim_jax import cluster

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
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
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
