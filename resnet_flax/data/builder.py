"""`build(config.data, split, ...)`: from a data config to a `Dataset`.

Fields of `config.data` (an ml_collections.ConfigDict or a plain dict):
  name           'digits' | 'cifar10' | 'imagefolder' | 'synthetic' (required)
  dir            cifar10: the extracted cifar-10-batches-py directory;
                 imagefolder: a root with train/ and val/ (or <split>/) of class folders
  image_size     digits: 8 (native) or more, see digits_resize; cifar10: 32;
                 imagefolder: required; synthetic: 224
  digits_resize  'pad' (center on a zero canvas, default) | 'upsample' (bilinear)
  preprocessing  imagefolder: 'vgg' | 'inception' (required: slim's ResNet checkpoints
                 were evaluated with either, so it is an explicit choice); others: 'none'
  augment        random train-time augmentation. digits: shifts of up to 1 pixel (never
                 flips, which change digits); cifar10: 4-pixel padded random crop and
                 mirror; imagefolder: the preprocessing's train mode (False: train batches
                 use the eval mode). Default: False for digits (the reference script does
                 not augment), True for cifar10 and imagefolder.
  color_distortion  inception only: slim's fast-mode color distortion (default False)
  resize         imagefolder: 'antialiased' (default: PIL's bilinear filter, which averages
                 when it shrinks, on a JPEG decoded at reduced scale where that suffices;
                 the fastest) | 'slim' (TF1's resize_bilinear on the full decode, as slim's
                 preprocessing: its pixel values to the JPEG decoder's rounding; use it to
                 evaluate slim's checkpoints as slim did)
  num_classes    synthetic: the number of classes (default 1000); others: if given, it
                 must equal the data's, so a config cannot silently disagree with its data
  num_examples   synthetic only (default 10000)
  channels       synthetic only (default 3)
  label_offset   imagefolder: added to labels (1 for slim's ResNet v2 with background class 0)
  on_bad_image   imagefolder: 'error' (default) | 'skip' (warn, mask 0; in training batches the
                 slot holds a copy of a readable batch mate, so batch norm's statistics stay
                 those of real images; a batch with no readable image is still an error)
  num_workers    imagefolder: decoding threads or processes (default 0: one per CPU core)
  worker_processes  imagefolder: decode in worker processes rather than threads (default
                 False); threads share one GIL and stop scaling at a few thousand img/s

Fields named for one source are ignored by the others, so one base config can serve all.
Normalization is no field: it follows from name and preprocessing (digits x / 16; cifar10
per-channel mean/std; vgg mean subtraction; inception [-1, 1]).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from resnet_flax.data import cifar10, digits, image_folder, synthetic
from resnet_flax.data.errors import DataError
from resnet_flax.data.pipeline import Dataset, Source, is_whole_number

NAMES = ('digits', 'cifar10', 'imagefolder', 'synthetic')
_FIELDS = frozenset({'name', 'dir', 'image_size', 'digits_resize', 'preprocessing', 'augment', 'color_distortion',
                     'num_classes', 'num_examples', 'channels', 'label_offset', 'on_bad_image', 'num_workers',
                     'worker_processes', 'resize'})

# Fields only some sources read: (fields, {deciding field: the values that read them}), in the
# form of `config_checks`' table, which refuses a command-line override that `_source` ignores.
READ_ONLY_WITH: tuple[tuple[tuple[str, ...], dict[str, tuple[str, ...]]], ...] = (
    (('dir',), {'name': ('cifar10', 'imagefolder')}),
    (('digits_resize',), {'name': ('digits',)}),
    (('label_offset', 'on_bad_image', 'num_workers', 'worker_processes', 'resize'), {'name': ('imagefolder',)}),
    (('color_distortion',), {'name': ('imagefolder',), 'preprocessing': ('inception',)}),
    (('num_examples', 'channels'), {'name': ('synthetic',)}),
    (('augment',), {'name': ('digits', 'cifar10', 'imagefolder')}),
)


# Switches, read by their truth value ('False' would turn one on), and whole-number fields (their
# ranges are each source's to check); None is a field left at its default. A ConfigDict keeps
# each field's type, a plain dict does not.
_SWITCHES = ('augment', 'color_distortion', 'worker_processes')
_WHOLE_NUMBERS = ('image_size', 'num_classes', 'num_examples', 'channels', 'label_offset', 'num_workers')


def _check_fields(config: Mapping[str, Any]) -> None:
  unknown = sorted(set(config.keys()) - _FIELDS)
  if unknown:
    raise DataError(f'unknown config.data field(s) {unknown}; known fields: {sorted(_FIELDS)}.')
  for key in _SWITCHES:
    if config.get(key) is not None and not isinstance(config[key], (bool, np.bool_)):
      raise DataError(f'config.data.{key}={config[key]!r} ({type(config[key]).__name__}) must be True or False.')
  for key in _WHOLE_NUMBERS:
    if config.get(key) is not None and not is_whole_number(config[key]):
      raise DataError(f'config.data.{key}={config[key]!r} ({type(config[key]).__name__}) must be a whole number.')


def _check_no_preprocessing(config: Mapping[str, Any], name: str) -> None:
  preprocessing = config.get('preprocessing') or 'none'
  if preprocessing != 'none':
    raise DataError(f"preprocessing={preprocessing!r} applies to imagefolder only; "
                    f"set config.data.preprocessing='none' for {name}.")


def _field(config: Mapping[str, Any], key: str, default: Any) -> Any:
  """`config[key]`, or `default` where it is absent or None; an explicit 0 is kept for the source to refuse."""
  value = config.get(key)
  return default if value is None else value


def check_config(config: Mapping[str, Any]) -> None:
  """Raises a one-line DataError for fields no data set of this name can be built with,
  before any file is read: an unknown name or field, preprocessing on a source that has none,
  CIFAR-10 at another size, an image folder without its size or preprocessing or with options
  its preprocessing refuses, a data directory that is unset, missing, a file or an archive."""
  _check_fields(config)
  name = config.get('name')
  if name not in NAMES:
    raise DataError(f'config.data.name={name!r} is unknown; use one of {NAMES}.')
  if name != 'imagefolder':
    _check_no_preprocessing(config, name)
  read = _with_defaults(config)
  if name == 'cifar10':
    image_size = read['image_size']
    if image_size != cifar10.NATIVE_SIZE:
      raise DataError(f'cifar10 images are {cifar10.NATIVE_SIZE}x{cifar10.NATIVE_SIZE}; set config.data.image_size '
                      f'to {cifar10.NATIVE_SIZE} (got {image_size}).')
    cifar10.check_directory(config.get('dir'))
  if name == 'imagefolder':
    if not is_whole_number(config.get('image_size'), 1) or not config.get('preprocessing'):
      raise DataError("imagefolder needs a positive whole config.data.image_size and config.data.preprocessing "
                      f"('vgg' or 'inception'); got {config.get('image_size')!r} and {config.get('preprocessing')!r}.")
    if not is_whole_number(read['num_workers'], 0):
      raise DataError(f"config.data.num_workers={read['num_workers']!r} must be a whole number >= 0 (0: one per "
                      'CPU core).')
    image_folder.get_preprocessing(read['preprocessing'], read['image_size'],  # its options, no file read
                                   color_distortion=bool(read['color_distortion']), resize=read['resize'])
    image_folder.check_root(config.get('dir'))


def _default_fields(name: Any) -> dict[str, Any]:
  """What `_source` uses for each field left out or None, for the source `name` (augmentation:
  off for digits, as the reference script; on for the others, as the CIFAR and slim recipes)."""
  image_size = {'digits': digits.NATIVE_SIZE, 'cifar10': cifar10.NATIVE_SIZE, 'synthetic': 224}.get(name)
  return {'dir': None, 'num_classes': 1000 if name == 'synthetic' else None, 'image_size': image_size,
          'digits_resize': 'pad', 'preprocessing': 'none', 'augment': name != 'digits', 'color_distortion': False,
          'resize': 'antialiased', 'label_offset': 0, 'on_bad_image': 'error', 'num_workers': 0,
          'worker_processes': False, 'num_examples': 10_000, 'channels': 3}


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config`'s fields with the defaults of the source it names in place of absent or None ones."""
  name = config.get('name')
  return {'name': name, **{key: _field(config, key, default) for key, default in _default_fields(name).items()}}


