"""Will it fit? Compiles the train steps for a TPU topology (or a GPU host) that is not attached, on any CPU host.

  python tools/aot_check.py --config configs/simmim_vit_base.py --topology v5e:2x2 --per_device_batch 128
  python tools/aot_check.py --config configs/simmim_vit_base.py --config configs/finetune_vit_base.py \
      --topology v4-8 --topology v5e-16 --plan --markdown      # the recipe's global batch: how it fits
  python tools/aot_check.py --config configs/simmim_swin_base.py --topology v5e:2x2 --find_batch \
      --remat none,block                                        # the largest per-device batch per remat mode
  python tools/aot_check.py --config configs/simmim_vit_base.py --topology v5e:2x2 --slices 2   # multi-slice
  python tools/aot_check.py --config configs/simmim_vit_base.py --topology h100x8   # needs JAX's CUDA plugin

Each --config compiles the step of its task (pretraining recipes the pretraining step, fine-tuning and probe
recipes theirs) at the recipe's batch, mesh, dtype and remat (or --per_device_batch / --set), with the
libtpu compiler for the topology's devices (nothing runs; no TPU needed). One line per (config, topology, step):
per device arguments, outputs, temporaries and aliased bytes, their total against the chip's HBM
(simmim_jax/aot.py's table) with FITS / DOES NOT FIT and the margin (a program the compiler itself refuses reads
DOES NOT FIT with its words); XLA's FLOPs per device and per example beside flops.py's model count (XLA's
include what remat recomputes); the collectives in the compiled HLO (count and result bytes per step); the
compile time. --markdown prints the same as a table.

--find_batch: per remat mode, the largest per-device batch (a multiple of --batch_multiple, no accumulation)
that fits, by bracketing and bisection over compiles; the line after it is the next batch up, which does not.
--plan: the recipe's global batch on the target, trying gradient accumulation 1, 2, 4, ... then each remat
mode: the first that fits (fine-tuning does not accumulate: remat only). --cache FILE keeps every compile's
figures (JSON lines) and reuses them, so a table grows over several runs.

Needs libtpu for TPUs: pip install -e '.[aot]'. On a host without it the tool says so in one line.
"""
import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simmim_jax import cluster  # pylint: disable=wrong-import-position  (no JAX: libtpu not loaded yet)

# libtpu looks for the TPU VM it runs on; compiling for a named topology needs none of that, even on a TPU VM, so
# tell it (else it prints a screen of warnings). Set before JAX loads libtpu; two compiles at once (two tools)
# do not lock each other out.
for _key, _value in {'JAX_PLATFORMS': 'cpu', **cluster.NO_TPU_VM_ENV, 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}.items():
  os.environ.setdefault(_key, _value)

from simmim_jax import aot, config_io, fit  # pylint: disable=wrong-import-position
from simmim_jax.errors import UserError  # pylint: disable=wrong-import-position

GiB = 2**30


def gib(n: float) -> str:
  return f'{n / GiB:.2f}'


def verdict(p: aot.Program) -> str:
  if p.failed:  # neither fits nor not: the compiler broke (counted as not fitting by --plan and --find_batch)
    return f'COMPILE FAILED (compiler: {p.failed})'
  if p.refused:
    return f'DOES NOT FIT (compiler: {p.refused.split(":", 1)[-1].strip()})'
  word = 'FITS' if p.fits else 'DOES NOT FIT'
  return f'{word} ({gib(abs(p.margin))} GiB {"spare" if p.fits else "over"})'


def collectives_text(p: aot.Program) -> str:
  return ', '.join(f'{op} {n} x {b / 2**20:,.1f} MiB' for op, (n, b) in sorted(p.collectives.items())) or 'none'


def gflop_per_example(p: aot.Program, flops_per_device: float) -> str:
  """Per-device FLOPs over the per-device batch, in GFLOP; 'n/a' where the compiler gave no count."""
  return f'{flops_per_device / max(p.per_device_batch, 1) / 1e9:.1f}' if flops_per_device else 'n/a'


def xla_text(p: aot.Program) -> str:
  if not p.xla_flops:
    return 'XLA FLOPs n/a (no count from this compiler)'
  return f'XLA {p.xla_flops:.3e} FLOP/device = {gflop_per_example(p, p.xla_flops)} GFLOP/example'


