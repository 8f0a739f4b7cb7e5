"""The benchmark harness runs every case at smoke size and reports real figures; the
side-by-side bookkeeping (anchor parsing, ratios, medians, the RESULTS.md section) is exact."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cases as cases_lib
from benchmarks import compare, flax_batch_norm, paired, report, run, side_by_side, timing, workloads, xla_flags
from resnet_flax import models
from resnet_flax.layers import BatchNorm, moments
from resnet_flax.layers import batch_norm as batch_norm_lib
from resnet_flax.layers import conv as conv_lib

UNITS = {'train': 'img/s', 'train_flax_bn': 'img/s', 'train_conv1x1': 'img/s', 'train_loop': 'img/s', 'eval': 'ms', 'bn_layer': 'ms',
         'pipeline': 'img/s'}


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
    assert record['steps'] >= 2
    if record['kind'] in ('bn_layer', *cases_lib.TRAIN_KINDS):  # timed in turn with what they are priced against
      assert record['interleaved']
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


def test_anchor_output_is_parsed_into_named_figures():
  flax_lines = ['{"jax": "0.10", "devices": "[CpuDevice(id=0)]"}',
                '{"case": "train:resnet50:8:fp32", "img_per_s": 4.0}',
                '{"case": "eval:resnet152:4:fp32", "ms_per_batch": 800.0, "img_per_s": 5.0}',
                '{"case": "eval:resnet152:4:bf16", "error": "RuntimeError()"}', 'not json']
  figures = compare.anchor_figures(compare.FLAX, flax_lines)
  assert compare.anchor_value(figures['flax_resnet.py train:resnet50:8:fp32'], 'img/s') == 4.0
  assert compare.anchor_value(figures['flax_resnet.py eval:resnet152:4:fp32'], 'ms') == 800.0
  assert compare.anchor_value(figures['flax_resnet.py eval:resnet152:4:bf16'], 'ms') is None
  jpeg = compare.anchor_figures(compare.JPEG, ['{"case": "pil_jpeg_rrc224", "procs": 2, "draft": true, '
                                               '"img_per_s": 1700.0, "mean_jpeg_kb": 30.1}'])
  assert list(jpeg) == ['jpeg_pipeline.py pil_jpeg_rrc224 procs=2 draft=True']


def _fake_results(cpu_cases):
  """Two rounds of figures: ours are the round index + 2 (img/s) or 10 * that (ms)."""
  results = []
  for index in range(2):
    ours = {case.name: {'case': case.name, 'kind': case.kind, 'variant': case.variant, 'unit': case.unit,
                        'value': (index + 2.0) * (10 if case.unit == 'ms' else 1), 'compile_s': 1.0,
                        'params': case.params} for case in cpu_cases}
    anchors = {
        'flax_resnet.py train:resnet50:8:fp32': {'case': 'train:resnet50:8:fp32', 'img_per_s': 2.0 + 2 * index},
        'flax_resnet.py eval:resnet152:4:fp32': {'case': 'eval:resnet152:4:fp32', 'ms_per_batch': 40.0},
        compare.jpeg_name(1, True): {'img_per_s': 5.0}, compare.jpeg_name(1, False): {'img_per_s': 1.0},
    }
    results.append({'ours': ours, 'anchors': anchors})
  return results


def test_merge_takes_medians_over_rounds_and_ratios_of_medians():
  cpu_cases = cases_lib.profile_cases('cpu')
  records = side_by_side.merge(_fake_results(cpu_cases), cpu_cases, 'cpu', 2, False, {'device': 'd', 'date': 'x'})
  by_case = {record['case']: record for record in records}
  train = by_case['train/resnet_v1_50/fp32/b8']
  assert train['value'] == 2.5 and train['rounds'] == [2.0, 3.0]
  flax = 'flax_resnet.py train:resnet50:8:fp32'
  assert by_case[flax]['value'] == 3.0  # median of 2 and 4
  assert train['ratios'][flax] == pytest.approx(2.5 / 3.0)
  assert train['time_ratios'][flax] == pytest.approx(3.0 / 2.5)  # img/s: time ratio is the inverse
  assert train['targets'][flax]['max_time_ratio'] == 1.0
  loop = by_case['train_loop/resnet_v1_50/fp32/b8']  # train.py priced against the bare step
  assert loop['ratios'] == {'ours:train/resnet_v1_50/fp32/b8': pytest.approx(1.0)}
  assert 'host round trips' in loop['targets']['ours:train/resnet_v1_50/fp32/b8']['text']
  flax_bn = 'ours:bn_layer/flax_nn_batchnorm/8x56x56x256'
  plain_bn = by_case['bn_layer/plain/8x56x56x256']
  assert plain_bn['ratios'] == {flax_bn: pytest.approx(1.0)} and plain_bn['targets'][flax_bn]['max_time_ratio'] == 1.03
  for forced in workloads.FORCED_MOMENTS:  # priced against flax's layer, but a choice of ours, not a target
    assert flax_bn in by_case[f'bn_layer/{forced}/8x56x56x256']['ratios']
    assert not by_case[f'bn_layer/{forced}/8x56x56x256'].get('targets'), forced
  evaluation = by_case['eval/resnet_v2_152/fp32/b4']
  assert evaluation['time_ratios']['flax_resnet.py eval:resnet152:4:fp32'] == pytest.approx(25.0 / 40.0)
  pipeline = by_case['pipeline/vgg224/1_worker']
  assert pipeline['time_ratios'] == {compare.jpeg_name(1, False): pytest.approx(1 / 2.5),
                                     compare.jpeg_name(1, True): pytest.approx(5 / 2.5)}
  # No all-cores anchor figure was given: no ratio is made up for it.
  assert by_case['pipeline/vgg224/all_cores']['ratios'] == {}


def test_results_md_section_is_replaced_and_the_rest_kept():
  cpu_cases = cases_lib.profile_cases('cpu')
  records = side_by_side.merge(_fake_results(cpu_cases), cpu_cases, 'cpu', 2, False, {'device': 'd', 'date': 'x'})
  run_info = {'date': 'x', 'device': 'd', 'profile': 'cpu', 'rounds': 2, 'load_min': 0.5, 'load_max': 1.5,
              'cpu_count': 2, 'uptime_before': 'up', 'uptime_after': 'up', 'jobs': []}
  section = report.table(records, run_info)
  row = '| `train/resnet_v1_50/fp32/b8` | 2.5 | img/s | `flax_resnet.py train:resnet50:8:fp32` | 3 | 1.200 |'
  assert row in section
  original = '# Benchmark results\n\nEarlier text.\n'
  once = report.update_results_md(original, 'cpu', section)
  twice = report.update_results_md(once, 'cpu', section.replace('2.5', '9.9'))
  assert once.startswith(original) and twice.startswith(original)
  assert twice.count(report.BEGIN.format(profile='cpu')) == 1 and '9.9' in twice
  # A results file's last run renders the same table again.
  old_run = {'record': 'run', 'run_id': 'a', **run_info}
  new_run = {**old_run, 'run_id': 'b'}
  lines = [json.dumps(r) for r in [old_run, {'record': 'ours', 'case': 'stale', 'run_id': 'a'}, new_run,
                                   *[{**r, 'run_id': 'b'} for r in records]]]
  again_run, again_records = report.last_run(lines)
  assert again_run == new_run and report.table(again_records, again_run) == section


def test_side_by_side_plans_ours_and_each_anchor_in_alternating_groups():
  cpu_cases = cases_lib.profile_cases('cpu')
  planned = side_by_side.build_groups('cpu', cpu_cases, side_by_side.GROUPS, '/anchors', with_torch=False,
                                      python='py')
  names = [[job.name for job in group] for group in planned]
  assert names == [['ours:train', 'flax_resnet.py:train'], ['ours:eval', 'flax_resnet.py:eval'], ['ours:loop'],
                   ['ours:pipeline', 'jpeg_pipeline.py'], ['ours:bn']]
  assert planned[0][1].command == ('py', '/anchors/flax_resnet.py', 'train:resnet50:8:fp32')
  paired = side_by_side.build_groups('cpu', cpu_cases, ['train'], '/anchors', with_torch=False, python='py',
                                     paired=True)
  assert [[job.name for job in group] for group in paired] == [['paired:train']]
  assert [job.group for group in planned for job in group] == ['train', 'train', 'eval', 'eval', 'loop',
                                                               'pipeline', 'pipeline', 'bn']
  gpu = side_by_side.build_groups('gpu', cases_lib.profile_cases('gpu'), ['torch'], '/anchors', with_torch=True)
  assert sorted(job.command[-1] for job in gpu[0]) == [
      'eval:resnet152:32:0:fp32', 'eval:resnet152:32:1:bf16', 'train:resnet50:256:0:bf16', 'train:resnet50:256:1:bf16']


def test_the_device_stages_measure_every_gpu_case_once_the_targets_first():
  gpu_cases = cases_lib.profile_cases('gpu')
  def picked(stage):
    groups = side_by_side.STAGES[stage].groups
    chosen = cases_lib.select('gpu', side_by_side.STAGES[stage].cases)
    return {case.name for case in chosen if side_by_side._group_of(case) in groups}
  targets, rest = picked('targets'), picked('rest')
  assert not targets & rest and targets | rest == {case.name for case in gpu_cases}
  assert not picked('torch')  # torch_resnet.py's figures only
  # First what the issue's GPU targets are read from (ResNet-50 train and ResNet-152 bf16 eval
  # against the Flax anchor, BN options against nn.BatchNorm) and what they are priced against.
  # The 1x1-as-convolution step too: the choice it decides is read from a ratio of steps in turn.
  assert targets == {case.name for case in gpu_cases if case.kind in (*cases_lib.TRAIN_KINDS, 'bn_layer')
                     or (case.kind, case.params.get('dtype')) == ('eval', 'bf16')}
  assert side_by_side.STAGES['rest'].groups[:2] == ('loop', 'pipeline')  # then the other targets' cases
  planned = side_by_side.build_groups('gpu', cases_lib.select('gpu', side_by_side.STAGES['torch'].cases),
                                      side_by_side.STAGES['torch'].groups, '/anchors', with_torch=True)
  assert {job.source for group in planned for job in group} == {compare.TORCH}


def test_merge_keeps_anchor_figures_no_case_of_the_run_is_compared_with():
  torch_lines = ['{"case": "train:resnet50:256:1:bf16", "img_per_s": 3000.0}',
                 '{"case": "eval:resnet152:32:0:fp32", "ms_per_batch": 20.0, "img_per_s": 1600.0}',
                 '{"case": "eval:resnet152:32:1:bf16", "error": "RuntimeError()"}']
  results = [{'ours': {}, 'anchors': compare.anchor_figures(compare.TORCH, torch_lines)}]
  records = side_by_side.merge(results, [], 'gpu', 16, True, {'device': 'd', 'date': 'x'})
  by_name = {record['case']: record for record in records}
  assert by_name['torch_resnet.py train:resnet50:256:1:bf16'].items() >= {'unit': 'img/s', 'value': 3000.0}.items()
  assert by_name['torch_resnet.py eval:resnet152:32:0:fp32']['unit'] == 'ms'
  assert by_name['torch_resnet.py eval:resnet152:32:0:fp32']['value'] == 20.0
  failed = by_name['torch_resnet.py eval:resnet152:32:1:bf16']
  assert failed['unit'] == 'ms' and failed['value'] is None and failed['error'] == 'RuntimeError()'


def _run_lines(run_id, records, stage, device='d'):
  run_info = {'record': 'run', 'run_id': run_id, 'date': 'x', 'device': device, 'profile': 'cpu', 'rounds': 1,
              'stage': stage, 'load_min': 0.5, 'load_max': 1.5, 'cpu_count': 2, 'uptime_before': f'up {run_id}',
              'uptime_after': f'up {run_id}', 'with_torch': False, 'paired': False,
              'jobs': [{'job': 'ours:loop', 'round': 0, 'status': 'skipped: time budget spent'},
                       {'job': 'ours:eval', 'arguments': ['bf16'], 'round': 0, 'status': 'timed out after 9 s'}]
                      if stage == 'a' else [{'job': 'ours:loop', 'round': 0, 'status': 'ok'},
                                            {'job': 'ours:eval', 'arguments': ['fp32'], 'round': 0, 'status': 'ok'}]}
  return [json.dumps(r) for r in [run_info, *[{**r, 'run_id': run_id} for r in records]]]


def test_a_report_of_several_calls_prices_each_case_against_figures_from_any_of_them():
  cpu_cases = cases_lib.profile_cases('cpu')
  train = [case for case in cpu_cases if case.kind in ('train', 'train_flax_bn')]
  loop = [case for case in cpu_cases if case.kind == 'train_loop']
  common = {'device': 'd', 'date': 'x'}
  first = side_by_side.merge(_fake_results(train), train, 'cpu', 2, False, common)
  later_results = _fake_results(loop + train[:1])
  for found in later_results:  # the later call's train figure failed: the earlier one stays
    found['ours'][train[0].name] = {'case': train[0].name, 'error': 'RuntimeError: boom'}
    found['ours'][loop[0].name]['value'] = 2.0
  later = side_by_side.merge(later_results, loop + train[:1], 'cpu', 2, False, common)
  loop_record = next(r for r in later if r['case'] == loop[0].name)
  assert loop_record['value'] == 2.0 and not loop_record['ratios']  # no bare step in its own call
  lines = _run_lines('r1', first, 'a') + _run_lines('r2', later, 'b')
  runs, records = report.last_runs(lines, 2)
  run_info = report.combined_run(runs)
  priced = report.priced_again(records, run_info)
  by_case = {record['case']: record for record in priced}
  assert by_case[train[0].name]['value'] == 2.5  # not replaced by the later error
  assert by_case[loop[0].name]['time_ratios'] == {f'ours:{train[0].name}': pytest.approx(2.5 / 2.0)}
  assert [r['case'] for r in priced if r['record'] == 'ours'] == [train[0].name, train[1].name, loop[0].name]
  section = report.table(priced, run_info)
  assert 'Figures from 2 calls on the same machine (runs r1, r2, stages a, b)' in section
  assert 'ours:loop' not in section  # skipped in the first call, run in the second
  assert '- job `ours:eval` (round 0): timed out after 9 s' in section  # the later one measured other cases
  assert f'| `{loop[0].name}` | 2 | img/s | `ours:{train[0].name}` | 2.5 | 1.250 |' in section
  assert report.last_runs(lines, 1)[0] == runs[1:]
  with pytest.raises(ValueError, match='differ in profile or device'):
    report.last_runs(_run_lines('r1', first, 'a') + _run_lines('r2', later, 'b', device='other'), 2)
  with pytest.raises(ValueError, match='holds 2 run'):
    report.last_runs(lines, 3)


def test_a_stage_runs_its_groups_and_cases_within_its_budget(tmp_path, monkeypatch):
  anchors = tmp_path / 'anchors'
  anchors.mkdir()
  for script in (compare.FLAX, compare.TORCH, compare.JPEG):
    (anchors / script).write_text('')
  ran = []
  def fake_job(job, timeout_s, env):
    ran.append((job.name, job.command, timeout_s))
    if job.source == 'ours':
      profile = job.command[job.command.index('--profile') + 1]
      chosen = cases_lib.select(profile, job.command[job.command.index('--cases') + 1:])
      return 'ok', [json.dumps({'case': case.name, 'kind': case.kind, 'variant': case.variant, 'unit': case.unit,
                                'value': 10.0, 'device': 'H100'}) for case in chosen]
    return 'ok', [json.dumps({'case': spec, 'img_per_s': 8.0, 'ms_per_batch': 20.0}) for spec in job.command[2:]]
  monkeypatch.setattr(side_by_side, 'run_job', fake_job)
  results_md = tmp_path / 'RESULTS.md'
  results_md.write_text('# Benchmark results\n')
  argv = ['--stage', 'targets', '--anchors-dir', str(anchors), '--results-dir', str(tmp_path),
          '--results-md', str(results_md), '--date', '2026-12-06', '--torch', 'on']
  assert side_by_side.main(argv) == 0
  assert [name for name, _, _ in ran] == ['ours:train', 'flax_resnet.py:train', 'ours:bn', 'ours:eval',
                                          'flax_resnet.py:eval']
  assert ran[-1][1][2:] == ('eval:resnet152:32:bf16',)  # the anchor measures only what the stage compares
  assert all(timeout <= side_by_side.STAGES['targets'].budget_s + side_by_side.STAGE_GRACE_S for _, _, timeout in ran)
  assert ran[0][2] > side_by_side.STAGES['targets'].budget_s  # the first job may overrun the budget by the grace
  lines = (tmp_path / '2026-12-06_h100.jsonl').read_text().splitlines()
  run_info, records = report.last_run(lines)
  assert run_info['stage'] == 'targets'
  assert {r['case'] for r in records if r['record'] == 'ours'} == {
      c.name for c in cases_lib.select('gpu', side_by_side.STAGES['targets'].cases)}
  train = next(r for r in records if r['case'] == 'train/resnet_v1_50/bf16/b256')
  assert train['time_ratios'] == {'flax_resnet.py train:resnet50:256:bf16': pytest.approx(0.8),
                                  'ours:train_flax_bn/resnet_v1_50/bf16/b256': pytest.approx(1.0)}
  assert '`train/resnet_v1_50/bf16/b256`' in results_md.read_text()
  # torch_resnet.py runs in a stage of its own; this one does not list its figures as missing.
  assert not run_info['with_torch'] and 'torch_resnet' not in results_md.read_text()
  # A stage's selectors may name variants a profile lacks: the cpu profile has no bf16 eval.
  ran.clear()
  assert side_by_side.main([*argv, '--profile', 'cpu', '--paired', 'off']) == 0
  assert [name for name, _, _ in ran] == ['ours:train', 'flax_resnet.py:train', 'ours:bn']


def test_the_torch_stage_records_the_machine_its_figures_are_combined_with(tmp_path, monkeypatch):
  anchors = tmp_path / 'anchors'
  anchors.mkdir()
  for script in (compare.FLAX, compare.TORCH, compare.JPEG):
    (anchors / script).write_text('')
  def fake_job(job, timeout_s, env):
    if job.source == 'ours':
      chosen = cases_lib.select('gpu', job.command[job.command.index('--cases') + 1:])
      return 'ok', [json.dumps({'case': c.name, 'kind': c.kind, 'variant': c.variant, 'unit': c.unit, 'value': 10.0,
                                'device': 'NVIDIA H100'}) for c in chosen]
    return 'ok', [json.dumps({'case': spec, 'img_per_s': 5.0, 'ms_per_batch': 40.0}) for spec in job.command[2:]]
  monkeypatch.setattr(side_by_side, 'run_job', fake_job)
  # No case of ours runs in the torch stage: the device is asked of a process of its own.
  monkeypatch.setattr(side_by_side, '_device_description', lambda: 'NVIDIA H100')
  (tmp_path / 'RESULTS.md').write_text('# Benchmark results\n')
  common = ['--anchors-dir', str(anchors), '--results-dir', str(tmp_path), '--results-md',
            str(tmp_path / 'RESULTS.md'), '--date', '2026-12-06', '--torch', 'on']
  for stage in ('targets', 'torch'):
    assert side_by_side.main(['--stage', stage, *common]) == 0
  assert [path.name for path in tmp_path.glob('*.jsonl')] == ['2026-12-06_nvidia-h100.jsonl']
  lines = (tmp_path / '2026-12-06_nvidia-h100.jsonl').read_text().splitlines()
  runs, records = report.last_runs(lines, 2)
  assert [run_info['stage'] for run_info in runs] == ['targets', 'torch'] and runs[0]['run_id'] != runs[1]['run_id']
  priced = {r['case']: r for r in report.priced_again(records, report.combined_run(runs))}
  assert priced['train/resnet_v1_50/bf16/b256']['time_ratios']['torch_resnet.py train:resnet50:256:1:bf16'] == 0.5
  assert priced['eval/resnet_v2_152/bf16/b32']['time_ratios']['torch_resnet.py eval:resnet152:32:1:bf16'] == 0.25


def test_the_device_a_run_without_cases_of_ours_records_is_our_harnesss():
  assert side_by_side._device_description() == run.device_description()


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
  assert ('slice[' in forced) == (algorithm is moments.shifted_moments)  # the shifted sums' per-example shift
  assert 'platform_index' in jaxpr()  # and the patch is undone
