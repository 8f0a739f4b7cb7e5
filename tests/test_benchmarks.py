"""The benchmark harness runs every case at smoke size and reports real figures; cases priced
against each other are timed in turn, the Flax anchor's own step paired with ours, and XLA flag
sets apart (the side-by-side bookkeeping: tests/test_side_by_side.py)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cases as cases_lib
from benchmarks import compare, flax_batch_norm, paired, run, timing, workloads, xla_flags
from resnet_flax import models
from resnet_flax.layers import BatchNorm
from resnet_flax.layers import batch_norm as batch_norm_lib
from resnet_flax.layers import conv as conv_lib

UNITS = {'train': 'img/s', 'train_flax_bn': 'img/s', 'train_conv1x1': 'img/s', 'train_loop': 'img/s', 'eval': 'ms',
         'bn_layer': 'ms', 'pipeline': 'img/s'}


@pytest.fixture(scope='module')
def smoke_records():
  return run.run('smoke', device='test-device', date='2026-01-02')


def _kinds_and_variants(profile):
  return {(case.kind, case.variant) for case in cases_lib.profile_cases(profile)}


def test_smoke_covers_every_case_the_gpu_run_measures():
  assert _kinds_and_variants('smoke') == _kinds_and_variants('gpu')
  assert {kind for kind, _ in _kinds_and_variants('gpu')} == set(UNITS)
  assert {variant for kind, variant in _kinds_and_variants('gpu') if kind == 'eval'} == {'fp32', 'bf16', 'bf16_folded'}
  assert {variant for kind, variant in _kinds_and_variants('gpu') if kind == 'bn_layer'} >= {
      'plain', 'zero_debias', 'bf16_act_fp32_stats', 'renorm', 'flax_nn_batchnorm'}


def test_gpu_profile_has_the_issues_shapes():
  by_kind = {}
  for case in cases_lib.profile_cases('gpu'):
    by_kind.setdefault(case.kind, []).append(case)
  (train,) = by_kind['train']
  assert (train.params['model'], train.params['dtype'], train.params['batch']) == ('resnet_v1_50', 'bf16', 256)
  assert {(c.params['model'], c.params['batch'], c.params['dtype'], c.params['fold_batch_norm'])
          for c in by_kind['eval']} == {('resnet_v2_152', 32, 'fp32', False), ('resnet_v2_152', 32, 'bf16', False),
                                        ('resnet_v2_152', 32, 'bf16', True)}
  assert all(c.params['image_size'] == 224 for c in by_kind['pipeline'])


def test_every_smoke_case_reports_a_real_figure(smoke_records):
  names = [case.name for case in cases_lib.profile_cases('smoke')]
  assert [record['case'] for record in smoke_records] == names
  has_renorm = 'renorm' in {field.name for field in dataclasses.fields(BatchNorm)}
  for record in smoke_records:
    assert 'error' not in record, record
    if 'skipped' in record:  # Only an option that is not in the code yet may be skipped.
      assert record['variant'] == 'renorm' and not has_renorm, record
      continue
    assert math.isfinite(record['value']) and record['value'] > 0, record
    assert record['unit'] == UNITS[record['kind']], record
    assert record['device'] == 'test-device' and record['date'] == '2026-01-02'
    if record['kind'] == 'pipeline':
      assert record['compile_s'] is None and record['workers'] >= 1
    elif record['kind'] == 'train_loop':  # Compilation falls in train.py's first, untimed interval.
      assert record['compile_s'] is None and record['intervals'] == record['params']['intervals']
    else:
      assert math.isfinite(record['compile_s']) and record['compile_s'] > 0, record
      assert record['xla_bytes_accessed'] > 0 and record['xla_flops'] > 0, record
    assert record['steps'] >= 2
    if record['kind'] in ('bn_layer', *cases_lib.TRAIN_KINDS):  # timed in turn with what they are priced against
      # Every step's time, for the side-by-side report's step-by-step ratios.
      assert record['interleaved'] and len(record['step_s']) == record['steps'], record
    json.dumps(record)  # every record is one JSON line


def test_smoke_train_steps_really_train(smoke_records):
  for record in smoke_records:
    if record['kind'] in ('train', 'train_flax_bn', 'train_conv1x1'):
      assert math.isfinite(record['loss']) and record['loss'] > 0
      # img/s and the step time agree: value = batch / median step.
      assert record['value'] == pytest.approx(record['params']['batch'] / (record['median_step_ms'] / 1e3))


def test_our_bn_and_train_step_are_priced_against_flax_batch_norm(smoke_records):
  by_case = {record['case']: record for record in smoke_records}
  for record in smoke_records:
    if record['kind'] in ('train', 'train_loop', 'train_conv1x1') or (
        record['kind'] == 'bn_layer' and not record['variant'].startswith('flax') and 'value' in record):
      ((reference, ratio),) = record['ratios'].items()
      assert ratio == pytest.approx(record['value'] / by_case[reference.removeprefix('ours:')]['value'])


def test_one_by_one_convolutions_train_the_same_model_as_our_dots(smoke_records):
  # Same initial variables, batch and number of steps: only the lowering of 1x1 kernels
  # differs, so the loss after the timed steps agrees to bfloat16 rounding.
  (dots,) = [record for record in smoke_records if record['kind'] == 'train']
  (convolutions,) = [record for record in smoke_records if record['kind'] == 'train_conv1x1']
  assert convolutions['loss'] == pytest.approx(dots['loss'], rel=2e-2)


def test_the_conv1x1_case_traces_1x1_kernels_as_convolutions():
  model = models.get_model('resnet_v1_tiny', num_classes=10).clone(block_sizes=((4, 2, 2),))
  variables = workloads.host_initialized_variables(model, (16, 16, 3))
  images = jnp.zeros((2, 16, 16, 3))

  def primitives():
    text = str(jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(variables))
    return text.count('conv_general_dilated['), text.count('dot_general[')

  with workloads._traced_with(conv_lib, 'convolve', conv_lib.convolution):  # as prepare_train(one_by_one_as_dot=False)
    as_convolutions = primitives()
  as_dots = primitives()  # and the patch is undone
  # The root's 7x7 and each unit's 3x3 are convolutions either way; each unit's two 1x1
  # kernels, the first unit's projection shortcut and the 1x1 logits layer are dots by default.
  assert as_dots == (3, 6) and as_convolutions == (9, 0)


def test_the_flax_batch_norm_swap_never_folds():
  model = models.get_model('resnet_v1_tiny', num_classes=3, fold_batch_norm_in_eval=True)
  swapped = flax_batch_norm.with_flax_batch_norm(model)
  images = jnp.ones((2, 16, 16, 3))
  variables = swapped.init(jax.random.PRNGKey(0), images, train=False)
  assert bool(jnp.all(jnp.isfinite(swapped.apply(variables, images, train=False))))


FAKE_ANCHOR = """
import jax.numpy as jnp
import flax.linen as nn
class Scale(nn.Module):  # a flax dataclass, as the real anchor defines
  factor: float
  def __call__(self, x):
    return x * self.factor
