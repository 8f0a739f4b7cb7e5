"""Multi-host start-up: `jax.distributed.initialize()` from `config.distributed` or the cluster.

JAX's SPMD runtime does the rest: after it, `jax.devices()` lists every process's devices,
the mesh spans them, and each process feeds its share of the batch. We add no launcher:
start the same command once per host (or per GPU) with the scheduler you have.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import jax
import ml_collections

MODES = ('auto', 'on', 'off')
_EXPLICIT_FIELDS = ('coordinator_address', 'num_processes', 'process_id')


def detected_cluster() -> Optional[tuple[str, int]]:
  """(name, process count) of a cluster environment JAX recognizes here, or None.

  Asks JAX's own detectors (SLURM, Open MPI, Cloud TPU on GCE and GKE, Kubernetes), the
  ones `jax.distributed.initialize()` consults; JAX has no public API for the question,
  and copying their environment-variable rules would drift from the version installed.
  Opt-in detectors (mpi4py) are left to `cluster_detection_method`.
  """
  try:
    from jax._src import clusters
  except ImportError:  # A JAX that moved them: explicit settings still work.
    return None
  for cluster in getattr(clusters.ClusterEnv, '_cluster_types', ()):
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
  """
  if settings.mode not in MODES:
    raise ValueError(f'config.distributed.mode={settings.mode!r} is unknown; use one of {MODES}.')
  if settings.mode == 'off':
    return False
  if jax.distributed.is_initialized():
    return True
  explicit = {field: settings[field] for field in _EXPLICIT_FIELDS if settings[field] is not None}
  if (settings.mode == 'auto' and not explicit and not settings.cluster_detection_method
      and not os.environ.get('JAX_COORDINATOR_ADDRESS')):
    cluster = detected_cluster()
    if cluster is None or cluster[1] <= 1:
      return False  # One process: JAX needs no coordinator.
  try:
    jax.distributed.initialize(cluster_detection_method=settings.cluster_detection_method, **explicit)
  except ValueError as error:
    raise ValueError(f'jax.distributed.initialize: {error} Set config.distributed.coordinator_address, '
                     'num_processes and process_id, or launch under SLURM, Open MPI or a Cloud TPU slice.'
                     ) from error
  return True
