"""The programs the harness times: a `prepare_*` (a compiled step, timed by the caller) or a
`measure_*` (timed inside) per kind of case, on synthetic data.

  prepare_train       our full train step (`train_lib.make_train_step`: jitted with donation,
                      as train.py runs it), or with flax's `nn.BatchNorm` swapped in; img/s
  prepare_eval        `model.apply(..., train=False)` on one batch; ms per batch
  measure_train_loop  `train_lib.train_and_evaluate` (what train.py runs); img/s it logs
  prepare_bn_layer    one BatchNorm layer, forward + backward + new statistics; ms
  measure_pipeline    `data.build` on a JPEG ImageFolder tree to uint8 crops; img/s
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import statistics
import sys
import time
import types
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flax_batch_norm, synthetic_jpegs, timing
from configs import imagenet_resnet_v1_50, synthetic_resnet_v1_50
from resnet_flax import data, metrics_writer, models, optim, sharding, train_lib
from resnet_flax.layers import BatchNorm, moments
from resnet_flax.layers import batch_norm as batch_norm_lib
from resnet_flax.layers import conv as conv_lib
from resnet_flax.train_state import TrainState

DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
# resnet_arg_scope's BatchNorm, which our ResNets use; flax's layer gets the same numbers.
ARG_SCOPE_BN = {'decay': 0.997, 'epsilon': 1e-5, 'scale': True}
# Our BatchNorm options priced against flax's nn.BatchNorm: (our fields, activation dtype).
BN_VARIANTS = {
    'plain': ({}, 'fp32'),
    'zero_debias': ({'zero_debias_moving_mean': True}, 'fp32'),
    'bf16_act_fp32_stats': ({}, 'bf16'),  # bf16 in and out; statistics always float32
    'renorm': ({'renorm': True}, 'fp32'),
    # Each moments algorithm forced, whatever the platform `layers.moments` picks it for.
    'centred_moments': ({}, 'fp32'),
    'shifted_moments': ({}, 'fp32'),
    'flax_nn_batchnorm': (None, 'fp32'),
    'flax_nn_batchnorm_bf16': (None, 'bf16'),
}
# With batch_moments' own derivative, so the rows differ from `plain` in the forward algorithm alone.
FORCED_MOMENTS = {name: moments.hand_differentiated(algorithm)
                  for name, algorithm in (('centred_moments', moments.centred_moments),
                                          ('shifted_moments', moments.shifted_moments))}


@dataclasses.dataclass(frozen=True)
class Measurement:
  """A case's figure, its compile time (None: not measured), the steps timed, and extra fields for its record."""
  value: float
  compile_s: Optional[float]
  steps: int
  extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stepper:
  """A compiled step ready to time: `step()` runs one (its result is waited on), and
  `measurement(median_s, iters)` turns the median step time into the case's figure;
  `compiled` is the XLA program `step` runs (its HLO, for `benchmarks.op_times`)."""
  step: Callable[[], Any]
  compile_s: Optional[float]
  measurement: Callable[[float, int], Measurement]
  compiled: Any = None


class SkipCase(Exception):
  """The case cannot run with this version of the code (e.g. an option not there yet)."""


def _synthetic_batch(batch: int, image_size: int, num_classes: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'image': rng.standard_normal((batch, image_size, image_size, 3), np.float32),
          'label': rng.integers(0, num_classes, batch).astype(np.int32),
          'mask': np.ones(batch, np.float32)}


# Variables that start at one (scales, variances); every other non-weight variable starts at zero.
_ONES = frozenset({'gamma', 'moving_variance', 'scale', 'var'})


