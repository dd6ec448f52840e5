"""gs:// for real, against the GCS emulator of tests/gcs_helpers.py: every file the package writes or reads outside
the input pipeline goes to a bucket there (image folders in a bucket: tests/test_gcs_folders.py).

The trainers and tools run in subprocesses with the emulator's environment; this file is also their driver
(`python tests/test_gcs.py ACTION ...`), since main.py does not take a URL workdir yet.
"""
import functools
import json
import os
import signal
import sys

import numpy as np
import pytest

import gcs_helpers
from gcs_helpers import BUCKET, ROOT, Emulator, gcs, ok  # pylint: disable=unused-import  (gcs: the fixture)

drive = functools.partial(gcs_helpers.drive, script=__file__)  # this file as the driver unless script= says


def flat(path: str) -> dict[str, np.ndarray]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from simmim_jax import params_io  # pylint: disable=import-outside-toplevel
  return traverse_util.flatten_dict(params_io.load_params(path), sep='/')


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
  assert got.keys() == want.keys() and got
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


# --------------------------------------------------------------------------------------------------------------
# Every small-file path of the package, on both epath routes (fast).
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('backend', ['gcsfs', 'tf'])
def test_files_checkpoints_metrics_and_caches_round_trip_through_the_bucket(gcs, backend, tmp_path):
  root = f'gs://{BUCKET}/files-{backend}'
  ok(drive(gcs.env(backend), 'files', root))
  names = gcs.objects(f'files-{backend}/')
  assert f'files-{backend}/config.json' in names and f'files-{backend}/fig/grid.png' in names
  steps = {n.split('/')[2] for n in names if '/checkpoints/' in n} - {''}  # '': tf.io.gfile's folder objects
  assert steps == {'2', '3'}  # keep=2 deleted step 1
  assert gcs.read(f'files-{backend}/fig/grid.png').startswith(b'\x89PNG')
  events = [n for n in names if '/tensorboard/events.out.tfevents.' in n]
  assert len(events) == 2, events  # one file per flush: here one per writer session (flushed at close)
  rows = [json.loads(line) for line in gcs.read(f'files-{backend}/metrics.jsonl').decode().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3]  # the second session's line after the first's, no append
  local = tmp_path / 'events'
  local.mkdir()
  for name in events:
    (local / os.path.basename(name)).write_bytes(gcs.read(name))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  accumulator = event_accumulator.EventAccumulator(str(local), size_guidance={'images': 0, 'scalars': 0})
  accumulator.Reload()
  assert [(e.step, e.value) for e in accumulator.Scalars('loss')] == [(1, 1.5), (2, 1.25), (3, 1.0)]
  assert accumulator.Images('reconstruction')[0].encoded_image_string.startswith(b'\x89PNG')


