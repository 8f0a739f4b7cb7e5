"""Our step and the Flax anchor's, timed in turn in one process: `python -m benchmarks.paired`.

On a shared 2-core CPU one ResNet-50 train step takes tens of seconds and other work
comes and goes, so the anchor running 25 steps in its own process, then ours, would put
different loads on the two sides. Here both are compiled in one process and their steps
alternate (A B, B A, A B, ...), each waited on; the figures are the medians, and the
median of the per-pair time ratios comes with them.

The anchor is `flax_resnet.py` itself: its definitions are executed as written and its
`train_case` / `eval_case` build the model, state and jitted step; only its timing loop
(`med`) is replaced, by one that hands the step over instead of running it.

  python -m benchmarks.paired --profile cpu --cases train eval [--anchors-dir DIR]
prints one JSON line per case of ours (with ratios) and one per anchor figure
(`anchor_script`, then the anchor's own fields).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from benchmarks import cases as cases_lib
from benchmarks import compare, run

# The anchor's script part starts here; everything before it is definitions.
_ANCHOR_MAIN = "print(json.dumps({'jax'"


def load_anchor(path: str) -> dict[str, Any]:
  """The anchor's module namespace: its definitions, without running its cases."""
  source = open(path).read()
  if _ANCHOR_MAIN not in source:
    raise ValueError(f'{path} no longer has the line starting {_ANCHOR_MAIN!r} that ends its definitions; '
                     'update benchmarks/paired.py.')
  # A registered module, as an import would make: flax's dataclasses look their module up.
  module = types.ModuleType('flax_resnet_anchor')
  module.__file__ = path
  sys.modules[module.__name__] = module
  exec(compile(source.split(_ANCHOR_MAIN)[0], path, 'exec'), module.__dict__)
  return module.__dict__


def anchor_step(namespace: dict[str, Any], spec: str) -> Callable[[], Any]:
  """The anchor's own step for `kind:arch:batch:dtype`, as its `med` would have timed it."""
  kind, arch, batch, dtype = spec.split(':')
  handed_over: list[Callable[[], Any]] = []

  def hand_over(fn, warm, iters):
    handed_over.append(fn)
    return 1.0  # The anchor divides by it; the figure is discarded.

  namespace['med'] = hand_over
  case = namespace['train_case'] if kind == 'train' else namespace['eval_case']
  case(arch, int(batch), {'bf16': jnp.bfloat16, 'fp32': jnp.float32}[dtype])
  (step,) = handed_over
  return step


def alternate(ours: Callable[[], Any], anchor: Callable[[], Any], warmup: int,
              iters: int) -> tuple[list[float], list[float], float]:
  """Seconds per step of each, alternating which goes first; returns (ours, anchor, anchor's
  first call in seconds, which includes its compilation)."""
  start = time.perf_counter()
  jax.block_until_ready(anchor())
  anchor_first_call = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(ours())
    jax.block_until_ready(anchor())
  times: dict[str, list[float]] = {'ours': [], 'anchor': []}
  for i in range(iters):
    order = (('ours', ours), ('anchor', anchor)) if i % 2 == 0 else (('anchor', anchor), ('ours', ours))
    for name, step in order:
      start = time.perf_counter()
      jax.block_until_ready(step())
      times[name].append(time.perf_counter() - start)
  return times['ours'], times['anchor'], anchor_first_call


def paired_records(case: cases_lib.Case, anchor: dict[str, Any], common: dict[str, Any]) -> list[dict[str, Any]]:
  """Our record and the anchor's for one case, measured in turn."""
  spec = compare.flax_spec(case)
  stepper = case.prepare()
  ours_times, anchor_times, anchor_first_call = alternate(
      stepper.step, anchor_step(anchor, spec), case.params['warmup'], case.params['iters'])
  measurement = stepper.measurement(statistics.median(ours_times), len(ours_times))
  anchor_median = statistics.median(anchor_times)
  batch = case.params['batch']
  anchor_record = {'anchor_script': compare.FLAX, 'case': spec, 'img_per_s': batch / anchor_median,
                   'first_call_s': anchor_first_call, 'step_s': anchor_times, 'paired_with': case.name}
  if case.kind == 'eval':
    anchor_record['ms_per_batch'] = anchor_median * 1e3
  ours = {'case': case.name, 'kind': case.kind, 'variant': case.variant, 'unit': case.unit,
          'value': measurement.value, 'compile_s': measurement.compile_s, 'steps': measurement.steps,
          'params': case.params, **measurement.extra, **common, 'step_s': ours_times,
          'paired_with': f'{compare.FLAX} {spec}',
          'paired_time_ratio_median': statistics.median(o / a for o, a in zip(ours_times, anchor_times))}
  return [ours, anchor_record]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--profile', choices=cases_lib.PROFILES, default='cpu')
  parser.add_argument('--cases', nargs='*', default=['train', 'eval'], help='train/eval case names or kinds')
  parser.add_argument('--anchors-dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'anchors'))
  parser.add_argument('--device')
  parser.add_argument('--date')
  args = parser.parse_args(argv)
  chosen = [case for case in run.select(args.profile, args.cases) if case.prepare is not None]
  anchor = load_anchor(os.path.join(args.anchors_dir, compare.FLAX))
  common = {'device': args.device or run.device_description(), 'jax': jax.__version__, 'profile': args.profile,
            **({'date': args.date} if args.date else {})}
  for case in chosen:
    print(f'[paired] {case.name} with {compare.FLAX} {compare.flax_spec(case)}', file=sys.stderr, flush=True)
    try:
      records = paired_records(case, anchor, common)
    except Exception as error:  # Reported, not raised: the other cases still run.
      records = [{'case': case.name, 'kind': case.kind, 'unit': case.unit, **common,
                  'error': f'{type(error).__name__}: {error}'[:500]}]
    for record in records:
      print(json.dumps(record), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
