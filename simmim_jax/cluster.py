"""Multi-process start-up: which launcher started this process and how it joins jax.distributed.

`detect` reads the launcher's environment (a Cloud TPU slice, SLURM's srun, Open MPI's mpirun, or an explicit
coordinator) and returns a Plan; it is a pure function of the env dict, so tests pass their own. `initialize`
applies a Plan (jax.distributed.initialize, before anything touches a device).

By default one process runs per host and uses all of that host's devices. JAX's own detection under SLURM and
Open MPI instead binds one device per process (its local rank), so a job with one task per 8-GPU node would use
GPU 0 alone; here the arguments are computed and JAX's detection is switched off, except on a TPU VM without
those variables, where JAX asks the metadata server (it never restricts TPU devices). `process_per_device` asks
for one process per device (SLURM --ntasks-per-node=8, mpirun -npernode 8). A launcher that started several
processes which would not join one job is refused: each would train its own copy into the same workdir.
"""
import dataclasses
import glob
import os
import re
import zlib
from collections.abc import Mapping, MutableMapping

TPU_PORT = 8482  # JAX's fixed coordinator port on TPU slices
TPU_PCI_VENDOR = '0x1ae0'  # Google: Cloud TPU chips are PCI devices of this vendor
VISIBLE_DEVICES = ('CUDA_VISIBLE_DEVICES', 'ROCR_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES')
# libtpu (the `aot` or `tpu` extra) is loaded by JAX on any host and looks for the TPU VM it runs on: without TPU
# chips it prints a screen of warnings, then JAX falls back to the next platform. These say "not a TPU VM" (the
# values tools/aot_check.py sets, on any host); a TPU VM has chips and sets its own.
NO_TPU_VM_ENV = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_WORKER_ID': '0', 'TPU_WORKER_HOSTNAMES': 'localhost',
                 'TPU_ACCELERATOR_TYPE': 'v4-8'}


class ClusterError(RuntimeError):
  """A launcher set-up this program refuses to start in; the message is one line that says what to do."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the job. launcher 'none': a single process, no jax.distributed."""
  # 'none' | 'explicit' | 'slurm' | 'openmpi' | 'tpu' | 'tpu-vm' (JAX asks the TPU metadata server) | 'auto' (JAX's
  # own detection, for --distributed where none of these was found)
  launcher: str
  num_processes: int | None = 1  # None where JAX finds it out ('tpu-vm', 'auto')
  process_id: int | None = 0
  coordinator_address: str | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: every device of this host
  num_nodes: int | None = 1
  processes_per_node: int = 1

  @property
  def distributed(self) -> bool:
    return self.launcher != 'none'

  def describe(self) -> str:
    """One line for the log."""
    if not self.distributed:
      return 'single process'
    if self.num_processes is None:
      return f'{self.launcher}: JAX finds the processes and the coordinator'
    devices = 'all local devices' if self.local_device_ids is None else f'local devices {list(self.local_device_ids)}'
    return (f'{self.launcher}: process {self.process_id} of {self.num_processes} ({self.num_nodes} node(s) x '
            f'{self.processes_per_node}), coordinator {self.coordinator_address}, {devices}')


def tpu_chips_present(sys_root: str = '/sys') -> bool:
  """Whether this host has Cloud TPU chips (PCI vendor 0x1ae0), read from sysfs without starting a runtime."""
  for vendor in glob.glob(os.path.join(sys_root, 'bus', 'pci', 'devices', '*', 'vendor')):
    try:
      with open(vendor, encoding='ascii') as f:
        if f.read().strip() == TPU_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def quiet_libtpu_without_tpu(env: MutableMapping[str, str], tpu_chips: bool) -> None:
  """On a host without TPU chips, tells libtpu there is no TPU VM to look for (values already set are kept).

  The package does it on import, before JAX starts a backend. The chips are found as JAX finds them (sysfs),
  and JAX itself sets TPU_SKIP_MDS_QUERY where it sees none. `detect` ignores a one-worker listing on a host
  without chips, so the listing neither invents a TPU launcher nor hides SLURM or Open MPI."""
  if not tpu_chips:
    for key, value in NO_TPU_VM_ENV.items():
      env.setdefault(key, value)


