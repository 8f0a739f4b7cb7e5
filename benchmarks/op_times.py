"""Where a step's time goes: a case's compiled step traced with jax's profiler, its time per
XLA op and per kind of work (convolution, matmul, reduction, elementwise, ...), and the
optimized HLO it ran.

  python -m benchmarks.op_times --profile gpu --cases train/resnet_v1_50/bf16/b256 --out DIR

prints, per case, the wall time of a traced step, the ops' time by kind and the slowest ops,
and writes to DIR `<case>.hlo.txt` (the optimized HLO), `<case>.ops.jsonl` (every op's time
per step), `<case>.md` (what it prints), `<case>.trace.json.gz` (the step's trace, for Perfetto's
viewer) and `trace/` (the raw profile, for TensorBoard's).

Which trace events are ops: on a GPU or TPU, the kernels on the device's lanes (the
`/device:...` processes; its "XLA Ops" lane where there is one, else its streams); on CPU,
events on the runtime's threads named after an instruction of the program (the executor's
own events are left out). An op's kind comes from the instruction it is named after (its
opcode, custom-call target, or the computation a fusion calls), else from a library kernel's
name (cuDNN's and cuBLAS's kernels are named after the library, not the HLO).

On GPU, XLA runs a step's kernels as CUDA graphs (command buffers) by default; where the
trace then shows a graph rather than its kernels, trace with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=` (and time with the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax

from benchmarks import cases as cases_lib

# Heaviest first: a fusion doing a convolution and an add is convolution work.
KINDS = ('convolution', 'matmul', 'reduction', 'collective', 'data movement', 'elementwise')
_OPCODE_KINDS = (
    ('convolution', re.compile(r'^convolution$')),
    ('matmul', re.compile(r'^dot$')),
    ('reduction', re.compile(r'^(reduce|reduce-window|select-and-scatter)$')),
    ('collective', re.compile(r'^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?$')),
    ('data movement', re.compile(r'^(copy|transpose|concatenate|pad|slice|dynamic-slice|dynamic-update-slice|'
                                 r'gather|scatter)$')),
)
# Library kernels, named after the library rather than an instruction (cuDNN's xmma fprop /
# dgrad / wgrad convolutions, cuBLAS's and nvjet's GEMMs, NCCL, copies).
_KERNEL_NAME_KINDS = (
    ('convolution', re.compile(r'conv|fprop|dgrad|wgrad', re.IGNORECASE)),
    ('matmul', re.compile(r'gemm|nvjet|cublas|cutlass|matmul', re.IGNORECASE)),
    ('collective', re.compile(r'nccl', re.IGNORECASE)),
    ('data movement', re.compile(r'memcpy|memset', re.IGNORECASE)),
)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[^\s=(]+)\s*=\s*.*?\s(?P<opcode>[a-z][a-z0-9-]*)\((?P<rest>.*)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?(?P<name>[^\s(]+)\s.*\{\s*$')
# Lanes of a device process that summarize rather than run ops (modules, steps, source lines).
_SUMMARY_LANES = re.compile(r'XLA Modules|Steps|Source|Framework|TensorFlow', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class OpTime:
  """One op's time in a traced step: `seconds` and `calls` per step."""
  name: str
  kind: str
  seconds: float
  calls: float