def check_files(root: str) -> None:
  """The driver's side of the test above: writes and reads every kind of file at `root` (a gs:// URL)."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  from simmim_jax import checkpoint, config_io, metrics, params_io, storage, visualize  # pylint: disable=import-outside-toplevel
  from simmim_jax.data import text, tokenizer  # pylint: disable=import-outside-toplevel

  config = config_io.load_config('configs/base.py')
  checkpoint.write_config(root, config)
  assert json.loads(storage.read_text(f'{root}/config.json'))['total_steps'] == config.total_steps
  # Orbax: async saves (tensorstore arrays + epath metadata), keep-2, latest step, restore into shardings.
  params = {'encoder': {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
                        'b': np.ones(3, ml_dtypes.bfloat16)}, 'decoder': {'k': np.full((2,), 7, np.int32)}}
  state = {'step': np.int32(3), 'params': params}
  ckpt = checkpoint.Checkpointer(root, config.checkpoint, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, {'step': step, 'config': checkpoint.config_dict(config)})
  ckpt.wait()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored, meta = ckpt.restore(ckpt.latest_step(), checkpoint.abstract_with_shardings(
      state, jax.tree.map(lambda _: device, state)))
  ckpt.close()
  assert meta['step'] == 3 and ckpt.directory == f'{root}/checkpoints'
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)
  # params_io: the checkpoint read back without a model; an .npz (bfloat16 as bits) and its config beside it.
  assert params_io.checkpoint_step_dir(root) == f'{root}/checkpoints/3'
  jax.tree.map(np.testing.assert_array_equal, params_io.load_params(root), params)
  assert params_io.load_config(root)['total_steps'] == config.total_steps
  params_io.save_npz(f'{root}/export/params.npz', params, config)
  loaded = params_io.load_params(f'{root}/export/params.npz')
  assert loaded['encoder']['b'].dtype == ml_dtypes.bfloat16
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert params_io.load_config(f'{root}/export/params.npz')['model']['variant'] == config.model.variant
  assert storage.glob(f'{root}/export/*.npz') == [f'{root}/export/params.npz']
  # Metrics: two writer sessions (a resumed run); figures.
  for steps in ((1, 2), (3,)):
    writer = metrics.Writer(root, total_steps=3, batch_size=4)
    for step in steps:
      writer.scalars(step, {'loss': 1.75 - 0.25 * step})
    writer.image(steps[-1], 'reconstruction', np.zeros((8, 8, 3), np.uint8))
    writer.close()
  visualize.save_png(np.full((4, 4, 3), 128, np.uint8), f'{root}/fig/grid.png', title='a grid')
  # Text: a tokenizer file, text_files documents and the token cache, all in the bucket.
  texts = [' '.join(p.split()) for t in topics.topics.values() for p in t.split('\n\n') if p.strip()][:400]
  storage.write_bytes(f'{root}/spm/t.model', tokenizer.train(texts, vocab_size=400))
  sp = tokenizer.load(f'{root}/spm/t.model')
  storage.write_text(f'{root}/text/train/a.txt', '\n'.join(texts[:100]))
  storage.write_text(f'{root}/text/train/b.txt', '\n'.join(texts[100:200]))
  import ml_collections  # pylint: disable=import-outside-toplevel
  data = ml_collections.ConfigDict({'name': text.TEXT_FILES, 'data_dir': f'{root}/text', 'text_key': 'text',
                                    'cache_dir': f'{root}/cache', 'tokenizer': f'{root}/spm/t.model'})
  assert text.load_tokenizer(data, 400).serialized_model_proto() == sp.serialized_model_proto()
  built = text.load_corpus(data, 'train', sp, 0, 1)
  assert built.num_documents == 200, built.num_documents
  assert len(storage.glob(f'{root}/cache/*/offsets.npy')) == 1
  cached = text.load_corpus(data, 'train', sp, 0, 1)
  np.testing.assert_array_equal(cached.tokens, built.tokens)
  np.testing.assert_array_equal(cached.offsets, built.offsets)


# --------------------------------------------------------------------------------------------------------------
# A whole run in the bucket (slow): pretrain, killed after a save, resumed bit-exactly; export, convert, fine-tune.
# --------------------------------------------------------------------------------------------------------------
PRETRAIN = ['batch_size=16', 'total_steps=6', 'log_every_steps=1', 'checkpoint.every_steps=2', 'image_every_steps=3',
            'optim.warmup_steps=2']
KILL_AT = 4


def pretrain_killed_and_resumed(gcs: Emulator, env: dict[str, str], name: str, data: list[str], tmp_path,
                                timings: dict[str, float]) -> tuple[str, str]:
  """gs://BUCKET/name: a run SIGKILLed right after its step-4 save, rerun to the end; and the same run,
  uninterrupted, in a local workdir. Checks the resume and returns (the bucket's run, the local reference)."""
  run = f'gs://{BUCKET}/{name}'
  killed = drive(env, 'train', 'configs/base.py', run, f'--kill_at={KILL_AT}', *PRETRAIN, *data)
  timings['first run (killed after saving step 4)'] = killed.seconds
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-5000:]
  steps = {n.split('/')[2] for n in gcs.objects(f'{name}/checkpoints/') if n.endswith('commit_success.txt')}
  assert steps == {'2', '4'}, steps  # committed in the bucket before the kill; nothing later
  resumed = ok(drive(env, 'train', 'configs/base.py', run, *PRETRAIN, *data))
  timings['resumed run (steps 5-6)'] = resumed.seconds
  assert f'Resumed from step {KILL_AT} in {run}/checkpoints' in resumed.stdout, resumed.stdout[-3000:]

  reference = str(tmp_path / 'reference')
  timings['reference run (local workdir)'] = ok(drive(env, 'train', 'configs/base.py', reference, *PRETRAIN,
                                                      *data)).seconds
  ok(drive(env, 'params', run, str(tmp_path / 'run.npz')))
  want = flat(reference)
  assert_same(flat(str(tmp_path / 'run.npz')), want)  # bit for bit, every array
  timings['arrays equal bit for bit'] = len(want)
  rows = {r['step']: r for r in map(json.loads, gcs.read(f'{name}/metrics.jsonl').decode().splitlines())}
  want_rows = {r['step']: r for r in map(json.loads, open(os.path.join(reference, 'metrics.jsonl')))}
  # The killed session's lines reach the bucket only if a flush (every 30 s) came before the kill.
  assert {5, 6} <= set(rows) and all(rows[s]['loss'] == want_rows[s]['loss'] for s in rows)
  names = gcs.objects(f'{name}/')
  assert {f'{name}/config.json', f'{name}/reconstructions/step_0000006.png'} <= set(names)
  assert any('/tensorboard/events.out.tfevents.' in n for n in names)
  return run, reference


def export_encoder(gcs: Emulator, env: dict[str, str], run: str, reference: str, out: str, tmp_path,
                   timings: dict[str, float]) -> dict[str, np.ndarray]:
  """tools/export_params.py from the bucket's run to an .npz in the bucket; checked against the reference."""
  timings['export'] = ok(drive(env, '--checkpoint', run, '--out', out, '--encoder_only',
                               script='tools/export_params.py')).seconds
  ok(drive(env, 'params', out, str(tmp_path / 'encoder.npz')))
  want = {k.removeprefix('encoder/'): v for k, v in flat(reference).items() if k.startswith('encoder/')}
  assert_same(flat(str(tmp_path / 'encoder.npz')), want)
  assert storage_name(out.removesuffix('.npz') + '.json') in gcs.objects(storage_name(out).rsplit('/', 1)[0])
  return want