def med(fn, warm, iters):
  raise AssertionError('the paired runner replaces med')
def train_case(arch, batch, dtype):
  state = [jnp.zeros(())]
  def run():
    state[0] = Scale(2.0).apply({}, state[0]) + 1.0
    return state[0]
  return batch / med(run, 5, 20)
def eval_case(arch, batch, dtype):
  return med(lambda: jnp.ones((batch,)), 5, 50)
print(json.dumps({'jax': 'x'}))
raise SystemExit('the cases part must not run')
"""


def test_paired_times_our_steps_and_the_anchors_own_step_in_turn(tmp_path):
  anchor_file = tmp_path / 'flax_resnet.py'
  anchor_file.write_text(FAKE_ANCHOR)
  anchor = paired.load_anchor(str(anchor_file))
  smoke = cases_lib.profile_cases('smoke')
  trains = [case for case in smoke if case.kind in cases_lib.TRAIN_KINDS]
  # The variants priced against our train step go in its rotation, with its anchor case.
  assert {paired.anchor_spec(case, smoke) for case in trains} == {'train:resnet50:4:bf16'}
  *ours, theirs = paired.paired_records(trains, anchor, 'train:resnet50:4:bf16', {'device': 'd', 'date': 'x'})
  assert [record['case'] for record in ours] == [case.name for case in trains]
  assert theirs['anchor_script'] == 'flax_resnet.py' and theirs['case'] == 'train:resnet50:4:bf16'
  assert theirs['img_per_s'] > 0 and theirs['paired_with'] == [case.name for case in trains]
  for record in ours:
    assert len(theirs['step_s']) == len(record['step_s']) == trains[0].params['iters']
    assert math.isfinite(record['value']) and record['value'] > 0 and record['paired_time_ratio_median'] > 0
    assert record['paired_with'] == 'flax_resnet.py train:resnet50:4:bf16'
  figures = compare.anchor_figures(compare.FLAX, [json.dumps(theirs)])
  assert compare.anchor_value(figures['flax_resnet.py train:resnet50:4:bf16'], 'img/s') == theirs['img_per_s']


def test_a_case_that_cannot_be_built_spares_the_rest_of_its_rotation(tmp_path):
  anchor_file = tmp_path / 'flax_resnet.py'
  anchor_file.write_text(FAKE_ANCHOR)
  anchor = paired.load_anchor(str(anchor_file))
  train, flax_bn, _ = [case for case in cases_lib.profile_cases('smoke') if case.kind in cases_lib.TRAIN_KINDS]

  def broken():
    raise RuntimeError('out of memory')

  ours, failed, theirs = paired.paired_records([train, dataclasses.replace(flax_bn, prepare=broken)], anchor,
                                               'train:resnet50:4:bf16', {'device': 'd'})
  assert ours['case'] == train.name and ours['value'] > 0
  assert failed['case'] == flax_bn.name and failed['error'] == 'RuntimeError: out of memory'
  assert theirs['anchor_script'] == 'flax_resnet.py' and theirs['paired_with'] == [train.name]


def test_a_case_failing_in_a_rotation_costs_only_its_own_figure():
  train, flax_bn, conv1x1 = [case for case in cases_lib.profile_cases('smoke') if case.kind in cases_lib.TRAIN_KINDS]

  def failing_step():
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory')

  def failing_figure(median_s, iters):
    raise FloatingPointError('the train step gave loss nan')

  def stepper_with(**fields):
    return lambda: dataclasses.replace(workloads.Stepper(lambda: 0.0, 1.0, None), **fields)

  records = cases_lib.run_interleaved([train, dataclasses.replace(flax_bn, prepare=stepper_with(step=failing_step)),
                                       dataclasses.replace(conv1x1, prepare=stepper_with(measurement=failing_figure))],
                                      'unused')
  assert records[0]['case'] == train.name and records[0]['value'] > 0 and records[0]['interleaved']
  assert records[1]['error'] == 'RuntimeError: RESOURCE_EXHAUSTED: out of memory'
  assert records[2]['error'] == 'FloatingPointError: the train step gave loss nan'


def test_cases_priced_against_each_other_are_timed_together():
  for profile in cases_lib.PROFILES:
    batches = [[case.kind for case in batch] for batch in run._batches(cases_lib.profile_cases(profile))]
    assert list(cases_lib.TRAIN_KINDS) in batches, profile
    bn_batches = [batch for batch in batches if 'bn_layer' in batch]
    assert len(bn_batches) == 1 and len(bn_batches[0]) >= 5 and set(bn_batches[0]) == {'bn_layer'}, profile
    evals = sum(case.kind == 'eval' for case in cases_lib.profile_cases(profile))  # gpu: fp32, bf16, folded
    assert [batch for batch in batches if 'eval' in batch] == [['eval'] * evals], profile
    assert all(len(batch) == 1 for batch in batches if batch[0] not in ('bn_layer', 'eval', *cases_lib.TRAIN_KINDS))
  # Only cases of equal sizes share a rotation.
  for kind in ('train', 'bn_layer'):
    small, large = ([case for case in cases_lib.profile_cases(profile) if case.kind == kind][0]
                    for profile in ('smoke', 'cpu'))
    assert [len(batch) for batch in run._batches([small, large])] == [1, 1], kind


def test_xla_flag_sets_run_apart_and_are_priced_against_xla_defaults(capsys):
  case = 'bn_layer/plain/4x8x8x16'
  assert xla_flags.main(['--profile', 'smoke', '--cases', case, '--sets', 'cpu_no_fast_min_max']) == 0
  lines = capsys.readouterr().out.splitlines()
  records = [json.loads(line) for line in lines if line.startswith('{')]
  assert [(r['flag_set'], r['case']) for r in records] == [('default', case), ('cpu_no_fast_min_max', case)]
  assert records[1]['xla_flags'] == '--xla_cpu_enable_fast_min_max=false'
  assert all(math.isfinite(r['value']) and r['value'] > 0 for r in records)
  assert f'| default | `(none)` | `{case}` |' in '\n'.join(lines)
  # img/s figures become time ratios by inversion; ms figures as they are.
  fake = [{'flag_set': 'default', 'case': 't', 'unit': 'img/s', 'value': 100.0},
          {'flag_set': 'x', 'case': 't', 'unit': 'img/s', 'value': 125.0},
          {'flag_set': 'default', 'case': 'e', 'unit': 'ms', 'value': 10.0},
          {'flag_set': 'x', 'case': 'e', 'unit': 'ms', 'value': 12.0}]
  assert xla_flags.time_ratios(fake) == {('default', 't'): 1.0, ('x', 't'): 0.8, ('default', 'e'): 1.0,
                                         ('x', 'e'): pytest.approx(1.2)}


def test_steps_taken_in_turn_follow_every_other_step_not_always_the_same_one():
  calls = []
  steps = {name: (lambda name=name: calls.append(name) or jnp.zeros(())) for name in 'abcd'}
  times = timing.round_robin(steps, warmup=1, iters=40)
  assert {name: len(t) for name, t in times.items()} == {name: 40 for name in 'abcd'}
  rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]  # after the warm-up round
  assert all(sorted(r) == list('abcd') for r in rounds)  # each step once a round
  predecessors = {name: {before for r in rounds for before, after in zip(r, r[1:]) if after == name} for name in 'abcd'}
  assert predecessors == {name: set('abcd') - {name} for name in 'abcd'}, predecessors  # a rotation would give one
  calls.clear()
  timing.round_robin(steps, 0, 5)
  timing.round_robin(steps, 0, 5)
  assert calls[:20] == calls[20:]  # seeded: a rerun repeats the order


def test_xla_cost_is_the_memory_and_arithmetic_of_one_call():
  # y = 2x over 1,000 float32 values: reads 4,000 bytes, writes 4,000, one multiply each.
  compiled = jax.jit(lambda x: 2.0 * x).lower(jnp.ones(1000, jnp.float32)).compile()
  assert timing.xla_cost(compiled) == {'xla_bytes_accessed': 8000.0, 'xla_flops': 1000.0}

  class NoCostModel:
    def cost_analysis(self):
      raise NotImplementedError('no cost model on this backend')

  assert timing.xla_cost(NoCostModel()) == {}


@pytest.mark.parametrize('variant, algorithm', list(workloads.FORCED_MOMENTS.items()))
def test_the_forced_moments_cases_trace_one_algorithm_and_no_platform_choice(variant, algorithm):
  layer = workloads._batch_norm_module(variant)
  x = jnp.ones((4, 3, 3, 2))
  variables = layer.init(jax.random.PRNGKey(0), x, train=False)
  def jaxpr():
    return str(jax.make_jaxpr(lambda v: layer.apply(v, x, train=True, mutable=['batch_stats']))(variables))

  assert 'platform_index' in jaxpr()  # by default the platform picks
  with workloads._traced_with(batch_norm_lib, 'batch_moments', algorithm):
    forced = jaxpr()
  assert 'platform_index' not in forced
  assert ('slice[' in forced) == (variant == 'shifted_moments')  # the shifted sums' per-example shift
  assert 'custom_jvp_call' in forced  # batch_moments' own derivative, so only the forward algorithm differs
  assert 'platform_index' in jaxpr()  # and the patch is undone


# '/proc/x.jsonl': a directory that exists but takes no new file (even for root) had failed after
# the measuring, with a traceback.
@pytest.mark.parametrize('out', ['missing/x.jsonl', '.', '/proc/x.jsonl'])
def test_an_out_file_that_cannot_be_written_is_refused_before_measuring(tmp_path, out, monkeypatch):
  monkeypatch.setattr(run, 'run', lambda *args, **kwargs: pytest.fail('measured before checking --out'))
  with pytest.raises(SystemExit) as exit_status:
    run.main(['--smoke', '--cases', 'bn_layer/plain', '--out', str(tmp_path / out)])
  assert exit_status.value.code == 2


@pytest.mark.parametrize('main, arguments', [
    (run.main, ['--profile', 'cpu', '--cases']),  # no names had run the whole profile
    (paired.main, ['--cases']),
    (paired.main, ['--cases', 'pipeline'])])  # nothing to take turns with the Flax anchor's step
def test_cases_that_name_nothing_to_run_are_a_usage_error(main, arguments, capsys, monkeypatch):
  monkeypatch.setattr(run, 'run', lambda *args, **kwargs: pytest.fail('measured'))
  monkeypatch.setattr(paired, 'paired_records', lambda *args, **kwargs: pytest.fail('measured'))
  with pytest.raises(SystemExit) as exit_status:
    main(arguments)
  assert exit_status.value.code == 2 and '--cases' in capsys.readouterr().err


def test_an_unknown_case_is_a_usage_error_with_exit_status_2(capsys):
  with pytest.raises(cases_lib.UnknownCaseError, match=r"unknown case\(s\) \['nosuch'\]"):
    cases_lib.select('cpu', ['train', 'nosuch'])  # the library raises; the command lines print it
  with pytest.raises(SystemExit) as exit_status:
    run.main(['--profile', 'cpu', '--cases', 'nosuch', '--list'])
  assert exit_status.value.code == 2
  assert "error: unknown case(s) ['nosuch'] for profile 'cpu': give a case name" in capsys.readouterr().err