def effective_fields(config: Mapping[str, Any]) -> dict[str, Any]:
  """`config`'s fields as its source reads them: defaults in place of absent or None fields, and
  fields its source ignores left out, so two configs that build the same data compare equal."""
  read = _with_defaults(config)
  for fields, deciders in READ_ONLY_WITH:
    if any(read[decider] not in values for decider, values in deciders.items()):
      for key in fields:
        read.pop(key, None)
  return read


def _source(config: Mapping[str, Any], split: str, batch_size: int, seed: int) -> Source:
  """The source `config` names; `check_config(config)` has passed."""
  read = _with_defaults(config)
  name, augment_train = read['name'], bool(read['augment'])
  if name == 'digits':
    return digits.build_source(split, image_size=read['image_size'], resize_mode=read['digits_resize'],
                               augment_train=augment_train)
  if name == 'cifar10':
    return cifar10.build_source(read['dir'], split, augment_train=augment_train)
  if name == 'imagefolder':
    return image_folder.build_source(
        read['dir'], split, preprocessing=read['preprocessing'], image_size=read['image_size'],
        color_distortion=bool(read['color_distortion']), resize=read['resize'], label_offset=read['label_offset'],
        on_bad_image=read['on_bad_image'], num_workers=read['num_workers'], augment_train=augment_train,
        worker_processes=bool(read['worker_processes']))
  return synthetic.build_source(split, image_size=read['image_size'], channels=read['channels'],
                                num_classes=read['num_classes'], num_examples=read['num_examples'],
                                batch_size=batch_size, seed=seed)


def build(config: Mapping[str, Any], split: str, *, batch_size: int, seed: int, process_index: int = 0,
          process_count: int = 1) -> Dataset:
  """This process's view of `split` of the data set `config` describes (see the module docstring).

  `batch_size` is per process; the global batch is batch_size * process_count.
  """
  check_config(config)
  source = _source(config, split, batch_size, seed)
  expected_classes = config.get('num_classes')
  if expected_classes is not None and expected_classes != source.num_classes:
    raise DataError(f'config.data.num_classes={expected_classes} but {source.name} has {source.num_classes} classes; '
                    f'set num_classes to {source.num_classes} (or remove it).')
  return Dataset(source, batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count)
