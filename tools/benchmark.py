"""Times the jitted pretraining step on synthetic input (no TensorFlow), one or more configs side by side.

  python tools/benchmark.py --config configs/simmim_vit_base.py --set batch_size=8 --set model.dtype=float32
  python tools/benchmark.py --config configs/simmim_vit_base.py --config configs/simmim_swin_base.py:100 \
      --set batch_size=8 --peak_tflops 989
  python tools/benchmark.py --config configs/text_tiny.py --text_pipeline   # + the input pipeline's tokens/s

Prints steps/s, examples/s (text: tokens/s), model TFLOPs per step (forward counted by XLA x3), achieved
TFLOP/s and MFU against --peak_tflops. Configs run one after another in the same process, so their ratio is
fair. --text_pipeline (needs TensorFlow for the tfds source) also times the text config's real input
pipeline on this host: sentencepiece per-document and batched calls, and serving packed rows from the cache.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from simmim_jax import config_io, feed, flops, pretrain_step, sharding, tasks


def benchmark(config, steps: int, warmup: int) -> dict[str, float]:
  """Compiles the step, runs `warmup` untimed steps, then times `steps` (blocking on the last)."""
  config.data.name = 'synthetic'
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh, config.optim.accum_steps)
  task = tasks.build(config)
  s = pretrain_step.setup(task, mesh, 10**6, 1000)
  state = s.init()
  train_step = pretrain_step.make_train_step(task, s)
  batches = feed.prefetch(task.data().batches(0), sharding.batch_sharding(mesh))

  spec = task.batch_spec(config.batch_size)
  masks = jax.eval_shape(lambda b: task.sample(jax.random.key(0), b), spec)
  step_flops = flops.train_flops(flops.forward_flops(
      lambda p, b, m: task.model.apply({'params': p}, *task.model_inputs(b, m)), s.abstract.params, spec, masks))

  start = time.perf_counter()
  for _ in range(warmup):
    state, metrics = train_step(state, next(batches))
  jax.block_until_ready(metrics)
  compile_and_warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_step(state, next(batches))
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  num_params = sum(x.size for x in jax.tree.leaves(s.abstract.params['encoder']))
  examples = config.batch_size * max(task.tokens_per_example, 1)  # text counts tokens
  return {'unit': 'tokens' if task.tokens_per_example else task.unit, 'params_M': num_params / 1e6, 'step_s': seconds, 'steps_per_s': 1 / seconds,
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', action='append', required=True, help='configs/x.py[:arg]; repeat to compare')
  parser.add_argument('--set', action='append', default=[], help='override a.b=value, applied to every config')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (the first compiles)')
  parser.add_argument('--peak_tflops', type=float, default=None, help='hardware peak for MFU, e.g. 989 (H100 bf16)')
  parser.add_argument('--text_pipeline', action='store_true', help='also time the text input pipeline (tokens/s)')
  args = parser.parse_args()

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