def detect(env: Mapping[str, str], *, tpu_chips: bool = False, process_per_device: bool = False,
           coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None) -> Plan:
  """The Plan for this process from its environment and the explicit flags (which win over the launcher's).

  Raises ClusterError where a launcher started several processes that cannot be joined as they stand.
  """
  found = _explicit(env, coordinator_address, num_processes, process_id)
  if found is None:
    found = _tpu(env, tpu_chips) or _slurm(env) or _openmpi(env)
  if found is None:
    if process_per_device:
      raise ClusterError('--process_per_device needs a launcher that starts one process per device (srun, mpirun); '
                         'none was found')
    return Plan('none')
  plan, local_rank = found
  if plan.num_processes == 1 and plan.launcher != 'explicit':
    return Plan('none')  # srun -n 1, mpirun -n 1, a single-host TPU VM with the variables set
  if plan.launcher in ('tpu', 'tpu-vm'):
    if process_per_device:
      raise ClusterError('--process_per_device is not for TPUs: start one process per TPU host (all its chips)')
    return plan
  if process_per_device:
    if local_rank is None:
      raise ClusterError('--process_per_device needs the local rank, which only a launcher (srun, mpirun) gives; '
                         'with --coordinator_address set JAX_LOCAL_DEVICE_IDS instead')
    return dataclasses.replace(plan, local_device_ids=_one_device(env, local_rank))
  if plan.processes_per_node > 1:
    raise ClusterError(f'{plan.launcher} started {plan.processes_per_node} processes on this node, but by default one '
                       'process per host uses all its devices: start one task per node, or pass --process_per_device')
  return plan


