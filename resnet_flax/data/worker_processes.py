"""Photos decoded by worker processes straight into shared-memory batches.

Decoding threads share one GIL, and the Python part of every image (the crop plan, PIL's
object set-up, the hand-over of pixels) holds it: a few tenths of a millisecond of the
~3 ms a 224 crop takes, so threads stop scaling at a few thousand images per second
however many cores there are. Worker processes each have their own. They write crops
into a shared-memory batch buffer, so no pixels go through a pipe, and the parent copies
each finished batch out once. Workers fork from a 'forkserver' process, never from the
parent, which runs JAX's threads.

Batches equal the threaded loader's (`image_folder.FolderLoader`) slot for slot: each
example's random draws come from its own generator, whichever process decodes it.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import functools
import multiprocessing
import os
import shutil
import signal
import threading
import time
import weakref
from multiprocessing import shared_memory
from typing import Optional, Sequence

import numpy as np

from resnet_flax.data.errors import DataError
from resnet_flax.data.image_decode import decode_into_slot, values_dtype
from resnet_flax.data.pipeline import Loaded, Pending
from resnet_flax.data.preprocessing import Preprocessing

START_METHOD = 'forkserver'
_SHARED_MEMORY_DIR = '/dev/shm'
_BROKEN_POOL = ('image decoding worker processes died (at start, this is usually a script whose top-level code '
                "is not under `if __name__ == '__main__':`, which workers re-import; later, often a full /dev/shm); "
                'fix that, or set config.data.worker_processes=False.')
# How long a closing loader waits for a busy worker before terminating it (tasks take milliseconds).
STUCK_WORKER_GRACE_S = 5.0
# Tasks per worker and batch: small enough to even out slow images, few enough that
# submitting them costs nothing next to decoding.
_CHUNKS_PER_WORKER = 4


@functools.lru_cache(maxsize=16)
def _attached(name: str) -> shared_memory.SharedMemory:
  """A worker's mapping of the parent's buffer `name`, kept for the batches that reuse it."""
  # Workers share the parent's resource tracker, so attaching registers nothing new and
  # the parent's unlink is the only one.
  return shared_memory.SharedMemory(name=name)


def _ignore_interrupts() -> None:
  """Worker start-up: Ctrl-C reaches the terminal's whole process group. The parent turns it into
  a save and closes the loader, which stops the workers; a worker's own KeyboardInterrupt came
  back as its task's result, raised past the parent's handler, and the run stopped unsaved."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_slots(buffer_name: str, shape: tuple[int, ...], dtype: str, slots: Sequence[int], paths: Sequence[str],
               rngs: Sequence[Optional[np.random.Generator]], preprocessing: Preprocessing, ship_pixels: bool,
               skip_unreadable: bool) -> list[Optional[str]]:
  """Worker side: decodes `paths` into `slots` of the shared batch; the problem per slot (None: read)."""
  images = np.ndarray(shape, np.dtype(dtype), buffer=_attached(buffer_name).buf)
  return [decode_into_slot(images, slot, path, preprocessing, ship_pixels, rng, skip_unreadable)
          for slot, path, rng in zip(slots, paths, rngs)]


class _Buffers:
  """Shared-memory batch buffers of the parent, reused once a batch has been copied out."""

  def __init__(self):
    self._lock = threading.Lock()
    self._free: list[shared_memory.SharedMemory] = []
    self._all: list[shared_memory.SharedMemory] = []

  def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
    with self._lock:
      for block in self._free:
        if block.size >= nbytes:
          self._free.remove(block)
          return block
      # A shared-memory segment is created sparse: on a full /dev/shm (Docker gives 64 MiB)
      # a worker would die of SIGBUS on its first write instead of this message.
      free = shutil.disk_usage(_SHARED_MEMORY_DIR).free if os.path.isdir(_SHARED_MEMORY_DIR) else nbytes
      if free < nbytes:
        raise DataError(f'{_SHARED_MEMORY_DIR} has {free / 2**20:.0f} MiB free, a batch buffer needs '
                        f'{nbytes / 2**20:.0f} MiB: give the container more shared memory (docker --shm-size=2g), '
                        'lower the batch size, or set config.data.worker_processes=False.')
      block = shared_memory.SharedMemory(create=True, size=nbytes)
      self._all.append(block)
      return block

  def release(self, block: shared_memory.SharedMemory) -> None:
    with self._lock:
      self._free.append(block)

  def close(self) -> None:
    with self._lock:
      for block in self._all:
        block.close()
        block.unlink()
      self._all, self._free = [], []


