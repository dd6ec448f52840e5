"""Times the jitted pretraining step on synthetic input (no TensorFlow), one or more configs side by side.

  python tools/benchmark.py --config configs/simmim_vit_base.py --set batch_size=8 --set model.dtype=float32
  python tools/benchmark.py --config configs/simmim_vit_base.py --config configs/simmim_swin_base.py:100 \
      --set batch_size=8 --peak_tflops 989
  python tools/benchmark.py --config configs/text_tiny.py --text_pipeline   # + the input pipeline's tokens/s
  python tools/benchmark.py --config configs/simmim_vit_base.py --set batch_size=8 --set model.dtype=float32 \
      --against torch --pairs 3 --steps 3 --threads 2                  # side by side with PyTorch (timm)

Prints steps/s, examples/s (text: tokens/s), model TFLOPs per step (forward counted by XLA x3), achieved
TFLOP/s and MFU against --peak_tflops. Configs run one after another in the same process, so their ratio is
fair. --text_pipeline (needs TensorFlow for the tfds source) also times the text config's real input
pipeline on this host: sentencepiece per-document and batched calls, and serving packed rows from the cache.

--against torch (one image config) times this project's step and its PyTorch peer (tools/torch_peer.py: the
same architecture in timm, SimMIM's head and masked L1, same batch, precision, mask ratio, drop path, AdamW +
clip) side by side. Each side is a worker process of this one, built and compiled in turn (compile and
--warmup steps untimed), then they take turns: --pairs rounds of A B, each turn --steps steps timed up to its
blocking result (JAX: block_until_ready on the metrics; PyTorch: loss.item()). The idle side waits on a pipe,
so turns never overlap; pairs make a ratio that holds while a shared machine's load drifts. torch gets
torch.set_num_threads(--threads); XLA:CPU sizes its pool by the CPUs the process may run on, so the JAX
worker is pinned to --threads CPUs only when fewer than it has. --baseline ROOT adds a third side: the JAX
step of another checkout (e.g. `git worktree add /tmp/before COMMIT`; its tools/benchmark.py must speak this
worker protocol), relative config paths resolved in that checkout. Prints per pair each side's img/s and
the ratio to torch, then medians, and each side's % of its own measured matmul peak (an n x n matmul in the
model's dtype, timed in that worker after each of its turns, the median taken: what this CPU gives each
framework at best at that load), with the model FLOPs counted by XLA for both.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pin_jax_worker(argv: list[str]) -> None:
  """A JAX worker with --threads N below its CPUs runs on N of them (XLA:CPU sizes its pool by the affinity
  mask; there is no thread-count flag), set before JAX starts."""
  if argv[argv.index('--worker') + 1] != 'jax' or '--threads' not in argv:
    return
  threads, cpus = int(argv[argv.index('--threads') + 1]), sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])


if '--worker' in sys.argv:
  pin_jax_worker(sys.argv)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io, feed, flops, pretrain_step, sharding, tasks  # pylint: disable=g-import-not-at-top


class JaxStep(NamedTuple):
  step: Callable[[], dict]  # one train step -> its metrics, not blocked on (state and batches in the closure)
  flops: float  # model FLOPs per step: forward counted by XLA, x3
  params: int  # the encoder's parameter count
  task: Any


def make_jax_step(config) -> JaxStep:
  """The jitted pretraining step on synthetic batches, with its model FLOPs and size."""
  config.data.name = 'synthetic'
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, 10**6, 1000)
  train_step = pretrain_step.make_train_step(task, s)
  batches = feed.prefetch(task.data().batches(0), sharding.batch_sharding(mesh))

  spec = task.batch_spec(config.batch_size)
  masks = jax.eval_shape(lambda b: task.sample(jax.random.key(0), b), spec)
  step_flops = flops.train_flops(flops.forward_flops(
      lambda p, b, m: task.model.apply({'params': p}, *task.model_inputs(b, m)), s.abstract.params, spec, masks))
  num_params = sum(x.size for x in jax.tree.leaves(s.abstract.params['encoder']))
  state = [s.init()]

  def step() -> dict:
    state[0], metrics = train_step(state[0], next(batches))
    return metrics

  return JaxStep(step, step_flops, num_params, task)


def benchmark(config, steps: int, warmup: int) -> dict[str, float]:
  """Compiles the step, runs `warmup` untimed steps, then times `steps` (blocking on the last)."""
  step, step_flops, num_params, task = make_jax_step(config)
  start = time.perf_counter()
  for _ in range(warmup):
    metrics = step()
  jax.block_until_ready(metrics)
  compile_and_warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    metrics = step()
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  examples = config.batch_size * max(task.tokens_per_example, 1)  # text counts tokens
  return {'unit': 'tokens' if task.tokens_per_example else task.unit, 'params_M': num_params / 1e6,
          'step_s': seconds, 'steps_per_s': 1 / seconds,
          'examples_per_s': examples / seconds, 'model_tflops_per_step': step_flops / 1e12,
          'achieved_tflops': step_flops / seconds / 1e12, 'warmup_s': compile_and_warmup}


def text_pipeline(config, seconds: float = 3.0) -> dict[str, float]:
  """Tokens/s of the text input pipeline on this host: sentencepiece calls and cached packed batches."""
  from simmim_jax.data import text  # pylint: disable=import-outside-toplevel
  sp = text.load_tokenizer(config.data, config.model.vocab_size)
  docs = text.read_documents(config.data, config.data.split, 0, 1)
  result = {}
  start = time.perf_counter()
  ids = [sp.encode(d) for d in docs]
  result['per_document_calls'] = sum(map(len, ids)) / (time.perf_counter() - start)
  start = time.perf_counter()
  corpus = text.tokenize(docs, sp)
  result['batched_calls'] = len(corpus.tokens) / (time.perf_counter() - start)
  rows = text.packed_batches(corpus, seq_len=config.data.seq_len, batch_size=config.batch_size, seed=0)
  tokens, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    tokens += next(rows)['tokens'].size
  result['cached_packed_rows'] = tokens / (time.perf_counter() - start)
  return result


def matmul_peak_tflops(dtype: str, n: int = 2048, seconds: float = 1.0) -> float:
  """Measured TFLOP/s of a jitted n x n matmul on this device (torch_peer.matmul_peak_tflops's JAX twin)."""
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    matmul(a, b).block_until_ready()
    count += 1
  return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def worker(side: str, spec: str, overrides: list[str], steps: int, warmup: int, threads: int) -> None:
  """One side of --against: build, compile and warm up, report; then time `steps` steps per 'run' on stdin."""
  protocol = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # whatever else prints (libraries, C++) goes to stderr: stdout carries the protocol alone
  config = config_io.load_config(spec, overrides)
  send = lambda **message: print(json.dumps(message), file=protocol, flush=True)
  if side == 'jax':
    step, model_flops, _, _ = make_jax_step(config)
    finish = lambda metrics: float(jax.block_until_ready(metrics)['loss'])
    label = f'jax {jax.__version__} ({len(os.sched_getaffinity(0))} CPUs)'
    peak = lambda seconds=1.0: matmul_peak_tflops(config.model.dtype, seconds=seconds)
  else:
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import torch_peer  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    torch = torch_peer.torch
    torch.set_num_threads(threads)
    step, model_flops = torch_peer.make_train_step(config), None  # the same model: the JAX side's count
    finish = lambda loss: loss.item()
    label = f'torch {torch.__version__} ({torch.get_num_threads()} threads)'
    dtype = torch_peer.AUTOCAST.get(str(config.model.dtype), torch.float32)
    peak = lambda seconds=1.0: torch_peer.matmul_peak_tflops(dtype=dtype, seconds=seconds)
  start = time.perf_counter()
  for _ in range(warmup):
    out = step()
  finish(out)
  send(label=label, compile_s=time.perf_counter() - start, peak_tflops=peak(), flops=model_flops)
  for line in sys.stdin:
    if line.strip() != 'run':
      break
    start = time.perf_counter()
    for _ in range(steps):
      out = step()
    loss = finish(out)
    # The peak again after each turn: on a shared machine one reading at start is off by up to 2x.
    send(step_s=(time.perf_counter() - start) / steps, loss=loss, peak_tflops=peak(0.5))


class Side(NamedTuple):
  name: str  # 'jax', 'jax@ROOT' (a baseline checkout) or 'torch'
  peak_tflops: float  # its own measured matmul peak (the median of its readings after each turn)
  step_s: list[float]  # seconds per step, one per pair


def summary(sides: list[Side], batch: int, model_flops: float) -> list[str]:
  """The lines --against prints after the pairs: medians of img/s and of the per-pair ratios to the last
  side (torch), JAX over each baseline, and each side's % of its own matmul peak at its median step time."""
  ref = sides[-1]
  ratio = lambda a, b: [y / x for x, y in zip(a.step_s, b.step_s)]  # a's img/s over b's, pair by pair
  lines = []
  for s in sides[:-1]:
    r = ratio(s, ref)
    lines.append(f'{s.name} / {ref.name}: median {statistics.median(r):.2f}x (pairs: '
                 + ' '.join(f'{x:.2f}' for x in r) + ')')
  for s in sides[1:-1]:
    r = ratio(sides[0], s)
    lines.append(f'{sides[0].name} / {s.name}: median {statistics.median(r):.2f}x (pairs: '
                 + ' '.join(f'{x:.2f}' for x in r) + ')')
  for s in sides:
    median = statistics.median(s.step_s)
    lines.append(f'{s.name}: median {batch / median:.2f} img/s | {model_flops / median / 1e12:.4f} TFLOP/s = '
                 f'{100 * model_flops / median / 1e12 / s.peak_tflops:.1f}% of its matmul peak '
                 f'{s.peak_tflops:.3f} TFLOP/s')
  return lines


def against_torch(args: argparse.Namespace) -> None:
  """--against torch: worker processes per side, built one after another, then --pairs turns each."""
  spec = os.path.abspath(args.config[0])
  sides = [('jax', 'jax', ROOT), *[('jax', f'jax@{r}', r) for r in args.baseline], ('torch', 'torch', ROOT)]
  workers, infos = [], []
  try:
    for kind, name, root in sides:
      inside = os.path.relpath(spec, ROOT)  # a baseline reads its own copy of a config of this checkout
      path = os.path.join(root, inside) if not inside.startswith('..') else spec
      command = [sys.executable, os.path.join(root, 'tools', 'benchmark.py'), '--worker', kind, '--config', path,
                 *[f'--set={o}' for o in args.set], f'--steps={args.steps}', f'--warmup={args.warmup}',
                 f'--threads={args.threads}']
      workers.append(subprocess.Popen(command, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
      infos.append(receive(workers[-1], name))
      print(f'{name}: {infos[-1]["label"]}, compile + {args.warmup} warm-up steps {infos[-1]["compile_s"]:.1f}s, '
            f'matmul peak {infos[-1]["peak_tflops"]:.3f} TFLOP/s', flush=True)
    config = config_io.load_config(spec, args.set)
    batch, times, peaks = config.batch_size, [[] for _ in sides], [[] for _ in sides]
    for pair in range(args.pairs):
      parts = []
      for (_, name, _), w, t, pk in zip(sides, workers, times, peaks):
        w.stdin.write('run\n')
        w.stdin.flush()
        r = receive(w, name)
        t.append(r['step_s'])
        pk.extend([r['peak_tflops']] if 'peak_tflops' in r else [])  # a --baseline may predate per-turn peaks
        parts.append(f'{name} {batch / r["step_s"]:.2f} img/s (loss {r["loss"]:.4f})')
      ratios = ' | '.join(f'{n} / torch {times[-1][-1] / t[-1]:.2f}x' for (_, n, _), t in zip(sides[:-1], times))
      print(f'pair {pair + 1}: ' + ' | '.join(parts) + f' | {ratios}', flush=True)
  finally:
    for w in workers:
      w.stdin.close()
      w.wait()
  model_flops = infos[0]['flops']
  measured = [Side(n, statistics.median(pk or [i['peak_tflops']]), t)
              for (_, n, _), i, t, pk in zip(sides, infos, times, peaks)]
  for line in summary(measured, batch, model_flops):
    print(line, flush=True)


def receive(process: subprocess.Popen, name: str) -> dict:
  """The worker's next message; a worker that died stops the benchmark with one line."""
  line = process.stdout.readline()
  if not line:
    raise SystemExit(f'The {name} worker exited (status {process.wait()}); its error is above.')
  return json.loads(line)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', action='append', required=True, help='configs/x.py[:arg]; repeat to compare')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value, applied to every config')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (the first compiles)')
  parser.add_argument('--peak_tflops', type=float, default=None, help='hardware peak for MFU, e.g. 989 (H100 bf16)')
  parser.add_argument('--text_pipeline', action='store_true', help='also time the text input pipeline (tokens/s)')
  parser.add_argument('--against', choices=['torch'], help='side by side with the PyTorch peer (docstring)')
  parser.add_argument('--pairs', type=int, default=3, help='--against: turns of each side, interleaved')
  parser.add_argument('--threads', type=int, default=2, help='--against: torch threads; CPUs the JAX side may use')
  parser.add_argument('--baseline', action='append', default=[], help='--against: another checkout, a third side')
  parser.add_argument('--worker', choices=['jax', 'torch'], help=argparse.SUPPRESS)  # a side of --against
  args = parser.parse_args()
  if args.worker:
    return worker(args.worker, args.config[0], args.set, args.steps, args.warmup, args.threads)
  if args.against:
    if len(args.config) != 1:
      parser.error('--against takes one --config')
    return against_torch(args)

  print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  rows = []
  for spec in args.config:
    config = config_io.load_config(spec, args.set)
    text = config.model.name == 'text'
    pipeline = text_pipeline(config.copy_and_resolve_references()) if text and args.text_pipeline else None
    r = benchmark(config, args.steps, args.warmup)
    rows.append(r)
    size = f'seq {config.data.seq_len}' if text else f'{config.model.image_size}px'
    name = f'{spec} [{config.model.name} {config.model.variant} {size}, batch {config.batch_size}, {config.model.dtype}]'
    line = (f'{name}\n  params {r["params_M"]:.2f}M | {r["steps_per_s"]:.3f} steps/s | {r["examples_per_s"]:.1f} {r["unit"]}/s'
            f' | {r["model_tflops_per_step"]:.4f} model TFLOPs/step | {r["achieved_tflops"]:.3f} TFLOP/s achieved')
    if args.peak_tflops:
      line += f' | MFU {100 * flops.mfu(r["model_tflops_per_step"] * 1e12, r["step_s"], args.peak_tflops):.1f}%'
    print(line + f' | compile+warmup {r["warmup_s"]:.1f}s', flush=True)
    if pipeline:
      lead = pipeline['cached_packed_rows'] / r['examples_per_s']
      print('  input pipeline (1 host thread): ' + ' | '.join(f'{k.replace("_", " ")} {v:,.0f} tokens/s'
                                                            for k, v in pipeline.items())
            + f' | cached rows lead the train step {lead:,.0f}x', flush=True)
  if len(rows) > 1:
    base = rows[0]['step_s']
    print('step time relative to the first: ' + ', '.join(f'{r["step_s"] / base:.2f}x' for r in rows))


if __name__ == '__main__':
  main()
