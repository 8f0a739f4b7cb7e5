"""Multi-host start-up: `jax.distributed.initialize()` from `config.distributed` or the cluster.

JAX's SPMD runtime does the rest: after it, `jax.devices()` lists every process's devices,
the mesh spans them, and each process feeds its share of the batch. We add no launcher:
start the same command once per host (or per GPU) with the scheduler you have.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import sys
import threading
import time
import warnings
from typing import Any, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from resnet_flax import error_lines

MODES = ('auto', 'on', 'off')
_EXPLICIT_FIELDS = ('coordinator_address', 'num_processes', 'process_id')
# The fixed row one process sends the others (a failure's message, a split's summary): room
# for a one-line error naming a long path, and all-gathered in microseconds.
_MESSAGE_BYTES = 2048
# A row's first byte: 0 for no text, else 1; failing_together marks with 2 a failure of a kind
# its caller goes on from.
_FAILURE, _EXPECTED_FAILURE = 1, 2
# JAX's own deadline for joining comes this long after ours: its ending is an abort from jaxlib
# (a fatal log, exit 134) that no caller can catch, so ours has to come first.
_JAX_DEADLINE_AFTER_OURS_S = 30


def _cluster_types() -> tuple:
  """JAX's cluster detectors, the ones `jax.distributed.initialize()` consults.

  JAX has no public API for them; copying their environment-variable rules would drift
  from the version installed. A JAX that moved them gives () and explicit settings still work.
  """
  try:
    from jax._src import clusters
  except ImportError:
    return ()
  return tuple(getattr(clusters.ClusterEnv, '_cluster_types', ()))


def detected_cluster() -> Optional[tuple[str, int]]:
  """(name, process count) of a cluster environment JAX recognizes here, or None.

  SLURM, Open MPI, Cloud TPU on GCE and GKE, Kubernetes; opt-in detectors (mpi4py) are
  left to `cluster_detection_method`.
  """
  for cluster in _cluster_types():
    if getattr(cluster, 'opt_in_only_method', False):
      continue
    with warnings.catch_warnings():
      # The Kubernetes detector warns in any pod lacking the `kubernetes` package, which
      # is every single-process run in a container there.
      warnings.simplefilter('ignore')
      present = cluster.is_env_present()
    if present:
      return cluster.name, cluster.get_process_count()
  return None


def initialize(settings: ml_collections.ConfigDict) -> bool:
  """Joins this process to a multi-process run when one is configured or detected.

  Call it before anything else uses JAX (no `jax.devices()`, no computation): the
  runtime has to know every process before a backend starts. Returns whether this
  process is now part of a distributed run (False: a single process, nothing done).
  If the others have not all joined after `settings.initialization_timeout_s`, it ends the
  process with one line on stderr and status 2, where JAX's own deadline would abort it.
  """
  if settings.mode not in MODES:
    raise ValueError(f'config.distributed.mode={settings.mode!r} is unknown; use one of {MODES}.')
  if settings.mode == 'off':
    return False
  if jax.distributed.is_initialized():
    return True
  method = settings.cluster_detection_method
  known = sorted(cluster.name for cluster in _cluster_types() if cluster.name)
  if method and known and method not in known:
    # JAX would log that it is unsupported and then ask for a coordinator address.
    raise ValueError(f'config.distributed.cluster_detection_method={method!r} is unknown; use one of {known} '
                     '(or leave it empty to detect the cluster).')
  timeout_s = settings.initialization_timeout_s
  if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
    raise ValueError(f'config.distributed.initialization_timeout_s={timeout_s!r} must be a whole number of seconds '
                     '>= 1 (how long every process waits for the others to join).')
  explicit = {field: settings[field] for field in _EXPLICIT_FIELDS if settings[field] is not None}
  address, source = settings.coordinator_address, 'config.distributed.coordinator_address'
  if address is None:
    address, source = os.environ.get('JAX_COORDINATOR_ADDRESS'), 'JAX_COORDINATOR_ADDRESS'
  port = _coordinator_port(address, source)
  if port is not None and settings.process_id == 0 and not os.environ.get('JAX_COORDINATOR_BIND_ADDRESS'):
    _check_coordinator_port_free(port, address, source)
  if (settings.mode == 'auto' and not explicit and not settings.cluster_detection_method
      and not os.environ.get('JAX_COORDINATOR_ADDRESS')):
    cluster = detected_cluster()
    if cluster is None or cluster[1] <= 1:
      return False  # One process: JAX needs no coordinator.
  if port is not None and settings.process_id not in (None, 0) and not _proxy_variables():
    _wait_for_coordinator(address, source, settings.process_id, timeout_s)
  try:
    with _exit_unless_done_within(timeout_s, _not_joined_line(explicit, address, timeout_s)):
      jax.distributed.initialize(cluster_detection_method=method,
                                 initialization_timeout=timeout_s + _JAX_DEADLINE_AFTER_OURS_S, **explicit)
  except ValueError as error:
    raise ValueError(f'jax.distributed.initialize: {error} Set config.distributed.coordinator_address, '
                     'num_processes and process_id, or launch under SLURM, Open MPI or a Cloud TPU slice.'
                     ) from error
  # The version first: the other two start the backends, which only jax 0.12 needs asked here.
  if (jax.__version_info__ >= (0, 12) and jax.config.jax_enable_compilation_cache
      and jax.config.jax_compilation_cache_dir
      and cached_programs_hang(jax.process_count(), jax.default_backend(), jax.__version_info__)):
    jax.config.update('jax_enable_compilation_cache', False)
    logging.warning('persistent compilation cache off for this run: jax %s hangs in the first collective of '
                    'a multi-process CPU program read back from it; each process compiles afresh.', jax.__version__)
  return True


def _coordinator_port(address: Optional[str], source: str) -> Optional[int]:
  """The port of `address` (from `source`; None: none given); an address that is not host:port
  with a port in 1..65535 is refused.

  JAX itself fails on a missing port with an IndexError traceback, and with port 0 or past
  65535 process 0 waits for ever for a coordinator that never listened.
  """
  if address is None:
    return None
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{source}={address!r} is not host:port; give process 0's host name or address and a free "
                     "port from 1 to 65535 (e.g. 'node0:29500'), the same on every process.")
  return int(port)


def _check_coordinator_port_free(port: int, address: str, source: str) -> None:
  """Process 0's check that it can listen on `port` (of `address`, from `source`) on every
  interface, as JAX will.

  When it cannot, jaxlib's coordinator start fails, and more often than not (2 of 3 tries,
  jaxlib 0.10.2) it takes the process down with a segmentation fault instead of raising.
  """
  # Both families: where IPv6 sockets take no IPv4 (bindv6only), a port taken in IPv4 only binds in IPv6.
  for family, everywhere in ((socket.AF_INET6, '::'), (socket.AF_INET, '')):
    try:
      with socket.socket(family) as probe:
        # As gRPC does: a connection of an earlier run left in TIME_WAIT does not stop it listening.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((everywhere, port))
    except OSError as error:
      if error.errno in (errno.EADDRINUSE, errno.EACCES):
        raise ValueError(f'{source}={address!r}: process 0 cannot listen on port {port} ({error.strerror}); '
                         'another program holds it (an earlier run still alive?) or it is reserved: choose a free '
                         'port, the same on every process.') from error
      # Any other failure (no IPv6 on this host): the family JAX will not use either.


def _proxy_variables() -> list[str]:
  """The proxies set in the environment that gRPC would connect through: with one, gRPC may
  reach the coordinator where a direct connection cannot, so none is probed then. (`no_proxy`
  asks for direct connections.)"""
  return [name for name, value in os.environ.items()
          if name.lower() in ('grpc_proxy', 'https_proxy', 'http_proxy') and value.strip()]


def _wait_for_coordinator(address: str, source: str, process_id: int, timeout_s: int) -> None:
  """Returns once `address` (from `source`) accepts a connection; raises a one-line error
  after `timeout_s` seconds without one.

  JAX's own wait for a coordinator that never answers (not started, another host or port)
  ends after its timeout in a fatal log and an abort, which no caller can catch.
  """
  host, _, port = address.rpartition(':')
  deadline, warned = time.monotonic() + timeout_s, False
  while True:
    try:
      # The host's name too may appear late (a pod's DNS record once it runs).
      with socket.create_connection((host.strip('[]'), int(port)), timeout=min(5.0, timeout_s)):
        return
    except OSError as error:
      reason = error.strerror or str(error)
    if time.monotonic() >= deadline:
      raise ValueError(f'{source}={address!r}: no coordinator answered in {timeout_s} s ({reason}); start process 0 '
                       'with that address on that host (with the others, in any order), or fix the host or port; '
                       'config.distributed.initialization_timeout_s sets the wait.')
    if not warned:
      logging.warning('process %d: no coordinator at %s yet (%s); waiting up to %d s for process 0.', process_id,
                      address, reason, timeout_s)
      warned = True
    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _not_joined_line(explicit: Mapping[str, Any], address: Optional[str], timeout_s: int) -> str:
  """The one line a process stops with when the run had not come together after `timeout_s`."""
  count, index = explicit.get('num_processes'), explicit.get('process_id')
  who = (f'process {index} of {count}' if count is not None and index is not None else 'this process')
  where = f' at the coordinator {address}' if address else ''
  start = (f'start all {count} (process_id 0 to {count - 1}) with that coordinator address'
           if count is not None and address else 'start every process of the run')
  # JAX's cluster detection (a Cloud TPU slice's coordinator name) falls within the same wait.
  return (f'config.distributed: {who} gave up after {timeout_s} s{where}: the coordinator or some process of the '
          f'run never joined; {start}, or raise config.distributed.initialization_timeout_s.')


@contextlib.contextmanager
def _exit_unless_done_within(timeout_s: float, line: str) -> Iterator[None]:
  """Runs the block; if it has not ended after `timeout_s`, prints `error: <line>` and ends the
  process with status 2, as the command-line programs end on a user error.

  For `jax.distributed.initialize`, which releases the GIL while it waits and whose own
  deadline ends in an abort from jaxlib that neither a caller nor the process's cleanup can
  catch. Nothing after the block runs once the timer has decided to stop the process.
  """
  lock = threading.Lock()
  finished = False

  def stop() -> None:
    with lock:  # held until the process ends: the block's end waits for it, and nothing runs after it
      if finished:
        return
      try:
        sys.stdout.flush()
        sys.stderr.write(f'error: {line}\n')
        sys.stderr.flush()
      finally:  # a closed stream must not leave the process to JAX's abort
        os._exit(2)

  timer = threading.Timer(timeout_s, stop)
  timer.daemon = True
  timer.start()
  try:
    yield
  finally:
    with lock:
      finished = True
    timer.cancel()


def cached_programs_hang(process_count: int, backend: str, jax_version: tuple[int, ...]) -> bool:
  """Whether programs read back from the persistent compilation cache hang in their collectives.

  Seen with jax 0.12.1 on CPU across processes: the second run of a two-process train.py (and
  of a bare two-process psum) waited forever in the first all-reduce; 0.10.2 and 0.11.2 ran both.
  """
  return process_count > 1 and backend == 'cpu' and jax_version >= (0, 12)


class FailedOnAnotherProcess(RuntimeError):
  """Another process of this run failed where this one did not; the message is that process's error.

  `expected`: whether that error was of a kind the block's caller named as one to go on from.
  """

  def __init__(self, message: str, expected: bool = False):
    super().__init__(message)
    self.expected = expected


@contextlib.contextmanager
def failing_together(what: str, expected: tuple[type[Exception], ...] = ()) -> Iterator[None]:
  """Runs the block on every process; if it raises on any, it raises on all, where they are.

  Work that can fail on one process alone (its data, a file only it writes, the chief's
  lock) would otherwise leave the others waiting for it at their next collective until that
  timed out with a traceback that does not say why. A failing process raises its own error;
  each other one raises FailedOnAnotherProcess with the first failing process's message.

  `expected` names the errors a caller goes on from (a damaged checkpoint: try an older one).
  Every process may go on only if every failure was one of them, so an error of another kind
  (out of memory, a bug) on one process wins: the others raise FailedOnAnotherProcess with
  `expected` False and its message, even those whose own failure was expected.

  Every process must enter the same blocks in the same order (one all-gather each), and a
  block must hold no collective of its own (orbax's save or its default restore, whose closing
  barrier is one; a jitted computation over all devices): a process that failed before it
  would pair its all-gather with the others' collective. Ctrl-C (a BaseException) is not shared: it stops one process.
  """
  failure: Optional[Exception] = None
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except  # whatever it is, the others must hear of it
    failure = error
  # One process: nothing to tell, and no backend to start (a config error is found before one is).
  if _several_processes():
    own_expected = isinstance(failure, expected)
    try:
      rows = _gathered_rows(None if failure is None else _message(failure),
                            _EXPECTED_FAILURE if own_expected else _FAILURE)
    except Exception as gather_error:  # pylint: disable=broad-except
      if failure is None:
        raise
      failure.add_note(f'(telling the other processes of it failed too: {error_lines.first_line(gather_error)})')
      raise failure from None
    failure = _failure_to_raise(failure, own_expected, rows, what)
  if failure is not None:
    raise failure


def _failure_to_raise(own: Optional[Exception], own_expected: bool, rows: np.ndarray,
                      what: str) -> Optional[Exception]:
  """What this process raises, given every process's row: its own error, unless that was
  expected and another's was not; else the first unexpected failure, else the first one."""
  failed = [(index, int(row[0]) == _EXPECTED_FAILURE, _decoded(row)) for index, row in enumerate(rows) if row[0]]
  unexpected = [(index, message) for index, was_expected, message in failed if not was_expected]
  if unexpected and (own is None or own_expected):
    index, message = unexpected[0]
    failure = FailedOnAnotherProcess(f'process {index} of {len(rows)} failed {what}: {message}')
    failure.__cause__ = own  # this process's expected failure (if any), still in its traceback
    return failure
  if own is None and failed:
    index, _, message = failed[0]
    return FailedOnAnotherProcess(f'process {index} of {len(rows)} failed {what}: {message}', expected=True)
  return own


