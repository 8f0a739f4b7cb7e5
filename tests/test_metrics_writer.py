"""metrics.jsonl and TensorBoard event files, read back independently; a full disk is one error, not a hang."""

import gc
import json
import math
import os
import resource
import struct
import warnings

import jax
import pytest
from tensorboardX.proto import event_pb2

from resnet_flax import metrics_writer, train_lib, workdir_lock
from resnet_flax.slim import crc32c
from test_train import tiny_config


def _read_records(path):
  """TFRecord framing, checked: (length, masked crc of it, data, masked crc of the data) each."""
  records = []
  with open(path, 'rb') as file:
    while header := file.read(12):
      length, length_crc = struct.unpack('<QI', header)
      assert crc32c.mask_crc(crc32c.crc32c(header[:8])) == length_crc
      data = file.read(length)
      (data_crc,) = struct.unpack('<I', file.read(4))
      assert crc32c.mask_crc(crc32c.crc32c(data)) == data_crc
      records.append(event_pb2.Event.FromString(data))
  return records


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(2, {'train/loss': 1.5, 'train/top1': 0.25})
  writer.write(4, {'eval/loss': 0.75})
  writer.close()
  (events_file,) = (tmp_path / 'tensorboard').iterdir()
  events = _read_records(events_file)
  assert events[0].file_version == 'brain.Event:2'
  scalars = [(event.step, value.tag, value.simple_value) for event in events[1:] for value in event.summary.value]
  assert scalars == [(2, 'train/loss', 1.5), (2, 'train/top1', 0.25), (4, 'eval/loss', 0.75)]
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [{'step': 2, 'train/loss': 1.5, 'train/top1': 0.25}, {'step': 4, 'eval/loss': 0.75}]


def test_non_finite_values_are_null_in_metrics_jsonl_and_nan_in_tensorboard_without_warnings(tmp_path, caplog):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(3, {'eval/loss': float('nan'), 'eval/top1': 0.0, 'eval/grad': float('inf')})
  writer.close()

  def refuse(constant):
    raise ValueError(f'{constant} is not JSON')

  (line,) = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert json.loads(line, parse_constant=refuse) == {'step': 3, 'eval/loss': None, 'eval/top1': 0.0, 'eval/grad': None}
  (events_file,) = (tmp_path / 'tensorboard').iterdir()
  values = {value.tag: value.simple_value for event in _read_records(events_file)[1:] for value in event.summary.value}
  assert math.isnan(values['eval/loss']) and values['eval/top1'] == 0.0 and values['eval/grad'] == math.inf
  assert not caplog.records


def test_a_failed_events_write_is_one_error_and_close_still_returns(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  original_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1, original_limit[1]))  # no file may grow: a real write failure
  try:
    with pytest.raises(metrics_writer.MetricsWriteError) as error:
      writer.write(2, {'train/loss': 1.5})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, original_limit)
  assert str(error.value).startswith(f'writing metrics to {tmp_path}/tensorboard failed (File too large); free disk '
                                     'space or pass another --workdir, then rerun the same command')
  writer.close()


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_a_full_disk_stops_training_with_one_error_instead_of_hanging(tmp_path):
  # Before, tensorboardX's writer thread died on the full disk and the loop waited on its queue forever.
  os.symlink('/dev/full', tmp_path / 'metrics.jsonl')  # every write to it: ENOSPC
  with pytest.raises(metrics_writer.MetricsWriteError, match=r'metrics.jsonl failed \(No space left on device\)'):
    train_lib.train_and_evaluate(tiny_config(4), str(tmp_path))
  # The first log (step 2) comes before its save: no checkpoint, and the empty checkpoints/ is not left behind.
  assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME, 'config.json', 'metrics.jsonl', 'tensorboard']


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full')
def test_close_after_a_full_disk_closes_both_files(tmp_path):
  os.symlink('/dev/full', tmp_path / 'metrics.jsonl')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', ResourceWarning)
    writer = metrics_writer.MetricsWriter(str(tmp_path))
    with pytest.raises(metrics_writer.MetricsWriteError):
      writer.write(2, {'train/loss': 1.5})
    writer.close()
    del writer
    gc.collect()
  assert not [warning for warning in caught if issubclass(warning.category, ResourceWarning)], caught


def test_a_directory_where_metrics_jsonl_belongs_names_the_path_not_the_disk(tmp_path):
  (tmp_path / 'metrics.jsonl').mkdir()
  with pytest.raises(metrics_writer.MetricsWriteError) as error:
    metrics_writer.MetricsWriter(str(tmp_path))
  assert str(error.value).startswith(f'writing metrics to {tmp_path} failed (Is a directory); fix {tmp_path} or pass '
                                     'another --workdir')


