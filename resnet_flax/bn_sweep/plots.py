"""The sweep's plots: accuracy_vs_step.png and gap_vs_decay.png (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Any

from resnet_flax import atomic_files
from resnet_flax.bn_sweep import results as results_lib

_INSTALL_HINT = "the sweep's plots need matplotlib: pip install -e '.[sweep]' (or pip install matplotlib)."


def require_matplotlib() -> None:
  """Raises ImportError with the install command when matplotlib is missing.

  Called before a sweep trains anything, so a missing package costs seconds, not the sweep.
  """
  _pyplot()


def _pyplot():
  # Imported here: matplotlib is an optional extra, and only this module needs it.
  try:
    import matplotlib
  except ImportError as error:
    raise ImportError(_INSTALL_HINT) from error
  matplotlib.use('Agg')  # Files only: no display needed, none opened.
  from matplotlib import pyplot
  return pyplot


def _save(figure, path: str) -> None:
  atomic_files.write_atomically(path, lambda file: figure.savefig(file, format='png', dpi=120, bbox_inches='tight'),
                                mode='wb')


def _panel_title(settings: dict[str, Any]) -> str:
  return f"batch {settings['batch_size']}, {settings['num_train_steps']} steps"


def plot_accuracy_vs_step(results: list[dict[str, Any]], path: str) -> None:
  """Eval top-1 (moving statistics) against step: a panel per batch size and length, a line per setting.

  Colour is the decay, a dashed line zero-debias, so the same setting looks the same in each panel.
  """
  pyplot = _pyplot()
  panels = sorted({(r['settings']['batch_size'], r['settings']['num_train_steps']) for r in results})
  decays = sorted({r['settings']['decay'] for r in results})
  colors = pyplot.get_cmap('viridis')
  figure, axes = pyplot.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
  for axis, panel in zip(axes[0], panels):
    for result in results:
      settings = result['settings']
      if (settings['batch_size'], settings['num_train_steps']) != panel:
        continue
      steps = [point['step'] for point in result['curve']]
      top1 = [point['top1'] for point in result['curve']]
      color = colors(decays.index(settings['decay']) / max(len(decays) - 1, 1) * 0.85)
      axis.plot(steps, top1, marker='o', markersize=3, color=color,
                linestyle='--' if settings['zero_debias_moving_mean'] else '-',
                label=f"decay {settings['decay']}" + (', zero-debias' if settings['zero_debias_moving_mean'] else '')
                + (f", diverged at step {result['diverged_at_step']}" if results_lib.diverged(result) else ''))
    axis.set_title(_panel_title({'batch_size': panel[0], 'num_train_steps': panel[1]}))
    axis.set_xlabel('step')
    axis.set_ylim(0.0, 1.02)
    axis.grid(alpha=0.3)
  # One legend, outside: a setting has the same colour and style in every panel.
  axes[0][-1].legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.02, 1.0))
  axes[0][0].set_ylabel(f"eval top-1 ({results[0]['eval_split']}, moving statistics)")
  _save(figure, path)
  pyplot.close(figure)


def plot_gap_vs_decay(results: list[dict[str, Any]], path: str) -> None:
  """Batch-statistics minus moving-statistics top-1 against decay: a line per zero-debias x batch size.

  Decays sit at even spacing (0.9, 0.99, 0.999 are equally far apart in 1 - decay's log).
  """
  pyplot = _pyplot()
  decays = sorted({r['settings']['decay'] for r in results})
  several_lengths = len({r['settings']['num_train_steps'] for r in results}) > 1
  lines: dict[tuple, list[tuple[float, float]]] = {}
  for result in results:
    if results_lib.diverged(result):  # No final numbers; its curve is in the other plot.
      continue
    settings = result['settings']
    key = (settings['zero_debias_moving_mean'], settings['batch_size'],
           settings['num_train_steps'] if several_lengths else None)
    lines.setdefault(key, []).append((decays.index(settings['decay']), 100 * result['gap']))
  figure, axis = pyplot.subplots(figsize=(6, 4))
  axis.axhline(0.0, color='gray', linewidth=0.8)
  for (debias, batch_size, steps), points in sorted(lines.items()):
    points.sort()
    label = f"batch {batch_size}, {'zero-debias' if debias else 'biased mean'}" + (f', {steps} steps' if steps else '')
    axis.plot([x for x, _ in points], [y for _, y in points], marker='o', linestyle='--' if debias else '-',
              label=label)
  axis.set_xticks(range(len(decays)), [str(decay) for decay in decays])
  axis.set_xlabel('BN decay')
  axis.set_ylabel('gap: batch − moving statistics top-1 (points)')
  axis.grid(alpha=0.3)
  if lines:
    axis.legend(fontsize='small')
  _save(figure, path)
  pyplot.close(figure)


def write_plots(results: list[dict[str, Any]], workdir: str) -> list[str]:
  """Writes accuracy_vs_step.png and gap_vs_decay.png into `workdir`; returns their paths."""
  accuracy, gap = os.path.join(workdir, 'accuracy_vs_step.png'), os.path.join(workdir, 'gap_vs_decay.png')
  plot_accuracy_vs_step(results, accuracy)
  plot_gap_vs_decay(results, gap)
  return [accuracy, gap]
