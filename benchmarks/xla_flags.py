"""Our cases under sets of XLA flags, each set in a process of its own: which flags help here.

    python -m benchmarks.xla_flags --profile gpu --cases train train_loop
    python -m benchmarks.xla_flags --profile gpu --sets default no_command_buffers

Prints one JSON line per (flag set, case) and then a markdown table of each case's time
relative to the `default` set (below 1 is faster). Every set, `default` included, adds its
flags to the environment's XLA_FLAGS. The GPU sets are the issue's candidates: the
latency-hiding scheduler, autotuning depth, command buffers (CUDA graphs), Triton GEMMs. The
CPU build accepts the `xla_gpu_*` flags and ignores them, so GPU sets mean something only on
a GPU; `--sets` picks, and `cpu_*` sets exist for the CPU profile and the smoke test. Each set
runs once, after `default`: compare ratios with the run-to-run spread of `default` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_SETS = {
    'default': '',
    'no_latency_hiding': '--xla_gpu_enable_latency_hiding_scheduler=false',
    'no_command_buffers': '--xla_gpu_enable_command_buffer=',
    'autotune_0': '--xla_gpu_autotune_level=0',
    'autotune_4': '--xla_gpu_autotune_level=4',
    'no_triton_gemm': '--xla_gpu_enable_triton_gemm=false',
    'cpu_no_fast_min_max': '--xla_cpu_enable_fast_min_max=false',
}
GPU_SETS = ('default', 'no_latency_hiding', 'no_command_buffers', 'autotune_0', 'autotune_4', 'no_triton_gemm')


def measure(flag_set: str, profile: str, cases: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
  """`benchmarks.run` in a fresh process with XLA_FLAGS of `flag_set` added to the environment's."""
  flags = ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), FLAG_SETS[flag_set]]))
  command = [sys.executable, '-m', 'benchmarks.run', '--profile', profile, '--cases', *cases]
  try:
    done = subprocess.run(command, cwd=REPO, env={**os.environ, 'XLA_FLAGS': flags}, stdout=subprocess.PIPE,
                          text=True, timeout=timeout_s)
    lines, status = done.stdout.splitlines(), ('ok' if done.returncode == 0 else f'exit {done.returncode}')
  except subprocess.TimeoutExpired:
    lines, status = [], f'timed out after {timeout_s:.0f} s'
  records = [json.loads(line) for line in lines if line.startswith('{')]
  if not records:
    return [{'flag_set': flag_set, 'xla_flags': FLAG_SETS[flag_set], 'case': ' '.join(cases), 'error': status}]
  process = {} if status == 'ok' else {'process_status': status}
  return [{**record, 'flag_set': flag_set, 'xla_flags': FLAG_SETS[flag_set], **process} for record in records]


def time_ratios(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
  """(flag set, case) -> its time over the default set's (img/s figures are inverted)."""
  default = {r['case']: r['value'] for r in records if r['flag_set'] == 'default' and 'value' in r}
  ratios = {}
  for record in records:
    reference = default.get(record.get('case'))
    if record.get('value') and reference:
      ratio = record['value'] / reference
      ratios[(record['flag_set'], record['case'])] = 1 / ratio if record['unit'] == 'img/s' else ratio
  return ratios


def table(records: Sequence[dict[str, Any]]) -> str:
  """Markdown: one row per flag set and case, the figure and its time relative to `default`."""
  ratios = time_ratios(records)
  rows = ['| flag set | XLA_FLAGS | case | value | unit | time / default |', '|---|---|---|---|---|---|']
  for record in records:
    if 'value' not in record:
      rows.append(f"| {record['flag_set']} | `{record['xla_flags']}` | {record.get('case', '—')} | "
                  f"{record.get('error', record.get('skipped', '—'))} | | |")
      continue
    ratio = ratios.get((record['flag_set'], record['case']))
    rows.append(f"| {record['flag_set']} | `{record['xla_flags'] or '(none)'}` | `{record['case']}` | "
                f"{record['value']:,.4g} | {record['unit']} | {'—' if ratio is None else f'{ratio:.3f}'} |")
  return '\n'.join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the cases under each flag set and prints their records and table; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--profile', default='gpu', choices=('gpu', 'cpu', 'smoke'))
  parser.add_argument('--cases', nargs='*', default=['train'], help='case names or kinds for benchmarks.run')
  parser.add_argument('--sets', nargs='*', choices=sorted(FLAG_SETS), help='flag sets (default: the GPU ones)')
  parser.add_argument('--timeout-s', type=float, default=300.0, help='per flag set')
  args = parser.parse_args(argv)
  if not args.timeout_s > 0:
    parser.error(f'--timeout-s {args.timeout_s}: give a positive number of seconds per flag set')
  sets = args.sets or list(GPU_SETS)
  if 'default' not in sets:
    sets = ['default', *sets]
  records = []
  for flag_set in sets:  # each set's lines as it ends: a call cut short keeps the sets it finished
    measured = measure(flag_set, args.profile, args.cases, args.timeout_s)
    for record in measured:
      print(json.dumps(record), flush=True)
    records += measured
  print(table(records), flush=True)
  return 1 if any('error' in record for record in records) else 0


if __name__ == '__main__':
  sys.exit(main())
