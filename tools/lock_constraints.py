"""Writes constraints.txt: the exact package set that `pip install -e '.[test,interop,aot]'` resolves here (the lock CI uses).

  python tools/lock_constraints.py                        # resolve again, keeping the current lock's versions
  python tools/lock_constraints.py --constraint /dev/null # resolve afresh: newest releases in pyproject's ranges

pip resolves the project with its test extras, as a fresh install would (--dry-run --ignore-installed), and every
package of the result is written as name==version, the project itself left out. Run it with the Python CI uses
(3.11 on x86-64 Linux): the lock is that platform's. tests/test_install.py checks that it still installs exactly.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, 'constraints.txt')
PROJECT = 'simmim-jax'
EXTRAS = 'test,interop,aot'  # what CI installs (.ci/run)


def normalize(name: str) -> str:
  """PEP 503 name: 'ML_Collections' -> 'ml-collections'."""
  return re.sub(r'[-_.]+', '-', name).lower()


def dry_run(requirements: list[str], *, python: str = sys.executable, constraints: list[str] = (),
            extra_args: list[str] = (), timeout: float = 900) -> tuple[dict[str, str], str]:
  """What pip would install for `requirements` into an empty environment: ({name: version}, pip's output).

  Raises RuntimeError with pip's output when it cannot resolve them.
  """
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, 'report.json')
    command = [python, '-m', 'pip', 'install', '--dry-run', '--ignore-installed', '--disable-pip-version-check',
               '--quiet', '--report', report, *extra_args]
    for c in constraints:
      command += ['-c', c]
    result = subprocess.run(command + list(requirements), cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, check=False)
    # pip's local find-links/extra-index warnings on this machine are noise, not errors.
    output = '\n'.join(l for l in (result.stdout + result.stderr).splitlines() if 'is ignored: it is neither' not in l)
    if result.returncode != 0:
      raise RuntimeError(f'pip could not resolve {requirements} (exit {result.returncode}):\n{output}')
    with open(report, encoding='utf-8') as f:
      installs = json.load(f)['install']
  return {normalize(i['metadata']['name']): i['metadata']['version'] for i in installs}, output


def read_lock(path: str = LOCK) -> dict[str, str]:
  """{name: version} of a constraints file of name==version lines (comments and blanks ignored)."""
  pins = {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        name, version = line.split('==')
        pins[normalize(name)] = version.strip()
  return pins


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--constraint', default=LOCK, help='resolve under these pins (default: the current lock)')
  parser.add_argument('--out', default=LOCK)
  args = parser.parse_args()
  constraints = [args.constraint] if os.path.exists(args.constraint) else []
  pins, _ = dry_run(['-e', f'.[{EXTRAS}]'], constraints=constraints)
  pins.pop(PROJECT, None)
  header = [
      f"# The exact set CI installs and tests: pip install -c constraints.txt -e '.[{EXTRAS}]'",
      f'# Python {sys.version_info.major}.{sys.version_info.minor} on x86-64 Linux; written by '
      'tools/lock_constraints.py from pyproject.toml\'s ranges.',
      '# The base install (pip install -c constraints.txt -e .) takes the subset it needs.',
  ]
  with open(args.out, 'w', encoding='utf-8') as f:
    f.write('\n'.join(header + [f'{n}=={v}' for n, v in sorted(pins.items())]) + '\n')
  print(f'{args.out}: {len(pins)} packages')


if __name__ == '__main__':
  main()