def line(name: str, target: aot.Target, p: aot.Program) -> str:
  """One (config, topology, step) as one line."""
  n = len(target.devices)
  mesh = ' '.join(f'{k}={v}' for k, v in p.mesh.items())
  head = (f'{name} {p.step} | {target.label} ({n} x {target.devices[0].device_kind}, {gib(target.hbm_bytes)} GiB) | '
          f'batch {p.per_device_batch * n} ({p.per_device_batch}/device, accum {p.accum_steps}) | mesh {mesh} | '
          f'remat {p.remat} | ')
  if p.refused or p.failed:
    return head + f'{verdict(p)} | compile {p.compile_s:.0f}s'
  return head + (f'args {gib(p.arguments)} out {gib(p.outputs)} temp {gib(p.temp)} alias {gib(p.alias)} -> '
                 f'{gib(p.total)} of {gib(p.hbm_bytes)} GiB: {verdict(p)} | {xla_text(p)}, '
                 f'flops.py {gflop_per_example(p, p.model_flops)} | '
                 f'{collectives_text(p)} | compile {p.compile_s:.0f}s')


MARKDOWN_HEAD = ('| config | step | target | global batch (per device) | mesh | remat | accum | arguments | temp | '
                 'total / HBM (GiB) | verdict | GFLOP/example XLA / flops.py | collectives | compile |\n'
                 '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')


def markdown_row(name: str, target: aot.Target, p: aot.Program) -> str:
  n = len(target.devices)
  mesh = 'x'.join(str(v) for v in p.mesh.values())
  if p.refused or p.failed:
    return (f'| {name} | {p.step} | {target.label} | {p.per_device_batch * n} ({p.per_device_batch}) | {mesh} | '
            f'{p.remat} | {p.accum_steps} | | | | {verdict(p)} | | | {p.compile_s:.0f} s |')
  return (f'| {name} | {p.step} | {target.label} | {p.per_device_batch * n} ({p.per_device_batch}) | {mesh} | '
          f'{p.remat} | {p.accum_steps} | {gib(p.arguments)} | {gib(p.temp)} | {gib(p.total)} / {gib(p.hbm_bytes)} | '
          f'{"FITS" if p.fits else "DOES NOT FIT"} | {gflop_per_example(p, p.xla_flops)} / '
          f'{gflop_per_example(p, p.model_flops)} | '
          f'{collectives_text(p)} | {p.compile_s:.0f} s |')


def plan_cell(p: aot.Program | None) -> str:
  """How a --plan ended on one target: the first (remat, accumulation) that fits, or that none did."""
  if p is None:
    return 'not compiled'
  if p.failed:
    return f'COMPILE FAILED (remat {p.remat}: {p.failed.split(":")[0]})'
  if not p.fits:
    return f'DOES NOT FIT (up to remat {p.remat}, accum {p.accum_steps})'
  how = f'{p.per_device_batch}/device, remat {p.remat}, accum {p.accum_steps}'
  return f'fits: {how}; {gib(p.total)} / {gib(p.hbm_bytes)} GiB'


def plan_grid(rows: list, labels: list[str]) -> str:
  """--plan --markdown: one row per (config, step), one column per target, each cell the plan's outcome."""
  last: dict[tuple[str, str, str], aot.Program] = {}
  for name, target, p in rows:  # a plan's programs in the order tried: the last is the chosen one, if it fits
    last[(name, p.step, target.label)] = p
  keys = list(dict.fromkeys((name, p.step) for name, _, p in rows))
  out = ['| config | step | ' + ' | '.join(labels) + ' |', '|---|---|' + '---|' * len(labels)]
  for name, step in keys:
    out.append(f'| {name} | {step} | ' + ' | '.join(plan_cell(last.get((name, step, l))) for l in labels) + ' |')
  return '\n'.join(out)