def from_process_zero(value: int) -> int:
  """Process 0's `value` on every process (the value itself in a run of one)."""
  if not _several_processes():
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def steps_one_at_a_time() -> bool:
  """Whether a loop over steps must wait for each before dispatching the next: XLA:CPU across
  processes (gloo collectives) deadlocked with several steps in flight, both processes stuck
  dispatching (2 of 13 two-process eval passes of 45 steps on a loaded 2-core machine; 0 of 16
  waiting for each step, at the same speed). Accelerators keep their steps queued."""
  return _several_processes() and jax.default_backend() == 'cpu'


def every_process_text(text: str) -> list[str]:
  """`text` as each process has it, in process order (`[text]` in a run of one); texts are cut
  to about 2 kB. A collective: every process must call it, outside `failing_together` blocks."""
  if not _several_processes():
    return [text]
  return [gathered or '' for gathered in _gathered(text)]


def disagreement(text: str) -> Optional[tuple[str, int, str]]:
  """(process 0's `text`, the first process whose text differs, its text), or None when every
  process has the same `text`. A collective, as `every_process_text`."""
  texts = every_process_text(text)
  differing = next((index for index, other in enumerate(texts) if other != texts[0]), None)
  return None if differing is None else (texts[0], differing, texts[differing])


def check_same_fields(fields: Mapping[str, Any], what: str) -> None:
  """Raises the same one-line ValueError on every process unless each has the same `fields`
  (name -> value), naming the first that differs: processes given other commands (a batch size,
  a learning rate) had trained together on a mix of them, silently. One collective when they
  agree; on the error path, one per field up to the first that differs. A collective, as
  `every_process_text`."""
  if not _several_processes():
    return
  text = lambda items: hashlib.blake2b(repr(sorted(items)).encode(), digest_size=16).hexdigest()
  if disagreement(text(fields.items())) is None:
    return
  names = disagreement(text(fields))
  if names is not None:
    raise ValueError(f'the {what} differs between processes: process {names[1]} has other fields than process 0 '
                     '(another config file?); give every process the same command and as many devices.')
  for name in sorted(fields):
    differs = disagreement(f'{name}={fields[name]!r}')
    if differs is not None:
      first, index, other = differs
      raise ValueError(f'the {what} differs between processes: process 0 has {first}, process {index} has {other}; '
                       'give every process the same command and as many devices.')


