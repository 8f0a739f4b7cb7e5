"""ImageFolder trees: <dir>/<split>/<class name>/<image> (IMAGE_EXTENSIONS), decoded by a thread pool.

Classes are the sorted subdirectory names of the training split (of the split itself when
there is no train/), at least 2; label i is the i-th class plus `label_offset` (1 for slim's
ResNet v2 checkpoints, whose class 0 is background).
Each example is decoded, cropped and converted in a worker thread straight into its slot of
the batch (PIL releases the GIL while decoding and resampling), or, for many cores, in
worker processes writing into shared memory (`worker_processes.py`). When the preprocessing's
values are a function of the pixels alone (VGG, inception without color distortion), the
batch holds the uint8 crops and the values are computed on the device.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Optional

import numpy as np

from resnet_flax.data import inception_preprocessing, vgg_preprocessing
from resnet_flax.data.data_dir import data_directory
from resnet_flax.data.errors import DataError
from resnet_flax.data.image_decode import decode_into_slot, values_dtype
from resnet_flax.data.pipeline import Loaded, Pending, Source
from resnet_flax.data.preprocessing import RESIZES, Preprocessing
from resnet_flax.data.worker_processes import ProcessLoader

# torchvision's ImageFolder list: Pillow decodes them all (slim's own pipelines read JPEG and PNG).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
PREPROCESSINGS = ('vgg', 'inception')
ON_BAD_IMAGE = ('error', 'skip')
# Directory names tried for a split, in order: ImageNet-style trees call validation 'val'.
_SPLIT_DIRS = {'validation': ('validation', 'val'), 'val': ('val', 'validation'), 'test': ('test', 'val')}
_EXPECTED = 'the ImageFolder root: a directory holding train/ and val/, each with one folder of images per class'


def get_preprocessing(name: str, image_size: int, *, color_distortion: bool = False,
                      resize: str = 'antialiased') -> Preprocessing:
  """TF-Slim's 'vgg' or 'inception' preprocessing producing image_size x image_size images,
  resized as `resize` (one of preprocessing.RESIZES) says."""
  if resize not in RESIZES:
    raise DataError(f"resize {resize!r} is unknown; use one of {RESIZES} ('slim' gives slim's pixel values).")
  if name == 'vgg':
    if color_distortion:
      raise DataError("color_distortion applies to preprocessing='inception' only; set it to False for 'vgg'.")
    chosen = vgg_preprocessing.preprocessing(image_size)
  elif name == 'inception':
    chosen = inception_preprocessing.preprocessing(image_size, color_distortion=color_distortion)
  else:
    raise DataError(f'preprocessing {name!r} is unknown for image folders; use one of {PREPROCESSINGS}.')
  return dataclasses.replace(chosen, resize=resize)


def _archive_fix(archive: str, stem: str) -> str:
  return (f'extract it first (e.g. into {stem}) and set config.data.dir to the extracted directory that holds '
          f'train/ and val/ with one folder of images per class.')


def check_root(root: Optional[str]) -> str:
  """`root` (`~` expanded) if it is a directory, else a one-line DataError naming what to pass."""
  return data_directory(root, _EXPECTED, _archive_fix)


def split_directory(root: str, split: str) -> str:
  """The directory holding `split`'s class folders."""
  candidates = [os.path.join(root, name) for name in _SPLIT_DIRS.get(split, (split,))]
  for candidate in candidates:
    if os.path.isdir(candidate):
      return candidate
  raise DataError(f'image folder split {split!r} not found: expected a directory {" or ".join(candidates)} '
                  f'with one subdirectory of images per class; {_root_fix(root)}.')


