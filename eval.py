"""Evaluates a checkpoint: python eval.py --config=configs/digits.py --workdir=/tmp/digits

Ends stdout with one JSON line: step, loss, top1, top5, num_examples (and the metrics
before recalibration with --config.bn_recalibration_batches=N). With
--config.bn_report_batch_sizes='(8,32)' it prints the BatchNorm discrepancy report instead.
"""

from absl import app, flags

from resnet_flax import bn_diagnostics, cli, config_checks, distributed, eval_lib

cli.define_flags()
flags.adopt_module_key_flags(cli)  # --help lists --config, --workdir, --traceback
flags.DEFINE_string('checkpoint', None, 'A checkpoint: <workdir>/checkpoints/<step>, a directory written by '
                    '`python -m resnet_flax.slim convert`, or slim:PATH for a TF-Slim checkpoint; '
                    'default: the latest in --workdir.')
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  """Evaluates `--checkpoint`, or the latest in `--workdir`, and ends stdout with the result as a JSON line."""
  del argv

  def run():
    distributed.initialize(FLAGS.config.distributed)  # Before anything else touches JAX.
    cli.warn_of_unread_overrides(config_checks.EVAL)
    workdir = cli.workdir()
    config = FLAGS.config
    if config.bn_report_batch_sizes:
      report = bn_diagnostics.discrepancy_report(config, workdir, FLAGS.checkpoint, config.bn_report_batch_sizes,
                                                 config.bn_recalibration_batches, show_progress=True)
      print(bn_diagnostics.format_report(report))
      print(cli.json_line(report))
      return
    result = eval_lib.evaluate(config, workdir, FLAGS.checkpoint)
    if 'before_recalibration' in result:
      before = result['before_recalibration']
      print(f"before recalibration: top-1 {100 * before['top1']:.2f}%, loss {before['loss']:.4f}")
      print(f'after recalibrating BN on {config.bn_recalibration_batches} training batches:')
    print(f"{config.eval_split}: top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}%, "
          f"loss {result['loss']:.4f} over {result['num_examples']} examples (step {result['step']})")
    print(cli.json_line(result))

  cli.run_reporting_user_errors(run, resumes=False)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(config_checks.EVAL))
