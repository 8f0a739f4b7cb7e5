"""`benchmarks/side_by_side.py` and `benchmarks/report.py`: anchor output parsed into figures,
medians and ratios (across the calls of one device lease too), the stages a device run comes
in, and the RESULTS.md section they write."""

import json

import pytest

from benchmarks import cases as cases_lib
from benchmarks import compare, report, run, side_by_side, workloads


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
                        'params': case.params, 'xla_bytes_accessed': 15.0 if 'flax' in case.variant else 16.0}
            for case in cpu_cases}
    anchors = {
        'flax_resnet.py train:resnet50:8:fp32': {'case': 'train:resnet50:8:fp32', 'img_per_s': 2.0 + 2 * index},
        'flax_resnet.py eval:resnet152:4:fp32': {'case': 'eval:resnet152:4:fp32', 'ms_per_batch': 40.0},
        compare.jpeg_name(1, True): {'img_per_s': 5.0}, compare.jpeg_name(1, False): {'img_per_s': 1.0},
    }
    results.append({'ours': ours, 'anchors': anchors})
  return results


def test_merge_takes_medians_over_rounds_and_ratios_of_medians():
  cpu_cases = cases_lib.profile_cases('cpu')
  results = _fake_results(cpu_cases)
  for found, pair_median in zip(results, (0.5, 0.7)):  # each round's paired timer: its own median
    found['ours']['train/resnet_v1_50/fp32/b8']['paired_time_ratio_median'] = pair_median
  records = side_by_side.merge(results, cpu_cases, 'cpu', 2, False, {'device': 'd', 'date': 'x'})
  by_case = {record['case']: record for record in records}
  train = by_case['train/resnet_v1_50/fp32/b8']
  assert train['value'] == 2.5 and train['rounds'] == [2.0, 3.0]
  assert train['paired_time_ratio_median'] == pytest.approx(0.6)  # over rounds, not the first round's
  assert 'paired_time_ratio_median' not in by_case['eval/resnet_v2_152/fp32/b4']
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
  assert plain_bn['bytes_ratios'] == {flax_bn: pytest.approx(16.0 / 15.0)}
  assert by_case['bn_layer/flax_nn_batchnorm/8x56x56x256']['bytes_ratios'] == {}  # a reference itself
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


