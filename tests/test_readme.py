"""The README's quick start is two commands, and CI runs the second one verbatim."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quick_start_commands():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as file:
    text = file.read()
  block = re.search(r'#+\s*Quick start.*?```[a-z]*\n(.*?)```', text, re.S | re.I).group(1)
  return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith('#')]


def test_quick_start_has_two_commands_and_ci_runs_the_second():
  commands = _quick_start_commands()
  assert len(commands) == 2
  assert 'train.py' in commands[0] and 'pytest' in commands[1]
  with open(os.path.join(REPO, '.ci', 'run'), encoding='utf-8') as file:
    ci = file.read().splitlines()
  assert commands[1] in ci
