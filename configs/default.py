"""Template: every field train.py and eval.py read, with what it does.

Variants import this and change a few fields. Values derived from others (the
scaled learning rate, the number of classes) are computed by the library from
the final config, so command-line overrides keep them consistent. Fields only one
optimizer, schedule or data set reads (lars.*, lr_end, data.dir, ...) may all be set
here; a command-line override of one the run never reads is refused, naming the setting.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Every field train.py and eval.py read, at its default value (a digits run); the variants change a few."""
  config = ml_collections.ConfigDict()
  # Model: a name from `resnet_flax.models.list_models()`.
  config.model = 'resnet_v1_digits'
  config.model_options = ml_collections.ConfigDict({
      # None keeps the model's own default.
      'global_pool': config_dict.placeholder(bool),
      'spatial_squeeze': config_dict.placeholder(bool),
      'output_stride': config_dict.placeholder(int),
      'include_root_block': config_dict.placeholder(bool),
      # ((base_depth, num_units, stride), ...) per block, as slim's resnet_v1_block: another depth.
      'block_sizes': config_dict.placeholder(tuple),
      # True: each residual unit's activations are recomputed in the backward pass, not kept
      # (less memory for larger batches, about one more forward pass; the same numbers).
      'remat': config_dict.placeholder(bool),
  })
  config.num_classes = config_dict.placeholder(int)  # None: the data set's.
  # Fine-tuning: start from these weights when the workdir has no checkpoint yet. An
  # orbax directory (a training checkpoint or `python -m resnet_flax.slim convert` output)
  # or slim:PATH for a TF-Slim checkpoint; a new head if num_classes differs.
  config.init_checkpoint = ''
  # > 0: also keep an exponential moving average of every model variable (weights, gamma, beta and the
  # moving statistics), as slim's train_image_classifier --moving_average_decay: after step t,
  # average -= (1 - d) * (average - variable) with d = min(model_ema_decay, (1 + t) / (10 + t)).
  # Evaluations in training report both (eval_ema/...: the averages). eval.py with it > 0 evaluates
  # the averages, of its runs or of a TF-Slim checkpoint (<name>/ExponentialMovingAverage, as slim's
  # eval_image_classifier --moving_average_decay); 0 evaluates the variables.
  config.model_ema_decay = 0.0
  config.dtype = 'float32'  # 'float32' | 'bfloat16' (activations; statistics stay float32)

  # Batch normalization (resnet_arg_scope's values unless a variant changes them).
  config.bn = ml_collections.ConfigDict({
      'decay': 0.997,  # moving -= (1 - decay) * (moving - batch_value)
      'epsilon': 1e-5,
      'center': True,
      'scale': True,
      'zero_debias_moving_mean': False,  # TF's debiased moving mean (biased / (1 - decay ** step))
      'fused': True,  # slim's fused path: unbiased batch variance into the moving variance
      'zero_debias_moving_variance': False,  # the same for the moving variance (as Haiku)
      'frozen': False,  # train with the moving statistics, never updating them
      'frozen_gamma_beta': False,  # gamma and beta get no gradient (fine-tuning at small batch)
      'zero_init_last_gamma': False,  # v1: each unit's last BN starts with gamma = 0 (unit = identity)
      # Eval: each conv's BN folded into its weights and a bias (same function, rounded otherwise; not
      # slim's order) so XLA:GPU may fuse conv, bias, residual add and ReLU; train mode unchanged.
      'fold_in_eval': False,
      # Batch renormalization (TF's renorm, renorm_clipping, renorm_decay); None: unclipped.
      'renorm': False,
      'renorm_decay': 0.99,
      'renorm_r_max': config_dict.placeholder(float),
      'renorm_r_min': config_dict.placeholder(float),  # None: TF's 0 (the paper uses 1 / renorm_r_max)
      'renorm_d_max': config_dict.placeholder(float),
      # Clipping schedule: plain BN (r = 1, d = 0) for start steps, then linear to the bounds.
      'renorm_clipping_start_step': 0,
      'renorm_clipping_ramp_steps': 0,
      'ghost_batch_size': config_dict.placeholder(int),  # statistics per ghost batch; None: whole batch
      # 'global': statistics over the global batch (synchronized BN); 'per_device': over each
      # device's share, as unsynchronized data parallelism (moving averages: mean over devices).
      'cross_device': 'global',
  })

  # Data (see resnet_flax/data/builder.py for every field).
  config.data = ml_collections.ConfigDict({
      'name': 'digits',  # 'digits' | 'cifar10' | 'imagefolder' | 'synthetic'
      'dir': config_dict.placeholder(str),  # cifar10 / imagefolder root
      # None: the data set's own size (digits 8, cifar10 32, synthetic 224); imagefolder needs one.
      'image_size': config_dict.placeholder(int),
      'digits_resize': 'pad',  # digits above 8 px: 'pad' | 'upsample'
      'preprocessing': 'none',  # imagefolder: 'vgg' | 'inception' (slim's)
      # None: the data set's recipe (digits off; cifar10 and imagefolder on, as slim's and CIFAR's).
      'augment': config_dict.placeholder(bool),
      'color_distortion': False,  # inception preprocessing only
      # imagefolder: 'antialiased' (PIL's, fastest) | 'slim' (TF1's resize_bilinear: slim's pixel values)
      'resize': 'antialiased',
      'num_classes': config_dict.placeholder(int),  # synthetic; elsewhere a check
      'num_examples': config_dict.placeholder(int),  # synthetic
      'channels': config_dict.placeholder(int),  # synthetic
      'label_offset': 0,  # imagefolder: 1 for slim v2's background class
      'on_bad_image': 'error',  # imagefolder: 'error' | 'skip'
      'num_workers': 0,  # imagefolder decoding threads (or processes); 0: one per core
      'worker_processes': False,  # imagefolder: processes, for many cores (threads share one GIL)
  })
  config.eval_split = 'test'
  # eval.py: > 0 recomputes BN statistics on this many training batches first (precise BN).
  config.bn_recalibration_batches = 0
  # eval.py: also report accuracy with batch statistics at these batch sizes, next to moving and
  # recalibrated statistics (the train/eval discrepancy report), e.g. '(8, 32, 128)'.
  config.bn_report_batch_sizes = ()

  # Optimization.
  config.batch_size = 64  # global, over all devices and hosts
  config.eval_batch_size = 0  # 0: batch_size
  config.num_train_steps = 600
  config.optimizer = 'sgd'  # 'sgd' | 'adamw' | 'lars' (large batches; momentum and nesterov apply)
  config.learning_rate = 0.1
  config.lr_batch_size = 0  # > 0: learning rate scales by batch_size / lr_batch_size
  config.lr_schedule = 'cosine'  # 'cosine' | 'step' | 'constant' | 'polynomial', after linear warm-up
  config.warmup_steps = 50  # linear from 0 to the peak, whatever num_train_steps (a shorter run stops part-way)
  config.lr_boundaries = (0.3, 0.6, 0.8)  # 'step': fractions f; decay at step round(f * num_train_steps), past warm-up
  config.lr_decay_factor = 0.1  # 'step': multiplier at each boundary
  config.lr_end = 1e-4  # 'polynomial': the rate it decays to (MLPerf's end learning rate)
  config.lr_power = 2.0  # 'polynomial': (peak - end) * (1 - t / T) ** power + end
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4  # slim's L2 on conv weights: 0.5 * wd * sum(w ** 2)
  # The same L2 on BatchNorm's gamma and beta (slim's batch_norm param_regularizers), for any
  # optimizer; resnet_arg_scope has none. PyTorch's SGD weight_decay decays them as it does
  # every parameter: set it to weight_decay to come close to such a recipe (which also decays
  # the logits' biases, never decayed here).
  config.bn_weight_decay = 0.0
  config.label_smoothing = 0.0
  config.skip_nonfinite_steps = False  # True: a NaN/Inf step leaves the state as it was (the schedule moves on)
  # With skipping: stop once this many steps in a row were non-finite. Checked where the loop reads
  # its metrics (every log_every_steps, at each save and at the end: no host sync per step), so
  # the steps up to there run first.
  config.max_skipped_in_a_row = 100
  # optimizer='lars': layer-wise trust ratio, weight decay added to the gradient; both on
  # conv/dense kernels only (not biases, not BN's gamma/beta), as MLPerf's ResNet runs do.
  config.lars = ml_collections.ConfigDict({
      'weight_decay': 1e-4,  # set config.weight_decay = 0 to drop slim's L2 from the loss
      'trust_coefficient': 0.001,  # eta: ratio = eta * |w| / |g + wd * w|
      'eps': 0.0,  # added to the ratio's denominator
  })
  # optimizer='adamw': decoupled weight decay (lr * wd * w subtracted after Adam's step) on
  # conv/dense kernels only; 0 makes it Adam with slim's L2 (config.weight_decay) in the loss.
  config.adamw = ml_collections.ConfigDict({'weight_decay': 0.0})

  # Scaling out (README: Scaling out).
  # ZeRO-1: split the optimizer state over the devices (each keeps 1/N) instead of
  # replicating it; parameters and statistics stay replicated. Same numbers either way.
  config.shard_optimizer_state = False
  # Multi-host: jax.distributed.initialize() before anything else (resnet_flax/distributed.py).
  config.distributed = ml_collections.ConfigDict({
      # 'auto': join when the fields below, JAX_COORDINATOR_ADDRESS or a cluster JAX detects
      # (SLURM, Open MPI, Cloud TPU, Kubernetes) give more than one process; 'on': always
      # call jax.distributed.initialize(); 'off': one process, never call it.
      'mode': 'auto',
      'coordinator_address': config_dict.placeholder(str),  # 'host:port' of process 0
      'num_processes': config_dict.placeholder(int),
      'process_id': config_dict.placeholder(int),  # 0 .. num_processes - 1
      # Force one of JAX's detectors: 'slurm' | 'ompi' | 'gcetpu' | 'gketpu' | 'k8s' | 'mpi4py'.
      'cluster_detection_method': config_dict.placeholder(str),
      # How long a process waits for the coordinator and the others to join (JAX's default).
      'initialization_timeout_s': 300,
  })

  # Bookkeeping.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = 0  # 0: only at the end
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  return config
