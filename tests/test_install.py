"""Installs: the lock (constraints.txt) against pyproject's ranges, the accelerator extras resolving on Python 3.11
and 3.12 and keeping an installed JAX, and the newest JAX the registry serves running the train step without
TensorFlow.

The fast tests read files only. The slow ones ask the package registry (pip --dry-run; a throwaway venv).
"""
import glob
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import lock_constraints  # pylint: disable=g-import-not-at-top,wrong-import-position

# The platform the lock is written for (CI's).
LOCK_ENV = {'python_version': '3.11', 'python_full_version': '3.11.7', 'platform_machine': 'x86_64',
            'sys_platform': 'linux', 'platform_system': 'Linux', 'os_name': 'posix', 'implementation_name': 'cpython',
            'platform_python_implementation': 'CPython', 'extra': ''}


def project() -> dict:
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def requirements(group: str | None = None) -> list[Requirement]:
  p = project()
  return [Requirement(r) for r in (p['dependencies'] if group is None else p['optional-dependencies'][group])]


def python(version: str) -> str | None:
  """An interpreter of that minor version on this machine (this one, pyenv's, then PATH), or None."""
  if f'{sys.version_info.major}.{sys.version_info.minor}' == version:
    return sys.executable
  candidates = sorted(glob.glob(os.path.expanduser(f'~/.pyenv/versions/{version}.*/bin/python{version}')))[::-1]
  candidates += [p for p in [shutil.which(f'python{version}')] if p]
  for candidate in candidates:  # a pyenv shim on PATH exists but may not run
    if subprocess.run([candidate, '-c', 'import venv'], capture_output=True, check=False).returncode == 0:
      return candidate
  return None


def test_lock_pins_every_dependency_inside_its_range():
  lock = lock_constraints.read_lock()
  for r in requirements() + requirements('test'):
    if r.marker and not r.marker.evaluate(LOCK_ENV):
      continue
    name = lock_constraints.normalize(r.name)
    assert name in lock, f'{r} is not in constraints.txt (python tools/lock_constraints.py)'
    assert r.specifier.contains(lock[name], prereleases=True), f'constraints.txt has {name}=={lock[name]}, outside {r}'
  assert lock_constraints.PROJECT not in lock


def test_jax_is_never_capped_so_an_accelerator_keeps_its_own():
  # An upper bound (or a pin) would make `pip install -e '.[gpu]'` downgrade a newer JAX and its plugin.
  jax_reqs = [r for g in (None, 'gpu', 'cuda12', 'tpu', 'aot') for r in requirements(g) if r.name in ('jax', 'jaxlib')]
  assert {r.name for r in jax_reqs} == {'jax'}  # jaxlib comes with jax, at jax's own matching version
  for r in jax_reqs:
    assert all(s.operator == '>=' for s in r.specifier), r
  assert requirements('gpu')[0].extras == {'cuda13'} and requirements('cuda12')[0].extras == {'cuda12'}
  assert requirements('tpu')[0].extras == requirements('aot')[0].extras == {'tpu'}


def test_tensorflow_is_a_cpu_build_on_every_platform():
  tf = [r for r in requirements() if r.name in ('tensorflow', 'tensorflow-cpu')]
  for machine, system in [('x86_64', 'linux'), ('aarch64', 'linux'), ('arm64', 'darwin'), ('AMD64', 'win32')]:
    env = {**LOCK_ENV, 'platform_machine': machine, 'sys_platform': system}
    chosen = [r.name for r in tf if r.marker.evaluate(env)]
    # tensorflow-cpu exists for x86-64 Linux and Windows only; the plain wheels elsewhere have no CUDA.
    assert chosen == (['tensorflow-cpu'] if machine in ('x86_64', 'AMD64') else ['tensorflow']), (machine, chosen)


def test_ci_installs_the_lock():
  with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
    ci = f.read()
  assert f"-c constraints.txt -e '.[{lock_constraints.EXTRAS}]'" in ci