def test_steps_timed_in_turn_are_priced_step_by_step_within_each_round():
  """Each of our steps against the reference's step of the same turn and round, the median over
  all of them: not the ratio of two medians, nor steps paired in another order."""
  bn_cases = [case for case in cases_lib.profile_cases('cpu') if case.kind == 'bn_layer']
  plain, flax_bn = (f'bn_layer/{variant}/8x56x56x256' for variant in ('plain', 'flax_nn_batchnorm'))
  # Round 0, turn by turn: 3, 0.5, 4 (median 3); sorted pairs or reversed lists give 2, the ratio
  # of medians 2 too. Round 1: the reference failed, so ours has no step of its turn to meet.
  step_s = {plain: ([0.030, 0.010, 0.020], [0.050, 0.050, 0.050]), flax_bn: ([0.010, 0.020, 0.005], None)}
  results = []
  for index in range(2):
    ours = {}
    for case in bn_cases:
      steps = step_s.get(case.name, ([0.02] * 3,) * 2)[index]
      if steps is None:
        ours[case.name] = {'case': case.name, 'error': 'RuntimeError: boom'}
        continue
      ours[case.name] = {'case': case.name, 'kind': case.kind, 'variant': case.variant, 'unit': case.unit,
                         'params': case.params, 'value': 1e3 * sorted(steps)[1],
                         **({'step_s': steps} if case.name in step_s else {})}
    results.append({'ours': ours, 'anchors': {}})
  records = {r['case']: r for r in side_by_side.merge(results, bn_cases, 'cpu', 2, False,
                                                      {'device': 'd', 'date': 'x', 'run_id': 'r'})}
  assert records[plain]['round_step_s'] == [step_s[plain][0], step_s[plain][1]] and 'step_s' not in records[plain]
  assert records[plain]['time_ratios'] == {f'ours:{flax_bn}': pytest.approx(35.0 / 10.0)}  # medians 20, 50 / 10
  assert records[plain]['in_turn_time_ratios'] == {f'ours:{flax_bn}': pytest.approx(3.0)}
  assert records['bn_layer/zero_debias/8x56x56x256']['in_turn_time_ratios'] == {}  # no step times
  run_info = {'date': 'x', 'device': 'd', 'profile': 'cpu', 'rounds': 2, 'load_min': 0.5, 'load_max': 1.5,
              'cpu_count': 2, 'uptime_before': 'u', 'uptime_after': 'u'}
  section = report.table(list(records.values()), run_info)
  assert (f'Median of the per-step time ratios against our own reference (each step timed in turn with the '
          f"reference's, in one process, over every round): `{plain}` 3.000x `{flax_bn}`.") in section
  # Figures from two calls, or from no run at all, were not timed in turn: no per-step ratio.
  for run_id in ('another call', None):
    assert compare.in_turn_time_ratio(records[plain], {**records[flax_bn], 'run_id': run_id}) is None
  assert compare.in_turn_time_ratio({**records[plain], 'run_id': None}, {**records[flax_bn], 'run_id': None}) is None
  # Priced again with the reference from a later call, the earlier call's per-step ratio goes.
  records[flax_bn]['run_id'] = 'later call'
  compare.price(list(records.values()), 'cpu', 2, False)
  assert records[plain]['in_turn_time_ratios'] == {}


@pytest.mark.parametrize('ratio, in_turn, met', [
    (0.95, None, 'yes'), (0.95, 1.02, 'yes'), (0.95, 1.06, '**no** (per step 1.060)'), (1.05, 1.0, '**no**'),
])
def test_a_target_is_met_only_where_the_per_step_ratio_meets_it_too(ratio, in_turn, met):
  assert report._met(ratio, in_turn, {'max_time_ratio': 1.03, 'min_time_ratio': 0.0}) == met


def test_results_md_section_is_replaced_and_the_rest_kept():
  cpu_cases = cases_lib.profile_cases('cpu')
  records = side_by_side.merge(_fake_results(cpu_cases), cpu_cases, 'cpu', 2, False, {'device': 'd', 'date': 'x'})
  run_info = {'date': 'x', 'device': 'd', 'profile': 'cpu', 'rounds': 2, 'load_min': 0.5, 'load_max': 1.5,
              'cpu_count': 2, 'uptime_before': 'up', 'uptime_after': 'up', 'jobs': []}
  section = report.table(records, run_info)
  row = '| `train/resnet_v1_50/fp32/b8` | 2.5 | img/s | `flax_resnet.py train:resnet50:8:fp32` | 3 | 1.200 |'
  assert row in section
  assert "`bn_layer/plain/8x56x56x256` 1.067x `bn_layer/flax_nn_batchnorm/8x56x56x256`" in section
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
  (again_run,), again_records = report.last_runs(lines, 1)
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
  # First what the GPU targets are read from (ResNet-50 train and ResNet-152 bf16 eval
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
  assert '. 1 round(s), ours and the anchors interleaved' in section  # each job finished one round
  assert 'ours:loop' not in section  # skipped in the first call, run in the second
  assert '- job `ours:eval` (round 0): timed out after 9 s' in section  # the later one measured other cases
  assert f'| `{loop[0].name}` | 2 | img/s | `ours:{train[0].name}` | 2.5 | 1.250 |' in section
  assert report.last_runs(lines, 1)[0] == runs[1:]
  with pytest.raises(ValueError, match='differ in profile or device'):
    report.last_runs(_run_lines('r1', first, 'a') + _run_lines('r2', later, 'b', device='other'), 2)
  with pytest.raises(ValueError, match='holds 2 run'):
    report.last_runs(lines, 3)


