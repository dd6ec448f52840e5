"""Multi-process start-up (simmim_jax/cluster.py) and the topology-aware mesh (sharding.make_mesh).

Detection is a function of an env dict, tested directly; then real jax.distributed runs of 2 processes on
localhost with SLURM / Open MPI / TPU-slice variables set by the test, and main's refusals.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from simmim_jax import cluster, config_io, sharding
from simmim_jax.cluster import ClusterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def srun(nodes: int, per_node: int, rank: int, **extra: str) -> dict[str, str]:
  """The variables srun gives task `rank` of a step with `per_node` tasks on each of `nodes` nodes."""
  return {'SLURM_JOB_ID': '4242', 'SLURM_STEP_ID': '0', 'SLURM_STEP_NUM_TASKS': str(nodes * per_node),
          'SLURM_STEP_NUM_NODES': str(nodes), 'SLURM_STEP_NODELIST': f'gpu[007-{7 + nodes - 1:03d}]',
          'SLURM_STEP_TASKS_PER_NODE': f'{per_node}(x{nodes})', 'SLURM_NNODES': str(nodes),
          'SLURM_PROCID': str(rank), 'SLURM_LOCALID': str(rank % per_node), 'SLURM_NODEID': str(rank // per_node),
          **extra}


def mpirun(size: int, per_node: int, rank: int, uri: str | None = '3418292224.0;tcp://10.0.0.5,10.1.0.5:40123',
           **extra: str) -> dict[str, str]:
  env = {'OMPI_COMM_WORLD_SIZE': str(size), 'OMPI_COMM_WORLD_RANK': str(rank),
         'OMPI_COMM_WORLD_LOCAL_RANK': str(rank % per_node), 'OMPI_COMM_WORLD_LOCAL_SIZE': str(per_node), **extra}
  if uri:
    env['OMPI_MCA_orte_hnp_uri'] = uri
  return env


# --- detection from env dicts ---------------------------------------------------------------------------------

def test_no_launcher_is_a_single_process():
  assert cluster.detect({}) == cluster.Plan('none')
  assert not cluster.detect({'HOME': '/root'}).distributed


def test_slurm_one_task_per_node_uses_all_local_devices():
  plan = cluster.detect(srun(nodes=4, per_node=1, rank=2))
  # JAX would bind local rank 0's GPU alone; here local_device_ids stays None (every device of the node).
  assert plan == cluster.Plan('slurm', 4, 2, f'gpu007:{4242 % 4096 + 61440}', None, 4, 1)
  assert 'process 2 of 4' in plan.describe() and 'all local devices' in plan.describe()


def test_slurm_one_task_per_device_needs_the_flag():
  with pytest.raises(ClusterError, match='8 processes on this node.*--process_per_device'):
    cluster.detect(srun(nodes=2, per_node=8, rank=11))
  plan = cluster.detect(srun(nodes=2, per_node=8, rank=11), process_per_device=True)
  assert (plan.num_processes, plan.process_id, plan.local_device_ids) == (16, 11, (3,))
  # srun --gpus-per-task=1 already leaves each task its one GPU (index 0): restrict nothing further.
  plan = cluster.detect(srun(nodes=2, per_node=8, rank=11, CUDA_VISIBLE_DEVICES='3'), process_per_device=True)
  assert plan.local_device_ids is None


def test_slurm_batch_script_of_several_nodes_is_refused():
  # sbatch's own shell (no srun step): only this one process would run, on the first node.
  batch = {'SLURM_JOB_ID': '7', 'SLURM_NNODES': '2', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_NTASKS': '2',
           'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_NODEID': '0'}
  with pytest.raises(ClusterError, match='2-node SLURM allocation but not an srun step'):
    cluster.detect(batch)
  assert not cluster.detect({**batch, 'SLURM_NNODES': '1', 'SLURM_JOB_NUM_NODES': '1'}).distributed
  assert not cluster.detect(srun(nodes=1, per_node=1, rank=0)).distributed  # srun -n 1


def test_slurm_port_override_and_node_lists():
  assert cluster.detect(srun(2, 1, 0, JAX_COORDINATOR_PORT='1234')).coordinator_address == 'gpu007:1234'
  assert cluster.first_host('node[007-012,020],gpu1') == 'node007'
  assert cluster.first_host('a1,b2') == 'a1' and cluster.first_host('solo') == 'solo'
  assert cluster.first_host('n[3,5-6]') == 'n3'
  env = srun(3, 2, 5, SLURM_STEP_TASKS_PER_NODE='2(x2),1', SLURM_NODEID='2')
  assert cluster.detect(env).processes_per_node == 1


def test_openmpi():
  plan = cluster.detect(mpirun(size=2, per_node=1, rank=1))
  # As JAX: the launcher's first address, the port from the job id (a multiple of 2^12).
  assert plan == cluster.Plan('openmpi', 2, 1, f'10.0.0.5:{3418292224 // 4096 % 4096 + 61440}', None, 2, 1)
  with pytest.raises(ClusterError, match='4 processes on this node'):
    cluster.detect(mpirun(size=8, per_node=4, rank=0))
  assert cluster.detect(mpirun(8, 4, 6), process_per_device=True).local_device_ids == (2,)
  # Open MPI 5 publishes no launcher address: fine on one node, refused across nodes unless given one.
  plan = cluster.detect(mpirun(4, 4, 3, uri=None, PMIX_NAMESPACE='prterun-h-77@1'), process_per_device=True)
  assert plan.coordinator_address.startswith('127.0.0.1:') and plan.num_nodes == 1
  with pytest.raises(ClusterError, match='--coordinator_address'):
    cluster.detect(mpirun(4, 2, 3, uri=None))
  plan = cluster.detect(mpirun(4, 2, 3, uri=None), process_per_device=True, coordinator_address='h0:5555')
  assert (plan.launcher, plan.num_processes, plan.process_id, plan.local_device_ids) == ('explicit', 4, 3, (1,))


def test_tpu_slice_from_its_variables():
  env = {'TPU_WORKER_HOSTNAMES': 't-0,t-1,t-2,t-3', 'TPU_WORKER_ID': '2'}
  assert cluster.detect(env) == cluster.Plan('tpu', 4, 2, 't-0:8482', None, 4, 1)
  multislice = {**env, 'MEGASCALE_NUM_SLICES': '2', 'MEGASCALE_SLICE_ID': '1',
                'MEGASCALE_COORDINATOR_ADDRESS': 'coord:1234'}
  assert cluster.detect(multislice) == cluster.Plan('tpu', 8, 6, 'coord:8482', None, 8, 1)
  with pytest.raises(ClusterError, match='not for TPUs'):
    cluster.detect(env, process_per_device=True)
  assert not cluster.detect({'TPU_WORKER_HOSTNAMES': 'solo', 'TPU_WORKER_ID': '0'}).distributed
  # A TPU VM without those variables: JAX asks the metadata server.
  assert cluster.detect({}, tpu_chips=True).launcher == 'tpu-vm'


def test_the_no_tpu_listing_hides_no_launcher():
  # What the package sets for libtpu on a host without chips reaches child processes: under srun it must still
  # read as SLURM, and alone as a single process.
  env: dict[str, str] = {}
  cluster.quiet_libtpu_without_tpu(env, tpu_chips=False)
  assert env == cluster.NO_TPU_VM_ENV
  assert cluster.detect({**env, **srun(nodes=2, per_node=1, rank=1)}).launcher == 'slurm'
  assert cluster.detect(env) == cluster.Plan('none')
  kept = {'TPU_WORKER_HOSTNAMES': 't-0,t-1', 'TPU_WORKER_ID': '1'}
  cluster.quiet_libtpu_without_tpu(kept, tpu_chips=False)
  assert cluster.detect(kept).num_processes == 2  # a real listing is kept as it was
  on_tpu: dict[str, str] = {}
  cluster.quiet_libtpu_without_tpu(on_tpu, tpu_chips=True)
  assert on_tpu == {}


def test_tpu_chips_are_found_in_sysfs(tmp_path):
  for i, vendor in enumerate(['0x8086', '0x10de']):
    (tmp_path / 'bus/pci/devices' / f'0000:0{i}').mkdir(parents=True)
    (tmp_path / 'bus/pci/devices' / f'0000:0{i}' / 'vendor').write_text(vendor + '\n')
  assert not cluster.tpu_chips_present(str(tmp_path))
  (tmp_path / 'bus/pci/devices/0000:05').mkdir()
  (tmp_path / 'bus/pci/devices/0000:05/vendor').write_text('0x1ae0\n')
  assert cluster.tpu_chips_present(str(tmp_path))


def test_explicit_coordinator():
  plan = cluster.detect({}, coordinator_address='h:1', num_processes=2, process_id=1)
  assert plan == cluster.Plan('explicit', 2, 1, 'h:1', None, 2, 1)
  env = {'JAX_COORDINATOR_ADDRESS': 'h:2', 'JAX_NUM_PROCESSES': '3', 'JAX_PROCESS_ID': '0'}
  assert cluster.detect(env).num_processes == 3
  with pytest.raises(ClusterError, match='needs --num_processes'):
    cluster.detect({}, coordinator_address='h:1')
  with pytest.raises(ClusterError, match='need --coordinator_address'):
    cluster.detect({}, num_processes=2)
  # srun with a coordinator of your choice: srun gives the count and the rank.
  plan = cluster.detect(srun(2, 1, 1), coordinator_address='login:9999')
  assert (plan.launcher, plan.num_processes, plan.process_id, plan.coordinator_address) == ('explicit', 2, 1,
                                                                                            'login:9999')


def test_plan_applies_the_distributed_flag():
  with pytest.raises(ClusterError, match='2 processes on 2 node.*--nodistributed'):
    cluster.plan(srun(2, 1, 0), distributed=False)
  assert cluster.plan({}, distributed=False) == cluster.Plan('none')
  assert cluster.plan({}, tpu_chips=True, distributed=False) == cluster.Plan('none')  # count unknown there
  assert cluster.plan({}, distributed=True).launcher == 'auto'  # JAX's own detection (k8s, mpi4py)
  assert cluster.plan(srun(2, 1, 0)).launcher == 'slurm'


# --- the mesh ---------------------------------------------------------------------------------------------------

def test_single_process_mesh_comes_from_mesh_utils():
  config = config_io.load_config('configs/base.py', {'mesh.fsdp': 2})
  devices = jax.devices()[:8]
  mesh = sharding.make_mesh(config.mesh, devices)
  assert mesh.shape == {'data': 4, 'fsdp': 2}
  np.testing.assert_array_equal(mesh.devices, mesh_utils.create_device_mesh((4, 2), devices))
  assert sharding.make_mesh(config.mesh, devices[:2]).shape == {'data': 1, 'fsdp': 2}  # a subset, as tests pass


def test_hybrid_split_keeps_fsdp_inside_a_host():
  assert sharding._hybrid_split(data=4, fsdp=2, granules=2, per_granule=4) == ((2, 2), (2, 1))
  assert sharding._hybrid_split(data=8, fsdp=1, granules=2, per_granule=4) == ((4, 1), (2, 1))
  assert sharding._hybrid_split(data=1, fsdp=8, granules=2, per_granule=4) == ((1, 4), (1, 2))  # fsdp spans hosts
  assert sharding._hybrid_split(data=6, fsdp=2, granules=4, per_granule=3) == ((3, 1), (2, 2))  # fsdp across 2


# --- real jax.distributed on localhost ----------------------------------------------------------------------------

# Each process: plan from its environment, initialise, build the mesh, and run a jitted global sum.
WORKER = r'''
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from simmim_jax import cluster, config_io, sharding
plan = cluster.plan(os.environ, process_per_device='--process_per_device' in sys.argv)
cluster.initialize(plan)
config = config_io.load_config('configs/base.py', {'mesh.fsdp': int(sys.argv[1])})
mesh = sharding.make_mesh(config.mesh)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P(('data', 'fsdp'))),
                                           np.full((jax.local_device_count(),), jax.process_index() + 1.0))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
rows = [sorted({d.process_index for d in row}) for row in mesh.devices]
print(json.dumps({'plan': plan.describe(), 'process': jax.process_index(), 'count': jax.process_count(),
                  'devices': jax.device_count(), 'mesh': dict(mesh.shape), 'rows': rows, 'sum': float(total)}))
jax.distributed.shutdown()
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(envs: list[dict[str, str]], args: list[str], devices: int = 2) -> list[dict]:
  """Starts one worker per env (as the launcher would) and returns each one's JSON line."""
  import json  # pylint: disable=import-outside-toplevel
  base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'PMIX'))}
  base.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu',
              PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, '-c', WORKER, *args], cwd=ROOT, env={**base, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
  return [json.loads(o[0].strip().splitlines()[-1]) for o in outputs]


def test_two_slurm_nodes_on_localhost_join_one_job():
  port = str(free_port())
  envs = [srun(2, 1, i, SLURM_STEP_NODELIST='localhost', JAX_COORDINATOR_PORT=port) for i in range(2)]
  results = launch(envs, ['2'])
  for i, r in enumerate(results):
    assert r['plan'].startswith(f'slurm: process {i} of 2') and 'all local devices' in r['plan']
    assert (r['process'], r['count'], r['devices']) == (i, 2, 4)
    # fsdp=2 inside each host, data across the two: each mesh row is one process's devices.
    assert r['mesh'] == {'data': 2, 'fsdp': 2} and r['rows'] == [[0], [1]]
    assert r['sum'] == 2 * 1.0 + 2 * 2.0


def test_open_mpi_one_process_per_device_on_localhost():
  port = str(free_port())
  envs = [mpirun(2, 2, i, uri=None, PMIX_NAMESPACE='prterun-test@1', JAX_COORDINATOR_PORT=port) for i in range(2)]
  results = launch(envs, ['1', '--process_per_device'], devices=1)
  for i, r in enumerate(results):
    assert r['plan'].startswith(f'openmpi: process {i} of 2') and f'local devices [{i}]' in r['plan']
    assert (r['count'], r['devices'], r['mesh']) == (2, 2, {'data': 2, 'fsdp': 1})
    assert r['sum'] == 3.0


def test_tpu_slice_variables_on_localhost():
  # The GKE / queued-resource variables of a 2-host slice, pointed at localhost (the TPU runtime itself cannot run
  # here: this checks the detection and the start-up path, on CPU devices).
  port = str(free_port())
  envs = [{'TPU_WORKER_HOSTNAMES': '127.0.0.1,127.0.0.1', 'TPU_WORKER_ID': str(i), 'JAX_COORDINATOR_PORT': port}
          for i in range(2)]
  results = launch(envs, ['4'])
  for i, r in enumerate(results):
    assert r['plan'].startswith(f'tpu: process {i} of 2') and (r['count'], r['devices']) == (2, 4)
    assert r['mesh'] == {'data': 1, 'fsdp': 4} and r['sum'] == 6.0  # fsdp across both hosts


# --- main's refusals: one line, before anything starts ------------------------------------------------------------

def run_main(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'TPU_'))}
  return subprocess.run([sys.executable, '-m', 'simmim_jax.main', '--config=configs/base.py', '--workdir=/nonexistent',
                         *flags], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120,
                        check=False)


