"""Multi-host through jax.distributed: two processes x two fake CPU devices on localhost train like
one device, write one checkpoint together and one record of metrics; the start-up rules."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import default
from resnet_flax import (bn_diagnostics, checkpoints, config_checks, distributed, eval_lib, model_builder, train_lib,
                         workdir_lock)
from test_train import REPO, SMALL_MODEL_FLAG, _read_params, tiny_config

# ZeRO-1 on, so each process holds and writes its own half of the optimizer state and of the
# model's moving averages: the checkpoint is right only if orbax assembled it from both, and
# each evaluation of the averages gathers them from both.
ARGS = ['--config=configs/digits.py', '--config.num_train_steps=4', '--config.batch_size=16',
        '--config.eval_batch_size=360', '--config.log_every_steps=2', '--config.checkpoint_every_steps=2',
        '--config.learning_rate=1e-4', '--config.warmup_steps=0', '--config.shard_optimizer_state=True',
        '--config.model_ema_decay=0.9', SMALL_MODEL_FLAG]
# For a checkpoint of variables alone (what `slim convert` writes), which holds no averages.
VARIABLES_ARGS = [arg for arg in ARGS if not arg.startswith('--config.model_ema_decay=')]


def _free_port():
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def _why_unsupported():
  """Why this machine cannot run two JAX processes with CPU collectives, or None."""
  try:
    _free_port()
  except OSError as error:
    return f'cannot open a localhost port for the coordinator ({error})'
  try:
    from jax._src.lib import _jax
  except ImportError:
    _jax = None
  if not hasattr(_jax, 'make_gloo_tcp_collectives'):
    return 'this jaxlib has no gloo CPU collectives (see jax_cpu_collectives_implementation)'
  return None


def _run_processes(workdir, **options):
  """`_run_processes_once` on a free localhost port; another if process 0 finds it taken."""
  for _ in range(3):
    runs = _run_processes_once(workdir, f'localhost:{_free_port()}', **options)
    # The probed port may be taken before the coordinator binds it: process 0 says so; try another.
    if 'process 0 cannot listen on port' not in runs[0][2]:
      break
  return runs


def _run_processes_once(workdir, coordinator, count=2, devices_each=2, timeout=300, stop_all_on_a_failure=True,
                        workdir_flag=None, args=ARGS, args_of=lambda index: [], script='train.py', with_workdir=True):
  """`script` (in the repository, or a path) once per process, joined through `coordinator` (host:port);
  (returncode, stdout, stderr) each.

  Without `stop_all_on_a_failure`, each process is left to end by itself (until `timeout`);
  `workdir_flag` is passed as --workdir in place of `workdir` (whose parent still takes the logs;
  no --workdir without `with_workdir`); process i gets `args` and then `args_of(i)`.
  """
  # PYTHONFAULTHANDLER: a process stopped at the deadline writes where each of its threads was.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_each}',
         'PYTHONFAULTHANDLER': '1'}
  workdir.parent.mkdir(parents=True, exist_ok=True)
  name = os.path.basename(script).removesuffix('.py')
  logs = pathlib.Path(tempfile.mkdtemp(prefix=f'{workdir.name}_{name}_logs', dir=workdir.parent))
  processes = []
  for index in range(count):
    # Files, not pipes: a process blocked on a full pipe would stall the other in a collective.
    with open(logs / f'{index}.out', 'w') as stdout, open(logs / f'{index}.err', 'w') as stderr:
      processes.append(subprocess.Popen(
          [sys.executable, os.path.join(REPO, script), *([f'--workdir={workdir_flag or workdir}'] * with_workdir),
           *args, *args_of(index),
           f'--config.distributed.coordinator_address={coordinator}', f'--config.distributed.num_processes={count}',
           f'--config.distributed.process_id={index}'],
          cwd=REPO, env=env, stdout=stdout, stderr=stderr))
  deadline = time.monotonic() + timeout
  try:
    # A process that fails leaves the others waiting on it in a collective: stop them at once.
    while any(p.poll() is None for p in processes):
      failed = stop_all_on_a_failure and any(p.returncode not in (None, 0) for p in processes)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    late = [p for p in processes if p.poll() is None]
    for p in late:
      p.send_signal(signal.SIGABRT if time.monotonic() > deadline else signal.SIGKILL)
    for p in late:
      try:
        p.wait(10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  return [(p.returncode, (logs / f'{i}.out').read_text(), (logs / f'{i}.err').read_text())
          for i, p in enumerate(processes)]


def _assert_every_process_stops_with(runs, *messages):
  """Each run ended with exit status 2 and the one-line error `messages[i]` (a substring) on stderr."""
  every = '\n'.join(f'--- process {index}, exit status {returncode}:\n{stdout}\n{stderr}'
                    for index, (returncode, stdout, stderr) in enumerate(runs))
  for index, ((returncode, stdout, stderr), message) in enumerate(zip(runs, messages)):
    assert returncode == 2, f'process {index} ended with {returncode}; every process:\n{every}'
    errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and message in errors[0], f'process {index}:\n{stderr}'
    assert 'Traceback' not in stderr, f'process {index}:\n{stderr}'


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """(workdir, runs) of train.py with ARGS in two processes: the run two tests read (each its own copy)."""
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  workdir = tmp_path_factory.mktemp('two_processes') / 'run'
  return workdir, _run_processes(workdir)


def _copy_of(run, tmp_path):
  """A copy of the module's two-process workdir in `tmp_path`, for a test that writes to it."""
  copy = tmp_path / 'run'
  shutil.copytree(run[0], copy)
  return copy