def _several_processes() -> bool:
  # Through jax.distributed, as `initialize` joins them; a runtime joined otherwise shares nothing here.
  return jax.distributed.is_initialized() and jax.process_count() > 1


def _message(failure: Exception) -> str:
  """`failure` in one line; never raises (a process that could not say its error would not join the all-gather)."""
  try:
    return error_lines.first_line(failure)
  except Exception:  # pylint: disable=broad-except  # a __str__ that raises
    return type(failure).__name__


def _gathered(text: Optional[str]) -> list[Optional[str]]:
  """Every process's `text` (None: it had none), through one all-gather of fixed-size rows."""
  return [_decoded(row) for row in _gathered_rows(text)]


def _gathered_rows(text: Optional[str], marker: int = _FAILURE) -> np.ndarray:
  """Every process's `_encoded(text, marker)` row, one per process, through one all-gather."""
  return np.asarray(multihost_utils.process_allgather(_encoded(text, marker)))


def _encoded(text: Optional[str], marker: int = _FAILURE) -> np.ndarray:
  """A fixed-size row of bytes: `marker` (not 0) and `text` (UTF-8, cut to fit, zero-padded), or
  all zeros for None."""
  row = np.zeros(_MESSAGE_BYTES, np.uint8)
  if text is not None:
    row[0] = marker
    # backslashreplace: a file name that is not UTF-8 comes as lone surrogates, which strict UTF-8 refuses.
    encoded = text.encode('utf-8', 'backslashreplace')[:_MESSAGE_BYTES - 1]
    row[1:1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  return row


def _decoded(row: np.ndarray) -> Optional[str]:
  """The text `_encoded` put in `row`, or None (a character cut in two at the end is dropped)."""
  if not row[0]:
    return None
  return bytes(row[1:]).rstrip(b'\0').decode('utf-8', errors='ignore')