def storage_name(url: str) -> str:
  return url.removeprefix(f'gs://{BUCKET}/')


@pytest.mark.slow
def test_pretrain_in_a_bucket_resumes_after_a_kill_then_exports_and_finetunes_from_it(gcs, tmp_path):
  """The route of a machine with TensorFlow: epath and tfds through tf.io.gfile, the digits prepared into the
  bucket and read from it; Orbax's arrays through tensorstore."""
  env, timings = gcs.env('tf'), {}
  data = [f'data.data_dir=gs://{BUCKET}/tfds']
  run, reference = pretrain_killed_and_resumed(gcs, env, 'run-tf', data, tmp_path, timings)
  encoder = f'gs://{BUCKET}/export-tf/encoder.npz'
  want_encoder = export_encoder(gcs, env, run, reference, encoder, tmp_path, timings)
  if _has('torch') and _has('safetensors'):
    torch_out = f'gs://{BUCKET}/export-tf/encoder.safetensors'
    timings['convert to torch'] = ok(drive(env, '--params', encoder, '--out', torch_out,
                                           script='tools/convert_to_torch.py')).seconds
    assert {'export-tf/encoder.safetensors', 'export-tf/encoder.timm.json'} <= set(gcs.objects('export-tf/'))
    ok(drive(env, 'params', torch_out, str(tmp_path / 'torch.npz')))  # read back from the bucket
    back = flat(str(tmp_path / 'torch.npz'))
    for name, value in want_encoder.items():
      np.testing.assert_array_equal(back[f'encoder/{name}'], value, err_msg=name)

  finetune = ok(drive(env, 'train', 'configs/finetune_cpu.py', f'gs://{BUCKET}/ft', f'init_from={encoder}',
                      'total_steps=2', 'eval_every_steps=2', 'checkpoint.every_steps=2', 'log_every_steps=1', *data))
  timings['fine-tune (2 steps + evaluation)'] = finetune.seconds
  assert f'Encoder from {encoder}' in finetune.stdout, finetune.stdout[-3000:]
  names = gcs.objects('ft/')
  assert any(n.startswith('ft/checkpoints/2/') for n in names) and any(n.startswith('ft/best/2/') for n in names)
  assert 'ft/metrics.jsonl' in names and 'ft/config.json' in names
  print('\ntf.io.gfile route: ' + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()))


@pytest.mark.slow
def test_pretrain_in_a_bucket_without_tensorflow(gcs, tmp_path):
  """The route of a JAX-only machine (TensorFlow and tfds unimportable): epath through gcsfs, synthetic data."""
  stubs = tmp_path / 'no_tf'
  for module in ('tensorflow', 'tensorflow_datasets'):
    (stubs / module).mkdir(parents=True)
    (stubs / module / '__init__.py').write_text(f'raise ImportError("{module} is not installed (test stub)")\n')
  env, timings = gcs.env('gcsfs'), {}
  env['PYTHONPATH'] = os.pathsep.join([str(stubs), ROOT])
  run, reference = pretrain_killed_and_resumed(gcs, env, 'run-jax', ['data.name=synthetic'], tmp_path, timings)
  export_encoder(gcs, env, run, reference, f'gs://{BUCKET}/export-jax/encoder.npz', tmp_path, timings)
  print('\ngcsfs route without TensorFlow: ' + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()))


def _has(module: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------------------------
# The driver, run in the subprocesses.
# --------------------------------------------------------------------------------------------------------------
def train(config_path: str, workdir: str, args: list[str]) -> None:
  """A trainer on workdir with config overrides; --kill_at=N: SIGKILL right after step N's save is committed."""
  from simmim_jax import checkpoint, config_io  # pylint: disable=import-outside-toplevel
  kill_at = next((int(a.split('=')[1]) for a in args if a.startswith('--kill_at=')), None)
  config = config_io.load_config(config_path, [a for a in args if not a.startswith('--')])
  if kill_at:
    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, state, meta):
      save(self, step, state, meta)
      if step == kill_at:
        self.wait()  # committed to the bucket; then the process dies with nothing closed or flushed
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die
  if config.task == 'pretrain':
    from simmim_jax.trainers import pretrain  # pylint: disable=import-outside-toplevel
    pretrain.train(config, workdir)
  else:
    from simmim_jax.trainers import finetune  # pylint: disable=import-outside-toplevel
    finetune.train(config, workdir)


def main(argv: list[str]) -> None:
  action, *args = argv
  if action == 'files':
    check_files(*args)
  elif action == 'train':
    train(args[0], args[1], args[2:])
  elif action == 'params':  # any params path (a gs:// one here) -> a local .npz for the test to compare
    from simmim_jax import params_io  # pylint: disable=import-outside-toplevel
    params_io.save_npz(args[1], params_io.load_params(args[0]))
  else:
    raise SystemExit(f'unknown action {action!r}')


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main(sys.argv[1:])