def test_two_processes_train_like_one_device(tmp_path, two_process_run):
  workdir = _copy_of(two_process_run, tmp_path)
  runs = two_process_run[1]
  for index, (returncode, stdout, stderr) in enumerate(runs):
    assert returncode == 0, f'process {index}:\n{stdout}\n{stderr}'
  results = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in runs]
  assert results[0] == results[1] and results[0]['step'] == 4
  # Only process 0 logs: the progress bar, evaluations and one metrics record per step.
  assert 'eval at step 4' in runs[0][1] and '4/4' in runs[0][1]
  assert 'eval at step' not in runs[1][1] and '4/4' not in runs[1][1]
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines if 'train/loss' in line] == [2, 4]
  assert [line['step'] for line in lines if 'eval/loss' in line] == [4]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  # The same global batches as one device sees (each process loads its half), and the
  # statistics over all of them: the checkpoint both wrote equals a one-device run.
  config = tiny_config(4)
  config.update(eval_batch_size=360, lr_schedule='cosine', learning_rate=1e-4, model_ema_decay=0.9)
  reference = train_lib.train_and_evaluate(config, str(tmp_path / 'one'))
  two, one = _read_params(workdir, config, 4), _read_params(tmp_path / 'one', config, 4)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), two, one)
  assert abs(results[0]['loss'] - reference['loss']) < 1e-5
  assert abs(results[0]['ema']['loss'] - reference['ema']['loss']) < 1e-5
  # eval.py --workdir on both: the step process 0 found (every process reads that one), the same
  # metrics (of the averages, as ARGS keep them); with precise BN, each process's share of the
  # batches feeds one set of statistics.
  evals = _run_processes(workdir, script='eval.py',
                         args_of=lambda index: ['--config.bn_recalibration_batches=3'])
  for index, (returncode, stdout, stderr) in enumerate(evals):
    assert returncode == 0, f'process {index}:\n{stdout}\n{stderr}'
  evaluated = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in evals]
  before = evaluated[0]['before_recalibration']
  assert evaluated[0] == evaluated[1] and before == {key: results[0]['ema'][key] for key in before}
  config.bn_recalibration_batches = 3
  recalibrated = eval_lib.evaluate(config, str(workdir))
  assert abs(evaluated[0]['loss'] - recalibrated['loss']) < 1e-5 and evaluated[0]['top1'] == recalibrated['top1']
  assert abs(evaluated[0]['loss'] - before['loss']) > 1e-4  # the statistics did change
  # The discrepancy report: batch statistics over each global batch of 8, split over 2 x 2 devices.
  reports = _run_processes(workdir, script='eval.py', args_of=lambda index: [
      '--config.bn_recalibration_batches=3', '--config.bn_report_batch_sizes=(8,)'])
  for index, (returncode, stdout, stderr) in enumerate(reports):
    assert returncode == 0, f'process {index}:\n{stdout}\n{stderr}'
  reported = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in reports]
  reference = bn_diagnostics.discrepancy_report(config, str(workdir), batch_sizes=(8,),
                                                recalibration_batches=3)
  assert reported[0] == reported[1]
  pairs = {'moving': (reported[0]['moving'], reference['moving']), 'batch 8': (reported[0]['batch']['8'],
           reference['batch'][8]), 'recalibrated': (reported[0]['recalibrated'], reference['recalibrated'])}
  for column, (ours, one) in pairs.items():
    assert abs(ours['loss'] - one['loss']) < 1e-5 and ours['top1'] == one['top1'], column