def _root_fix(root: str) -> str:
  """What to set config.data.dir to, for a `root` that holds no split: one level too deep (a split
  or class folder) or too high (a folder holding the root)."""
  split_names = {name for names in _SPLIT_DIRS.values() for name in names} | {'train'}
  parent = os.path.dirname(os.path.normpath(root))
  if os.path.basename(os.path.normpath(root)) in split_names:
    return f'config.data.dir is a split folder: set it to the one above, {parent}'
  with os.scandir(root) as listing:
    entries = list(listing)
  below = sorted(entry.path for entry in entries if entry.is_dir() and not entry.name.startswith('.')
                 and os.path.isdir(os.path.join(entry.path, 'train')))
  if below:
    return f'config.data.dir is one level too high: set it to {below[0]}, which holds train/'
  if any(_is_image(entry.name) for entry in entries if entry.is_file()):
    return f'config.data.dir holds images, so it is a class folder: set it to {os.path.dirname(parent)}, two levels up'
  return 'set config.data.dir to the directory holding train/ and val/, each with one folder per class'


def class_names(directory: str) -> list[str]:
  """The class folders of a split directory, sorted: label i is the i-th."""
  entries = [entry for entry in os.scandir(directory) if not entry.name.startswith('.')]
  broken = sorted(entry.path for entry in entries if entry.is_symlink() and not os.path.exists(entry.path))
  if broken:  # a class folder linked from a mount that is gone: its class had been dropped without a word
    raise DataError(f'{broken[0]} is a symlink to {os.readlink(broken[0])}, which does not exist; mount or fix its '
                    f'target, or remove the link ({len(broken)} broken link(s) in {directory}).')
  classes = sorted(entry.name for entry in entries if entry.is_dir())
  if not classes:
    raise DataError(f'{directory} has no class subdirectories; expected {directory}/<class name>/<image>.jpg.')
  return classes


def label_classes(directory: str) -> list[str]:
  """The class folders of `directory` that define the labels: `class_names`, at least 2 of them."""
  classes = class_names(directory)
  if len(classes) < 2:
    # One class trains to loss 0 and top-1 1.0 with nothing learnt; it is usually a data.dir one level too deep.
    raise DataError(f'{directory} has one class folder, {classes[0]!r}, but training a classifier needs at least 2 '
                    f'classes; set config.data.dir to the directory holding train/ and val/ with one folder per '
                    f'class (or add the missing class folders).')
  return classes


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _loop_target(link: str, walked: tuple[str, ...]) -> Optional[str]:
  """The directory of `walked` (real paths, the scan's way down) that symlink `link` leads back into, if any."""
  target = os.path.realpath(link)
  return next((directory for directory in walked if os.path.commonpath((directory, target)) == target), None)


def image_files(directory: str, walked: tuple[str, ...] = ()) -> list[str]:
  """The image files under `directory`, in sorted order (a directory's files, then its subdirectories').

  Symlinked directories are followed, each time they are met: a file reached by two paths
  counts twice. A symlink leading back into a directory on the way down (a loop) is an error:
  following it would count the same files again and again.
  """
  walked = (*walked, os.path.realpath(directory))
  try:
    entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
  except OSError as error:  # os.walk skipped such a directory: its images went missing silently.
    message = f'cannot list image directory {directory}: {error.strerror}; fix its permissions or remove it.'
    raise DataError(message) from error
  # Anything that is not a directory (a broken link too) counts, so a bad file is named when read, not dropped.
  found = [entry.path for entry in entries if not entry.is_dir() and _is_image(entry.name)]
  for entry in entries:
    if not entry.is_dir() or entry.name.startswith('.'):  # hidden, as hidden files and class folders are
      continue
    loop = _loop_target(entry.path, walked) if entry.is_symlink() else None
    if loop is not None:  # Named where it is, not as reached through other links: that is the file to remove.
      link = os.path.join(walked[-1], entry.name)
      raise DataError(f'symlink {link} -> {os.readlink(entry.path)} loops back into {loop}, which holds it, '
                      f'so its images would be counted again and again; remove the link or point it elsewhere.')
    found.extend(image_files(entry.path, walked))
  return found


