"""Worker-process decoding: the same batches as threads, bad files named or skipped, cleanup."""

import itertools
import os
import shutil
import signal
import time

import numpy as np
import pytest

from resnet_flax import data
from resnet_flax.data import worker_processes
from resnet_flax.data.errors import DataError
from test_preprocessing import FOLDER, _make_folder


def _config(root, **extra):
  return dict(FOLDER, dir=str(root), num_workers=2, **extra)


@pytest.mark.parametrize('preprocessing,color_distortion', [('vgg', False), ('inception', True)])
def test_processes_give_the_threads_batches_slot_for_slot(tmp_path, preprocessing, color_distortion):
  config = _config(_make_folder(tmp_path), preprocessing=preprocessing, color_distortion=color_distortion)
  threads = data.build(config, 'train', batch_size=4, seed=3)
  processes = data.build(dict(config, worker_processes=True), 'train', batch_size=4, seed=3)
  assert processes.image_dtype == threads.image_dtype
  for ours, theirs in [(itertools.islice(processes.train_batches(), 4), itertools.islice(threads.train_batches(), 4)),
                       (processes.eval_batches(), threads.eval_batches())]:
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
      for key in ('image', 'label', 'mask'):
        np.testing.assert_array_equal(a[key], b[key])


def test_a_skipped_file_never_shows_a_reused_buffers_old_image(tmp_path):
  # Shared-memory buffers are reused from batch to batch: a skipped slot must not keep the last one's pixels.
  root = _make_folder(tmp_path)
  (root / 'train' / 'cat' / 'broken.jpg').write_bytes(b'not a jpeg')
  ds = data.build(_config(root, preprocessing='vgg', on_bad_image='skip', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  masked = 0
  with pytest.warns(UserWarning, match='broken.jpg'):
    for batch in itertools.islice(ds.train_batches(), 8):  # 32 draws of 11 files: the broken one recurs
      readable = [image for image, keep in zip(batch['image'], batch['mask']) if keep]
      assert all(image.any() for image in readable)
      for image in batch['image'][batch['mask'] == 0]:
        masked += 1  # Training: a copy of a batch mate (what batch norm's statistics see), never stale pixels.
        assert any(np.array_equal(image, mate) for mate in readable)
    eval_batches = list(ds.eval_batches())
  assert masked >= 1
  assert sum(not image.any() for batch in eval_batches for image in batch['image'][batch['mask'] == 0]) >= 1


def test_an_unreadable_file_is_named_from_the_worker(tmp_path):
  root = _make_folder(tmp_path)
  (root / 'train' / 'dog' / 'broken.jpg').write_bytes(b'this is not a jpeg')
  ds = data.build(_config(root, preprocessing='inception', worker_processes=True), 'train', batch_size=11, seed=0)
  with pytest.raises(DataError, match='broken.jpg') as excinfo:
    next(ds.eval_batches())
  assert '\n' not in str(excinfo.value)


def test_ctrl_c_sent_to_the_workers_leaves_them_decoding(tmp_path):
  # A terminal's Ctrl-C reaches the workers too; the parent alone decides to save and stop.
  ds = data.build(_config(_make_folder(tmp_path), preprocessing='vgg', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  batches = ds.eval_batches()
  first = next(batches)
  workers = list(ds.source.loader._executor._processes.values())  # pylint: disable=protected-access
  assert workers
  deadline = time.monotonic() + 30
  while not all(_ignores_sigint(worker.pid) for worker in workers):  # a busy machine: one may still be starting
    assert time.monotonic() < deadline, 'a worker never ignored SIGINT'
    time.sleep(0.05)
  for worker in workers:
    os.kill(worker.pid, signal.SIGINT)
  time.sleep(0.5)  # an idle worker interrupted in its queue read would be gone by now
  assert all(worker.is_alive() for worker in workers)
  rest = list(batches)
  assert len(rest) >= 1 and first['image'].shape == rest[0]['image'].shape
  ds.source.loader.close()


def test_closing_terminates_a_worker_stuck_on_a_task(tmp_path, monkeypatch):
  # Workers ignore Ctrl-C: one stuck on a hung read had held a stopping run (its second signal too).
  monkeypatch.setattr(worker_processes, 'STUCK_WORKER_GRACE_S', 0.5)
  ds = data.build(_config(_make_folder(tmp_path), preprocessing='vgg', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  next(ds.eval_batches())
  loader = ds.source.loader
  stuck = loader._executor.submit(time.sleep, 3600)  # pylint: disable=protected-access
  workers = list(loader._executor._processes.values())  # pylint: disable=protected-access
  started = time.monotonic()
  while not stuck.running():
    time.sleep(0.01)
  loader.close()
  assert time.monotonic() - started < 30 and not any(worker.is_alive() for worker in workers)


def _ignores_sigint(pid):
  with open(f'/proc/{pid}/status') as status:
    ignored = int(next(line for line in status if line.startswith('SigIgn:')).split()[1], 16)
  return bool(ignored >> (signal.SIGINT - 1) & 1)


def test_closing_stops_the_workers_and_frees_the_shared_memory(tmp_path):
  ds = data.build(_config(_make_folder(tmp_path), preprocessing='vgg', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  next(ds.eval_batches())
  loader = ds.source.loader
  names = [block.name for block in loader._buffers._all]  # pylint: disable=protected-access
  assert names and all(os.path.exists(f'/dev/shm/{name.lstrip("/")}') for name in names)
  loader.close()
  assert not any(os.path.exists(f'/dev/shm/{name.lstrip("/")}') for name in names)
  assert not loader.close.alive


def test_a_full_dev_shm_is_named_before_any_worker_writes(tmp_path, monkeypatch):
  ds = data.build(_config(_make_folder(tmp_path), preprocessing='vgg', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  monkeypatch.setattr(worker_processes.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(64, 63, 1))
  with pytest.raises(DataError, match='shm-size') as excinfo:
    next(ds.eval_batches())
  assert '\n' not in str(excinfo.value)


def test_without_augmentation_processes_give_the_threads_eval_mode_training_batches(tmp_path):
  # Mutant: ProcessLoader.start_train ignoring augment_train=False (random crops in the
  # processes while threads use the eval preprocessing). The threaded loader is the reference.
  config = _config(_make_folder(tmp_path), preprocessing='vgg', augment=False)
  threads = data.build(config, 'train', batch_size=4, seed=3)
  processes = data.build(dict(config, worker_processes=True), 'train', batch_size=4, seed=3)
  for ours, theirs in zip(itertools.islice(processes.train_batches(), 2), itertools.islice(threads.train_batches(), 2)):
    np.testing.assert_array_equal(ours['image'], theirs['image'])
  processes.source.loader.close()


def test_batch_buffers_are_reused(tmp_path):
  # Mutant: wait() never releasing its shared-memory block (one new /dev/shm segment per batch).
  # The Dataset keeps one batch in flight while another is copied out: at most 2 buffers over
  # 3 passes of 3 batches.
  ds = data.build(_config(_make_folder(tmp_path), preprocessing='vgg', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  for _ in range(3):
    assert len(list(ds.eval_batches())) == 3
  assert len(ds.source.loader._buffers._all) <= 2  # pylint: disable=protected-access
  ds.source.loader.close()


def test_an_abandoned_iterator_gives_its_buffer_back(tmp_path):
  # A pass left early never waits on the batch it had started, so that batch's shared-memory
  # buffer had stayed taken: one more per abandoned pass (38 MB at 256 x 224^2). It comes back
  # once the batch's tasks are done, without anyone waiting for them.
  ds = data.build(_config(_make_folder(tmp_path), preprocessing='vgg', worker_processes=True), 'train',
                  batch_size=4, seed=0)
  buffers = ds.source.loader._buffers  # pylint: disable=protected-access
  for _ in range(4):
    batches = ds.train_batches()
    next(batches)
    batches.close()
    deadline = time.monotonic() + 10
    while len(buffers._free) < len(buffers._all) and time.monotonic() < deadline:  # pylint: disable=protected-access
      time.sleep(0.01)
    assert len(buffers._free) == len(buffers._all)  # pylint: disable=protected-access
  assert len(buffers._all) <= 2  # pylint: disable=protected-access (had grown by one per pass)
  ds.source.loader.close()