def host_initialized_variables(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """Variables of `model`'s shapes, drawn with numpy on the host: weights ~ N(0, 2 / fan_in).

  The timed programs do not depend on these values, and compiling flax's `init` costs more
  than the measurement at ResNet-152 size (and most of a smoke run): only shapes are traced.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
  rng = np.random.default_rng(0)

  def value(path, leaf):
    name = path[-1].key
    if name in ('weights', 'kernel'):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2.0 / fan_in), leaf.dtype)
    return (jnp.ones if name in _ONES else jnp.zeros)(leaf.shape, leaf.dtype)

  return {'batch_stats': {}, **jax.tree_util.tree_map_with_path(value, shapes)}


@contextlib.contextmanager
def _traced_with(module: types.ModuleType, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
  """While tracing inside the block, `module.<name>` is `replacement`: a choice of ours the
  device at hand prices against the one the code makes (1x1 kernels as convolutions rather
  than dots, one moments algorithm on every platform), the same numbers to rounding.

  Only a fresh trace sees it: a function jitted and traced before the block keeps its
  cached program, hence the `prepare_*` functions build the function they jit afresh.
  """
  original = getattr(module, name)
  setattr(module, name, replacement)
  try:
    yield
  finally:
    setattr(module, name, original)


def prepare_train(*, model_name: str, dtype: str, batch: int, image_size: int, num_classes: int,
                  flax_bn: bool = False, one_by_one_as_dot: bool = True, block_sizes: Optional[tuple] = None,
                  **unused: Any) -> Stepper:
  """Our train step, `train_lib.make_train_step` as `train_lib.train_and_evaluate` builds it; figure: img/s.

  `block_sizes` shrinks the registry model (smoke runs: compiling dominates them).
  `one_by_one_as_dot=False` traces 1x1 kernels as convolutions (the `train_conv1x1` case).
  """
  config = imagenet_resnet_v1_50.get_config()  # slim's recipe: Nesterov SGD, L2 1e-4, smoothing 0.1
  config.batch_size = batch
  model = models.get_model(model_name, num_classes=num_classes, dtype=DTYPES[dtype])
  if block_sizes is not None:
    model = model.clone(block_sizes=block_sizes)
  if flax_bn:
    model = flax_batch_norm.with_flax_batch_norm(model)
  tx = optim.build_optimizer(config)
  mesh = sharding.data_mesh()
  variables = host_initialized_variables(model, (image_size, image_size, 3))
  state = sharding.replicate(TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                                        batch_stats=variables['batch_stats'],
                                        opt_state=tx.init(variables['params'])), mesh)
  train_step = train_lib.make_train_step(config, model, tx, mesh, sharding.train_state_shardings(state, mesh))
  batch_arrays = sharding.to_global_batch(_synthetic_batch(batch, image_size, num_classes), mesh)
  with contextlib.nullcontext() if one_by_one_as_dot else _traced_with(conv_lib, 'convolve', conv_lib.convolution):
    compiled, compile_s = timing.compile_timed(train_step, state, batch_arrays)
  carried = [state]

  def step():
    carried[0], metrics = compiled(carried[0], batch_arrays)
    return metrics

  def measurement(median_s: float, iters: int) -> Measurement:
    loss = float(step()['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'{model_name}: the train step gave loss {loss}; the timing would be meaningless.')
    return Measurement(batch / median_s, compile_s, iters, {'median_step_ms': median_s * 1e3, 'loss': loss,
                                                            **timing.xla_cost(compiled)})

  return Stepper(step, compile_s, measurement, compiled)


def prepare_eval(*, model_name: str, dtype: str, batch: int, image_size: int, num_classes: int,
                 fold_batch_norm: bool = False, **unused: Any) -> Stepper:
  """`model.apply(variables, images, train=False)` jitted as the anchor does; figure: ms per batch.
  `fold_batch_norm`: each conv's BatchNorm folded into it (`fold_batch_norm_in_eval`)."""
  model = models.get_model(model_name, num_classes=num_classes, dtype=DTYPES[dtype],
                           fold_batch_norm_in_eval=fold_batch_norm)
  images = jnp.asarray(_synthetic_batch(batch, image_size, num_classes)['image'])
  variables = host_initialized_variables(model, (image_size, image_size, 3))
  forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
  compiled, compile_s = timing.compile_timed(forward, variables, images)

  def measurement(median_s: float, iters: int) -> Measurement:
    return Measurement(median_s * 1e3, compile_s, iters, {'img_per_s': batch / median_s, **timing.xla_cost(compiled)})

  return Stepper(lambda: compiled(variables, images), compile_s, measurement, compiled)


def _train_in_this_process(config: Any, workdir: str) -> None:
  """`train_lib.train_and_evaluate` with its console output on stderr (stdout carries the
  harness's JSON lines) and this process's SIGINT/SIGTERM handlers back afterwards.

  In this process rather than a `train.py` child: the harness process already holds the
  accelerator (and on GPU, XLA's preallocated memory).
  """
  handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    with contextlib.redirect_stdout(sys.stderr):
      train_lib.train_and_evaluate(config, workdir)
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)


def measure_train_loop(workdir: str, *, model_name: str, dtype: str, batch: int, image_size: int, num_classes: int,
                       intervals: int, log_every: int, block_sizes: Optional[tuple] = None, **unused: Any
                       ) -> Measurement:
  """img/s that `train.py` logs on synthetic data: the median over logging intervals after
  the first (which includes compilation), in a fresh workdir."""
  config = synthetic_resnet_v1_50.get_config()
  config.model = model_name
  config.model_options.block_sizes = block_sizes
  config.dtype = {'bf16': 'bfloat16', 'fp32': 'float32'}[dtype]
  config.batch_size = batch
  config.data.update(image_size=image_size, num_classes=num_classes, num_examples=batch)
  config.log_every_steps = log_every
  config.num_train_steps = (intervals + 1) * log_every
  run_dir = os.path.join(workdir, f'train_loop_{model_name}_{dtype}_{batch}_{time.time_ns()}')
  _train_in_this_process(config, run_dir)
  logged = metrics_writer.read_records(run_dir)
  rates = [record['train/images_per_second'] for record in logged if 'train/images_per_second' in record][1:]
  losses = np.array([record.get('train/loss', 0.0) for record in logged], float)  # null (non-finite) -> NaN
  if len(rates) != intervals or not np.isfinite(losses).all():
    raise ValueError(f'train.py logged {len(rates)} timed intervals of {intervals}, or a non-finite loss.')
  value = statistics.median(rates)
  return Measurement(value, None, intervals * log_every,
                     {'median_step_ms': batch / value * 1e3, 'intervals': intervals})