def _normal(name: str) -> str:
  """XLA names a fusion's GPU kernel after its instruction, '.' and '-' made '_'."""
  return re.sub(r'[.\-]', '_', name.lstrip('%'))


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """Each instruction of an optimized HLO module (names as `_normal`) and its kind of work:
  from its opcode or custom-call target, or for a fusion or call the heaviest kind among the
  instructions of the computations it calls."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  current: Optional[list] = None
  for line in hlo_text.splitlines():
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      current.append((instruction['name'], instruction['opcode'], instruction['rest']))
    elif (computation := _COMPUTATION.match(line)) and not line.lstrip().startswith('HloModule'):
      current = computations.setdefault(computation['name'].lstrip('%'), [])
  memo: dict[str, str] = {}

  def kind(opcode: str, rest: str, depth: int) -> str:
    if opcode == 'custom-call':
      target = re.search(r'custom_call_target="([^"]*)"', rest)
      return _kernel_kind(target[1] if target else '') or 'elementwise'
    for name, pattern in _OPCODE_KINDS:
      if pattern.match(opcode):
        return name
    called = re.findall(r'(?:calls|to_apply|body)=%?([\w.\-]+)', rest)
    if depth > 8 or not called:
      return 'elementwise'
    return _heaviest(computation_kind(name, depth + 1) for name in called)

  def computation_kind(name: str, depth: int) -> str:
    if name not in memo:
      memo[name] = _heaviest(kind(opcode, rest, depth) for _, opcode, rest in computations.get(name, ()))
    return memo[name]

  return {_normal(name): kind(opcode, rest, 0)
          for instructions in computations.values() for name, opcode, rest in instructions}


def _heaviest(kinds: Iterable[str]) -> str:
  return min(kinds, key=KINDS.index, default='elementwise')


def _kernel_kind(name: str) -> Optional[str]:
  return next((kind for kind, pattern in _KERNEL_NAME_KINDS if pattern.search(name)), None)


def op_events(trace: dict[str, Any], instructions: dict[str, str], platform: str = 'cpu') -> list[dict[str, Any]]:
  """The trace's complete events that are ops of the program (module docstring), which ran on
  `platform` (jax's name: 'cpu', 'gpu', 'tpu')."""
  events = trace.get('traceEvents', [])
  processes = {e['pid']: e['args']['name'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  complete = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  devices = {pid for pid, name in processes.items() if name.startswith('/device:')}
  if platform != 'cpu' and not devices:  # host threads only: launches, not the kernels' time
    raise RuntimeError(f'the trace of a {platform} program has no device lanes: jax.profiler recorded no kernels '
                       '(on GPU it needs CUPTI, the nvidia-cuda-cupti package).')
  if not devices:  # CPU: the runtime's threads run the ops
    return [e for e in complete if threads.get((e['pid'], e['tid'])) != 'python' and _normal(e['name']) in instructions]
  chosen = []
  for pid in devices:
    lanes = {tid: name for (p, tid), name in threads.items() if p == pid}
    op_lanes = {tid for tid, name in lanes.items() if name == 'XLA Ops'} or {
        tid for tid, name in lanes.items() if not _SUMMARY_LANES.search(name)}
    chosen += [e for e in complete if e['pid'] == pid and e['tid'] in op_lanes]
  return chosen


def op_times(events: Sequence[dict[str, Any]], instructions: dict[str, str], steps: int) -> list[OpTime]:
  """Time and calls per step of each op, slowest first."""
  seconds: dict[str, float] = {}
  calls: dict[str, int] = {}
  for event in events:
    # A kernel event may name the instruction it runs for (`hlo_op`); library kernels need it.
    name = (event.get('args') or {}).get('hlo_op') or event['name']
    seconds[name] = seconds.get(name, 0.0) + event['dur'] * 1e-6  # trace times are microseconds
    calls[name] = calls.get(name, 0) + 1
  ops = [OpTime(name, instructions.get(_normal(name)) or _kernel_kind(name) or 'other', total / steps,
                calls[name] / steps) for name, total in seconds.items()]
  return sorted(ops, key=lambda op: -op.seconds)


def by_kind(ops: Sequence[OpTime]) -> dict[str, float]:
  """Seconds per step of each kind of work, heaviest kind first."""
  totals: dict[str, float] = {}
  for op in ops:
    totals[op.kind] = totals.get(op.kind, 0.0) + op.seconds
  return dict(sorted(totals.items(), key=lambda item: -item[1]))


def trace_steps(step: Callable[[], Any], steps: int, logdir: str) -> tuple[dict[str, Any], float, str]:
  """Runs `step` `steps` times (each waited on) under jax's profiler; returns the trace
  (Chrome trace JSON), the wall seconds per step and the trace's file."""
  jax.block_until_ready(step())  # compiled and warm before the trace
  with jax.profiler.trace(logdir):
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(step())
    wall = (time.perf_counter() - start) / steps
  written = sorted(glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.trace.json.gz')), key=os.path.getmtime)
  if not written:
    raise RuntimeError(f'jax.profiler wrote no *.trace.json.gz under {logdir}.')
  with gzip.open(written[-1], 'rt', encoding='utf-8') as file:
    return json.load(file), wall, written[-1]


def summary(case_name: str, ops: Sequence[OpTime], wall_s: float, top: int) -> str:
  """Markdown lines: the traced step's wall time, time by kind of work, the slowest ops."""
  busy = sum(op.seconds for op in ops)
  lines = [f'### `{case_name}`: {wall_s * 1e3:.2f} ms a step (traced), ops {busy * 1e3:.2f} ms '
           f'({len(ops)} distinct)', '', '| kind | ms / step | share of op time |', '|---|---|---|']
  lines += [f'| {kind} | {seconds * 1e3:.3f} | {seconds / busy:.1%} |' for kind, seconds in by_kind(ops).items()]
  lines += ['', '| op | kind | ms / step | calls / step | share |', '|---|---|---|---|---|']
  lines += [f'| `{op.name[:80]}` | {op.kind} | {op.seconds * 1e3:.3f} | {op.calls:g} | {op.seconds / busy:.1%} |'
            for op in ops[:top]]
  return '\n'.join(lines) + '\n'


def profile_case(case: cases_lib.Case, steps: int, out_dir: str, top: int) -> str:
  """Traces `steps` steps of one case and writes its files to `out_dir`; returns its summary."""
  if case.prepare is None:
    raise ValueError(f'{case.name} is timed inside its own loop (no compiled step to trace); '
                     'profile a train, eval or bn_layer case.')
  stepper = case.prepare()
  hlo_text = stepper.compiled.as_text()
  instructions = instruction_kinds(hlo_text)
  trace, wall_s, trace_file = trace_steps(stepper.step, steps, os.path.join(out_dir, 'trace'))
  ops = op_times(op_events(trace, instructions, jax.default_backend()), instructions, steps)
  if not ops:
    raise RuntimeError(f'{case.name}: the trace holds no event named after an op of the program.')
  stem = os.path.join(out_dir, re.sub(r'[^\w.-]', '_', case.name))
  with open(f'{stem}.hlo.txt', 'w', encoding='utf-8') as file:
    file.write(hlo_text)
  with open(f'{stem}.ops.jsonl', 'w', encoding='utf-8') as file:
    file.writelines(json.dumps({'case': case.name, **dataclasses.asdict(op)}) + '\n' for op in ops)
  # Beside the others: the device tool returns files two folders deep at most, and a long summary
  # overflows the command's output it returns.
  shutil.copyfile(trace_file, f'{stem}.trace.json.gz')
  text = summary(case.name, ops, wall_s, top)
  with open(f'{stem}.md', 'w', encoding='utf-8') as file:
    file.write(text + '\n')
  return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Profiles the chosen cases; returns the exit status (1 if a case failed)."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--profile', choices=cases_lib.PROFILES, default='gpu')
  parser.add_argument('--cases', nargs='+', default=['train'], help='case names or kinds (default: train)')
  parser.add_argument('--steps', type=int, default=10, help='steps traced (after one untraced)')
  parser.add_argument('--top', type=int, default=25, help='slowest ops listed')
  parser.add_argument('--out', default=os.environ.get('OUT', 'op_times'), help='folder for the files (default: $OUT)')
  args = parser.parse_args(argv)
  if args.steps < 1 or args.top < 1:
    parser.error(f'--steps {args.steps} --top {args.top}: trace at least one step and list at least one op')
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    parser.error(f'--out {args.out} is a file; give a folder for the HLO, the op times and the trace')
  try:
    chosen = cases_lib.select(args.profile, args.cases)  # an unknown name fails before --out is made
  except cases_lib.UnknownCaseError as error:
    parser.error(str(error))
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as error:
    parser.error(f'--out {args.out} cannot be made ({error.strerror}); give a folder this user may write')
  status = 0
  for case in chosen:
    try:
      print(profile_case(case, args.steps, args.out, args.top), flush=True)
    except Exception as error:  # Reported, not raised: the other cases are still profiled.
      print(f'op_times: {case.name}: {type(error).__name__}: {error}', file=sys.stderr, flush=True)
      status = 1
  return status


if __name__ == '__main__':
  sys.exit(main())