def test_config_record_lists_what_changed_since_the_last_start(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  assert writer.record_config({'batch_size': 16, 'bn': {'decay': 0.9}, 'lr_boundaries': (0.3, 0.6)}) == []
  changes = writer.record_config({'batch_size': 8, 'bn': {'decay': 0.9, 'frozen': True}, 'lr_boundaries': (0.3, 0.6)})
  assert changes == ['batch_size: 16 -> 8', 'bn.frozen: (none) -> True']
  assert json.loads((tmp_path / 'config.json').read_text())['batch_size'] == 8
  assert sorted(os.listdir(tmp_path)) == ['config.json', 'metrics.jsonl', 'tensorboard']  # no temporary left
  writer.close()


def test_how_the_processes_meet_is_no_change(tmp_path):
  # A multi-host run's coordinator gets a new port at each launch: a resume had warned of it.
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  first = {'distributed': {'coordinator_address': 'host:1234', 'process_id': 0}, 'device_count': 4}
  writer.record_config(first)
  assert writer.record_config({'distributed': {'coordinator_address': 'host:4321', 'process_id': 0},
                               'device_count': 8}) == ['device_count: 4 -> 8']
  writer.close()


def test_recomputing_activations_is_no_change(tmp_path):
  # remat changes memory and time, not a number: switching it on or off for a resume is no change.
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({'model_options': {'remat': None, 'output_stride': None}})
  assert writer.record_config({'model_options': {'remat': True, 'output_stride': None}}) == []
  assert writer.record_config({'model_options': {'remat': False, 'output_stride': 8}}) == [
      'model_options.output_stride: None -> 8']
  writer.close()


def test_data_fields_compare_as_their_source_reads_them(tmp_path):
  # A record from before a data field existed (config.data.resize), a default spelt out, a field
  # the data set ignores: none is a change; a field it reads is.
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({'data': {'name': 'digits', 'image_size': None}})
  assert writer.record_config({'data': {'name': 'digits', 'image_size': 8, 'resize': 'antialiased', 'dir': '/x'}}) == []
  assert writer.record_config({'data': {'name': 'digits', 'image_size': 12}}) == ['data.image_size: 8 -> 12']
  writer.close()


# Every resume of a run from before config.bn_weight_decay existed had warned
# "bn_weight_decay: (none) -> 0.0".
def test_a_field_added_since_the_run_is_a_change_only_when_it_is_switched_on(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({'weight_decay': 1e-4, 'bn': {'decay': 0.9}})
  assert metrics_writer.config_changes(str(tmp_path), {'weight_decay': 1e-4, 'bn_weight_decay': 0.0,
                                                       'bn': {'decay': 0.9, 'renorm': False}}) == []
  assert metrics_writer.config_changes(str(tmp_path), {'weight_decay': 1e-4, 'bn_weight_decay': 1e-4,
                                                       'bn': {'decay': 0.9}}) == ['bn_weight_decay: (none) -> 0.0001']
  # A field the run had, gone now, is a change whatever its value was.
  writer.record_config({'weight_decay': 1e-4, 'label_smoothing': 0.0})
  assert metrics_writer.config_changes(str(tmp_path), {'weight_decay': 1e-4}) == ['label_smoothing: 0.0 -> (none)']
  writer.close()


def test_resuming_with_another_batch_size_says_so(tmp_path, capsys):
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  capsys.readouterr()
  changed = tiny_config(4)
  changed.batch_size = 8
  train_lib.train_and_evaluate(changed, str(tmp_path))
  out = capsys.readouterr().err  # warnings go to stderr, as eval.py's
  assert ('warning: resuming with a changed config: batch_size: 16 -> 8; num_train_steps: 2 -> 4 (batches are cut '
          'from the data order at step x batch size: with another batch size, some examples come again') in out
  # Recorded too: per-device statistics and ghost batches change with it.
  assert json.loads((tmp_path / 'config.json').read_text())['device_count'] == jax.device_count()


def test_a_resumed_run_drops_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  for step in (2, 4, 6):
    writer.write(step, {'train/loss': float(step)})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as file:
    file.write('{"step": 8, "train/lo')  # a line the kill cut short
  resumed = metrics_writer.MetricsWriter(str(tmp_path), resumed_step=4)
  resumed.write(6, {'train/loss': 6.5})
  resumed.close()
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [{'step': 2, 'train/loss': 2.0}, {'step': 4, 'train/loss': 4.0}, {'step': 6, 'train/loss': 6.5}]
  # TensorBoard's purge: the new file starts a session at step 5, which hides the old file's step 6.
  files = [_read_records(path) for path in (tmp_path / 'tensorboard').iterdir()]
  assert len(files) == 2  # one per writer, even within one second
  (resumed_events,) = [events for events in files if events[1].HasField('session_log')]
  assert resumed_events[1].step == 5 and resumed_events[1].session_log.status == event_pb2.SessionLog.START
  assert [(event.step, event.summary.value[0].simple_value) for event in resumed_events[2:]] == [(6, 6.5)]


def test_resuming_with_nothing_to_drop_leaves_metrics_jsonl_untouched(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(2, {'train/loss': 1.0})
  writer.close()
  before = os.stat(tmp_path / 'metrics.jsonl').st_mtime_ns
  metrics_writer.MetricsWriter(str(tmp_path), resumed_step=2).close()
  assert os.stat(tmp_path / 'metrics.jsonl').st_mtime_ns == before


def test_read_records_gives_what_was_written_without_a_line_a_kill_cut_short(tmp_path):
  assert metrics_writer.read_records(str(tmp_path)) == []  # no file yet: a run that diverged before logging
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.write(1, {'train/loss': 2.5})
  writer.write(2, {'eval/top1': float('nan')})
  writer.close()
  with open(tmp_path / 'metrics.jsonl', 'a', encoding='utf-8') as file:
    file.write('{"step": 3, "train/lo')  # killed mid-write
  assert metrics_writer.read_records(str(tmp_path)) == [{'step': 1, 'train/loss': 2.5},
                                                         {'step': 2, 'eval/top1': None}]


# A kill between a record and its newline: the resumed writer's first record would run into
# that line, and both become one unreadable line.
def test_a_resume_ends_a_last_record_without_its_newline_before_appending(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 2, "train/loss": 1.5}', encoding='utf-8')  # no '\n'
  writer = metrics_writer.MetricsWriter(str(tmp_path), resumed_step=2)
  writer.write(4, {'train/loss': 1.0})
  writer.close()
  assert [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [
      {'step': 2, 'train/loss': 1.5}, {'step': 4, 'train/loss': 1.0}]


# A cut line is skipped, not taken for the end of the records.
def test_read_records_skips_a_damaged_line_in_the_middle(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 2.5}\n{"step": 2, "train/lo\n'
                                          '{"step": 1, "train/loss": 2.25}\n', encoding='utf-8')
  assert metrics_writer.read_records(str(tmp_path)) == [{'step': 1, 'train/loss': 2.5},
                                                         {'step': 1, 'train/loss': 2.25}]


# A field the new config no longer has is a change too.
def test_a_field_the_new_config_lacks_is_a_change(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({'batch_size': 16, 'mixup': {'alpha': 0.2}, 'bn': {'decay': 0.9}})
  assert writer.record_config({'batch_size': 16, 'bn': {'decay': 0.9}}) == ['mixup.alpha: 0.2 -> (none)']
  writer.close()


# With twelve changed fields, set order is almost never the sorted one.
def test_changes_are_listed_in_sorted_order(tmp_path):
  names = [f'field_{letter}' for letter in 'qwertyuiopas']
  writer = metrics_writer.MetricsWriter(str(tmp_path))
  writer.record_config({name: 1 for name in names})
  assert writer.record_config({name: 2 for name in names}) == [f'{name}: 1 -> 2' for name in sorted(names)]
  writer.close()


def test_fields_are_named_by_their_full_dotted_path():
  assert metrics_writer.flat_fields({'a': {'b': {'c': 1, 'd': [2]}}, 'e': 3}) == {'a.b.c': 1, 'a.b.d': [2], 'e': 3}


def test_a_fresh_start_after_a_kill_keeps_only_its_own_records(tmp_path):
  # A run killed before its first checkpoint starts again from step 0. Its writer had appended to
  # the killed run's file: the new step 2 ran into the line the kill cut short and was lost, and
  # the killed run's step 2 (loss 99) read as this run's.
  (tmp_path / 'metrics.jsonl').write_text('{"step": 2, "train/loss": 99.0}\n{"step": 4, "train/lo', encoding='utf-8')
  killed = metrics_writer.MetricsWriter(str(tmp_path))  # as the killed run's TensorBoard file
  killed.close()
  writer = metrics_writer.MetricsWriter(str(tmp_path), resumed_step=0)
  assert writer.dropped_steps == [2]  # the cut line is no step
  writer.write(2, {'train/loss': 2.5})
  writer.close()
  assert metrics_writer.read_records(str(tmp_path)) == [{'step': 2, 'train/loss': 2.5}]
  # TensorBoard: the new file starts a session at step 1, hiding every event of the earlier one.
  files = [_read_records(path) for path in (tmp_path / 'tensorboard').iterdir()]
  (fresh,) = [events for events in files if len(events) > 1]
  assert fresh[1].step == 1 and fresh[1].session_log.status == event_pb2.SessionLog.START


def test_training_again_in_a_workdir_without_checkpoints_drops_the_earlier_records(tmp_path, capsys):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 2, "train/loss": 99.0}\n{"step": 4, "train/lo', encoding='utf-8')
  train_lib.train_and_evaluate(tiny_config(2), str(tmp_path))
  assert ('note: dropped 1 step(s) (2 to 2) an earlier start without a checkpoint had logged to metrics.jsonl: this '
          'run starts at step 0.') in capsys.readouterr().out
  records = metrics_writer.read_records(str(tmp_path))
  assert [record['step'] for record in records if 'train/loss' in record] == [2]
  assert all(record.get('train/loss') != 99.0 for record in records)

