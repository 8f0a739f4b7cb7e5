"""`benchmarks/op_times.py`: a traced step's time per op and per kind of work, on CPU for real
and on a GPU-shaped trace written by hand (no GPU here)."""

import json
import os

import pytest

from benchmarks import cases as cases_lib
from benchmarks import op_times

HLO = """HloModule jit_step, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%fused_conv (p0: f32[8,4,4,16], p1: f32[3,3,16,16]) -> f32[8,4,4,16] {
  %p0 = f32[8,4,4,16]{3,2,1,0} parameter(0)
  %p1 = f32[3,3,16,16]{3,2,1,0} parameter(1)
  %convolution.3 = f32[8,4,4,16]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f
  ROOT %add.1 = f32[8,4,4,16]{3,2,1,0} add(%convolution.3, %convolution.3)
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.2 = f32[] add(%a, %b)
}

%fused_reduce (p0: f32[8,16]) -> f32[16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %reduce.4 = f32[16]{0} reduce(%p0, %zero), dimensions={0}, to_apply=%region_add
}

%fused_add (p0: f32[8,16]) -> f32[8,16] {
  %p0 = f32[8,16]{1,0} parameter(0)
  ROOT %multiply.5 = f32[8,16]{1,0} multiply(%p0, %p0)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %cudnn-conv.1 = (f32[8,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x), custom_call_target="__cudnn$convForward"
  %cublas-gemm.2 = (f32[8,16]{1,0}, s8[4]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %loop_conv_fusion = f32[8,4,4,16]{3,2,1,0} fusion(%x, %x), kind=kLoop, calls=%fused_conv
  %input_reduce_fusion.3 = f32[16]{0} fusion(%x), kind=kInput, calls=%fused_reduce
  %transpose.7 = f32[16,8]{0,1} transpose(%x), dimensions={1,0}
  ROOT %loop_multiply_fusion.1 = f32[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_add
}
"""


def test_each_instruction_gets_the_heaviest_kind_of_work_it_does():
  kinds = op_times.instruction_kinds(HLO)
  assert kinds['cudnn_conv_1'] == 'convolution'  # by custom-call target
  assert kinds['cublas_gemm_2'] == 'matmul'
  assert kinds['loop_conv_fusion'] == 'convolution'  # a conv and an add: convolution work
  assert kinds['input_reduce_fusion_3'] == 'reduction'
  assert kinds['transpose_7'] == 'data movement'
  assert kinds['loop_multiply_fusion_1'] == 'elementwise'
  assert kinds['x'] == 'elementwise'  # a parameter; never an event, but harmless


def _trace(threads, events, processes=None):
  """A Chrome trace as jax's profiler writes it: metadata naming processes and threads, then
  complete ('X') events with microsecond durations."""
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': name}}
          for pid, name in (processes or {1: '/host:CPU', 2: '/device:GPU:0'}).items()]
  meta += [{'ph': 'M', 'name': 'thread_name', 'pid': pid, 'tid': tid, 'args': {'name': name}}
           for (pid, tid), name in threads.items()]
  return {'traceEvents': meta + [{'ph': 'X', 'pid': pid, 'tid': tid, 'name': name, 'dur': dur, 'ts': 0, 'args': args}
                                 for pid, tid, name, dur, args in events]}


def test_a_gpu_trace_counts_the_device_streams_kernels_once_each():
  threads = {(1, 10): 'python', (2, 20): 'Stream #13(Compute)', (2, 21): 'XLA Modules'}
  events = [
      (1, 10, 'PjitFunction(step)', 9000, {}),  # host side: not an op
      (2, 21, 'jit_step(123)', 900, {}),  # the module's span: a summary lane
      (2, 20, 'loop_multiply_fusion_1', 10, {}), (2, 20, 'loop_multiply_fusion_1', 10, {}),  # kernel names: '.' -> '_'
      (2, 20, 'sm90_xmma_fprop_implicit_gemm_bf16f32_nhwckrsc_nhwc', 300, {}),  # cuDNN's, by its name
      (2, 20, 'nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT', 200, {}),  # cuBLAS's
      (2, 20, 'sm90_xmma_dgrad_implicit_gemm', 100, {'hlo_op': 'cudnn-conv.1'}),  # named by its instruction
      (2, 20, 'input_reduce_fusion_3', 40, {}),
      (2, 20, 'some_unknown_kernel', 5, {}),
  ]
  instructions = op_times.instruction_kinds(HLO)
  ops = op_times.op_times(op_times.op_events(_trace(threads, events), instructions, 'gpu'), instructions, steps=2)
  by_name = {op.name: op for op in ops}
  assert by_name['loop_multiply_fusion_1'].kind == 'elementwise'
  assert (by_name['loop_multiply_fusion_1'].seconds, by_name['loop_multiply_fusion_1'].calls) == (
      pytest.approx(10e-6), 1)
  assert by_name['sm90_xmma_fprop_implicit_gemm_bf16f32_nhwckrsc_nhwc'].kind == 'convolution'
  assert by_name['nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT'].kind == 'matmul'
  assert by_name['cudnn-conv.1'].kind == 'convolution'
  assert by_name['input_reduce_fusion_3'].kind == 'reduction'
  assert by_name['some_unknown_kernel'].kind == 'other'
  assert 'PjitFunction(step)' not in by_name and 'jit_step(123)' not in by_name
  assert [op.name for op in ops][0] == 'sm90_xmma_fprop_implicit_gemm_bf16f32_nhwckrsc_nhwc'  # slowest first
  assert op_times.by_kind(ops) == pytest.approx({'convolution': 200e-6, 'matmul': 100e-6, 'reduction': 20e-6,
                                                 'elementwise': 10e-6, 'other': 2.5e-6})