def measure_stepper(workdir: str, *, prepare: Callable[..., Stepper], warmup: int, iters: int,
                    **params: Any) -> Measurement:
  """Prepares a step, times it (warm-up excluded, median of `iters`) and makes the figure."""
  del workdir
  stepper = prepare(**params)
  median_s, _ = timing.median_step_time(stepper.step, warmup, iters)
  return stepper.measurement(median_s, iters)


def _batch_norm_module(variant: str) -> nn.Module:
  fields, dtype = BN_VARIANTS[variant]
  if fields is None:
    return flax_batch_norm.FlaxBatchNorm(**ARG_SCOPE_BN, dtype=DTYPES[dtype])
  missing = sorted(set(fields) - {field.name for field in dataclasses.fields(BatchNorm)})
  if missing:
    raise SkipCase(f'resnet_flax.layers.BatchNorm has no field(s) {missing} yet')
  return BatchNorm(**ARG_SCOPE_BN, **fields, dtype=DTYPES[dtype])


def prepare_bn_layer(*, variant: str, shape: tuple[int, ...], **unused: Any) -> Stepper:
  """One BatchNorm layer in train mode: output, gradients (input, gamma, beta), new statistics; ms.

  The output is returned, as the next layer of a network always reads it: left out, XLA
  drops its write, and a case prices a layer no network has (XLA:CPU then wrote our
  centred statistics' input only for them, 1.05x flax's time instead of 0.98x).
  """
  module = _batch_norm_module(variant)
  dtype = DTYPES[BN_VARIANTS[variant][1]]
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  # A non-zero mean, as activations after a conv have, so centering does real work.
  x = (2.0 * jax.random.normal(keys[0], shape, jnp.float32) + 0.5).astype(dtype)
  cotangent = jax.random.normal(keys[1], shape, jnp.float32).astype(dtype)
  variables = module.init(jax.random.PRNGKey(1), x[:2], train=False)

  def forward_backward(variables, x, cotangent):
    def forward(params, x):
      y, updates = module.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return y, updates['batch_stats']
    y, pullback, batch_stats = jax.vjp(forward, variables['params'], x, has_aux=True)
    return y, pullback(cotangent.astype(y.dtype)), batch_stats

  forced = FORCED_MOMENTS.get(variant)
  with _traced_with(batch_norm_lib, 'batch_moments', forced) if forced else contextlib.nullcontext():
    compiled, compile_s = timing.compile_timed(jax.jit(forward_backward), variables, x, cotangent)

  def measurement(median_s: float, iters: int) -> Measurement:
    return Measurement(median_s * 1e3, compile_s, iters, {'gelem_per_s': int(np.prod(shape)) / median_s / 1e9,
                                                              **timing.xla_cost(compiled)})

  return Stepper(lambda: compiled(variables, x, cotangent), compile_s, measurement, compiled)


def _jpeg_tree(workdir: str, num_images: int, height_range: tuple[int, int], width_range: tuple[int, int]) -> str:
  """An ImageFolder root in `workdir`, written once per process and shape."""
  root = os.path.join(workdir, f'jpegs_{num_images}_{height_range[0]}_{width_range[0]}')
  if not os.path.isdir(root):
    synthetic_jpegs.write_image_folder(root, num_images, height_range=height_range, width_range=width_range)
  return root


def measure_pipeline(workdir: str, *, preprocessing: str, image_size: int, batch: int, num_workers: int,
                     num_images: int, height_range: tuple[int, int], width_range: tuple[int, int],
                     warmup_batches: int, batches: int) -> Measurement:
  """img/s of training batches from `data.build` (imagefolder, the ImageNet config's worker
  processes), prefetched as train_lib does: uint8 crops, mapped to float on the device.

  The value is images over wall time of the timed batches (what the pipeline can feed a
  step); the median batch time is in `extra`. `num_workers=0` is one worker per core.
  """
  root = _jpeg_tree(workdir, num_images, height_range, width_range)
  config = imagenet_resnet_v1_50.get_config().data
  config.dir = root
  config.image_size = image_size
  config.preprocessing = preprocessing
  config.num_workers = num_workers
  dataset = data.build(config, 'train', batch_size=batch, seed=0)
  batches_iter = data.prefetch(dataset.train_batches())
  try:
    for _ in range(warmup_batches):
      next(batches_iter)
    times = []
    start = last = time.perf_counter()
    for _ in range(batches):
      images = next(batches_iter)['image']
      now = time.perf_counter()
      times.append(now - last)
      last = now
    total = last - start
  finally:
    batches_iter.close()
  if images.shape != (batch, image_size, image_size, 3) or not np.isfinite(images).all() or not images.any():
    raise ValueError(f'the pipeline returned images {images.dtype}{images.shape} that are not real crops.')
  workers = num_workers or len(os.sched_getaffinity(0))  # what the loader starts (image_folder.build_source)
  return Measurement(batches * batch / total, None, batches,
                     {'median_batch_ms': float(np.median(times)) * 1e3, 'workers': workers})
