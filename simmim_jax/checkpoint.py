"""Orbax checkpoints under workdir/checkpoints: async, keep-N, auto-resume; the config beside them as JSON.
workdir may be a URL (gs://bucket/run): Orbax writes there itself (tensorstore for arrays, epath for the rest)."""
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from simmim_jax import storage


class Checkpointer:
  """Saves and restores the train state (any sharding, any process count) plus a JSON metadata item."""

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict, subdir: str = 'checkpoints',
               keep: int | None = None):
    self.directory = os.path.join(storage.absolute(workdir), subdir)  # a URL stays a URL
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or cfg.keep, enable_async_checkpointing=cfg.enable_async,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an async save; the caller keeps training while it is written."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the shardings of `abstract_state` (a pytree of ShapeDtypeStruct with .sharding)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
      raise RuntimeError(
          f'Could not restore checkpoint step {step} from {self.directory}: {e}\nIf it is corrupt or from a '
          'different model, delete that step directory (earlier steps are kept) or use a new --workdir.') from e
    return restored.state, restored.meta

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Only the JSON item of `step` (no arrays read)."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice (SIGTERM on TPU/SLURM) has been synced at `step`."""
    return self.manager.reached_preemption(step)

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def set_aside(self, step: int) -> str:
    """Renames an unreadable step out of Orbax's sight (`<step>.unreadable`, nothing deleted); returns where."""
    source = storage.path(self.directory) / str(step)
    target = storage.path(self.directory) / f'{step}.unreadable'
    if jax.process_index() == 0:
      source.rename(target)
    self.manager.reload()
    return os.fspath(target)

  def remove_partial_saves(self) -> None:
    """Deletes the temporary directories of saves that never committed (a kill or a failed write); committed
    steps are never touched."""
    if jax.process_index() == 0 and storage.path(self.directory).exists():
      for partial in storage.path(self.directory).glob('*.orbax-checkpoint-tmp*'):
        partial.rmtree()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def check_for_errors(self) -> None:
    """Raises the error of an async save that has failed, without waiting for one in flight."""
    self.manager.check_for_errors()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """workdir/config.json (process 0 only), the record of what this run was."""
  if jax.process_index() == 0:
    storage.write_text(storage.path(workdir) / 'config.json', config.to_json_best_effort(indent=2, sort_keys=True))


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON data (stored inside every checkpoint)."""
  return json.loads(config.to_json_best_effort())
