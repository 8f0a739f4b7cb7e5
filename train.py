"""Trains a ResNet: python train.py --config=configs/digits.py --workdir=/tmp/digits"""

import time

from absl import app, flags

from resnet_flax import cli, config_checks, distributed, train_lib

cli.define_flags()
flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir, --traceback
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  """Trains `--config` in `--workdir`; prints the final eval accuracy and the result as a JSON line."""
  del argv
  start = time.time()

  def run():
    distributed.initialize(FLAGS.config.distributed)  # Before anything else touches JAX.
    result = train_lib.train_and_evaluate(FLAGS.config, cli.workdir(cli.DEFAULT_TRAIN_WORKDIR))
    if 'top1' in result:
      print(f"Final {FLAGS.config.eval_split} accuracy: {100 * result['top1']:.2f}% "
            f"(top-5 {100 * result['top5']:.2f}%, loss {result['loss']:.4f}, {result['num_examples']} examples, "
            f"step {result['step']}, {time.time() - start:.1f} s)")
    if 'ema' in result:
      averages = result['ema']
      print(f"Final {FLAGS.config.eval_split} accuracy of the averages (config.model_ema_decay): "
            f"{100 * averages['top1']:.2f}% (top-5 {100 * averages['top5']:.2f}%, loss {averages['loss']:.4f})")
    print(cli.json_line(result))

  cli.run_reporting_user_errors(run)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(config_checks.TRAIN))