class Cache:
  """Compile figures by (config, target, step), as JSON lines in a file; nothing when path is empty."""

  def __init__(self, path: str):
    self.path, self.entries = path, {}
    if path and os.path.exists(path):
      with open(path) as f:
        for row in map(json.loads, f):
          self.entries[row['key']] = row['program']

  def compile(self, config, target: aot.Target, step: str, num_classes: int) -> aot.Program:
    key = hashlib.sha256(json.dumps([config.to_json(), target.label, step, num_classes]).encode()).hexdigest()
    if key in self.entries:
      program = aot.Program(**self.entries[key])
      program.collectives = {k: tuple(v) for k, v in program.collectives.items()}
      return program
    program = aot.compile_step(config, target, step, num_classes)
    if self.path:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'key': key, 'program': program.__dict__}) + '\n')
    self.entries[key] = program.__dict__
    return program


def step_of(config) -> str:
  return 'pretrain' if config.task == 'pretrain' else 'finetune'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', action='append', required=True, help='configs/x.py[:arg]; repeat for more')
  parser.add_argument('--topology', action='append', required=True,
                      help='TPU: v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:2x4 or v4-8, v5e-16; GPU host: h100x8, h200x8')
  parser.add_argument('--slices', type=int, default=1, help='TPU slices over DCN (multi-slice hybrid mesh)')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value, applied to every config')
  parser.add_argument('--per_device_batch', type=int, default=None, help="default: the recipe's global batch")
  parser.add_argument('--find_batch', action='store_true', help='the largest per-device batch, per --remat mode')
  parser.add_argument('--plan', action='store_true', help="the recipe's global batch: accumulation, then remat")
  parser.add_argument('--remat', default='none,block', help='remat modes for --find_batch / --plan (in order)')
  parser.add_argument('--batch_multiple', type=int, default=8, help='--find_batch: per-device batch step')
  parser.add_argument('--num_classes', type=int, default=1000, help='fine-tuning head (recipes without one)')
  parser.add_argument('--markdown', action='store_true', help='also print the lines as a Markdown table')
  parser.add_argument('--cache', default='', help='JSON-lines file of compile figures, reused across runs')
  args = parser.parse_args()
  try:
    targets = [aot.target(t, args.slices) for t in args.topology]
  except aot.TargetError as e:
    raise SystemExit(f'error: {e}') from None
  cache, rows = Cache(args.cache), []
  remats = tuple(args.remat.split(','))
  for spec in args.config:
    name = os.path.basename(spec)
    for target in targets:
      n = len(target.devices)
      try:
        config = config_io.load_config(spec, args.set + ['data.name=synthetic'])
      except (KeyError, ValueError, FileNotFoundError, UserError) as e:
        raise SystemExit(f'error: {e}') from None
      if args.per_device_batch:
        config.batch_size = args.per_device_batch * n
      step = step_of(config)
      compile_fn = lambda c, t=target, s=step: cache.compile(c, t, s, config.get('num_classes') or args.num_classes)
      try:
        programs = _programs(config, n, compile_fn, step, args, remats)
      except ValueError as e:  # a batch the mesh cannot split, a mesh the devices cannot form
        print(f'{name} {step} | {target.label}: cannot compile: {e}', flush=True)
        continue
      for p in programs:
        rows.append((name, target, p))
        print(line(name, target, p), flush=True)
  if args.markdown:
    print('\n' + MARKDOWN_HEAD)
    for row in rows:
      print(markdown_row(*row))
    if args.plan:
      print('\n' + plan_grid(rows, [t.label for t in targets]))


def _programs(config, devices: int, compile_fn, step: str, args, remats) -> list[aot.Program]:
  """What one (config, target) prints: the plain compile, the --find_batch results, or the --plan."""
  if args.find_batch:
    found = []
    for remat in remats:
      search = fit.find_batch(config, devices, compile_fn, remat=remat, start=max(config.batch_size // devices, 1),
                              multiple=args.batch_multiple)
      print(f'  largest per-device batch with remat {remat}: {search.batch} ({len(search.probes)} compiles)',
            flush=True)
      found += [p for p in (search.best, search.next_up) if p is not None]
    return found
  if args.plan:
    result = fit.plan(config, devices, compile_fn, step=step, remats=remats)
    if result.program is None:
      print(f'  the global batch {config.batch_size} fits in none of: '
            f'{", ".join(f"remat {p.remat} accum {p.accum_steps}" for p in result.tried)}', flush=True)
    return result.tried
  return [compile_fn(config)]


if __name__ == '__main__':
  main()
