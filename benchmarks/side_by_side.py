"""Ours and the anchors in one run, interleaved: `python -m benchmarks.side_by_side --profile gpu|cpu`.

Each job (our harness on some cases, or one anchor script) is its own process, so none
inherits another's compiled programs or GPU memory. Jobs come in groups that measure the
same thing (our train step and the Flax anchor's, say); within a group the order flips
every round (A B, then B A), so drift in the machine's load falls on both sides. Each
figure is the median over rounds. The run is appended to
`<results-dir>/<date>_<device>.jsonl` and its table replaces the profile's section of
`<results-md>` (see benchmarks/RESULTS.md and run_side_by_side.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Optional, Sequence, TextIO

from benchmarks import cases as cases_lib
from benchmarks import compare, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ('train', 'eval', 'loop', 'pipeline', 'bn', 'torch')


@dataclasses.dataclass(frozen=True)
class Stage:
  """A part of the run sized for one device call: a lease is 15 minutes of device time in all,
  machine start included, and a call should leave time to run again. `cases` are selectors
  (`cases.matches`); `budget_s` is the default time after which no job starts; a job started
  before it may run `STAGE_GRACE_S` longer (the call's timeout_s covers both)."""
  groups: tuple[str, ...]
  cases: tuple[str, ...]
  budget_s: float


# Each of our cases is measured in exactly one of the first two stages; `report --runs` prices
# across them. 'targets' holds what the GPU targets are read from (ResNet-50 train and
# ResNet-152 bf16 eval against the Flax anchor, the BN options against nn.BatchNorm) and the
# two choices decided by steps timed in turn with our own (1x1 kernels as convolutions, BN
# folded into the convs for eval); 'rest' first the other targets' (train.py's loop against
# the bare step, the input pipeline on the host's cores), then fp32 eval; 'torch'
# torch_resnet.py's figures, which no target reads.
STAGES = {
    'targets': Stage(('train', 'bn', 'eval'), ('train', 'train_flax_bn', 'train_conv1x1', 'bn_layer', 'eval/bf16',
                                                 'eval/bf16_folded'), 390.0),
    'rest': Stage(('loop', 'pipeline', 'eval'), ('train_loop', 'pipeline', 'eval/fp32'), 180.0),
    'torch': Stage(('torch',), ('train', 'eval'), 120.0),
}
DEFAULT_BUDGET_S = 500.0
# A compile started near a stage's budget is worth finishing: its figure is what the call is for.
STAGE_GRACE_S = 30.0
# Images the JPEG anchor decodes with all cores (an eighth of them with one process).
JPEG_ANCHOR_IMAGES = {'gpu': 20000, 'cpu': 8000, 'smoke': 64}


@dataclasses.dataclass(frozen=True)
class Job:
  """One process to run: our harness on some cases, the paired timer, or one anchor script."""
  name: str
  source: str  # 'ours', 'paired' or the anchor's script name
  command: tuple[str, ...]
  group: str = ''


def _group_of(case: cases_lib.Case) -> str:
  return {**{kind: 'train' for kind in cases_lib.TRAIN_KINDS}, 'eval': 'eval', 'train_loop': 'loop',
          'pipeline': 'pipeline'}.get(case.kind, 'bn')


def build_groups(profile: str, cases: Sequence[cases_lib.Case], groups: Sequence[str], anchors_dir: str,
                 with_torch: bool, python: str = sys.executable, paired: bool = False) -> list[list[Job]]:
  """The jobs of each group that has cases (or, for 'torch', anchor figures) to measure.

  With `paired`, our train and eval steps and the Flax anchor's run in one process, step by
  step in turn (`benchmarks.paired`), instead of one process after the other.
  """
  planned = []
  for group in groups:
    mine = [case for case in cases if _group_of(case) == group]
    jobs = []
    if paired and mine and group in ('train', 'eval'):
      planned.append([Job(f'paired:{group}', 'paired', (python, '-m', 'benchmarks.paired', '--profile', profile,
                                                        '--anchors-dir', anchors_dir, '--cases',
                                                        *[case.name for case in mine]), group)])
      continue
    if mine:
      jobs.append(Job(f'ours:{group}', 'ours', (python, '-m', 'benchmarks.run', '--profile', profile, '--cases',
                                                  *[case.name for case in mine])))
    flax_specs = sorted({compare.flax_spec(case) for case in mine if compare.flax_spec(case)})
    if flax_specs:
      jobs.append(Job(f'{compare.FLAX}:{group}', compare.FLAX,
                      (python, os.path.join(anchors_dir, compare.FLAX), *flax_specs)))
    if group == 'pipeline' and mine:
      jobs.append(Job(f'{compare.JPEG}', compare.JPEG,
                      (python, os.path.join(anchors_dir, compare.JPEG), str(JPEG_ANCHOR_IMAGES[profile]))))
    if group == 'torch' and with_torch:
      # One process per spec: a torch.compile that runs long costs only its own figure.
      specs = [spec for case in cases for spec in compare.torch_specs(case)]
      torch_script = os.path.join(anchors_dir, compare.TORCH)
      jobs.extend(Job(f'{compare.TORCH}:{spec}', compare.TORCH, (python, torch_script, spec))
                  for spec in sorted(set(specs)))
    if jobs:
      planned.append([dataclasses.replace(job, group=group) for job in jobs])
  return planned


def _device_description() -> str:
  """What our harness would record as the device, asked of a process of its own (so this one
  holds no GPU memory while the anchors run): for a run with no case of ours, the torch stage's."""
  try:
    return subprocess.run([sys.executable, '-c', 'from benchmarks import run; print(run.device_description())'],
                          cwd=REPO, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def _load1() -> float:
  return os.getloadavg()[0]


def _uptime() -> str:
  try:
    return subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'load average: ' + ', '.join(f'{x:.2f}' for x in os.getloadavg())


def run_job(job: Job, timeout_s: float, env: dict[str, str]) -> tuple[str, list[str]]:
  """Runs one job; returns (status, stdout lines). A job past its time keeps what it printed."""
  try:
    done = subprocess.run(job.command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    return ('ok' if done.returncode == 0 else f'exit {done.returncode}'), done.stdout.splitlines()
  except subprocess.TimeoutExpired as expired:
    out = expired.stdout or ''
    out = out.decode() if isinstance(out, bytes) else out
    return f'timed out after {timeout_s:.0f} s', out.splitlines()


def _ours_records(lines: list[str]) -> dict[str, dict[str, Any]]:
  records = {}
  for line in lines:
    if line.startswith('{'):
      record = json.loads(line)
      records[record['case']] = record
  return records


def run_rounds(planned: list[list[Job]], rounds: int, budget_s: float, group_rounds: Optional[dict[int, int]] = None,
               raw_log: Optional[str] = None, log: TextIO = sys.stderr, grace_s: float = 0.0
               ) -> tuple[list[dict], list[dict]]:
  """Runs every group `rounds` times (group i: `group_rounds[i]` times if given), alternating
  the order inside each group.

  Returns (per-round results {'ours': {case: record}, 'anchors': {figure: record}}, job log).
  A job that would start past `budget_s` is skipped and logged; one started before it may
  run `grace_s` past it (a device call's time limit must allow for that), then it is
  stopped. Each job's output is also appended to `raw_log` as it ends, so a run cut short
  still leaves its figures.
  """
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  start = time.perf_counter()
  results, jobs_log = [], []
  group_rounds = group_rounds or {}
  for round_index in range(max([rounds, *group_rounds.values()])):
    found: dict[str, dict] = {'ours': {}, 'anchors': {}}
    for group_index, group in enumerate(planned):
      if round_index >= group_rounds.get(group_index, rounds):
        continue
      for job in (group if round_index % 2 == 0 else group[::-1]):
        left = budget_s - (time.perf_counter() - start)
        # The arguments name what the job measured: the stages share job names ('ours:train').
        entry = {'job': job.name, 'arguments': list(job.command[1:]), 'round': round_index, 'load1': _load1()}
        if left < 30:
          jobs_log.append({**entry, 'status': 'skipped: time budget spent'})
          continue
        print(f'[side_by_side] round {round_index}: {job.name} (load {entry["load1"]:.2f})', file=log, flush=True)
        job_start = time.perf_counter()
        status, lines = run_job(job, left + grace_s, env)
        jobs_log.append({**entry, 'status': status, 'seconds': round(time.perf_counter() - job_start, 1)})
        if raw_log:
          with open(raw_log, 'a') as file:
            file.write(json.dumps({**jobs_log[-1], 'command': job.command, 'stdout': lines}) + '\n')
        if job.source == 'ours':
          found['ours'].update(_ours_records(lines))
        elif job.source == 'paired':
          ours_lines = [line for line in lines if line.startswith('{') and '"anchor_script"' not in line]
          found['ours'].update(_ours_records(ours_lines))
          found['anchors'].update(compare.anchor_figures(compare.FLAX, [l for l in lines if l not in ours_lines]))
        else:
          found['anchors'].update(compare.anchor_figures(job.source, lines))
    results.append(found)
  return results, jobs_log


def merge(results: list[dict], cases: Sequence[cases_lib.Case], profile: str, cpu_count: int, with_torch: bool,
          common: dict[str, Any]) -> list[dict[str, Any]]:
  """Median over rounds of every figure (ours for `cases`; every anchor figure found, and the
  ones `cases` are compared with even where missing), and our cases' ratios to each reference."""
  merged: dict[str, dict[str, Any]] = {}
  for case in cases:
    per_round = [found['ours'].get(case.name) for found in results]
    present = [record for record in per_round if record and 'value' in record]
    if not present:
      last = next((record for record in reversed(per_round) if record), None)
      reason = {key: last[key] for key in ('error', 'skipped') if last and key in last} or {'error': 'not run'}
      merged[case.name] = {'record': 'ours', 'case': case.name, 'kind': case.kind, 'unit': case.unit, **common,
                           **reason}
      continue
    # One round's step times stand for none: `round_step_s` holds every round's.
    template = {k: v for k, v in present[0].items() if k not in ('ratios', 'device', 'date', 'profile', 'step_s')}
    merged[case.name] = {**template, 'record': 'ours', **common,
                         'value': compare.median_or_none([r['value'] for r in present]),
                         'compile_s': compare.median_or_none([r.get('compile_s') for r in present]),
                         **({'paired_time_ratio_median': compare.median_or_none(
                             [r.get('paired_time_ratio_median') for r in present])}
                            if 'paired_time_ratio_median' in template else {}),
                         'rounds': [record['value'] if record and 'value' in record else None for record in per_round],
                         # Steps timed in turn with others' (`step_s`), by round: `compare.price` pairs them.
                         'round_step_s': [record.get('step_s') if record else None for record in per_round]}
  units = {name: case.unit for case in cases for name in compare.references(case, cpu_count, with_torch)}
  for found in results:  # anchor figures no case of this run is compared with (the torch stage's)
    for name in found['anchors']:
      units.setdefault(name, _anchor_unit(found['anchors'][name]))
  anchors: dict[str, dict[str, Any]] = {}
  for name, unit in units.items():
    per_round = [found['anchors'].get(name) for found in results]
    values = [compare.anchor_value(record, unit) if record else None for record in per_round]
    last = next((record for record in reversed(per_round) if record), {})
    anchors[name] = {'record': 'anchor', 'case': name, 'unit': unit, **common,
                     'value': compare.median_or_none(values), 'rounds': values,
                     **({'error': last['error']} if 'error' in last else {})}
  records = list(merged.values()) + list(anchors.values())
  compare.price(records, profile, cpu_count, with_torch)
  return records


def _anchor_unit(record: dict[str, Any]) -> str:
  """An anchor figure's unit, as our cases of its kind have it: eval latency, else throughput."""
  return 'ms' if record.get('case', '').startswith('eval:') else 'img/s'


def device_slug(device: str) -> str:
  """`device` as a lowercase file-name part, e.g. 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
  return re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()


def _group_rounds(item: str) -> tuple[str, int]:
  """'pipeline=3' -> ('pipeline', 3), for argparse: a malformed item is a usage error."""
  group, _, rounds = item.partition('=')
  if group not in GROUPS or not rounds.isdigit() or int(rounds) < 1:
    raise argparse.ArgumentTypeError(f'{item!r}: give GROUP=N with GROUP one of {", ".join(GROUPS)} and N >= 1')
  return group, int(rounds)


def unrecordable(records: list[dict[str, Any]], profile: str, device: str) -> Optional[str]:
  """Why a run's figures should not go into results/ and RESULTS.md, or None: nothing was
  measured (a stage may hold anchors only), or the GPU profile ran on a CPU (its file and
  section are the GPU's)."""
  if not any(record.get('value') is not None for record in records):
    return 'nothing was measured (each job failed, was skipped, or found no time left)'
  return profile_mismatch(profile, device)


def has_nvidia_gpu() -> bool:
  """Whether the machine may have an NVIDIA GPU: any NVIDIA device file, or nvidia-smi. Not
  jax's answer: that takes a process initializing the GPU, seconds of a short device lease.
  Generous on purpose: a wrong no would lose a lease's stage; after measuring, the device
  our harness reports is checked again (`unrecordable`)."""
  return bool(glob.glob('/dev/nvidia*')) or shutil.which('nvidia-smi') is not None


def profile_mismatch(profile: str, device: str) -> Optional[str]:
  """Why `profile` should not run on `device`, or None: the gpu profile's figures on a CPU
  would go into the GPU's results file and RESULTS.md section."""
  if profile == 'gpu' and device.startswith('cpu'):
    return f'the gpu profile ran on {device}; pass --profile cpu for a CPU run'
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the jobs in rounds, then records and reports the figures; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--profile', choices=('gpu', 'cpu'), default='gpu')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--group-rounds', nargs='*', default=[], metavar='GROUP=N', type=_group_rounds,
                      help='rounds for some groups, e.g. pipeline=3 (cheap groups can afford more)')
  parser.add_argument('--stage', choices=sorted(STAGES),
                      help='one device call\'s part of the run: its groups, cases and budget (see STAGES)')
  parser.add_argument('--groups', nargs='+', choices=GROUPS, help='default: the stage\'s, else all')
  parser.add_argument('--cases', nargs='+', help='our cases: names, kinds or kind/variant (default: the '
                      'stage\'s, else all of the profile); the anchors follow them')
  parser.add_argument('--anchors-dir', default=os.path.join(REPO, 'benchmarks', 'anchors'))
  parser.add_argument('--torch', choices=('auto', 'on', 'off'), default='auto',
                      help='run torch_resnet.py (auto: on the gpu profile when torch is importable)')
  parser.add_argument('--paired', choices=('auto', 'on', 'off'), default='auto',
                      help='time our train/eval steps and the Flax anchor\'s in turn in one process '
                           '(auto: on for the cpu profile; see benchmarks/paired.py)')
  parser.add_argument('--budget-s', type=float,
                      help=f'start no job after this many seconds (default: the stage\'s, else {DEFAULT_BUDGET_S:.0f})')
  parser.add_argument('--device', help="device name to record (default: what our harness reports)")
  parser.add_argument('--date', default=datetime.date.today().isoformat())
  parser.add_argument('--results-dir', default=os.path.join(REPO, 'benchmarks', 'results'))
  parser.add_argument('--raw-log', help="append each job's output here as it ends (JSON lines)")
  parser.add_argument('--results-md', default=os.path.join(REPO, 'benchmarks', 'RESULTS.md'))
  args = parser.parse_args(argv)
  if args.rounds < 1 or (args.budget_s is not None and args.budget_s <= 0):
    parser.error(f'--rounds {args.rounds} --budget-s {args.budget_s}: run at least one round, with a positive budget')

  missing = [s for s in (compare.FLAX, compare.TORCH, compare.JPEG)
             if not os.path.exists(os.path.join(args.anchors_dir, s))]
  if missing:
    raise SystemExit(f'anchors {missing} not in {args.anchors_dir}; copy ../shared/anchors/*.py there '
                     '(bash benchmarks/run_side_by_side.sh --prepare does).')
  with_torch = args.torch == 'on' or (args.torch == 'auto' and args.profile == 'gpu'
                                      and importlib.util.find_spec('torch') is not None)
  stage = STAGES.get(args.stage)
  groups = args.groups or (stage.groups if stage else GROUPS)
  with_torch = with_torch and 'torch' in groups  # else its figures would be listed as missing
  budget_s = args.budget_s if args.budget_s is not None else (stage.budget_s if stage else DEFAULT_BUDGET_S)
  # A stage's selectors may name variants a profile lacks (the cpu one has no bf16 eval).
  try:
    cases = (cases_lib.select(args.profile, args.cases) if args.cases or not stage else
             cases_lib.select(args.profile, stage.cases, strict=False))
  except cases_lib.UnknownCaseError as error:
    parser.error(str(error))
  paired = args.paired == 'on' or (args.paired == 'auto' and args.profile == 'cpu')
  planned = build_groups(args.profile, cases, groups, args.anchors_dir, with_torch, paired=paired)
  # Only the jobs (their own processes) start a JAX backend; this one, which imports jax, holds no GPU memory.
  cases = [case for case in cases if _group_of(case) in groups]
  if args.profile == 'gpu' and not args.device and not has_nvidia_gpu():  # before hours of measuring
    print('[side_by_side] the gpu profile needs an NVIDIA GPU and this machine has none (no /dev/nvidia*); pass '
          '--profile cpu for a CPU run; nothing run.', file=sys.stderr)
    return 1
  uptime_before = _uptime()
  wanted = dict(args.group_rounds)
  group_rounds = {index: wanted[jobs[0].group] for index, jobs in enumerate(planned) if jobs[0].group in wanted}
  results, jobs_log = run_rounds(planned, args.rounds, budget_s, group_rounds, args.raw_log,
                                 grace_s=STAGE_GRACE_S if stage else 0.0)
  uptime_after = _uptime()
  ours_device = next((r['device'] for found in results for r in found['ours'].values() if 'device' in r), None)
  device = args.device or ours_device or _device_description()
  loads = [job['load1'] for job in jobs_log]
  run = {'record': 'run', 'run_id': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='microseconds'),
         'date': args.date, 'device': device, 'profile': args.profile, 'rounds': args.rounds,
         'stage': args.stage, 'group_rounds': wanted, 'cpu_count': os.cpu_count(),
         'load_min': min(loads, default=0.0), 'load_max': max(loads, default=0.0),
         'uptime_before': uptime_before, 'uptime_after': uptime_after, 'with_torch': with_torch, 'paired': paired,
         'jobs': jobs_log}
  records = merge(results, cases, args.profile, os.cpu_count(), with_torch,
                  {'device': device, 'date': args.date, 'profile': args.profile, 'run_id': run['run_id']})
  refusal = unrecordable(records, args.profile, device)
  if refusal:
    print(report.table(records, run))
    print(f'[side_by_side] {refusal}; nothing written (the jobs\' output: {args.raw_log or "above"}).', file=sys.stderr)
    return 1
  os.makedirs(args.results_dir, exist_ok=True)
  path = os.path.join(args.results_dir, f'{args.date}_{device_slug(device)}.jsonl')
  with open(path, 'a') as file:
    for record in [run, *records]:
      file.write(json.dumps(record) + '\n')
  section = report.table(records, run)
  report.write_results_section(args.results_md, args.profile, section)
  print(section)
  print(f'[side_by_side] wrote {path} and {args.results_md}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