def test_the_rounds_each_job_ran_are_told_apart_where_they_differ():
  bn = [{'job': 'ours:bn', 'arguments': ['--cases', 'bn'], 'round': r, 'status': 'ok', 'call': call}
        for call, rounds in ((0, 5), (1, 9)) for r in range(rounds)]
  train = [{'job': 'paired:train', 'round': 0, 'status': 'ok', 'call': 0},
           {'job': 'paired:train', 'round': 1, 'status': 'timed out after 9 s', 'call': 0}]
  assert report.rounds_text({'rounds': 9, 'jobs': train + bn}) == (
      'Rounds per job: `paired:train` 1, `ours:bn` 5 + 9 (a case measured in several calls has its latest figure)')
  assert report.rounds_text({'rounds': 3, 'jobs': bn[:5] + train[:1]}) == (
      'Rounds per job: `ours:bn` 5, `paired:train` 1')
  # Every job finished as many rounds: that count, whatever --rounds asked for.
  assert report.rounds_text({'rounds': 1, 'jobs': bn[:5]}) == '5 round(s)'
  assert report.rounds_text({'rounds': 3, 'jobs': train}) == '1 round(s)'
  assert report.rounds_text({'rounds': 2, 'jobs': []}) == '2 round(s)'
  # The device stages' jobs share names (our eval in each): told apart by what they measured.
  evals = [{'job': 'ours:eval', 'arguments': ['-m', 'benchmarks.run', '--cases', case], 'round': 0, 'status': 'ok',
            'call': call} for call, case in ((0, 'eval/bf16'), (1, 'eval/fp32'))]
  assert report.rounds_text({'rounds': 1, 'jobs': evals}) == '1 round(s)'
  assert report.rounds_text({'rounds': 1, 'jobs': evals + bn[:2]}) == (
      'Rounds per job: `ours:eval eval/bf16` 1, `ours:eval eval/fp32` 1, `ours:bn` 2')


@pytest.mark.parametrize('loop_img_per_s, met', [(2.5, 'yes'), (3.0, 'yes'), (2.0, '**no**'), (1450.0, '**no**')])
def test_train_py_faster_than_the_step_it_runs_is_not_met(loop_img_per_s, met):
  # 1,450 img/s for a 4 img/s step had been "met": train.py's intervals were timed before
  # their host sync. Far below a time ratio of 1 the loop is mistimed, not fast.
  chosen = [case for case in cases_lib.profile_cases('cpu') if case.kind in ('train', 'train_loop')]
  (loop,) = [case for case in chosen if case.kind == 'train_loop']
  results = _fake_results(chosen)
  for found in results:
    found['ours'][loop.name]['value'] = loop_img_per_s
  records = side_by_side.merge(results, chosen, 'cpu', 2, False, {'device': 'd', 'date': 'x'})
  runs, records = report.last_runs(_run_lines('r1', records, 'b'), 1)
  row = next(line for line in report.table(records, runs[0]).splitlines() if line.startswith(f'| `{loop.name}`'))
  assert row.endswith(f'below 0.75, mistimed) | {met} |')


