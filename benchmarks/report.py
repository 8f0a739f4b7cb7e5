"""The side-by-side table in markdown, and its section in benchmarks/RESULTS.md.

`python -m benchmarks.report RESULTS_JSONL [--runs N] [--results-md PATH]` renders a file's
last run again, or its last N runs as one table: the stages of one device lease
(`side_by_side --stage`), each case priced against references measured in any of them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Optional, Sequence

from benchmarks import cases as cases_lib
from benchmarks import compare
from resnet_flax import atomic_files

BEGIN = '<!-- side-by-side {profile} begin -->'
END = '<!-- side-by-side {profile} end -->'


def _number(value: float) -> str:
  return f'{value:,.1f}' if abs(value) >= 100 else f'{value:.3g}'


def _met(ratio: float, in_turn: Optional[float], target: dict[str, Any]) -> str:
  """'yes' where the time ratio meets the target, and so does the per-step ratio where there is
  one (a noisy machine can put the two on either side of it); else '**no**', naming a per-step
  ratio that failed where the ratio of medians alone would have passed."""
  within = lambda value: target.get('min_time_ratio', 0.0) <= value <= target['max_time_ratio']
  if within(ratio) and (in_turn is None or within(in_turn)):
    return 'yes'
  return '**no** (per step {:.3f})'.format(in_turn) if within(ratio) else '**no**'


def table(records: list[dict[str, Any]], run: dict[str, Any]) -> str:
  """A markdown section: one row per (our case, reference), then anchor errors and skipped cases."""
  lines = [
      f"### {run['date']}, {run['device']} (profile `{run['profile']}`)",
      '',
      (f"Figures from {len(run['run_ids'])} calls on the same machine (runs {', '.join(run['run_ids'])}, "
       'stages ' + ', '.join(stage or 'all' for stage in run['stages']) + '); each case is priced against '
       'references measured in any of them. ' if len(run.get('run_ids', ())) > 1 else '')
      + f"{rounds_text(run)}, ours and the anchors interleaved (the order alternates each round)"
      + ('; train and eval: our step and the Flax anchor\'s (its own code) in one process, step by step '
         'in turn (`benchmarks/paired.py`)' if run.get('paired') else '')
      + '. Each figure is the median over rounds of a median over timed steps, compilation excluded. '
      f"Load average (1 min) seen before each job: {run['load_min']:.2f} to {run['load_max']:.2f} "
      f"on {run['cpu_count']} cores; `uptime` before: `{run['uptime_before']}`, after: `{run['uptime_after']}`.",
      '',
      '| case | ours | unit | reference | reference value | time ratio (ours / ref) | target | met |',
      '|---|---|---|---|---|---|---|---|',
  ]
  notes = []
  for record in records:
    if record.get('record') != 'ours':
      continue
    if 'value' not in record:
      notes.append(f"- `{record['case']}`: {record.get('skipped') or record.get('error')}")
      continue
    compared = record.get('time_ratios') or {}
    if not compared:
      no_reference = ' — |' * 5
      lines.append(f"| `{record['case']}` | {_number(record['value'])} | {record['unit']} |{no_reference}")
    for reference, ratio in compared.items():
      target = (record.get('targets') or {}).get(reference)
      met = '—' if target is None else _met(ratio, (record.get('in_turn_time_ratios') or {}).get(reference), target)
      lines.append(f"| `{record['case']}` | {_number(record['value'])} | {record['unit']} | `{reference}` | "
                   f"{_number(record['reference_values'][reference])} | {ratio:.3f} | "
                   f"{target['text'] if target else '—'} | {met} |")
  for record in records:
    if record.get('record') == 'anchor' and record.get('value') is None:
      notes.append(f"- anchor `{record['case']}`: {record.get('error', 'no figure')}")
  for job in run.get('jobs', []):
    if job.get('status') != 'ok':
      notes.append(f"- job `{job['job']}` (round {job['round']}): {job['status']}")
  if notes:
    lines += ['', 'Not measured or failed:', '', *notes]
  paired = [f"`{r['case']}` {r['paired_time_ratio_median']:.3f}" for r in records
            if r.get('record') == 'ours' and r.get('paired_time_ratio_median')]
  if paired:
    lines += ['', 'Median of the per-pair time ratios (ours / anchor, steps taken in turn; over rounds, '
              "the median of the rounds' medians): " + ', '.join(paired) + '.']
  in_turn = [f"`{r['case']}` {ratio:.3f}x `{reference.removeprefix('ours:')}`" for r in records
             if r.get('record') == 'ours' for reference, ratio in (r.get('in_turn_time_ratios') or {}).items()]
  if in_turn:
    lines += ['', 'Median of the per-step time ratios against our own reference (each step timed in turn with '
              "the reference's, in one process, over every round): " + ', '.join(in_turn) + '.']
  compile_times = [f"`{r['case']}` {r['compile_s']:.1f} s" for r in records
                   if r.get('record') == 'ours' and r.get('compile_s')]
  if compile_times:
    lines += ['', 'Compile time of ours (median over rounds): ' + ', '.join(compile_times) + '.']
  traffic = [f"`{r['case']}` {ratio:.3f}x `{reference.removeprefix('ours:')}`" for r in records
             if r.get('record') == 'ours' for reference, ratio in (r.get('bytes_ratios') or {}).items()]
  if traffic:
    lines += ['', "Bytes accessed per step by XLA's cost analysis, ours / our reference (the same in every "
              'run: a time ratio above it is not more passes over memory): ' + ', '.join(traffic) + '.']
  return '\n'.join(lines) + '\n'


def _job_label(job: dict[str, Any], name_taken: bool) -> str:
  """A job's name, with what it measured where several jobs share the name (the stages' eval jobs)."""
  if not name_taken:
    return job['job']
  arguments = job.get('arguments') or []
  measured = arguments[arguments.index('--cases') + 1:] if '--cases' in arguments else arguments[1:]
  return f"{job['job']} {' '.join(measured)}".strip()


def rounds_text(run: dict[str, Any]) -> str:
  """How many rounds the figures come from: one count where every job finished as many, else
  each job's finished rounds, call by call ('5 + 9') where several calls ran it."""
  per_job: dict[tuple[str, str], dict[int, int]] = {}
  jobs: dict[tuple[str, str], dict[str, Any]] = {}
  for job in run.get('jobs', []):
    if job.get('status') == 'ok':
      key = (job['job'], json.dumps(job.get('arguments')))
      calls = per_job.setdefault(key, {})
      calls[job.get('call', 0)] = calls.get(job.get('call', 0), 0) + 1
      jobs.setdefault(key, job)
  counts = {key: [calls[call] for call in sorted(calls)] for key, calls in per_job.items()}
  if not counts:
    return f"{run['rounds']} round(s)"
  if len({tuple(count) for count in counts.values()}) == 1 and len(next(iter(counts.values()))) == 1:
    return f'{next(iter(counts.values()))[0]} round(s)'
  names = [name for name, _ in counts]
  return ('Rounds per job: ' + ', '.join(f"`{_job_label(jobs[key], names.count(key[0]) > 1)}` "
                                         f"{' + '.join(map(str, count))}" for key, count in counts.items())
          + (' (a case measured in several calls has its latest figure)'
             if any(len(count) > 1 for count in counts.values()) else ''))