def test_this_environment_has_the_locked_versions():
  # CI installs with the lock, so every locked package that is installed has the locked version.
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  lock = lock_constraints.read_lock()
  wrong = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-cpu', 'ml-collections'):
    try:
      installed = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
    if installed != lock[name]:
      wrong[name] = (installed, lock[name])
  assert not wrong, f'installed vs constraints.txt: {wrong}'


@pytest.mark.slow
def test_the_lock_installs_exactly_the_pinned_set():
  pins, _ = lock_constraints.dry_run(['-e', f'.[{lock_constraints.EXTRAS}]'], constraints=[lock_constraints.LOCK])
  pins.pop(lock_constraints.PROJECT)
  lock = lock_constraints.read_lock()
  assert pins == lock, {n: (pins.get(n), lock.get(n)) for n in set(pins) | set(lock) if pins.get(n) != lock.get(n)}


# What each extra must bring beside jax: the accelerator runtime, at JAX's own version where it has one.
RUNTIME = {'gpu': 'jax-cuda13-plugin', 'cuda12': 'jax-cuda12-plugin', 'tpu': 'libtpu'}


@pytest.mark.slow
@pytest.mark.parametrize('version', ['3.11', '3.12'])
@pytest.mark.parametrize('extra', ['gpu', 'cuda12', 'tpu'])
def test_accelerator_extras_resolve(extra, version):
  interpreter = python(version)
  if interpreter is None:
    pytest.skip(f'no Python {version} here (looked on PATH and in ~/.pyenv/versions)')
  pins, output = lock_constraints.dry_run(['-e', f'.[{extra}]'], python=interpreter)
  print(f'.[{extra}] on Python {version}:', {k: pins.get(k) for k in ('jax', 'jaxlib', RUNTIME[extra], 'flax', 'optax',
                                                                     'orbax-checkpoint', 'tensorflow-cpu', 'numpy')})
  assert RUNTIME[extra] in pins, output
  assert pins['jaxlib'] == pins['jax'], pins
  if extra != 'tpu':
    assert pins[RUNTIME[extra]] == pins['jax'], pins
  # The data pipeline comes as a CPU build beside the accelerator's JAX.
  assert 'tensorflow-cpu' in pins and 'tensorflow' not in pins, sorted(pins)


@pytest.mark.slow
@pytest.mark.parametrize('extra', ['gpu', 'tpu'])
def test_extras_admit_the_jax_an_image_already_has(extra):
  # The H200 image carries jax 0.11.2 with its CUDA 13 plugin: the extras must resolve with exactly that version,
  # which is what lets pip keep it (an installed version that satisfies the range is never replaced).
  interpreter = python('3.12')
  if interpreter is None:
    pytest.skip('no Python 3.12 here')
  pins, output = lock_constraints.dry_run(['-e', f'.[{extra}]', 'jax==0.11.2'], python=interpreter)
  assert pins['jax'] == pins['jaxlib'] == '0.11.2', output
  if extra == 'gpu':
    assert pins['jax-cuda13-plugin'] == '0.11.2'


@pytest.mark.slow
def test_newest_jax_runs_the_train_step_without_tensorflow(tmp_path):
  # A throwaway venv with the newest releases of the JAX stack alone (no TensorFlow), as on an accelerator image;
  # the device check runs its quick mode there (train steps, CPU reference, checkpoint round trip).
  interpreter = python('3.12') or sys.executable
  venv = tmp_path / 'venv'
  subprocess.run([interpreter, '-m', 'venv', str(venv)], check=True)
  pip = [str(venv / 'bin' / 'python'), '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
  subprocess.run(pip + ['jax', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections', 'numpy'], check=True,
                 capture_output=True, timeout=900)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'PYTHONPATH')}
  result = subprocess.run([str(venv / 'bin' / 'python'), 'tools/device_check.py', '--quick'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'device check passed' in result.stdout
  print(result.stdout)