def test_report_main_prints_the_table_and_replaces_only_its_section(tmp_path, capsys):
  train = [case for case in cases_lib.profile_cases('cpu') if case.kind == 'train']
  records = side_by_side.merge(_fake_results(train), train, 'cpu', 2, False, {'device': 'd', 'date': 'x'})
  results = tmp_path / 'results.jsonl'
  results.write_text('\n'.join(_run_lines('r1', records, 'a')) + '\n')
  results_md = tmp_path / 'RESULTS.md'
  results_md.write_text('# Notes kept\n')
  assert report.main([str(results), '--results-md', str(results_md)]) == 0
  printed = capsys.readouterr()
  assert f'| `{train[0].name}` | 2.5 | img/s |' in printed.out and str(results_md) in printed.err
  written = results_md.read_text()
  assert written.startswith('# Notes kept\n') and printed.out.rstrip('\n') in written
  assert report.main([str(results), '--runs', '2', '--results-md', str(results_md)]) == 2
  assert capsys.readouterr().err == f'report: {results}: the results file holds 1 run(s), not the 2 asked for\n'
  assert results_md.read_text() == written
  assert report.main([str(results), '--results-md', str(tmp_path / 'missing' / 'RESULTS.md')]) == 2
  assert capsys.readouterr().err.startswith(f"report: writing {tmp_path / 'missing' / 'RESULTS.md'} failed (")
  assert sorted(path.name for path in tmp_path.iterdir()) == ['RESULTS.md', 'results.jsonl']  # no .tmp left


def _fake_device(tmp_path, monkeypatch, device, anchor_img_per_s, anchor_ms_per_batch):
  """side_by_side.main's arguments for a run with empty anchor scripts and every job faked:
  ours report 10.0 on `device`, the anchors the given figures. Returns (arguments, jobs run)."""
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
                                'value': 10.0, 'device': device}) for case in chosen]
    return 'ok', [json.dumps({'case': spec, 'img_per_s': anchor_img_per_s, 'ms_per_batch': anchor_ms_per_batch})
                  for spec in job.command[2:]]
  monkeypatch.setattr(side_by_side, 'run_job', fake_job)
  monkeypatch.setattr(side_by_side, 'has_nvidia_gpu', lambda: not device.startswith('cpu'))
  (tmp_path / 'RESULTS.md').write_text('# Benchmark results\n')
  arguments = ['--anchors-dir', str(anchors), '--results-dir', str(tmp_path), '--results-md',
               str(tmp_path / 'RESULTS.md'), '--date', '2026-12-06', '--torch', 'on']
  return arguments, ran


def test_a_stage_runs_its_groups_and_cases_within_its_budget(tmp_path, monkeypatch):
  arguments, ran = _fake_device(tmp_path, monkeypatch, 'H100', 8.0, 20.0)
  results_md = tmp_path / 'RESULTS.md'
  argv = ['--stage', 'targets', *arguments]
  assert side_by_side.main(argv) == 0
  assert [name for name, _, _ in ran] == ['ours:train', 'flax_resnet.py:train', 'ours:bn', 'ours:eval',
                                          'flax_resnet.py:eval']
  assert ran[-1][1][2:] == ('eval:resnet152:32:bf16',)  # the anchor measures only what the stage compares
  assert all(timeout <= side_by_side.STAGES['targets'].budget_s + side_by_side.STAGE_GRACE_S for _, _, timeout in ran)
  assert ran[0][2] > side_by_side.STAGES['targets'].budget_s  # the first job may overrun the budget by the grace
  lines = (tmp_path / '2026-12-06_h100.jsonl').read_text().splitlines()
  (run_info,), records = report.last_runs(lines, 1)
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
  arguments, _ = _fake_device(tmp_path, monkeypatch, 'NVIDIA H100', 5.0, 40.0)
  # No case of ours runs in the torch stage: the device is asked of a process of its own.
  monkeypatch.setattr(side_by_side, '_device_description', lambda: 'NVIDIA H100')
  for stage in ('targets', 'torch'):
    assert side_by_side.main(['--stage', stage, *arguments]) == 0
  assert [path.name for path in tmp_path.glob('*.jsonl')] == ['2026-12-06_nvidia-h100.jsonl']
  lines = (tmp_path / '2026-12-06_nvidia-h100.jsonl').read_text().splitlines()
  runs, records = report.last_runs(lines, 2)
  assert [run_info['stage'] for run_info in runs] == ['targets', 'torch'] and runs[0]['run_id'] != runs[1]['run_id']
  priced = {r['case']: r for r in report.priced_again(records, report.combined_run(runs))}
  assert priced['train/resnet_v1_50/bf16/b256']['time_ratios']['torch_resnet.py train:resnet50:256:1:bf16'] == 0.5
  assert priced['eval/resnet_v2_152/bf16/b32']['time_ratios']['torch_resnet.py eval:resnet152:32:1:bf16'] == 0.25


