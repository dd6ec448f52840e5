"""Faults, as a preempted or misconfigured user meets them, in fresh processes of the main job: SIGTERM saves
the current step and exits 0; an unreadable latest step falls back to the previous one; partial saves are
cleaned; a different model in the workdir is refused before anything is written; a failing write stops the
run with one message; SIGKILL at random moments never changes the final parameters (slow)."""
import os
import random
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from workdir_helpers import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--config.batch_size=16', '--config.log_every_steps=1', '--config.image_every_steps=1000']


def command(workdir, *flags):
  return [sys.executable, '-m', 'simmim_jax.main', '--config=configs/base.py', f'--workdir={workdir}', *FAST, *flags]


def env():
  return {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}


def run(workdir, *flags, timeout=600, **kwargs):
  return subprocess.run(command(workdir, *flags), cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=timeout, check=False, **kwargs)


def start(workdir, *flags):
  return subprocess.Popen(command(workdir, *flags), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, step: int, lines: list[str]) -> None:
  """Reads the process's output until it logs `step`."""
  for line in proc.stdout:
    lines.append(line)
    if line.startswith('step ') and int(line.split()[1].split('/')[0]) >= step:
      return
  raise AssertionError('the run ended before step %d:\n%s' % (step, ''.join(lines[-30:])))


