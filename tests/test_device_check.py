"""tools/device_check.py on the CPU: its lines, its exit code, and no TensorFlow import."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import device_check  # pylint: disable=g-import-not-at-top,wrong-import-position


def run(*args: str, devices: int = 2) -> subprocess.CompletedProcess:
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, 'tools/device_check.py', '--quick', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200, check=False)


def test_peak_table():
  assert device_check.peak_tflops('NVIDIA H200') == 989 and device_check.peak_tflops('NVIDIA H100 80GB HBM3') == 989
  assert device_check.peak_tflops('NVIDIA A100-SXM4-80GB') == 312
  assert device_check.peak_tflops('TPU v4') == 275 and device_check.peak_tflops('TPU v5 lite') == 197
  assert device_check.peak_tflops('TPU v5') == 459 and device_check.peak_tflops('TPU v6 lite') == 918
  assert device_check.peak_tflops('cpu') is None


def test_quick_vit_on_two_cpu_devices():
  # One model, no CPU reference: the devices, the timed line, the checkpoint round trip, no TensorFlow.
  result = run('--models', 'vit_base', '--no_reference', '--steps', '2', '--warmup', '1')
  out = result.stdout
  assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
  assert 'devices: 2 x cpu (cpu), 1 process(es), 2 local' in out
  assert "bf16 peak: unknown for 'cpu'" in out
  assert re.search(r'\[vit_base\] vit Mu/4 32px bf16, batch 8 \(4/device\): compile [\d.]+s \| step [\d.]+ ms '
                   r'\(median of 2\) \| [\d,.]+ img/s .* \| MFU n/a \| program memory [\d.]+ GiB', out), out
  assert re.search(r'\[vit_base\] checkpoint \(Orbax, step 3, \d+ arrays, .*\): .* bit-identical: ok', out), out
  assert 'tensorflow imported: no' in out and out.strip().splitlines()[-1].startswith('device check passed')


@pytest.mark.slow
def test_quick_check_in_full_on_cpu():
  # Both models and the float32 comparison of a 2-device mesh with the 1-device CPU reference.
  result = run()
  out = result.stdout
  assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
  for name in ('vit_base', 'swin_base'):
    assert re.search(rf'\[{name}\] float32 step 1 vs CPU \(batch 2\): .*: ok', out), out
  assert '[swin_base] swin Mu 32px bf16' in out and 'tensorflow imported: no' in out
  assert 'device check passed' in out


def test_a_mismatch_fails_the_check(capsys):
  with pytest.raises(device_check.CheckFailed):
    device_check.compare('vit_base', {'loss': 1.0, 'grad_norm': 1.0}, {'loss': 1.01, 'grad_norm': 1.0}, 2)
  assert 'MISMATCH' in capsys.readouterr().out
  device_check.compare('vit_base', {'loss': 1.0, 'grad_norm': 1.0}, {'loss': 1.0 + 1e-6, 'grad_norm': 1.0}, 2)
