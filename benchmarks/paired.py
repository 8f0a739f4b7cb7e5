"""Our step and the Flax anchor's, timed in turn in one process: `python -m benchmarks.paired`.

On a shared 2-core CPU one ResNet-50 train step takes seconds to tens of seconds and the
machine's speed drifts, so the anchor running 25 steps in its own process, then ours,
would meet different conditions. Here both are compiled in one process and their steps
taken in turn (in an order shuffled each round), each waited on, with the variants of
ours priced against our step (flax's BN, 1x1 kernels as convolutions) in the same
rotation; the figures are the medians, and each of ours comes with the median of its
per-round time ratios to the anchor.

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
from benchmarks import compare, run, timing

# The anchor's script part starts here; everything before it is definitions.
_ANCHOR_MAIN = "print(json.dumps({'jax'"


def load_anchor(path: str) -> dict[str, Any]:
  """The anchor's module namespace: its definitions, without running its cases."""
  with open(path) as file:
    source = file.read()
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


def anchor_spec(case: cases_lib.Case, cases: Sequence[cases_lib.Case]) -> Optional[str]:
  """The Flax anchor's case (kind:arch:batch:dtype) `case` is timed with: its own, or else
  that of our case it is priced against (the train step, for `train_conv1x1`)."""
  spec = compare.flax_spec(case)
  if spec is None:
    reference = cases_lib.internal_reference(case, list(cases))
    spec = compare.flax_spec(reference) if reference is not None else None
  return spec


def paired_records(cases: Sequence[cases_lib.Case], anchor: dict[str, Any], spec: str,
                   common: dict[str, Any]) -> list[dict[str, Any]]:
  """Records of our `cases` (equal warm-up and step counts) and of the anchor's `spec`, every
  step of each taken in turn with the others'; the anchor's record comes last. A case that
  cannot be built or run, or whose figure fails, gets an error record; the others keep theirs."""
  steppers, failures = cases_lib.prepare_runnable(list(cases))
  failed = [{**failures[case.name], **common} for case in cases if case.name in failures]
  cases = [case for case in cases if case.name in steppers]
  if not cases:
    return failed
  anchor_name = f'{compare.FLAX} {spec}'
  step = anchor_step(anchor, spec)
  start = time.perf_counter()
  jax.block_until_ready(step())
  anchor_first_call = time.perf_counter() - start  # includes its compilation
  params = cases[0].params
  times = timing.round_robin({**{name: stepper.step for name, stepper in steppers.items()}, anchor_name: step},
                             params['warmup'], params['iters'])
  anchor_times = times.pop(anchor_name)
  records = [cases_lib.measured_record(
      case, steppers[case.name], times[case.name], **common, step_s=times[case.name], paired_with=anchor_name,
      paired_time_ratio_median=statistics.median(o / a for o, a in zip(times[case.name], anchor_times)))
      for case in cases]
  anchor_median = statistics.median(anchor_times)
  anchor_record = {'anchor_script': compare.FLAX, 'case': spec, 'img_per_s': params['batch'] / anchor_median,
                   'first_call_s': anchor_first_call, 'step_s': anchor_times, 'paired_with': [c.name for c in cases]}
  if spec.startswith('eval:'):
    anchor_record['ms_per_batch'] = anchor_median * 1e3
  return [*records, *failed, anchor_record]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Times the chosen cases in turn with the Flax anchor's, printing a JSON line per figure; returns 0."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--profile', choices=cases_lib.PROFILES, default='cpu')
  parser.add_argument('--cases', nargs='+', default=['train', 'eval'], help='train/eval case names or kinds')
  parser.add_argument('--anchors-dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'anchors'))
  parser.add_argument('--device')
  parser.add_argument('--date')
  args = parser.parse_args(argv)
  try:
    chosen = [case for case in cases_lib.select(args.profile, args.cases) if case.prepare is not None]
  except cases_lib.UnknownCaseError as error:
    parser.error(str(error))
  if not chosen:  # pipeline or train_loop: nothing of ours steps in turn with the Flax anchor's step
    parser.error(f'--cases {" ".join(args.cases)}: none is a train or eval case; give train or eval case names '
                 'or kinds')
  anchor = load_anchor(os.path.join(args.anchors_dir, compare.FLAX))
  common = {'device': args.device or run.device_description(), 'jax': jax.__version__, 'profile': args.profile,
            **({'date': args.date} if args.date else {})}
  # One rotation per anchor case, holding only cases of ours with equal sizes and step counts.
  rotations: dict[tuple, list[cases_lib.Case]] = {}
  for case in chosen:
    rotations.setdefault((anchor_spec(case, chosen), run.timed_together(case) or case.name), []).append(case)
  for (spec, _), cases in rotations.items():
    print(f'[paired] {[case.name for case in cases]} with {compare.FLAX} {spec}', file=sys.stderr, flush=True)
    try:
      if spec is None:
        raise ValueError(f'no {compare.FLAX} case to pair with')
      records = paired_records(cases, anchor, spec, common)
    except Exception as error:  # Reported, not raised: the other cases still run.
      records = [{**cases_lib.failure_record(case, error), **common} for case in cases]
    for record in records:
      print(json.dumps(record), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
