"""python -m resnet_flax.slim convert --checkpoint PATH --model NAME --workdir DIR [--num_classes N] [--moving_averages]

Writes DIR/variables, an orbax checkpoint of {'params', 'batch_stats'} that eval.py
(--checkpoint=DIR/variables) and train.py (--config.init_checkpoint=DIR/variables) accept.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from resnet_flax import checkpoints, error_lines, models, pretrained, slim, workdirs
from resnet_flax.slim import checkpoint_state

# Slim's public ImageNet checkpoints: v1 has 1000 classes, v2 1001 (class 0 = background).
_DEFAULT_CLASSES = {'resnet_v1': 1000, 'resnet_v2': 1001}


class UsageError(ValueError):
  """A command line argparse refuses (unknown choice, malformed number, missing argument)."""


class _Parser(argparse.ArgumentParser):
  """Reports a bad argument as one `error:` line like every other user mistake, not a usage block.

  Subparsers are made with the parent's class, so `convert`'s arguments get this too.
  """

  def error(self, message: str) -> NoReturn:
    raise UsageError(f'{message}; `{self.prog} --help` lists the arguments.')


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = _Parser(prog='python -m resnet_flax.slim', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  convert = commands.add_parser('convert', help='TF-Slim checkpoint -> orbax variables checkpoint')
  convert.add_argument('--checkpoint', required=True, help='TF checkpoint prefix (model.ckpt) or its directory')
  convert.add_argument('--model', required=True, choices=models.list_models())
  convert.add_argument('--workdir', required=True)
  convert.add_argument('--num_classes', type=int, default=None,
                       help='default: 1000 for v1, 1001 for v2 (slim\'s ImageNet checkpoints); 0 for features only')
  convert.add_argument('--image_size', type=int, default=224)
  convert.add_argument('--channels', type=int, default=3)
  convert.add_argument('--moving_averages', action='store_true',
                       help="each variable's exponential moving average where the checkpoint has one (slim's "
                       'train_image_classifier --moving_average_decay), as slim\'s eval_image_classifier '
                       '--moving_average_decay reads it')
  convert.add_argument('--traceback', action='store_true', help='show the full error (every variable that '
                       'does not fit) with its traceback')
  return parser.parse_args(argv)


def convert(checkpoint: str, model_name: str, workdir: str, num_classes: int | None = None,
            image_shape: tuple[int, int, int] = (224, 224, 3), moving_averages: bool = False) -> str:
  """Converts (with `moving_averages`, each variable's average where it has one) and returns the
  written directory."""
  if num_classes is None:
    num_classes = _DEFAULT_CLASSES[model_name[:len('resnet_v1')]]
  if num_classes < 0 or min(image_shape) < 1:
    raise ValueError(f'--num_classes={num_classes}, --image_size={image_shape[0]}, --channels={image_shape[2]}: '
                     'give num_classes >= 0 (0: features only) and a positive image size and channel count.')
  _check_a_tf_checkpoint(checkpoint)
  if not workdir.strip():  # os.path.join('', 'variables') would write into the current directory
    raise ValueError('--workdir is empty; pass a directory.')
  target = checkpoints.converted_path(workdir)
  if os.path.lexists(target):  # orbax refuses to overwrite; say so before the slow read, not after
    raise ValueError(f'{target} already exists; delete it or pass another --workdir.')
  model = models.get_model(model_name, num_classes=num_classes or None)
  variables, step = slim.load_variables_and_step(checkpoint, model, image_shape=image_shape,
                                                 moving_averages=moving_averages)
  # Before orbax's writer threads meet an unwritable or full workdir (they hung there).
  workdirs.check_workdir(workdir, checkpoints.checkpoint_bytes(variables))
  # The TF run's step, so eval.py reports the step the weights were trained to.
  checkpoints.save_tree(target, {**variables, 'step': step})
  return target


def _check_a_tf_checkpoint(checkpoint: str) -> None:
  """Refuses what eval.py and train.py take but convert does not: `slim:PATH` (their mark of a TF
  checkpoint), an orbax checkpoint, converted already, and a training run's folders (a reader had
  called each "no checkpoint here")."""
  if checkpoint.startswith(pretrained.SLIM_PREFIX):
    path = checkpoint[len(pretrained.SLIM_PREFIX):]
    fix = f'pass --checkpoint {path}' if path.strip() else 'pass the TF checkpoint\'s prefix or folder'
    raise ValueError(f'--checkpoint {checkpoint}: convert reads TF checkpoints only, without the '
                     f'{pretrained.SLIM_PREFIX} mark eval.py and train.py take; {fix}.')
  if checkpoint_state.tf_checkpoint_in(checkpoint) is not None:  # a TF download converted into its own folder
    return
  # Convert's output folder, and a training run's folder or its checkpoints/ folder (named by the newest step).
  candidates = [checkpoint, checkpoints.converted_path(checkpoint)]
  run_steps = os.path.join(checkpoint, 'checkpoints')
  steps = run_steps if os.path.isdir(run_steps) else checkpoint
  newest = checkpoints.latest_step_in(steps)
  if newest is not None:
    candidates.append(os.path.join(steps, str(newest)))
  for orbax in candidates:
    if checkpoints.is_checkpoint(orbax):
      what = 'is' if orbax == checkpoint else 'holds'
      raise ValueError(f'--checkpoint {checkpoint} {what} an orbax checkpoint, converted already or saved by train.py; '
                       f'evaluate it with eval.py --checkpoint={orbax} or fine-tune from it with '
                       f'--config.init_checkpoint={orbax}.')


def main(argv: list[str] | None = None) -> int:
  """Runs the command; a user mistake prints one `error:` line on stderr and returns 2."""
  try:
    args = _parse(sys.argv[1:] if argv is None else argv)
  except UsageError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  try:
    target = convert(args.checkpoint, args.model, args.workdir, args.num_classes,
                     (args.image_size, args.image_size, args.channels), args.moving_averages)
  except (ValueError, FileNotFoundError) as error:
    if args.traceback:
      raise
    print(f'error: {error_lines.first_line(error)}', file=sys.stderr)
    return 2
  print(f'wrote {target}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