def plan(env: Mapping[str, str], *, distributed: bool | None = None, tpu_chips: bool = False,
         process_per_device: bool = False, coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None) -> Plan:
  """What main does: `detect`, then --distributed (None: as detected; True: JAX's own detection where nothing
  was found, e.g. Kubernetes or mpi4py; False: a single process, refused where the launcher started several)."""
  found = detect(env, tpu_chips=tpu_chips, process_per_device=process_per_device,
                 coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  if distributed is False:
    if found.distributed and found.num_processes != 1 and found.num_processes is not None:
      nodes = f' on {found.num_nodes} node(s)' if found.num_nodes else ''
      raise ClusterError(f'{found.launcher} started {found.num_processes} processes{nodes} but --nodistributed was '
                         'given: each would train its own copy into the same workdir; drop --nodistributed')
    return Plan('none')
  if distributed and not found.distributed:
    return Plan('auto', None, None, None, None, None)
  return found


def initialize(plan: Plan) -> None:
  """jax.distributed.initialize for the plan (nothing for a single process). Call before any device is used."""
  if not plan.distributed:
    return
  import jax  # pylint: disable=import-outside-toplevel
  if plan.launcher == 'tpu-vm':
    # Recommended but optional on TPUs (the TPU runtime links the hosts of a slice by itself): where the metadata
    # server does not answer as on a Cloud TPU VM (e.g. some hosted notebooks), go on without it.
    try:
      jax.distributed.initialize()
    except Exception as e:  # pylint: disable=broad-except
      print(f'jax.distributed not initialised on this TPU host ({type(e).__name__}: {e}); going on without it',
            flush=True)
    return
  if plan.launcher == 'auto':
    jax.distributed.initialize()  # --distributed with no launcher we know: JAX's own detection
    return
  jax.distributed.initialize(plan.coordinator_address, plan.num_processes, plan.process_id,
                             local_device_ids=None if plan.local_device_ids is None else list(plan.local_device_ids),
                             # Our arguments stand: JAX's detection would bind one device per process.
                             cluster_detection_method='deactivate')


def _explicit(env: Mapping[str, str], address: str | None, count: int | None, index: int | None
              ) -> tuple[Plan, int | None] | None:
  """--coordinator_address/--num_processes/--process_id, or JAX_COORDINATOR_ADDRESS/_NUM_PROCESSES/_PROCESS_ID.

  A launcher's count and rank fill in what the flags leave out (e.g. srun with a coordinator of your choice).
  """
  address = address or env.get('JAX_COORDINATOR_ADDRESS')
  if not address:
    if count is not None or index is not None:
      raise ClusterError('--num_processes/--process_id need --coordinator_address=HOST:PORT (the host of process 0)')
    return None
  try:
    launched = _slurm(env) or _openmpi(env, need_address=False)
  except ClusterError:  # a SLURM shell outside a step gives no ranks; the flags must
    launched = None
  count = count if count is not None else _int(env, 'JAX_NUM_PROCESSES')
  index = index if index is not None else _int(env, 'JAX_PROCESS_ID')
  if launched is not None:
    plan, local_rank = launched
    count = plan.num_processes if count is None else count
    index = plan.process_id if index is None else index
    nodes, per_node = plan.num_nodes, plan.processes_per_node
  else:
    local_rank, nodes, per_node = None, count, 1
  if count is None or index is None:
    raise ClusterError(f'--coordinator_address={address} also needs --num_processes and --process_id')
  return Plan('explicit', count, index, address, None, nodes, per_node), local_rank


def _tpu(env: Mapping[str, str], tpu_chips: bool) -> tuple[Plan, None] | None:
  """A TPU slice whose workers are listed in the environment (GKE, queued resources, multislice), else a TPU VM."""
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  workers = hosts.split(',') if hosts else []
  slices = _int(env, 'MEGASCALE_NUM_SLICES') or 1
  # One worker on a host without chips is no TPU job: the listing quiet_libtpu_without_tpu sets (inherited by
  # child processes), which must not hide a SLURM or Open MPI launcher.
  if workers and 'TPU_WORKER_ID' in env and (tpu_chips or len(workers) * slices > 1):
    index = int(env['TPU_WORKER_ID']) + (_int(env, 'MEGASCALE_SLICE_ID') or 0) * len(workers)
    # As JAX: the multislice coordinator if there is one, else the slice's first worker, on a fixed port.
    host = (env.get('MEGASCALE_COORDINATOR_ADDRESS') or workers[0]).split(':')[0]
    port = env.get('JAX_COORDINATOR_PORT') or TPU_PORT
    return Plan('tpu', len(workers) * slices, index, f'{host}:{port}', None, len(workers) * slices), None
  if tpu_chips:
    return Plan('tpu-vm', None, None, None, None, None), None
  return None


def _slurm(env: Mapping[str, str]) -> tuple[Plan, int] | None:
  """Inside an srun step. In a batch script or salloc shell of several nodes (no step), refuse: only one
  process would run, on the first node."""
  if 'SLURM_JOB_ID' not in env:
    return None
  if 'SLURM_STEP_NUM_TASKS' not in env:
    nodes = _int(env, 'SLURM_JOB_NUM_NODES') or _int(env, 'SLURM_NNODES') or 1
    if nodes > 1:
      raise ClusterError(f'this is a {nodes}-node SLURM allocation but not an srun step: start the program with '
                         'srun (one task per node) so that every node runs it')
    return None
  tasks = int(env['SLURM_STEP_NUM_TASKS'])
  nodes = _int(env, 'SLURM_STEP_NUM_NODES') or 1
  per_node = _tasks_on_node(env.get('SLURM_STEP_TASKS_PER_NODE', str(tasks)), _int(env, 'SLURM_NODEID') or 0)
  port = env.get('JAX_COORDINATOR_PORT') or _port(int(env['SLURM_JOB_ID']))
  host = first_host(env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or 'localhost')
  return (Plan('slurm', tasks, int(env['SLURM_PROCID']), f'{host}:{port}', None, nodes, per_node),
          int(env.get('SLURM_LOCALID', 0)))


def _openmpi(env: Mapping[str, str], need_address: bool = True) -> tuple[Plan, int] | None:
  """Started by Open MPI's mpirun. The coordinator is the launcher's host (Open MPI 4's OMPI_MCA_orte_hnp_uri, as
  JAX does); Open MPI 5 publishes no launcher address, so there a job of several nodes needs --coordinator_address."""
  if 'OMPI_COMM_WORLD_SIZE' not in env:
    return None
  size, rank = int(env['OMPI_COMM_WORLD_SIZE']), int(env['OMPI_COMM_WORLD_RANK'])
  per_node = _int(env, 'OMPI_COMM_WORLD_LOCAL_SIZE') or size
  nodes = -(-size // per_node)
  uri = env.get('OMPI_MCA_orte_hnp_uri')
  if uri:
    match = re.search(r'tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]', uri)
    if match is None:
      raise ClusterError(f'cannot read the launcher address from OMPI_MCA_orte_hnp_uri={uri!r}: '
                         'pass --coordinator_address=HOST:PORT')
    host = next(g for g in match.groups() if g)
    job = int(uri.split('.', 1)[0]) // 2**12  # Open MPI job ids are multiples of 2^12
  elif nodes == 1 or not need_address:
    host, job = '127.0.0.1', zlib.crc32(env.get('PMIX_NAMESPACE', 'ompi').encode())  # same on every rank
  else:
    raise ClusterError(f'Open MPI started {size} processes on {nodes} nodes but gives no launcher address '
                       '(Open MPI 5): pass --coordinator_address=HOST_OF_RANK_0:PORT')
  port = env.get('JAX_COORDINATOR_PORT') or _port(job)
  return (Plan('openmpi', size, rank, f'{host}:{port}', None, nodes, per_node),
          int(env.get('OMPI_COMM_WORLD_LOCAL_RANK', 0)))


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: 'node[007-012,020],gpu1' -> 'node007'."""
  head = re.match(r'([^,\[]*)(?:\[([^\],\-]*))?', nodelist)
  return head.group(1) + (head.group(2) or '')


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
  """SLURM's compressed per-node task counts ('8(x2),4') at this node's index."""
  counts = []
  for part in tasks_per_node.split(','):
    match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if match is None:
      raise ClusterError(f'cannot read SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}')
    counts += [int(match.group(1))] * int(match.group(2) or 1)
  return counts[min(node_id, len(counts) - 1)]


def _one_device(env: Mapping[str, str], local_rank: int) -> tuple[int, ...] | None:
  """The device of this local rank; None where the launcher already left this process one visible device
  (srun --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task, so its only device is index 0)."""
  for name in VISIBLE_DEVICES:
    if name in env and len([d for d in env[name].split(',') if d.strip()]) == 1:
      return None
  return (local_rank,)


def _port(job_id: int) -> int:
  """As JAX: a port in [61440, 65535] from the job id, the same on every process of the job."""
  return job_id % 2**12 + (65535 - 2**12 + 1)


def _int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  return int(value) if value not in (None, '') else None
