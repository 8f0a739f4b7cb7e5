"""Evaluates a checkpoint: python eval.py --config=configs/digits.py --workdir=/tmp/digits

Ends stdout with one JSON line: step, loss, top1, top5, num_examples.
"""

import json

from absl import app, flags

from resnet_flax import cli, distributed, eval_lib

cli.define_flags()
flags.DEFINE_string('checkpoint', None, 'A checkpoint: <workdir>/checkpoints/<step>, a directory written by '
                    '`python -m resnet_flax.slim convert`, or slim:PATH for a TF-Slim checkpoint; '
                    'default: the latest in --workdir.')
FLAGS = flags.FLAGS


def main(argv):
  del argv

  def run():
    distributed.initialize(FLAGS.config.distributed)  # Before anything else touches JAX.
    if FLAGS.workdir is None and FLAGS.checkpoint is None:
      raise ValueError('pass --workdir=DIR (latest checkpoint in it) or --checkpoint=PATH.')
    result = eval_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
    print(f"{FLAGS.config.eval_split}: top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}%, "
          f"loss {result['loss']:.4f} over {result['num_examples']} examples (step {result['step']})")
    print(json.dumps(result))

  cli.run_reporting_user_errors(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
