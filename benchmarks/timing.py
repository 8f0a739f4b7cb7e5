"""Timing helpers: compile apart, warm-up excluded, the median of blocked steps."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable

import jax


def compile_timed(jitted: Any, *args: Any) -> tuple[Callable[..., Any], float]:
  """`jitted` lowered and compiled for `args`; returns (compiled, seconds spent compiling).

  Calling the compiled object never traces or compiles again, so none of that leaks into
  the timed steps.
  """
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def xla_cost(compiled: Any) -> dict[str, float]:
  """XLA's own count for one call of `compiled`: bytes its fused kernels read and write
  (`xla_bytes_accessed`) and floating-point operations (`xla_flops`); empty where the backend
  gives none.

  Unlike a timing it is the same in every run, so it tells an extra pass over memory from a
  machine's noise: a step a few per cent slower that accesses as many bytes is not doing more.
  """
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):  # a backend without a cost model
    return {}
  names = {'bytes accessed': 'xla_bytes_accessed', 'flops': 'xla_flops'}
  return {name: float(analysis[key]) for key, name in names.items() if analysis and key in analysis}


def median_step_time(step: Callable[[], Any], warmup: int, iters: int) -> tuple[float, list[float]]:
  """Runs `step` `warmup` times untimed, then `iters` times each waited on with
  `block_until_ready`; returns (median seconds, every timed step's seconds).

  Each step is waited on, as the anchors do, so a step's time includes its dispatch
  but never overlaps the next one.
  """
  if iters < 1:
    raise ValueError(f'iters must be >= 1, got {iters}.')
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def round_robin(steps: dict[str, Callable[[], Any]], warmup: int, iters: int, seed: int = 0) -> dict[str, list[float]]:
  """Seconds per step of each of `steps`, run in turn in an order shuffled each round
  (seeded, so a run repeats), each waited on; `warmup` untimed rounds first.

  Shuffled, not rotated: in a rotation each step nearly always follows the same one, and on
  CPU the one before biases the next (the BN layer after the bf16 one took ~8 % longer than
  the same layer with zero-debias, which differs only in a few (C,) updates; shuffled, the
  two agreed within 2 %).
  """
  names = list(steps)
  for _ in range(warmup):
    for name in names:
      jax.block_until_ready(steps[name]())
  order = random.Random(seed)
  times: dict[str, list[float]] = {name: [] for name in names}
  for _ in range(iters):
    for name in order.sample(names, len(names)):
      start = time.perf_counter()
      jax.block_until_ready(steps[name]())
      times[name].append(time.perf_counter() - start)
  return times