def steps(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def params(workdir, step):
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return ocp.tree.to_flat_dict(state['params'])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def test_sigterm_finishes_the_step_saves_it_and_exits_0(tmp_path, data_dir):
  # SIGTERM_TRIALS=N repeats it at random steps and prints each trial's figures (the closing notes' evidence).
  rng = random.Random(0)
  for trial in range(int(os.environ.get('SIGTERM_TRIALS', 1))):
    workdir = tmp_path / f'w{trial}'
    proc = start(workdir, f'--config.data.data_dir={data_dir}', '--config.total_steps=100000',
                 '--config.checkpoint.every_steps=100000')
    lines = []
    wait_for_step(proc, 3 if trial == 0 else rng.randint(1, 20), lines)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    seconds = time.perf_counter() - sent
    last_logged = max(int(l.split()[1].split('/')[0]) for l in lines + rest.splitlines() if l.startswith('step '))
    assert proc.returncode == 0, rest[-3000:]
    assert seconds < 30 and 'Preempted at step' in rest and 'rerun the same command to resume' in rest
    saved = int(rest.split('Preempted at step ')[1].split(':')[0])
    assert steps(workdir) == [saved]
    assert saved >= last_logged  # no logged step is lost
    again = run(workdir, f'--config.data.data_dir={data_dir}', '--config.total_steps=100000', '--max_steps=1')
    assert again.returncode == 0 and f'Resumed from step {saved}' in again.stdout, again.stderr[-3000:]
    print(f'trial {trial}: last logged step {last_logged}, saved {saved}, exit {proc.returncode} '
          f'{seconds:.1f} s after SIGTERM, resumed from {saved}')


def test_an_unreadable_latest_step_falls_back_to_the_previous_one(tmp_path, data_dir):
  flags = [f'--config.data.data_dir={data_dir}', '--config.checkpoint.every_steps=2']
  first = run(tmp_path / 'w', *flags, '--config.total_steps=4')
  assert first.returncode == 0, first.stderr[-3000:]
  assert steps(tmp_path / 'w') == [2, 4]
  latest = tmp_path / 'w' / 'checkpoints' / '4' / 'state'
  biggest = max((p for p in latest.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])  # truncated, as by a full disk or a killed copy
  os.makedirs(tmp_path / 'w' / 'checkpoints' / '6.orbax-checkpoint-tmp-123')  # a killed save's leftovers
  second = run(tmp_path / 'w', *flags, '--config.total_steps=5')
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert 'checkpoint step 4 cannot be restored' in second.stdout and 'Resumed from step 2' in second.stdout
  names = sorted(os.listdir(tmp_path / 'w' / 'checkpoints'))
  assert '4.unreadable' in names and not any('tmp' in n for n in names), names  # set aside, nothing deleted
  assert steps(tmp_path / 'w') == [2, 4, 5]


@pytest.mark.slow  # the bad-input table (slow too) refuses the same change; this one also checks a longer run
def test_resuming_a_different_model_is_refused_and_changes_nothing(tmp_path, data_dir):
  flags = [f'--config.data.data_dir={data_dir}', '--config.total_steps=2']
  assert run(tmp_path / 'w', *flags).returncode == 0
  before = snapshot(tmp_path / 'w')
  other = run(tmp_path / 'w', *flags, '--config.model.image_size=64', '--config.mask.mask_patch_size=16')
  assert other.returncode != 0
  message = other.stderr.strip().splitlines()[-1]
  assert 'model.image_size: 32 -> 64' in message and 'new --workdir' in message, other.stderr[-2000:]
  assert 'Traceback' not in other.stderr
  assert snapshot(tmp_path / 'w') == before
  longer = run(tmp_path / 'w', *flags[:1], '--config.total_steps=3', '--config.optim.base_lr=0.004')
  assert longer.returncode == 0 and 'optim.base_lr 0.008 -> 0.004' in longer.stdout, longer.stdout[-2000:]


def test_a_failing_write_stops_with_one_message_and_keeps_earlier_steps(tmp_path, data_dir):
  flags = [f'--config.data.data_dir={data_dir}', '--config.checkpoint.every_steps=2']
  assert run(tmp_path / 'w', *flags, '--config.total_steps=2').returncode == 0

  def small_files():  # writes past 1 MB fail (EFBIG) like a full disk, in the child only
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

  full = run(tmp_path / 'w', *flags, '--config.total_steps=6', preexec_fn=small_files)
  assert full.returncode != 0
  message = full.stderr.strip().splitlines()[-1]
  assert message.startswith('error: Saving step 4') and 'earlier checkpoints are kept' in message, full.stderr[-3000:]
  assert 'Event loop is closed' not in full.stderr  # the other writes' callbacks, printed by tensorstore
  assert steps(tmp_path / 'w') == [2]
  assert not any('tmp' in n for n in os.listdir(tmp_path / 'w' / 'checkpoints'))
  resumed = run(tmp_path / 'w', *flags, '--config.total_steps=4')
  assert resumed.returncode == 0 and 'Resumed from step 2' in resumed.stdout


@pytest.mark.slow
def test_sigkill_at_random_moments_never_changes_the_result(tmp_path, data_dir):
  flags = [f'--config.data.data_dir={data_dir}', '--config.total_steps=24', '--config.checkpoint.every_steps=3']
  began = time.perf_counter()
  whole = run(tmp_path / 'whole', *flags)
  assert whole.returncode == 0, whole.stderr[-3000:]
  # Kill moments span start-up to the end of a whole run as timed here, so a loaded machine (slow start-up)
  # still sees kills mid-step and mid-save; a resumed run has fewer steps left, so every trial finishes.
  latest = time.perf_counter() - began
  reference = params(tmp_path / 'whole', 24)
  rng, trials, identical = random.Random(0), int(os.environ.get('KILL_TRIALS', 10)), 0
  for trial in range(trials):
    workdir, kills = tmp_path / f'trial{trial}', 0
    while True:
      proc = start(workdir, *flags)
      try:
        proc.communicate(timeout=rng.uniform(3, latest))  # start-up, compiling, mid-step or mid-save
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        kills += 1
        continue
      assert proc.returncode == 0
      break
    result = params(workdir, 24)
    identical += all(np.array_equal(result[k], reference[k]) for k in reference)
    print(f'trial {trial}: {kills} kills (moments drawn in 3-{latest:.0f} s), identical={identical}')
  assert identical == trials, f'{identical}/{trials} identical'
