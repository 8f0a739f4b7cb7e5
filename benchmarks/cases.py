"""The cases the harness runs (a program of `workloads.py` at given sizes), the profiles
that list them, and how a case is run and priced against another of ours.

Kinds (each case's `kind`):
  train          our full train step (`steps.train_step` jitted with donation, as train_lib
                 does: forward, backward, BN updates, slim's L2, SGD momentum), img/s
  train_flax_bn  the same step with every BatchNorm swapped for flax's `nn.BatchNorm`, img/s
  train_conv1x1  the same step with 1x1 kernels lowered as convolutions instead of our dots
                 (a choice measured on CPU; this prices it on the device), img/s
  eval           `model.apply(..., train=False)` on one batch, ms per batch (latency); the
                 `<dtype>_folded` variants with BatchNorm folded into the convs
                 (`fold_batch_norm_in_eval`), priced against the unfolded model
  train_loop     `train_lib.train_and_evaluate` (what train.py runs) on synthetic data with
                 the train case's model and batch: img/s the loop sustains, batches copied
                 to the device every step; priced against the bare train step
  bn_layer       one BatchNorm layer, forward + backward + new moving statistics, ms
  pipeline       `data.build` on a JPEG ImageFolder tree to uint8 224 crops, img/s

Profiles: 'gpu' (the issue's shapes), 'cpu' (the 2-core CPU target's), 'smoke' (tiny, for CI).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
from typing import Any, Callable, Optional, Sequence

import jax

from benchmarks import timing
from benchmarks.workloads import (BN_VARIANTS, Measurement, SkipCase, Stepper, measure_pipeline, measure_stepper,
                                  measure_train_loop, prepare_bn_layer, prepare_eval, prepare_train)

PROFILES = ('gpu', 'cpu', 'smoke')


@dataclasses.dataclass(frozen=True)
class Case:
  """One line of output: `measure(workdir)` gives `value` in `unit`.

  `kind` and `variant` name what is measured independently of sizes (the same in every
  profile); `params` are the sizes, recorded with the result.
  """
  name: str
  kind: str
  variant: str
  unit: str
  params: dict
  measure: Callable[[str], Measurement]
  # Builds the compiled step alone, for timing in turn with others (`run_interleaved`,
  # `benchmarks.paired`).
  prepare: Optional[Callable[[], Stepper]] = None


def _shown_model_name(model_name: str, block_sizes: Optional[tuple]) -> str:
  return model_name if block_sizes is None else f'{model_name}_{len(block_sizes)}block'


def _train_case(kind: str, model_name: str, dtype: str, batch: int, image_size: int, num_classes: int, warmup: int,
                iters: int, anchor_arch: str, block_sizes: Optional[tuple] = None) -> Case:
  params = dict(model=model_name, dtype=dtype, batch=batch, image_size=image_size, num_classes=num_classes,
                warmup=warmup, iters=iters)
  prepare = functools.partial(prepare_train, model_name=model_name, flax_bn=kind == 'train_flax_bn',
                              one_by_one_as_dot=kind != 'train_conv1x1', block_sizes=block_sizes,
                              **{k: v for k, v in params.items() if k != 'model'})
  measure = functools.partial(measure_stepper, prepare=prepare, warmup=warmup, iters=iters)
  shown_name = _shown_model_name(model_name, block_sizes)
  return Case(f'{kind}/{shown_name}/{dtype}/b{batch}', kind, dtype, 'img/s',
              {**params, 'anchor_arch': anchor_arch, 'block_sizes': block_sizes}, measure, prepare)


# Our train step, then the variants priced against it; `run` times them in turn together.
TRAIN_KINDS = ('train', 'train_flax_bn', 'train_conv1x1')


def _train_cases(*sizes: Any) -> list[Case]:
  return [_train_case(kind, *sizes) for kind in TRAIN_KINDS]


def _train_loop_case(model_name: str, dtype: str, batch: int, image_size: int, num_classes: int, intervals: int,
                     log_every: int, block_sizes: Optional[tuple] = None) -> Case:
  params = dict(model=model_name, dtype=dtype, batch=batch, image_size=image_size, num_classes=num_classes,
                intervals=intervals, log_every=log_every, block_sizes=block_sizes)
  shown_name = _shown_model_name(model_name, block_sizes)
  return Case(f'train_loop/{shown_name}/{dtype}/b{batch}', 'train_loop', dtype, 'img/s', params,
              functools.partial(measure_train_loop, model_name=model_name,
                                **{k: v for k, v in params.items() if k != 'model'}))


def _eval_case(model_name: str, dtype: str, batch: int, image_size: int, num_classes: int, warmup: int, iters: int,
               anchor_arch: str, fold_batch_norm: bool = False) -> Case:
  params = dict(model=model_name, dtype=dtype, batch=batch, image_size=image_size, num_classes=num_classes,
                warmup=warmup, iters=iters, fold_batch_norm=fold_batch_norm)
  prepare = functools.partial(prepare_eval, model_name=model_name,
                              **{k: v for k, v in params.items() if k != 'model'})
  measure = functools.partial(measure_stepper, prepare=prepare, warmup=warmup, iters=iters)
  variant = f'{dtype}_folded' if fold_batch_norm else dtype
  return Case(f'eval/{model_name}/{variant}/b{batch}', 'eval', variant, 'ms', {**params, 'anchor_arch': anchor_arch},
              measure, prepare)


def _bn_cases(shape: tuple[int, ...], warmup: int, iters: int) -> list[Case]:
  shape_name = 'x'.join(map(str, shape))
  return [Case(f'bn_layer/{variant}/{shape_name}', 'bn_layer', variant, 'ms',
               dict(shape=list(shape), dtype=BN_VARIANTS[variant][1], warmup=warmup, iters=iters),
               functools.partial(measure_stepper, prepare=prepare_bn_layer, variant=variant, shape=shape,
                                 warmup=warmup, iters=iters),
               functools.partial(prepare_bn_layer, variant=variant, shape=shape))
          for variant in BN_VARIANTS]


def _pipeline_cases(image_size: int, batch: int, images_per_case: int, jpegs: dict, warmup_batches: int) -> list[Case]:
  cases = []
  for preprocessing in ('vgg', 'inception'):
    for workers_name, num_workers in (('1_worker', 1), ('all_cores', 0)):
      batches = max(2, images_per_case // batch) * (1 if num_workers == 1 else os.cpu_count())
      params = dict(preprocessing=preprocessing, image_size=image_size, batch=batch, num_workers=num_workers,
                    warmup_batches=warmup_batches, batches=batches, **jpegs)
      cases.append(Case(f'pipeline/{preprocessing}{image_size}/{workers_name}', 'pipeline',
                        f'{preprocessing}/{workers_name}', 'img/s', params,
                        functools.partial(measure_pipeline, **params)))
  return cases


_PHOTO_JPEGS = dict(num_images=256, height_range=(300, 500), width_range=(350, 500))  # as the anchor's


def profile_cases(profile: str) -> list[Case]:
  """The cases of a profile, in the order they run."""
  if profile == 'gpu':
    return [
        *_train_cases('resnet_v1_50', 'bf16', 256, 224, 1000, 5, 20, 'resnet50'),
        _eval_case('resnet_v2_152', 'fp32', 32, 224, 1000, 5, 50, 'resnet152'),
        _eval_case('resnet_v2_152', 'bf16', 32, 224, 1000, 5, 50, 'resnet152'),
        _eval_case('resnet_v2_152', 'bf16', 32, 224, 1000, 5, 50, 'resnet152', fold_batch_norm=True),
        _train_loop_case('resnet_v1_50', 'bf16', 256, 224, 1000, 3, 20),
        # The largest BN input of ResNet-50 (block1's conv3 and shortcut) at batch 256.
        *_bn_cases((256, 56, 56, 256), 5, 50),
        *_pipeline_cases(224, 128, 2048, _PHOTO_JPEGS, 4),
    ]
  if profile == 'cpu':
    # A ResNet-50 train step takes seconds to tens of seconds on 2 cores (see RESULTS.md), so
    # fewer steps than the anchor's 5 + 20; benchmarks.paired times the anchor's step as many times.
    return [
        *_train_cases('resnet_v1_50', 'fp32', 8, 224, 1000, 1, 6, 'resnet50'),
        _train_loop_case('resnet_v1_50', 'fp32', 8, 224, 1000, 2, 3),
        _eval_case('resnet_v2_152', 'fp32', 4, 224, 1000, 2, 20, 'resnet152'),
        _eval_case('resnet_v2_152', 'fp32', 4, 224, 1000, 2, 20, 'resnet152', fold_batch_norm=True),
        *_bn_cases((8, 56, 56, 256), 5, 30),
        *_pipeline_cases(224, 64, 2048, _PHOTO_JPEGS, 2),
    ]
  if profile == 'smoke':
    # One block of two units (a projection and a strided subsample shortcut) keeps the
    # train steps' compile time, which dominates a smoke run, to a few seconds each.
    one_block = ((4, 2, 2),)
    return [
        *_train_cases('resnet_v1_tiny', 'bf16', 4, 16, 10, 1, 2, 'resnet50', one_block),
        _eval_case('resnet_v2_tiny', 'fp32', 4, 16, 10, 1, 3, 'resnet152'),
        _eval_case('resnet_v2_tiny', 'bf16', 4, 16, 10, 1, 3, 'resnet152'),
        _eval_case('resnet_v2_tiny', 'bf16', 4, 16, 10, 1, 3, 'resnet152', fold_batch_norm=True),
        _train_loop_case('resnet_v1_tiny', 'bf16', 4, 16, 10, 2, 2, one_block),
        *_bn_cases((4, 8, 8, 16), 1, 3),
        *_pipeline_cases(16, 4, 8, dict(num_images=12, height_range=(24, 40), width_range=(28, 40)), 1),
    ]
  raise ValueError(f'unknown profile {profile!r}; use one of {PROFILES}.')


def matches(case: Case, selector: str) -> bool:
  """Whether `selector` names `case`: its name, its kind, or `kind/variant`."""
  return selector in (case.name, case.kind, f'{case.kind}/{case.variant}')


class UnknownCaseError(ValueError):
  """A case name that picks no case of the profile."""


def select(profile: str, names: Optional[Sequence[str]], strict: bool = True) -> list[Case]:
  """The profile's cases, or those among them named (exactly, by a `kind` such as 'eval', or
  by `kind/variant` such as 'eval/bf16'); with `strict`, a name that picks no case raises
  UnknownCaseError (a stage's names may name variants a profile lacks: not strict)."""
  cases = profile_cases(profile)
  if not names:
    return cases
  unknown = [name for name in names if not any(matches(case, name) for case in cases)]
  if unknown and strict:
    kinds = ', '.join(sorted({case.kind for case in cases}))
    raise UnknownCaseError(f'unknown case(s) {unknown} for profile {profile!r}: give a case name (`python -m '
                           f'benchmarks.run --profile {profile} --list` lists them), a kind ({kinds}) or kind/variant.')
  return [case for case in cases if any(matches(case, name) for name in names)]


def internal_reference(case: Case, cases: list[Case]) -> Optional[Case]:
  """The case of ours another is priced against in the same run, if any: flax's nn.BatchNorm
  for our train step and BN layer, our train step for train.py's loop and for 1x1 convolutions,
  the unfolded model for eval with BatchNorm folded into the convs."""
  if case.kind == 'eval' and case.params.get('fold_batch_norm'):
    wanted = ('eval', case.params['dtype'])
  elif case.kind == 'train':
    wanted = ('train_flax_bn', case.variant)
  elif case.kind in ('train_loop', 'train_conv1x1'):
    wanted = ('train', case.variant)
  elif case.kind == 'bn_layer' and not case.variant.startswith('flax'):
    dtype = BN_VARIANTS[case.variant][1]
    wanted = ('bn_layer', 'flax_nn_batchnorm' + ('_bf16' if dtype == 'bf16' else ''))
  else:
    return None
  sizes = ('model', 'batch', 'image_size', 'block_sizes', 'shape')
  same_sizes = [c for c in cases if (c.kind, c.variant) == wanted and
                all(c.params.get(size) == case.params.get(size) for size in sizes)]
  return same_sizes[0] if same_sizes else None


def reference_name(case: Case) -> str:
  """How a case of ours is named where another is priced against it: 'ours:<case>'."""
  return f'ours:{case.name}'


def _head(case: Case) -> dict[str, Any]:
  return {'case': case.name, 'kind': case.kind, 'variant': case.variant, 'unit': case.unit}


def _measured(case: Case, measurement: Measurement, **fields: Any) -> dict[str, Any]:
  return {**_head(case), 'value': measurement.value, 'compile_s': measurement.compile_s, 'steps': measurement.steps,
          'params': case.params, **fields, **measurement.extra}


def failure_record(case: Case, error: Exception) -> dict[str, Any]:
  """The record of a case that was skipped (SkipCase) or failed, with the reason in one line."""
  if isinstance(error, SkipCase):
    return {**_head(case), 'skipped': str(error)}
  return {**_head(case), 'error': f'{type(error).__name__}: {error}'[:500]}


def run_case(case: Case, workdir: str) -> dict[str, Any]:
  """Measures one case; a failure becomes an `error` record so that one bad case spares the rest."""
  try:
    measurement = case.measure(workdir)
  except Exception as error:  # Reported, not raised: the other cases still run.
    return failure_record(case, error)
  return _measured(case, measurement)


def prepare_runnable(cases: list[Case]) -> tuple[dict[str, Stepper], dict[str, dict[str, Any]]]:
  """Each case's compiled step, run once: (steppers by case name, failure records of the
  cases that could not be built or run), so that in a rotation a failing case costs only
  its own figure."""
  steppers, failures = {}, {}
  for case in cases:
    try:
      stepper = case.prepare()
      jax.block_until_ready(stepper.step())  # A step that fails at run time (out of memory, say) fails here.
      steppers[case.name] = stepper
    except Exception as error:  # Reported, not raised: the other cases still run.
      failures[case.name] = failure_record(case, error)
  return steppers, failures


def measured_record(case: Case, stepper: Stepper, step_times: list[float], **fields: Any) -> dict[str, Any]:
  """A case's record from its step times (`fields` added); a failure in making its figure
  (a non-finite loss, say) becomes its failure record."""
  try:
    measurement = stepper.measurement(statistics.median(step_times), len(step_times))
  except Exception as error:  # Reported, not raised: the other cases keep their figures.
    return failure_record(case, error)
  return _measured(case, measurement, **fields)


def run_interleaved(cases: list[Case], workdir: str) -> list[dict[str, Any]]:
  """Measures cases whose figures are compared with each other (our BN options and flax's, our
  train step and its variants) step by step in turn, so that a change in the machine's load
  falls on all of them alike."""
  del workdir
  steppers, records = prepare_runnable(cases)
  if steppers:
    params = cases[0].params
    times = timing.round_robin({name: stepper.step for name, stepper in steppers.items()},
                               params['warmup'], params['iters'])
    for case in cases:
      if case.name in steppers:
        records[case.name] = measured_record(case, steppers[case.name], times[case.name], interleaved=True,
                                             step_s=times[case.name])
  return [records[case.name] for case in cases]
