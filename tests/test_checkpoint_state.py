"""Which TensorFlow checkpoint a folder holds (what `slim:` takes), and the state file naming it."""

import os

import pytest

from resnet_flax.slim import checkpoint_state


@pytest.mark.parametrize('files, expected', [
    ([], None),
    (['notes.txt', 'model.ckpt-9.data-00000-of-00001'], None),  # data without its index is no checkpoint
    (['model.ckpt-999.index', 'model.ckpt-1000.index', 'model.ckpt.index'], 'model.ckpt-1000'),  # by step, not name
    (['resnet_v1_50.ckpt', 'resnet_v2_50.ckpt'], 'resnet_v1_50.ckpt'),
    (['checkpoint', 'model.ckpt-3.index'], ''),  # the state file names the newest: the folder is what slim: takes
])
def test_the_tensorflow_checkpoint_a_folder_holds(tmp_path, files, expected):
  for name in files:
    (tmp_path / name).write_text('')
  found = checkpoint_state.tf_checkpoint_in(str(tmp_path))
  assert found == (None if expected is None else os.path.join(str(tmp_path), expected) if expected else str(tmp_path))


def test_a_directory_named_checkpoint_is_not_a_state_file(tmp_path):
  (tmp_path / 'checkpoint').mkdir()
  assert checkpoint_state.tf_checkpoint_in(str(tmp_path)) is None
  assert checkpoint_state.tf_checkpoint_in(str(tmp_path / 'missing')) is None


def test_a_state_file_names_its_checkpoint_back_escapes_and_all(tmp_path):
  name = 'odd "name"\\with\nnewline'
  (tmp_path / 'checkpoint').write_bytes(checkpoint_state.state_text(name))
  assert checkpoint_state.newest_in(str(tmp_path / 'checkpoint')) == name
  (tmp_path / 'checkpoint').write_text('all_model_checkpoint_paths: "x"\n')
  with pytest.raises(ValueError, match='no model_checkpoint_path'):
    checkpoint_state.newest_in(str(tmp_path / 'checkpoint'))
