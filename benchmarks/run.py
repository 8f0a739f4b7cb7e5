"""Our harness: `python -m benchmarks.run --profile gpu|cpu|smoke [--cases NAME ...] [--out FILE]`.

Prints one JSON line per case (case, value, unit, device, date, compile_s, ratios, ...).
`ratios` holds value / reference value for the references measured in the same run; here
that is flax's nn.BatchNorm for our BN (see `cases.internal_reference`). The anchors'
ratios are added by `benchmarks.side_by_side`, which runs this and the anchors in turn.
`--smoke` is `--profile smoke`: tiny shapes, for CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence, TextIO

import jax

from benchmarks import cases as cases_lib


def device_description() -> str:
  """What ran the steps, e.g. 'NVIDIA H100 80GB HBM3' or 'cpu (2 cores)'."""
  device = jax.devices()[0]
  name = f'cpu ({os.cpu_count()} cores)' if device.platform == 'cpu' else device.device_kind
  return name if jax.device_count() == 1 else f'{name} x{jax.device_count()}'


def add_ratios(records: list[dict[str, Any]], cases: Sequence[cases_lib.Case]) -> None:
  """Adds `ratios[ours:<reference case>] = value / reference value` where both were measured."""
  by_name = {record['case']: record for record in records}
  for case in cases:
    record = by_name.get(case.name)
    reference = cases_lib.internal_reference(case, list(cases))
    if record is None or reference is None or 'value' not in record:
      continue
    reference_record = by_name.get(reference.name, {})
    if reference_record.get('value'):
      record.setdefault('ratios', {})[cases_lib.reference_name(reference)] = record['value'] / reference_record['value']


def timed_together(case: cases_lib.Case) -> Optional[tuple]:
  """What the cases timed in turn with this one share (None: it is timed alone): our BN
  options and flax's at one shape; our train step and its variants at one size; eval of one
  model at one size, folded or not, in either dtype."""
  if case.kind == 'bn_layer':  # fp32 and bf16 options alike
    return ('bn_layer', str(case.params['shape']), case.params['warmup'], case.params['iters'])
  if case.kind in cases_lib.TRAIN_KINDS:
    return ('train', *sorted((k, str(v)) for k, v in case.params.items()))
  if case.kind == 'eval':
    return ('eval', *sorted((k, str(v)) for k, v in case.params.items() if k not in ('dtype', 'fold_batch_norm')))
  return None


def _batches(cases: Sequence[cases_lib.Case]) -> list[list[cases_lib.Case]]:
  """Cases one by one, except runs of cases priced against each other, which are timed in
  turn together (`cases.run_interleaved`), so that drift in the machine's speed falls on all."""
  batches: list[list[cases_lib.Case]] = []
  for case in cases:
    key = timed_together(case)
    if key is not None and batches and timed_together(batches[-1][0]) == key:
      batches[-1].append(case)
    else:
      batches.append([case])
  return batches


def run(profile: str, names: Optional[Sequence[str]] = None, *, device: Optional[str] = None,
        date: Optional[str] = None, log: TextIO = sys.stderr) -> list[dict[str, Any]]:
  """Runs the chosen cases of `profile` in this process and returns their records."""
  chosen = cases_lib.select(profile, names)
  common = {'device': device or device_description(), 'date': date or datetime.date.today().isoformat(),
            'profile': profile, 'jax': jax.__version__}
  records = []
  with tempfile.TemporaryDirectory(prefix='resnet_flax_bench_') as workdir:
    for batch in _batches(chosen):
      start = time.perf_counter()
      if len(batch) > 1:
        measured = cases_lib.run_interleaved(batch, workdir)
      else:
        measured = [cases_lib.run_case(batch[0], workdir)]
      for case, record in zip(batch, measured):
        records.append({**record, **common})
        outcome = record.get('error') or record.get('skipped') or f"{record['value']:.4g} {case.unit}"
        print(f'[benchmarks] {case.name}: {outcome}', file=log, flush=True)
      print(f'[benchmarks] ({time.perf_counter() - start:.1f} s)', file=log, flush=True)
  add_ratios(records, chosen)
  return records


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the chosen cases and prints their JSON lines; returns the exit status (1 if a case failed)."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--profile', choices=cases_lib.PROFILES, default='gpu')
  parser.add_argument('--smoke', action='store_true', help='same as --profile smoke')
  parser.add_argument('--cases', nargs='+', help='case names or kinds (default: all of the profile)')
  parser.add_argument('--device', help="device name to record (default: jax's)")
  parser.add_argument('--date', help='date to record (default: today)')
  parser.add_argument('--out', help='also append the JSON lines to this file')
  parser.add_argument('--list', action='store_true', help='list the cases and exit')
  args = parser.parse_args(argv)
  profile = 'smoke' if args.smoke else args.profile
  if args.out and (os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out)))):
    parser.error(f'--out {args.out}: give a file in an existing directory (checked before hours of measuring)')
  if args.out:
    try:  # opened for appending (made if absent) now: a place not writable fails before the measuring, not after
      with open(args.out, 'a'):
        pass
    except OSError as error:
      parser.error(f'--out {args.out} cannot be written ({error.strerror}); give a file this user may write')
  try:
    chosen = cases_lib.select(profile, args.cases)
  except cases_lib.UnknownCaseError as error:
    parser.error(str(error))
  if args.list:
    print('\n'.join(case.name for case in chosen))
    return 0
  if profile == 'gpu' and jax.default_backend() == 'cpu':
    print('[benchmarks] warning: the gpu profile (the issue\'s ResNet-50 batch 256, ResNet-152 batch 32) on a CPU '
          'takes hours; --profile cpu is sized for one.', file=sys.stderr)
  records = run(profile, args.cases, device=args.device, date=args.date)
  lines = [json.dumps(record) for record in records]
  print('\n'.join(lines), flush=True)
  if args.out:
    with open(args.out, 'a') as file:
      file.write(''.join(line + '\n' for line in lines))
  return 1 if any('error' in record for record in records) else 0


if __name__ == '__main__':
  sys.exit(main())