def test_the_device_a_run_without_cases_of_ours_records_is_our_harnesss():
  assert side_by_side._device_description() == run.device_description()


def test_a_run_that_measured_nothing_or_the_gpu_profile_on_a_cpu_writes_nothing(tmp_path, monkeypatch, capsys):
  # Both had been appended to results/ and given a RESULTS.md section of "not run" rows.
  arguments, ran = _fake_device(tmp_path, monkeypatch, 'cpu (2 cores)', 8.0, 20.0)
  assert side_by_side.main(['--stage', 'targets', *arguments]) == 1
  assert 'the gpu profile needs an NVIDIA GPU and this machine has none' in capsys.readouterr().err
  assert not ran  # refused before measuring
  assert side_by_side.unrecordable([{'record': 'ours', 'value': 1.0}], 'gpu', 'cpu (2 cores)') == (
      'the gpu profile ran on cpu (2 cores); pass --profile cpu for a CPU run')  # a --device given: after
  monkeypatch.setattr(side_by_side, 'run_job', lambda job, timeout_s, env: ('timed out', []))
  assert side_by_side.main(['--stage', 'targets', '--profile', 'cpu', *arguments]) == 1
  assert 'nothing was measured' in capsys.readouterr().err
  assert not list(tmp_path.glob('*.jsonl')) and (tmp_path / 'RESULTS.md').read_text() == '# Benchmark results\n'


@pytest.mark.parametrize('item', ['pipeline', 'nosuch=3', 'pipeline=0', 'pipeline=x'])
def test_a_malformed_group_rounds_item_is_a_usage_error(item, capsys):
  with pytest.raises(SystemExit) as exit_status:
    side_by_side.main(['--group-rounds', item])
  assert exit_status.value.code == 2 and 'give GROUP=N with GROUP one of' in capsys.readouterr().err


@pytest.mark.parametrize('arguments', [['--rounds', '0'], ['--rounds', '-1'], ['--budget-s', '0']])
def test_no_rounds_or_no_budget_is_a_usage_error_before_any_job(arguments, capsys, monkeypatch):
  monkeypatch.setattr(side_by_side, 'run_rounds', lambda *args, **kwargs: pytest.fail('jobs ran'))
  with pytest.raises(SystemExit) as exit_status:
    side_by_side.main(arguments)
  err = capsys.readouterr().err
  assert exit_status.value.code == 2 and 'run at least one round, with a positive budget' in err


def test_report_of_a_file_without_run_records_says_which_files_it_reports(tmp_path, capsys):
  path = tmp_path / 'figures.jsonl'  # what benchmarks.run --out appends: figures, no run record
  path.write_text('{"case": "bn_layer/plain/8x8x8x8", "value": 1.0, "unit": "ms"}\n')
  assert report.main([str(path), '--results-md', str(tmp_path / 'RESULTS.md')]) == 2
  assert capsys.readouterr().err == (f'report: {path}: it holds no run record: give a file side_by_side.py wrote '
                                     "(benchmarks/results/*.jsonl); benchmarks.run's --out lines are figures only\n")


@pytest.mark.parametrize('lines', [['[1, 2]'], ['{"record": "run", "run_id": "a"}']])
def test_report_of_json_that_side_by_side_did_not_write_is_one_line(tmp_path, capsys, lines):
  path = tmp_path / 'other.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  assert report.main([str(path), '--results-md', str(tmp_path / 'RESULTS.md')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'report: {path} is not a results file side_by_side wrote (') and err.count('\n') == 1
  assert not (tmp_path / 'RESULTS.md').exists()