def test_a_device_with_an_xla_ops_lane_is_read_from_that_lane_alone():
  # A TPU-style trace shows each op on the "XLA Ops" lane as well as lower down: counted once.
  threads = {(2, 20): 'XLA Ops', (2, 22): 'Stream #1', (2, 21): 'XLA Modules'}
  events = [(2, 20, 'input_reduce_fusion.3', 40, {}), (2, 22, 'input_reduce_fusion_3', 40, {})]
  instructions = op_times.instruction_kinds(HLO)
  ops = op_times.op_times(op_times.op_events(_trace(threads, events), instructions, 'tpu'), instructions, steps=1)
  assert [(op.name, op.kind) for op in ops] == [('input_reduce_fusion.3', 'reduction')]


def test_a_gpu_trace_without_device_lanes_is_refused_not_read_as_launch_times():
  # Without CUPTI a GPU trace holds only host threads, whose events are named after the
  # instructions they launch: their times are launches, not the kernels'.
  trace = _trace({(1, 11): 'tf_XLAPjRtClient'}, [(1, 11, 'input_reduce_fusion.3', 3, {})], {1: '/host:CPU'})
  instructions = op_times.instruction_kinds(HLO)
  with pytest.raises(RuntimeError, match='no device lanes'):
    op_times.op_events(trace, instructions, 'gpu')
  assert len(op_times.op_events(trace, instructions, 'cpu')) == 1


def test_a_cpu_step_is_traced_and_its_time_split_by_op(tmp_path):
  (case,) = cases_lib.select('smoke', ['bn_layer/plain'])
  text = op_times.profile_case(case, steps=3, out_dir=str(tmp_path), top=5)
  stem = tmp_path / 'bn_layer_plain_4x8x8x16'
  hlo = (stem.parent / (stem.name + '.hlo.txt')).read_text()
  ops = [json.loads(line) for line in (stem.parent / (stem.name + '.ops.jsonl')).read_text().splitlines()]
  assert ops and all(op['seconds'] > 0 and op['calls'] == pytest.approx(1.0) for op in ops), ops
  # Every op is an instruction of the program; a BN layer's work is reductions and elementwise.
  assert all(f"%{op['name']} = " in hlo for op in ops)
  assert {op['kind'] for op in ops} <= {'reduction', 'elementwise', 'data movement'}
  assert 'reduction' in {op['kind'] for op in ops}
  assert text.startswith('### `bn_layer/plain/4x8x8x16`') and '| reduction |' in text
  assert os.listdir(tmp_path / 'trace')
  # Where the device tool returns them: beside the others, not four folders down.
  assert (stem.parent / (stem.name + '.md')).read_text() == text + '\n'
  assert (stem.parent / (stem.name + '.trace.json.gz')).stat().st_size > 0


def test_cases_without_a_compiled_step_and_bad_arguments_are_refused(tmp_path, capsys):
  (loop,) = cases_lib.select('smoke', ['train_loop'])
  with pytest.raises(ValueError, match='profile a train, eval or bn_layer case'):
    op_times.profile_case(loop, 1, str(tmp_path), 5)
  assert op_times.main(['--profile', 'smoke', '--cases', 'train_loop', '--out', str(tmp_path)]) == 1
  assert 'train_loop' in capsys.readouterr().err
  for bad in (['--steps', '0'], ['--top', '0'], ['--out', str(tmp_path / 'a_file')]):
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(SystemExit) as exit_status:
      op_times.main(['--profile', 'smoke', '--out', str(tmp_path), *bad])
    assert exit_status.value.code == 2
  with pytest.raises(SystemExit) as exit_status:  # an unknown case: before --out is made
    op_times.main(['--profile', 'smoke', '--cases', 'nosuch', '--out', str(tmp_path / 'new')])
  assert exit_status.value.code == 2 and not (tmp_path / 'new').exists()
  assert "unknown case(s) ['nosuch']" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_refused_before_profiling(monkeypatch):
  # /proc takes no new folder (even for root): os.makedirs had raised a traceback.
  monkeypatch.setattr(op_times, 'profile_case', lambda *args: pytest.fail('profiled before making --out'))
  with pytest.raises(SystemExit) as exit_status:
    op_times.main(['--profile', 'smoke', '--cases', 'bn_layer/plain', '--out', '/proc/op_times_out'])
  assert exit_status.value.code == 2