def scan(directory: str, classes: Optional[list[str]] = None) -> tuple[list[str], list[str], np.ndarray]:
  """(class names, image paths, class index per path) of a split directory, in sorted order.

  `classes` (the training split's) fixes the labels: a split missing some classes keeps the
  others' labels, and a class training never saw is an error, not a shifted label.
  """
  present = class_names(directory)
  classes = classes or present
  unknown = sorted(set(present) - set(classes))
  if unknown:
    raise DataError(f'{directory} has class folder(s) {unknown[:3]} that the training split does not have; '
                    'every split must use the training classes (remove or rename them).')
  paths, class_indices = [], []
  for name in present:
    index = classes.index(name)
    found = image_files(os.path.join(directory, name))
    if not found:
      raise DataError(f'class directory {os.path.join(directory, name)} has no {"/".join(IMAGE_EXTENSIONS)} '
                      f'files; add images or remove the directory.')
    paths.extend(found)
    class_indices.extend([index] * len(found))
  return classes, paths, np.asarray(class_indices, np.int32)


@dataclasses.dataclass(frozen=True)
class FolderLoader:
  """Decodes the images of a batch in parallel into one preallocated array.

  With `ship_pixels` the array holds the uint8 crops; otherwise the float32 values of the
  preprocessing's train (random) or eval mapping.
  """
  paths: tuple[str, ...]
  preprocessing: Preprocessing
  executor: concurrent.futures.Executor
  skip_unreadable: bool = False
  augment_train: bool = True
  ship_pixels: bool = False

  def start_train(self, indices: np.ndarray, rng: np.random.Generator) -> Pending:
    if not self.augment_train:
      return self._start(indices, None)
    # One child generator per example: results do not depend on which thread runs first.
    return self._start(indices, rng.spawn(len(indices)))

  def start_eval(self, indices: np.ndarray) -> Pending:
    return self._start(indices, None)

  def _start(self, indices: np.ndarray, rngs: Optional[list[np.random.Generator]]) -> Pending:
    size = self.preprocessing.image_size
    images = np.zeros((len(indices), size, size, 3), values_dtype(self.ship_pixels))
    futures = [self.executor.submit(decode_into_slot, images, slot, self.paths[indices[slot]], self.preprocessing,
                                    self.ship_pixels, None if rngs is None else rngs[slot], self.skip_unreadable)
               for slot in range(len(indices))]
    return lambda: Loaded.with_problems(images, [future.result() for future in futures])


def build_source(root: str, split: str, *, preprocessing: str, image_size: int, color_distortion: bool = False,
                 resize: str = 'antialiased', label_offset: int = 0, on_bad_image: str = 'error', num_workers: int = 0,
                 augment_train: bool = True, worker_processes: bool = False) -> Source:
  """An image folder split; `num_workers` decoding threads (0: one per CPU core), or worker
  processes with `worker_processes` (for many cores: threads share one GIL; see
  `worker_processes.py`). Both give the same batches.

  Without `augment_train`, training batches get the deterministic eval preprocessing; `~` in `root` is expanded.
  """
  if on_bad_image not in ON_BAD_IMAGE:
    raise DataError(f'on_bad_image {on_bad_image!r} is unknown; use one of {ON_BAD_IMAGE}.')
  if label_offset < 0:
    raise DataError(f'label_offset must be >= 0, got {label_offset}.')
  chosen = get_preprocessing(preprocessing, image_size, color_distortion=color_distortion, resize=resize)
  root = check_root(root)
  # Labels are the training split's class indices, whichever split this is (a tree with
  # only a validation split, to evaluate a converted checkpoint, has its own).
  directory = split_directory(root, split)
  train_directory = os.path.join(root, 'train')
  classes = label_classes(train_directory if os.path.isdir(train_directory) else directory)
  classes, paths, class_indices = scan(directory, classes)
  workers = num_workers or len(os.sched_getaffinity(0))  # The cores this process may use, not the machine's.
  ship_pixels = chosen.pixel_values is not None
  options = dict(skip_unreadable=on_bad_image == 'skip', augment_train=augment_train, ship_pixels=ship_pixels)
  if worker_processes:
    loader = ProcessLoader(paths, chosen, workers, **options)
  else:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix='imagefolder')
    loader = FolderLoader(tuple(paths), chosen, executor, **options)
  pixels = dict(image_dtype=np.uint8, model_input=chosen.pixel_values) if ship_pixels else {}
  return Source(labels=class_indices + label_offset, num_classes=len(classes) + label_offset,
                image_shape=(image_size, image_size, 3), loader=loader, name=f'imagefolder/{split}', **pixels)
