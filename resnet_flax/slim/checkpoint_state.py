"""Which TensorFlow checkpoint a directory holds: the newest its `checkpoint` state file names, else by the
files there."""

from __future__ import annotations

import codecs
import os
import re
from typing import Optional

STATE_FILENAME = 'checkpoint'


def newest_in(state: str) -> str:
  """The newest checkpoint's prefix (`model_checkpoint_path`) as the state file `state` gives it."""
  with open(state, encoding='utf-8') as f:
    text = f.read()
  # TF text-format proto: `model_checkpoint_path: "..."` with C-style escapes.
  match = re.search(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
  if not match:
    raise ValueError(f'{state}: no model_checkpoint_path in the checkpoint state file')
  return codecs.escape_decode(match.group(1).encode('utf-8'))[0].decode('utf-8')


def newest_prefix(directory: str) -> Optional[str]:
  """The newest checkpoint's prefix in `directory` (joined to it) as its state file names it, or
  None where `directory` has no state file."""
  state = os.path.join(directory, STATE_FILENAME)
  if not os.path.isfile(state):
    return None
  return os.path.join(directory, newest_in(state))


def state_text(basename: str) -> bytes:
  """A state file naming `basename` (a prefix in the same directory) as the newest and only checkpoint."""
  quoted = basename.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')
  return (f'model_checkpoint_path: "{quoted}"\n'
          f'all_model_checkpoint_paths: "{quoted}"\n').encode('utf-8')


def tf_checkpoint_in(directory: str) -> Optional[str]:
  """What `slim:` takes for the TensorFlow checkpoint in `directory`, if it holds one: the
  directory itself where a `checkpoint` state file names the newest, else the V2 prefix of
  the highest step (`model.ckpt-N` of `model.ckpt-N.index`), else a V1 file (`resnet_v1_50.ckpt`)."""
  try:
    names = os.listdir(directory)
  except OSError:
    return None
  if os.path.isfile(os.path.join(directory, STATE_FILENAME)):
    return directory
  prefixes = [name.removesuffix('.index') for name in names if name.endswith('.index')]
  if prefixes:
    return os.path.join(directory, max(prefixes, key=_step_then_name))
  v1_files = sorted(name for name in names if name.endswith('.ckpt'))
  return os.path.join(directory, v1_files[0]) if v1_files else None


def _step_then_name(prefix: str) -> tuple[int, str]:
  """Sorts `model.ckpt-999` before `model.ckpt-1000` (a prefix without a step first)."""
  step = re.search(r'-(\d+)$', prefix)
  return (int(step.group(1)) if step else -1, prefix)