def update_results_md(text: str, profile: str, section: str) -> str:
  """`text` with the profile's marked section replaced by `section` (appended if absent)."""
  begin, end = BEGIN.format(profile=profile), END.format(profile=profile)
  block = f'{begin}\n{section}{end}\n'
  pattern = re.compile(re.escape(begin) + r'.*?' + re.escape(end) + r'\n?', re.DOTALL)
  if pattern.search(text):
    return pattern.sub(lambda _: block, text, count=1)
  return text.rstrip('\n') + '\n\n' + block


def write_results_section(results_md: str, profile: str, section: str) -> None:
  """Replaces the profile's section of the file at `results_md` (made if absent), atomically."""
  text = '# Benchmark results\n'
  if os.path.exists(results_md):
    with open(results_md, encoding='utf-8') as file:
      text = file.read()
  atomic_files.write_text(results_md, update_results_md(text, profile, section))


def last_runs(lines: Sequence[str], count: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """The last `count` runs of a results file and their figures as one set: a case measured in
  several keeps the latest figure (an error replaces none). The runs must share profile and device."""
  records = [json.loads(line) for line in lines if line.strip()]
  runs = [record for record in records if record.get('record') == 'run']
  if count < 1:
    raise ValueError(f'--runs {count}: combine at least one run')
  if not runs:
    raise ValueError('it holds no run record: give a file side_by_side.py wrote (benchmarks/results/*.jsonl); '
                     "benchmarks.run's --out lines are figures only")
  if len(runs) < count:
    raise ValueError(f'the results file holds {len(runs)} run(s), not the {count} asked for')
  runs = runs[-count:]
  if len({(run['profile'], run['device']) for run in runs}) > 1:
    raise ValueError('the runs to combine differ in profile or device: '
                     f"{sorted({(run['profile'], run['device']) for run in runs})}; combine one machine's runs")
  figures: dict[tuple[str, str], dict[str, Any]] = {}
  for run in runs:
    for record in records:
      if record.get('run_id') == run['run_id'] and record.get('record') != 'run':
        key = (record['record'], record['case'])
        if record.get('value') is not None or figures.get(key, {}).get('value') is None:
          figures[key] = record
  return runs, list(figures.values())


def combined_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One 'run' record standing for several calls: their loads, uptimes and jobs together, less
  the failed or skipped jobs a later call ran again (same job, same arguments) and finished."""
  if len(runs) == 1:
    return runs[0]
  def same_job(job: dict[str, Any]) -> tuple[str, str]:
    return job['job'], json.dumps(job.get('arguments'))
  jobs = []
  for index, run in enumerate(runs):
    done_later = {same_job(job) for later in runs[index + 1:] for job in later['jobs'] if job.get('status') == 'ok'}
    jobs += [{**job, 'call': index} for job in run['jobs']
             if job.get('status') == 'ok' or same_job(job) not in done_later]
  return {**runs[-1], 'rounds': max(run['rounds'] for run in runs), 'jobs': jobs,
          'load_min': min(run['load_min'] for run in runs), 'load_max': max(run['load_max'] for run in runs),
          'uptime_before': runs[0]['uptime_before'], 'paired': any(run.get('paired') for run in runs),
          'with_torch': any(run.get('with_torch') for run in runs),
          'run_ids': [run['run_id'] for run in runs], 'stages': [run.get('stage') for run in runs]}


def priced_again(records: list[dict[str, Any]], run: dict[str, Any]) -> list[dict[str, Any]]:
  """`records` with every ratio made anew from the figures they hold, ours in the profile's order."""
  records = [dict(record) for record in records]
  compare.price(records, run['profile'], run['cpu_count'], run.get('with_torch', False))
  order = {case.name: index for index, case in enumerate(cases_lib.profile_cases(run['profile']))}
  return sorted(records, key=lambda r: (r.get('record') != 'ours', order.get(r['case'], len(order))))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Renders the results file's last run(s) and writes its RESULTS.md section; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('results_jsonl')
  parser.add_argument('--runs', type=int, default=1, help='combine the last N runs (one lease\'s stages)')
  parser.add_argument('--results-md', default='benchmarks/RESULTS.md')
  args = parser.parse_args(argv)
  try:
    with open(args.results_jsonl, encoding='utf-8') as file:
      runs, records = last_runs(file.read().splitlines(), args.runs)
    run = combined_run(runs)
  except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
    print(f'report: {args.results_jsonl}: {error}', file=sys.stderr)
    return 2
  except (KeyError, TypeError, AttributeError) as error:  # JSON of another shape than side_by_side's
    print(f'report: {args.results_jsonl} is not a results file side_by_side wrote ({type(error).__name__}: '
          f'{error}).', file=sys.stderr)
    return 2
  if len(runs) > 1:
    records = priced_again(records, run)
  section = table(records, run)
  print(section)  # before writing: a failed write still shows the table
  try:
    write_results_section(args.results_md, run['profile'], section)
  except OSError as error:
    print(f'report: writing {args.results_md} failed ({error}); pass --results-md PATH', file=sys.stderr)
    return 2
  print(f'[report] wrote its section of {args.results_md}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