def _release_unclaimed(futures: list[concurrent.futures.Future], buffers: _Buffers,
                       block: shared_memory.SharedMemory, claimed: threading.Event) -> None:
  """Gives `block` back once its tasks are done, if its batch was dropped without being waited
  on (a pass over the data left early): otherwise each such pass kept a batch of /dev/shm (38 MB
  at 256 x 224 x 224 x 3) until the loader closed. Never blocks: it runs when the wait is collected."""
  if claimed.is_set():  # the wait read the batch and released it
    return
  remaining = [len(futures)]
  lock = threading.Lock()

  def one_done(_: concurrent.futures.Future) -> None:
    with lock:
      remaining[0] -= 1
      last = remaining[0] == 0
    if last:  # no worker writes into it any more
      buffers.release(block)

  for future in futures:
    future.add_done_callback(one_done)


def _shut_down(executor: concurrent.futures.ProcessPoolExecutor, buffers: _Buffers) -> None:
  """Stops the workers, then unlinks the buffers. A worker still busy `STUCK_WORKER_GRACE_S`
  later is terminated: workers ignore Ctrl-C, so one stuck on a hung read (a dead network
  mount) would otherwise hold a stopping run for ever, the second signal's "at once" included."""
  workers = list((executor._processes or {}).values())  # pylint: disable=protected-access
  executor.shutdown(wait=False, cancel_futures=True)
  deadline = time.monotonic() + STUCK_WORKER_GRACE_S
  for worker in workers:
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
      worker.terminate()
      worker.join()
  buffers.close()


class ProcessLoader:
  """A Loader whose `num_workers` processes decode `paths` with `preprocessing`."""

  def __init__(self, paths: Sequence[str], preprocessing: Preprocessing, num_workers: int, *,
               skip_unreadable: bool = False, augment_train: bool = True, ship_pixels: bool = False):
    self.paths = tuple(paths)
    self.preprocessing = preprocessing
    self.num_workers = num_workers
    self.skip_unreadable = skip_unreadable
    self.augment_train = augment_train
    self.ship_pixels = ship_pixels
    self._executor = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context(START_METHOD), initializer=_ignore_interrupts)
    self._buffers = _Buffers()
    # Workers stop and buffers are unlinked when the loader goes away or at exit.
    self.close = weakref.finalize(self, _shut_down, self._executor, self._buffers)

  def start_train(self, indices: np.ndarray, rng: np.random.Generator) -> Pending:
    if not self.augment_train:
      return self._start(indices, None)
    return self._start(indices, rng.spawn(len(indices)))  # As FolderLoader: one generator per example.

  def start_eval(self, indices: np.ndarray) -> Pending:
    return self._start(indices, None)

  def _start(self, indices: np.ndarray, rngs: Optional[list[np.random.Generator]]) -> Pending:
    size = self.preprocessing.image_size
    shape = (len(indices), size, size, 3)
    dtype = values_dtype(self.ship_pixels)
    block = self._buffers.acquire(int(np.prod(shape)) * dtype.itemsize)
    chunks = np.array_split(np.arange(len(indices)), min(len(indices), self.num_workers * _CHUNKS_PER_WORKER))
    futures = []
    try:
      for chunk in chunks:
        futures.append(self._executor.submit(
            load_slots, block.name, shape, dtype.str, chunk.tolist(), [self.paths[indices[slot]] for slot in chunk],
            [None if rngs is None else rngs[slot] for slot in chunk], self.preprocessing, self.ship_pixels,
            self.skip_unreadable))
    except concurrent.futures.process.BrokenProcessPool as error:
      concurrent.futures.wait(futures)
      self._buffers.release(block)
      raise DataError(_BROKEN_POOL) from error

    claimed = threading.Event()

    def wait() -> Loaded:
      claimed.set()
      # Every task must be finished before the buffer is read or reused, even if one failed.
      concurrent.futures.wait(futures)
      try:
        problems = [problem for future in futures for problem in future.result()]
        images = np.ndarray(shape, dtype, buffer=block.buf).copy()
      except concurrent.futures.process.BrokenProcessPool as error:
        raise DataError(_BROKEN_POOL) from error
      finally:
        self._buffers.release(block)
      return Loaded.with_problems(images, problems)

    weakref.finalize(wait, _release_unclaimed, futures, self._buffers, block, claimed)
    return wait
