"""Normal runs print no spurious warnings: no TensorFlow banner, no tfds progress bars or 'download' talk for the
embedded datasets, no Orbax metadata warning on checkpoint reads (tests/test_params_io.py), and the main job's
stderr stays empty on a run and its resume (slow)."""
import os
import subprocess
import sys

import pytest

from simmim_jax import cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra):
  """The environment of a fresh shell: none of the TF_* or JAX_PLATFORMS settings conftest gives the test process,
  nor what importing simmim_jax set for libtpu (JAX_PLATFORMS=cpu or those would hide what libtpu prints)."""
  dropped = {'JAX_PLATFORMS', *cluster.NO_TPU_VM_ENV}
  env = {k: v for k, v in os.environ.items() if not k.startswith('TF_') and k not in dropped}
  return {**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1', **extra}


def python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=clean_env(**env), capture_output=True, text=True,
                        timeout=300, check=False)


def test_importing_the_pipeline_prints_nothing():
  run = python('import simmim_jax.data.sources')
  assert run.returncode == 0, run.stderr
  assert run.stdout == '' and run.stderr == '', run.stderr


def test_a_warning_the_user_asks_for_still_shows():
  run = python('import simmim_jax.data.sources', TF_ENABLE_ONEDNN_OPTS='1', TF_CPP_MIN_LOG_LEVEL='0')
  assert 'oneDNN custom operations are on' in run.stderr  # the user's settings win


def test_embedded_datasets_prepare_with_one_line_before_and_after(tmp_path):
  code = ('from simmim_jax.data.builders import digits, pydoc_topics\n'
          f'digits.ensure_prepared({str(tmp_path)!r}); pydoc_topics.ensure_prepared({str(tmp_path)!r})\n'
          f'digits.ensure_prepared({str(tmp_path)!r})  # prepared: silent\n')
  run = python(code)
  assert run.returncode == 0, run.stderr
  assert run.stderr == '', run.stderr  # no progress bars, no 'Variant folder ... has no dataset_info.json'
  lines = run.stdout.splitlines()
  assert len(lines) == 4, lines
  assert lines[0].startswith('Preparing sklearn_digits (shipped with an installed package, nothing to download)')
  assert lines[1].startswith('Prepared sklearn_digits in ') and lines[3].startswith('Prepared pydoc_topics in ')


def test_an_installed_libtpu_stays_quiet_on_a_host_without_tpus():
  pytest.importorskip('libtpu')  # the aot extra; CI installs it
  if cluster.tpu_chips_present():
    pytest.skip('this host has TPU chips')
  devices = 'import jax; print(jax.devices()[0].platform)'
  # A libtpu another process holds (this one, after tests/test_aot.py) stays silent: let both load it.
  loud = python(devices, ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  assert loud.returncode == 0 and 'TPU' in loud.stderr, loud.stderr  # what libtpu prints unless told
  quiet = python('import simmim_jax\n' + devices, ALLOW_MULTIPLE_LIBTPU_LOAD='1')  # told: no TPU VM here
  assert quiet.returncode == 0 and quiet.stderr == '' and quiet.stdout.strip() == 'cpu', quiet.stderr


@pytest.mark.slow
def test_a_run_and_its_resume_write_nothing_to_stderr(tmp_path):
  """The README's first command, shortened, twice (~2 minutes on 2 shared cores)."""
  command = [sys.executable, '-m', 'simmim_jax.main', '--config=configs/base.py', f'--workdir={tmp_path / "w"}',
             f'--config.data.data_dir={tmp_path / "tfds"}', '--config.total_steps=4', '--config.batch_size=16']
  for _ in range(2):
    run = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == '', run.stderr
  assert 'Nothing to do: the run is at step 4 of 4.' in run.stdout