# train.py, with orbax's read of checkpoint step 4 failing on process 1 alone, where a damaged
# file that only it reads (its shards of a ZeRO-1 optimizer state) makes it fail.
_TRAIN_WITH_A_READ_FAILING_ON_PROCESS_1 = """
import runpy, sys
from orbax.checkpoint._src.checkpointers import checkpointer

if '--config.distributed.process_id=1' in sys.argv:
  read = checkpointer.Checkpointer._restore

  def read_failing_at_step_4(self, directory, *args, **kwargs):
    if directory.parent.name == '4':  # <step>/default
      raise ValueError('OUT_OF_RANGE: Error reading "opt_state.0.trace" (process 1 alone)')
    return read(self, directory, *args, **kwargs)

  checkpointer.Checkpointer._restore = read_failing_at_step_4
sys.path[0] = {repo!r}  # as running train.py itself: configs/ is imported from there
sys.argv[0] = {repo!r} + '/train.py'
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_a_checkpoint_one_process_cannot_read_is_skipped_by_every_process(tmp_path, two_process_run):
  # Process 1 had gone on to step 2 while process 0, which had read step 4, waited in orbax's
  # closing barrier: a gloo "collective mismatch" abort, and process 0 hung until killed.
  for index, (returncode, stdout, stderr) in enumerate(two_process_run[1]):
    assert returncode == 0, f'process {index}:\n{stdout}\n{stderr}'
  workdir = _copy_of(two_process_run, tmp_path)
  script = tmp_path / 'train_failing_read.py'
  script.write_text(_TRAIN_WITH_A_READ_FAILING_ON_PROCESS_1.format(repo=REPO))
  runs = _run_processes(workdir, script=str(script), timeout=120, stop_all_on_a_failure=False)
  for index, (returncode, stdout, stderr) in enumerate(runs):
    assert returncode == 0, f'process {index}:\n{stdout}\n{stderr}'
  directory = workdir / 'checkpoints'
  assert (f'warning: skipping checkpoint step 4: process 1 of 2 failed to restore it: checkpoint {directory}/4 '
          'cannot be read (OUT_OF_RANGE: Error reading "opt_state.0.trace" (process 1 alone))') in runs[0][2]
  assert f'Set aside damaged checkpoint(s) [4] as {directory}/4.damaged; resuming from step 2.' in runs[0][1]
  assert sorted(os.listdir(directory)) == ['2', '4', '4.damaged']
  # Both trained steps 3 and 4 again from step 2, together: the same state as the first time.
  config = tiny_config(4)
  config.update(eval_batch_size=360, lr_schedule='cosine', learning_rate=1e-4, model_ema_decay=0.9)
  first = checkpoints.restore_from(str(directory / '4.damaged'), _read_params(workdir, config, 2))
  jax.tree_util.tree_map(np.testing.assert_array_equal, _read_params(workdir, config, 4), first)


def test_processes_that_see_other_checkpoints_stop_together_before_trying_any(tmp_path, monkeypatch):
  # Each tries the steps it lists, one all-gather each: a host whose listing lags (a shared file
  # system not caught up) would make one fewer and hang the others.
  directory = str(tmp_path / 'checkpoints')
  state = {'w': jnp.arange(3.0)}
  checkpointer = checkpoints.Checkpointer(directory, async_save=False)
  for step in (2, 4):
    checkpointer.save(step, state)
  checkpointer.close()
  monkeypatch.setattr(checkpoints.distributed, 'every_process_text',
                      lambda text: [text, 'steps [2], of another config []'])
  with pytest.raises(checkpoints.CheckpointError,
                     match=re.escape(f'the processes see different checkpoints in {directory}: process 0 steps [4, 2], '
                                     'of another config [], process 1 steps [2], of another config []; every host')):
    checkpoints.Checkpointer(directory).restore_newest_intact(state, print)


def test_a_workdir_in_use_stops_every_process_not_only_the_chief(tmp_path):
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  workdir = tmp_path / 'busy'
  with workdir_lock.held(str(workdir)):  # as another run would hold it
    runs = _run_processes(workdir, timeout=120, stop_all_on_a_failure=False)
    assert os.listdir(workdir) == [workdir_lock.LOCK_NAME]  # nothing written beside the lock
  # Process 1 had waited at its first collective for the chief, which had stopped: here 30 s, then a gloo traceback.
  chiefs = f'error: {workdir} is in use by another training run'
  _assert_every_process_stops_with(runs, chiefs, f'process 0 of 2 failed to take the lock of {workdir}: {chiefs[7:]}')


def test_a_url_workdir_stops_every_process_at_once(tmp_path):
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  runs = _run_processes(tmp_path / 'url', timeout=120, stop_all_on_a_failure=False, workdir_flag='gs://bucket/run')
  # Before failing_together, process 1 had waited 30 s for the chief.
  _assert_every_process_stops_with(runs, *['error: workdir gs://bucket/run is a URL'] * 2)


def test_when_only_the_chief_fails_the_others_stop_with_its_error(tmp_path):
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  workdir = tmp_path / 'run'
  (workdir / 'metrics.jsonl').mkdir(parents=True)  # only the chief opens it
  runs = _run_processes(workdir, timeout=120, stop_all_on_a_failure=False)
  chiefs = f'writing metrics to {workdir}'
  _assert_every_process_stops_with(runs, chiefs, f'process 0 of 2 failed to open the metrics files: {chiefs}')


def test_when_the_chiefs_metrics_write_fails_mid_run_the_others_stop_with_its_error(tmp_path):
  # Only the chief writes metrics; its failure at a log step had left the others at their next
  # step's collective. /dev/full opens, then refuses every write, as a full disk does.
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').symlink_to('/dev/full')
  runs = _run_processes(workdir, timeout=120, stop_all_on_a_failure=False)
  chiefs = f'writing metrics to {workdir}/metrics.jsonl failed (No space left on device); free disk space'
  _assert_every_process_stops_with(runs, chiefs, f'process 0 of 2 failed to write the metrics: {chiefs}')


def test_processes_given_another_learning_rate_stop_before_training(tmp_path):
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  runs = _run_processes(tmp_path / 'run', timeout=120, stop_all_on_a_failure=False, args=VARIABLES_ARGS,
                        args_of=lambda index: ['--config.learning_rate=0.5'] * index)
  differs = ('the config differs between processes: process 0 has learning_rate=0.0001, process 1 has '
             'learning_rate=0.5; give every process the same command and as many devices.')
  _assert_every_process_stops_with(runs, differs, differs)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


@pytest.mark.parametrize('script, where', [('train.py', 'its config checks'), ('eval.py', 'to build its test data')])
def test_when_one_host_lacks_the_data_every_process_stops_with_its_error(tmp_path, script, where):
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  from test_cifar10 import _make_cifar
  mounted, missing = tmp_path / 'cifar', tmp_path / 'not_mounted'
  mounted.mkdir()
  _make_cifar(mounted)
  args = ['--config=configs/cifar10.py', '--config.batch_size=4', '--config.eval_batch_size=4', SMALL_MODEL_FLAG]
  runs = _run_processes(tmp_path / 'run', timeout=120, stop_all_on_a_failure=False, args=args, script=script,
                        args_of=lambda index: [f'--config.data.dir={missing if index == 1 else mounted}'])
  its = f"config.data.dir='{missing}' does not exist"
  _assert_every_process_stops_with(runs, f'process 1 of 2 failed {where}: {its}', its)
  if script == 'train.py':
    assert not (tmp_path / 'run').exists()  # nothing written, no lock left


def test_a_host_whose_copy_of_the_data_differs_stops_every_process(tmp_path):
  # Each process takes its share of a batch by example index into its own listing: with one
  # example fewer on one host, the processes would have trained on a mix nobody chose.
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  from test_cifar10 import _make_cifar
  whole, partial = tmp_path / 'cifar', tmp_path / 'partial_copy'
  for directory, sizes in [(whole, (3, 3, 3, 3, 2)), (partial, (3, 3, 3, 3, 1))]:
    directory.mkdir()
    _make_cifar(directory, sizes)
  args = ['--config=configs/cifar10.py', '--config.batch_size=4', '--config.eval_batch_size=4', SMALL_MODEL_FLAG]
  runs = _run_processes(tmp_path / 'run', timeout=120, stop_all_on_a_failure=False, args=args,
                        args_of=lambda index: [f'--config.data.dir={partial if index == 1 else whole}'])
  message = ('the train split differs between processes: process 0 has 14 examples in 10 classes (32x32x3, labels #')
  _assert_every_process_stops_with(runs, message, message)
  assert 'process 1 has 13 examples in 10 classes' in runs[0][2]


def _checked_in_two_processes(monkeypatch, fields_of):
  """Each of two threads, as process 0 and 1, runs `distributed.check_same_fields` on its fields,
  exchanging texts through a barrier as the all-gathers would; the error each raised (None: none)."""
  barrier, slots, local = threading.Barrier(2, timeout=10), [None, None], threading.local()

  def every_process_text(text):
    slots[local.index] = text
    barrier.wait()
    texts = list(slots)
    barrier.wait()  # both have read before either writes again
    return texts

  monkeypatch.setattr(distributed, '_several_processes', lambda: True)
  monkeypatch.setattr(distributed, 'every_process_text', every_process_text)
  errors = [None, None]

  def run(index):
    local.index = index
    try:
      distributed.check_same_fields(fields_of[index], 'config')
    except ValueError as error:
      errors[index] = str(error)

  threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return errors


def test_processes_given_other_configs_stop_together_naming_the_first_field_that_differs(monkeypatch):
  # Two processes given other learning rates had trained together on a mix, without a word.
  ours = {'batch_size': 16, 'learning_rate': 1e-4, 'model': 'resnet_v1_digits'}
  assert _checked_in_two_processes(monkeypatch, [ours, dict(ours)]) == [None, None]
  expected = ('the config differs between processes: process 0 has learning_rate=0.0001, process 1 has '
              'learning_rate=0.5; give every process the same command and as many devices.')
  assert _checked_in_two_processes(monkeypatch, [ours, {**ours, 'learning_rate': 0.5}]) == [expected, expected]
  other_file = ('the config differs between processes: process 1 has other fields than process 0 (another config '
                'file?); give every process the same command and as many devices.')
  assert _checked_in_two_processes(monkeypatch, [ours, {**ours, 'sweep': 1}]) == [other_file, other_file]


def test_the_config_fields_each_process_may_set_for_itself_are_not_compared(monkeypatch):
  compared = []
  monkeypatch.setattr(distributed, 'check_same_fields', lambda fields, what: compared.append(fields))
  config = tiny_config()
  config.distributed.process_id = 1
  config_checks.check_same_on_every_process(config)
  assert not [name for name in compared[0] if name.startswith(('distributed.', 'data.dir', 'init_checkpoint',
                                                                 'data.num_workers'))]
  assert compared[0]['batch_size'] == config.batch_size and compared[0]['jax.local_device_count()'] == 1


def test_every_process_text_in_a_run_of_several(monkeypatch):
  _as_processes(monkeypatch, None)  # the other process's row: None, as a process without text would send
  monkeypatch.setattr(distributed.multihost_utils, 'process_allgather',
                      lambda row: np.stack([distributed._encoded('theirs'), row]))
  assert distributed.every_process_text('mine') == ['theirs', 'mine']


def test_each_process_reads_a_whole_checkpoint_by_itself(tmp_path):
  reason = _why_unsupported()
  if reason:
    pytest.skip(reason)
  config = tiny_config()
  config.eval_batch_size = 360
  model = model_builder.build_model(config, 10)
  saved = str(tmp_path / 'variables')
  checkpoints.save_tree(saved, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False))
  runs = _run_processes(tmp_path / 'eval', script='eval.py', with_workdir=False, args=VARIABLES_ARGS,
                        args_of=lambda index: [f'--checkpoint={saved}'])
  for index, (returncode, stdout, stderr) in enumerate(runs):
    assert returncode == 0, f'process {index}:\n{stdout}\n{stderr}'
  results = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in runs]
  reference = eval_lib.evaluate(config, None, saved)
  assert results[0] == results[1] and results[0]['num_examples'] == 360
  assert abs(results[0]['loss'] - reference['loss']) < 1e-5
  # A host that cannot read it: orbax's closing barrier had paired with the failing process's
  # all-gather, and both aborted with a gloo "collective mismatch".
  elsewhere = tmp_path / 'not_mounted'
  its = f'checkpoint {elsewhere} does not exist'
  for script, flag, what in [('eval.py', '--checkpoint', 'the checkpoint'),
                             ('train.py', '--config.init_checkpoint', 'config.init_checkpoint')]:
    runs = _run_processes(tmp_path / script, script=script, with_workdir=script == 'train.py', timeout=120,
                          stop_all_on_a_failure=False, args=VARIABLES_ARGS,
                          args_of=lambda index: [f'{flag}={saved if index == 0 else elsewhere}'])
    _assert_every_process_stops_with(runs, f'process 1 of 2 failed to read {what}: {its}', its)


def _settings(**fields):
  settings = default.get_config().distributed
  settings.update(fields)
  return settings


def test_one_process_starts_nothing(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_STEP_NODELIST', 'OMPI_MCA_orte_hnp_uri', 'KUBERNETES_SERVICE_HOST'):
    monkeypatch.delenv(name, raising=False)
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: called.append(kwargs))
  assert not distributed.initialize(_settings())
  assert not distributed.initialize(_settings(mode='off', coordinator_address='h:1'))
  assert called == []


def test_explicit_settings_and_detected_clusters_start_the_runtime(monkeypatch):
  called, probed = [], []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: called.append(kwargs))
  monkeypatch.setattr(distributed, '_wait_for_coordinator', lambda *args: probed.append(args))  # no node0 here
  assert distributed.initialize(_settings(coordinator_address='node0:1234', num_processes=4, process_id=3,
                                          initialization_timeout_s=60))
  # JAX's deadline comes 30 s after our own, which stops the process with one line (see below).
  assert called[-1] == {'cluster_detection_method': None, 'coordinator_address': 'node0:1234',
                        'num_processes': 4, 'process_id': 3, 'initialization_timeout': 90}
  assert probed == [('node0:1234', 'config.distributed.coordinator_address', 3, 60)]
  # An srun step of 8 tasks: JAX's detector finds it, and JAX fills in the rest itself.
  monkeypatch.setenv('SLURM_JOB_ID', '77')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'node[001-002]')
  monkeypatch.setenv('SLURM_NTASKS', '8')
  monkeypatch.setenv('SLURM_PROCID', '5')
  monkeypatch.setenv('SLURM_LOCALID', '1')
  assert distributed.detected_cluster() == ('slurm', 8)
  assert distributed.initialize(_settings())
  assert called[-1] == {'cluster_detection_method': None, 'initialization_timeout': 330}
  assert len(probed) == 1  # JAX alone knows a detected cluster's coordinator
  monkeypatch.setenv('SLURM_NTASKS', '1')  # One task: a single process needs no coordinator.
  assert not distributed.initialize(_settings())
  assert len(called) == 2


def test_failing_together_in_one_process_is_the_block_itself(monkeypatch):
  def no_backend():
    raise AssertionError('a run of one process asked for the process count')
  monkeypatch.setattr(jax, 'process_count', no_backend)  # a config error must not start the backend
  with distributed.failing_together('to do it'):
    ran = True
  assert ran
  error = ValueError('bad value\nmore detail')
  with pytest.raises(ValueError) as raised:
    with distributed.failing_together('to do it'):
      raise error
  assert raised.value is error
  assert distributed.from_process_zero(7) == 7


def _as_processes(monkeypatch, *others, expected=()):
  """This process as the last of a run whose other processes failed with `others` (None: did
  not), in blocks whose caller goes on from `expected` errors."""
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  monkeypatch.setattr(jax, 'process_count', lambda: len(others) + 1)
  def row(other):
    marker = distributed._EXPECTED_FAILURE if isinstance(other, expected) else distributed._FAILURE
    return distributed._encoded(None if other is None else distributed._message(other), marker)
  monkeypatch.setattr(distributed.multihost_utils, 'process_allgather',
                      lambda own: np.stack([*(row(other) for other in others), own]))


def test_failing_together_tells_every_process_of_the_first_failure(monkeypatch):
  other = ValueError('config.data.dir=\'/data/imagenet\' does not exist; set it to ...\nsecond line')
  _as_processes(monkeypatch, None, other, KeyError('a later one'))
  with pytest.raises(distributed.FailedOnAnotherProcess,
                     match=r"^process 1 of 4 failed to build its data: config.data.dir='/data/imagenet' does not "
                           r"exist; set it to \.\.\.$"):
    with distributed.failing_together('to build its data'):
      pass
  # This process failed too: its own error, which is the one its log should show.
  own = KeyError('its own')
  with pytest.raises(KeyError) as raised:
    with distributed.failing_together('to build its data'):
      raise own
  assert raised.value is own
  # Nobody failed: nothing raised.
  _as_processes(monkeypatch, None, None)
  with distributed.failing_together('to build its data'):
    pass


class _Damaged(ValueError):
  """An error a caller goes on from, as a damaged checkpoint."""


def test_processes_go_on_from_expected_failures_only_when_every_failure_was_expected(monkeypatch):
  # An expected failure elsewhere: this process hears of it as one to go on from.
  _as_processes(monkeypatch, None, _Damaged('checkpoint 4 cannot be read'), expected=(_Damaged,))
  with pytest.raises(distributed.FailedOnAnotherProcess, match='^process 1 of 3 failed to restore it: checkpoint 4 '
                                                               'cannot be read$') as raised:
    with distributed.failing_together('to restore it', expected=(_Damaged,)):
      pass
  assert raised.value.expected
  own = _Damaged('its own')
  with pytest.raises(_Damaged) as raised:
    with distributed.failing_together('to restore it', expected=(_Damaged,)):
      raise own
  assert raised.value is own
  # Out of memory on one process, damage on another: every process stops, and with the error
  # that is not damage, even where the first failure or its own was; going on to an older
  # checkpoint there would leave the process that stopped behind.
  _as_processes(monkeypatch, _Damaged('checkpoint 4 cannot be read'), MemoryError('out of host memory'),
                expected=(_Damaged,))
  for raise_own in (False, True):
    with pytest.raises(distributed.FailedOnAnotherProcess,
                       match='^process 1 of 3 failed to restore it: out of host memory$') as raised:
      with distributed.failing_together('to restore it', expected=(_Damaged,)):
        if raise_own:
          raise own
    assert not raised.value.expected and raised.value.__cause__ is (own if raise_own else None)
  # This process's own unexpected error is its own, whatever the others had.
  surprise = KeyError('a bug')
  with pytest.raises(KeyError) as raised:
    with distributed.failing_together('to restore it', expected=(_Damaged,)):
      raise surprise
  assert raised.value is surprise
  # Without `expected`, no failure is one to go on from.
  _as_processes(monkeypatch, _Damaged('checkpoint 4 cannot be read'))
  with pytest.raises(distributed.FailedOnAnotherProcess) as raised:
    with distributed.failing_together('to restore it'):
      pass
  assert not raised.value.expected


def test_a_failure_whose_message_is_odd_is_still_a_failure(monkeypatch):
  # A message starting with NUL, one from a file name that is not UTF-8 (lone surrogates), a __str__ that raises.
  class Unprintable(Exception):
    def __str__(self):
      raise RuntimeError('no')
  name = b'caf\xe9.jpg'.decode('utf-8', 'surrogateescape')
  for other, shown in [(ValueError('\0starts with NUL'), '\0starts with NUL'),
                       (ValueError(f'{name} is a symlink to nowhere'), 'caf\\udce9.jpg is a symlink to nowhere'),
                       (Unprintable(), 'Unprintable')]:
    _as_processes(monkeypatch, other)
    with pytest.raises(distributed.FailedOnAnotherProcess) as raised:
      with distributed.failing_together('to do it'):
        pass
    assert str(raised.value) == f'process 0 of 2 failed to do it: {shown}'


def test_a_failing_process_whose_gather_fails_too_raises_its_own_error(monkeypatch):
  _as_processes(monkeypatch, None)
  def gather_fails(row):
    raise RuntimeError('gloo: connection closed by peer')
  monkeypatch.setattr(distributed.multihost_utils, 'process_allgather', gather_fails)
  own = ValueError('its own')
  with pytest.raises(ValueError) as raised:
    with distributed.failing_together('to do it'):
      raise own
  assert raised.value is own and 'gloo: connection closed by peer' in raised.value.__notes__[0]
  with pytest.raises(RuntimeError, match='gloo'):  # nothing of its own to say: the gather's error
    with distributed.failing_together('to do it'):
      pass


@pytest.mark.parametrize('backend, one_at_a_time', [('cpu', True), ('gpu', False)])
def test_steps_go_one_at_a_time_only_on_cpu_across_processes(monkeypatch, backend, one_at_a_time):
  assert not distributed.steps_one_at_a_time()  # one process
  _as_processes(monkeypatch, None)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert distributed.steps_one_at_a_time() == one_at_a_time


def test_every_process_takes_the_value_of_process_zero(monkeypatch):
  # eval.py --workdir: the newest step as process 0 listed it, should training commit one meanwhile.
  _as_processes(monkeypatch, None)
  monkeypatch.setattr(distributed.multihost_utils, 'broadcast_one_to_all', lambda value: np.int64(1200))
  assert distributed.from_process_zero(1300) == 1200


def test_a_failing_process_message_crosses_in_utf8_cut_at_a_character():
  message = 'é' * 2000  # 4000 bytes: more than is sent, cut inside a character
  assert distributed._decoded(distributed._encoded(message)) == 'é' * ((distributed._MESSAGE_BYTES - 1) // 2)
  assert distributed._decoded(distributed._encoded(None)) is None
  assert distributed._decoded(distributed._encoded('')) == ''
  assert distributed._message(ValueError()) == 'ValueError'


def test_bad_mode_is_a_one_line_error():
  with pytest.raises(ValueError, match=r"config.distributed.mode='sometimes' is unknown"):
    distributed.initialize(ConfigDict({'mode': 'sometimes'}))


def test_unknown_cluster_detection_method_is_a_one_line_error(monkeypatch):
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: called.append(kwargs))
  # JAX logged 'bogus is not supported' and then blamed the missing coordinator address.
  with pytest.raises(ValueError, match=r"cluster_detection_method='bogus' is unknown; use one of \[.*'mpi4py'.*"
                                       r"'slurm'.*\]"):
    distributed.initialize(_settings(cluster_detection_method='bogus'))
  assert called == []
  assert distributed.initialize(_settings(cluster_detection_method='mpi4py'))
  assert called == [{'cluster_detection_method': 'mpi4py', 'initialization_timeout': 330}]


@pytest.mark.parametrize('address', ['node0', 'node0:', ':29500', 'node0:0', 'node0:65536', 'node0:http'])
def test_a_coordinator_address_that_is_not_host_port_is_a_one_line_error(monkeypatch, address):
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: called.append(kwargs))
  # JAX raised an IndexError for 'node0'; with port 0 or 65536, process 0 waited for ever.
  with pytest.raises(ValueError, match=rf"config.distributed.coordinator_address='{address}' is not host:port; "):
    distributed.initialize(_settings(coordinator_address=address, num_processes=2, process_id=0))
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', address)
  with pytest.raises(ValueError, match=rf"JAX_COORDINATOR_ADDRESS='{address}' is not host:port; "):
    distributed.initialize(_settings(mode='on'))
  assert called == []
  monkeypatch.setattr(distributed, '_wait_for_coordinator', lambda *args: None)  # no such coordinators here
  for good in ('node0:29500', '10.0.0.7:1', '[::1]:65535'):
    assert distributed.initialize(_settings(coordinator_address=good, num_processes=2, process_id=1))
  assert len(called) == 3


def test_a_coordinator_port_in_use_is_a_one_line_error(tmp_path):
  with socket.socket() as holder:
    holder.bind(('', 0))
    holder.listen()
    port = holder.getsockname()[1]
    run = subprocess.run(
        [sys.executable, 'train.py', f'--workdir={tmp_path}', *ARGS, f'--config.distributed.coordinator_address='
         f'localhost:{port}', '--config.distributed.num_processes=2', '--config.distributed.process_id=0'],
        cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=120)
  # jaxlib's own start of the coordinator failed, with a segmentation fault in 2 of 3 tries.
  assert run.returncode == 2, run.stderr
  assert run.stderr.strip().splitlines() == [
      f"error: config.distributed.coordinator_address='localhost:{port}': process 0 cannot listen on port {port} "
      '(Address already in use); another program holds it (an earlier run still alive?) or it is reserved: choose '
      'a free port, the same on every process.']


def test_a_process_waits_for_a_late_coordinator_and_one_that_never_answers_is_a_one_line_error(monkeypatch, caplog):
  # JAX's own wait ended after its timeout in a fatal log and an abort (exit 134), no error to catch.
  called = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: called.append(kwargs))
  for name in ('grpc_proxy', 'https_proxy', 'http_proxy', 'GRPC_PROXY', 'HTTPS_PROXY', 'HTTP_PROXY'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('no_proxy', 'localhost')  # direct connections: probed all the same
  with socket.socket() as coordinator:
    # Bound, not listening: connections are refused, and no other test can take the port meanwhile.
    coordinator.bind(('localhost', 0))
    port = coordinator.getsockname()[1]
    settings = _settings(coordinator_address=f'localhost:{port}', num_processes=2, process_id=1,
                         initialization_timeout_s=1)
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^config.distributed.coordinator_address='localhost:{port}': no "
                                         r'coordinator answered in 1 s \(Connection refused\); start process 0 with '
                                         'that address'):
      distributed.initialize(settings)
    assert time.monotonic() - start < 5 and called == []
    # Process 0 starting 1.5 s after process 1: it waits, says so once, and goes on.
    settings.initialization_timeout_s = 30
    late = threading.Timer(1.5, coordinator.listen)
    late.start()
    caplog.clear()
    assert distributed.initialize(settings)
    late.join()
  waited = [r.getMessage() for r in caplog.records if 'no coordinator at' in r.getMessage()]
  assert waited == [f'process 1: no coordinator at localhost:{port} yet (Connection refused); waiting up to 30 s for '
                    'process 0.']
  assert called == [{'cluster_detection_method': None, 'coordinator_address': f'localhost:{port}',
                     'num_processes': 2, 'process_id': 1, 'initialization_timeout': 60}]


@pytest.mark.parametrize('timeout_s', [0, -5])
def test_a_wait_of_no_time_is_a_one_line_error(timeout_s):
  with pytest.raises(ValueError, match=rf'^config.distributed.initialization_timeout_s={timeout_s} must be a whole '
                                       'number of seconds >= 1'):
    distributed.initialize(_settings(initialization_timeout_s=timeout_s))


def test_train_py_with_no_coordinator_stops_in_one_line(tmp_path):
  env = {name: value for name, value in os.environ.items()
         if name.lower() not in ('grpc_proxy', 'https_proxy', 'http_proxy')}
  with socket.socket() as held:  # bound, not listening: refused, and the port stays free of other tests
    held.bind(('localhost', 0))
    port = held.getsockname()[1]
    run = subprocess.run(
        [sys.executable, 'train.py', f'--workdir={tmp_path}', *ARGS, f'--config.distributed.coordinator_address='
         f'localhost:{port}', '--config.distributed.num_processes=2', '--config.distributed.process_id=1',
         '--config.distributed.initialization_timeout_s=1'],
        cwd=REPO, env={**env, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2, run.stderr
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [f"error: config.distributed.coordinator_address='localhost:{port}': no coordinator answered in 1 s "
                    '(Connection refused); start process 0 with that address on that host (with the others, in any '
                    'order), or fix the host or port; config.distributed.initialization_timeout_s sets the wait.']
  assert 'Traceback' not in run.stderr and not os.listdir(tmp_path)


def test_train_py_whose_peers_never_join_stops_in_one_line(tmp_path):
  """Process 0 of 2, the other never started: JAX's own deadline ended in a fatal log and an
  abort (exit 134); ours comes first, with one line."""
  if _why_unsupported():
    pytest.skip(_why_unsupported())
  port = _free_port()  # free again once probed: process 0 listens on it
  run = subprocess.run(
      [sys.executable, 'train.py', f'--workdir={tmp_path}', *ARGS, f'--config.distributed.coordinator_address='
       f'localhost:{port}', '--config.distributed.num_processes=2', '--config.distributed.process_id=0',
       '--config.distributed.initialization_timeout_s=2'],
      cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2, run.stderr  # JAX's abort, 30 s later, would be 134
  errors = [line for line in run.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [f'error: config.distributed: process 0 of 2 gave up after 2 s at the coordinator localhost:{port}: '
                    'the coordinator or some process of the run never joined; start all 2 (process_id 0 to 1) with '
                    'that coordinator address, or raise config.distributed.initialization_timeout_s.']
  assert 'Traceback' not in run.stderr and 'Check failure' not in run.stderr and not os.listdir(tmp_path)


def test_a_start_that_joins_in_time_is_not_stopped_and_one_that_does_not_is(monkeypatch):
  stopped = threading.Event()
  monkeypatch.setattr(distributed.os, '_exit', lambda status: stopped.set() if status == 2 else None)
  before = set(threading.enumerate())
  with distributed._exit_unless_done_within(30, 'never shown'):
    pass
  timers = [thread for thread in threading.enumerate() if thread not in before]
  for timer in timers:
    timer.join(timeout=10)
  assert not any(timer.is_alive() for timer in timers)  # cancelled: nothing is left to fire in 30 s
  assert not stopped.is_set()
  with distributed._exit_unless_done_within(0.05, 'shown'):
    assert stopped.wait(timeout=30)  # os._exit is faked, so the block goes on once the timer fired
  assert distributed._not_joined_line({}, None, 5) == (
      'config.distributed: this process gave up after 5 s: the coordinator or some process of the run never '
      'joined; start every process of the run, or raise config.distributed.initialization_timeout_s.')


@pytest.mark.parametrize('process_count, backend, version, hangs', [
    (2, 'cpu', (0, 12, 1), True), (2, 'cpu', (0, 11, 2), False), (1, 'cpu', (0, 12, 1), False),
    (2, 'gpu', (0, 12, 1), False),
])
def test_a_multi_process_cpu_run_on_jax_0_12_compiles_without_the_cache(monkeypatch, caplog, tmp_path, process_count,
                                                                        backend, version, hangs):
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: None)
  monkeypatch.setattr(jax, 'process_count', lambda: process_count)
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(jax, '__version_info__', version)
  assert distributed.cached_programs_hang(process_count, backend, version) == hangs
  was = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  jax.config.update('jax_compilation_cache_dir', was[1] or str(tmp_path))
  try:
    jax.config.update('jax_enable_compilation_cache', True)
    assert distributed.initialize(_settings(coordinator_address=f'h:{_free_port()}', num_processes=process_count,
                                            process_id=0))
    assert jax.config.jax_enable_compilation_cache == (not hangs)
    warned = [r.getMessage() for r in caplog.records if 'persistent compilation cache off' in r.getMessage()]
    assert len(warned) == hangs
  finally:
    jax.config.update('jax_enable_compilation_cache', was[0])
    jax.config.update('jax_compilation_cache_dir', was[1])