@pytest.mark.parametrize('env,flags,message', [
    (srun(2, 1, 0), ['--nodistributed'], 'slurm started 2 processes on 2 node(s) but --nodistributed'),
    ({'SLURM_JOB_ID': '9', 'SLURM_NNODES': '2', 'SLURM_PROCID': '0'}, [], 'not an srun step'),
    (mpirun(16, 8, 0), [], 'openmpi started 8 processes on this node'),
    (mpirun(4, 2, 0, uri=None), [], 'gives no launcher address'),
])
def test_main_refuses_an_uncoordinated_job_in_one_line(env, flags, message):
  result = run_main(env, *flags)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('simmim_jax.main: refusing to start: ') and message in lines[0], lines


@pytest.mark.slow
def test_main_trains_as_two_slurm_nodes(tmp_path):
  # The real entry point under srun's variables: both processes join, train 2 synthetic steps and checkpoint.
  port = str(free_port())
  base = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'OMPI_', 'TPU_'))}
  base['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'simmim_jax.main', '--config=configs/base.py', f'--workdir={tmp_path}',
       '--config.data.name=synthetic', '--config.total_steps=2', '--config.batch_size=8',
       '--config.checkpoint.every_steps=2'], cwd=ROOT,
      env={**base, **srun(2, 1, i, SLURM_STEP_NODELIST='localhost', JAX_COORDINATOR_PORT=port)},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  assert 'jax.distributed: slurm: process 0 of 2' in outputs[0]
  assert "mesh {'data': 4, 'fsdp': 1}" in outputs[0]
  assert (tmp_path / 'checkpoints' / '2').is_dir()
