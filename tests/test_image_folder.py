"""Image folder trees that cannot train (symlink loops, broken links, one class), the files read
as images, and unreadable ones: named, or skipped and masked.

Preprocessing of image folders is tested in test_preprocessing.py."""

import os
import re
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from resnet_flax import data
from resnet_flax.data.pipeline import SkippedImageWarning


def _image_tree(root, classes=('a', 'b'), per_class=4, split='train'):
  for name in classes:
    directory = root / split / name
    directory.mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(directory / f'{i}.jpg')
  return root


def _folder(root, **extra):
  return {'name': 'imagefolder', 'dir': str(root), 'image_size': 16, 'preprocessing': 'vgg', 'num_workers': 1,
          **extra}


@pytest.mark.parametrize('link,target', [
    ('train/a/loop', '.'),  # itself
    ('train/a/up', '..'),  # the split directory, which holds train/a again
    ('elsewhere/back', '../train/a'),  # a loop through two links: train/a/out -> elsewhere -> train/a
])
def test_a_symlink_loop_is_refused_by_name(tmp_path, link, target):
  root = _image_tree(tmp_path)
  (root / 'elsewhere').mkdir()
  (root / 'train' / 'a' / 'out').symlink_to(root / 'elsewhere')
  (root / link).symlink_to(target)
  expected = f'symlink {os.path.realpath(tmp_path)}/{link} -> {target} loops back into'  # Where the link is.
  with pytest.raises(data.DataError, match=re.escape(expected)) as excinfo:
    data.build(_folder(root), 'train', batch_size=4, seed=0)  # Had scanned 168 paths for 8 images.
  assert '\n' not in str(excinfo.value)


def test_a_class_folder_linked_to_a_missing_target_is_refused(tmp_path):
  root = _image_tree(tmp_path)
  (root / 'train' / 'c').symlink_to(tmp_path / 'unmounted')  # had trained on 2 classes of 3 without a word
  with pytest.raises(data.DataError, match=re.escape(f"{root / 'train' / 'c'} is a symlink to "
                                                     f"{tmp_path / 'unmounted'}, which does not exist")):
    data.build(_folder(root), 'train', batch_size=4, seed=0)


def test_symlinks_to_directories_elsewhere_count_each_path(tmp_path):
  root = _image_tree(tmp_path)
  _image_tree(tmp_path / 'extra', classes=('more',), per_class=2)
  (root / 'train' / 'a' / 'more').symlink_to(root / 'extra' / 'train' / 'more')
  (root / 'train' / 'b' / 'same').symlink_to(root / 'extra' / 'train' / 'more')  # Not a loop: counted again.
  ds = data.build(_folder(root), 'train', batch_size=4, seed=0)
  np.testing.assert_array_equal(ds.source.labels, [0] * 6 + [1] * 6)
  assert ds.source.loader.paths[4:6] == tuple(str(root / 'train' / 'a' / 'more' / f'{i}.jpg') for i in range(2))


@pytest.mark.parametrize('split,label_offset', [('train', 0), ('train', 1), ('validation', 0)])
def test_one_class_folder_is_refused(tmp_path, split, label_offset):
  root = _image_tree(tmp_path / 'data', classes=('n01440764',))  # data.dir one level too deep looks like this
  _image_tree(root, classes=('n01440764',), split='val')
  with pytest.raises(data.DataError, match=r"train has one class folder, 'n01440764', but training a classifier "
                                           r"needs at least 2 classes; set config.data.dir to the directory "
                                           r"holding train/ and val/") as excinfo:
    data.build(_folder(root, label_offset=label_offset), split, batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value) and str(root / 'train') in str(excinfo.value)


@pytest.mark.parametrize('given, fix', [
    ('data/train', 'config.data.dir is a split folder: set it to the one above, {root}/data'),
    ('.', 'config.data.dir is one level too high: set it to {root}/data, which holds train/'),
    ('data/train/a', 'config.data.dir holds images, so it is a class folder: set it to {root}/data, two levels up'),
    ('empty', 'set config.data.dir to the directory holding train/ and val/, each with one folder per class'),
])
def test_a_data_dir_that_holds_no_split_says_where_the_root_is(tmp_path, given, fix):
  # It had ended "check config.data.dir", naming no folder.
  _image_tree(tmp_path / 'data')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(data.DataError) as error:
    data.build(_folder(tmp_path / given), 'train', batch_size=4, seed=0)
  assert str(error.value).startswith("image folder split 'train' not found: expected a directory ")
  assert str(error.value).endswith(f"; {fix.format(root=tmp_path)}.")


@pytest.mark.parametrize('field, value, named', [
    ('num_workers', -1, 'config.data.num_workers=-1 must be a whole number >= 0'),  # a ThreadPoolExecutor error
    ('image_size', '32', "config.data.image_size='32' (str) must be a whole number."),  # a TypeError comparing a str
    ('image_size', 0, "needs a positive whole config.data.image_size and config.data.preprocessing ('vgg' or "
                      "'inception'); got 0"),
])
def test_library_callers_get_the_data_errors_command_lines_get(tmp_path, field, value, named):
  root = _image_tree(tmp_path)
  with pytest.raises(data.DataError, match=re.escape(named)):
    data.build(_folder(root, **{field: value}), 'train', batch_size=4, seed=0)


def test_a_validation_split_with_one_class_present_keeps_the_training_classes(tmp_path):
  root = _image_tree(tmp_path)
  _image_tree(root, classes=('b',), split='val')
  ds = data.build(_folder(root), 'validation', batch_size=4, seed=0)
  assert ds.num_classes == 2 and set(ds.source.labels.tolist()) == {1}


def test_images_in_every_format_torchvision_lists_are_read_and_other_files_are_not(tmp_path):
  # .bmp and .webp files had been left out without a word.
  directory = tmp_path / 'train' / 'a'
  _image_tree(tmp_path, classes=('b',))
  directory.mkdir(parents=True)
  pixels = np.full((20, 24, 3), 90, np.uint8)
  for extension in ('jpg', 'JPEG', 'png', 'ppm', 'bmp', 'tif', 'tiff', 'webp'):
    Image.fromarray(pixels).save(directory / f'x.{extension}')
  Image.fromarray(pixels[..., 0]).save(directory / 'x.pgm')
  (directory / 'labels.txt').write_text('not an image')
  dataset = data.build(_folder(tmp_path), 'train', batch_size=4, seed=0)
  assert dataset.num_examples == 9 + 4
  batches = list(dataset.eval_batches())  # every file decoded: an unreadable one would raise
  assert sum(int(batch['mask'].sum()) for batch in batches) == 13


def test_a_skipped_file_is_one_warning_line_without_the_skip_advice(tmp_path):
  root = _image_tree(tmp_path)
  (root / 'train' / 'a' / 'broken.jpg').write_bytes(b'not a jpeg')
  ds = data.build(_folder(root, on_bad_image='skip'), 'train', batch_size=9, seed=0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    batch = next(ds.eval_batches())
  assert batch['mask'].sum() == 8
  assert [w.category for w in caught] == [SkippedImageWarning]
  # As the default `showwarning` prints it: the location line used to be followed by a source line of the pipeline.
  printed = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno)
  assert printed.count('\n') == 1 and 'broken.jpg' in printed and 'replace or delete the file' in printed
  assert 'on_bad_image' not in printed  # It is already 'skip'.


def _in_a_thread(function, timeout_s=30):
  """`function()`'s exception or result, or a failed test if it is still running after `timeout_s`."""
  outcome = {}

  def run():
    try:
      outcome['result'] = function()
    except Exception as error:  # pylint: disable=broad-except
      outcome['error'] = error
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(timeout_s)
  assert not thread.is_alive(), f'still running after {timeout_s} s'
  return outcome


@pytest.mark.parametrize('on_bad_image', ['error', 'skip'])
def test_a_named_pipe_among_the_images_is_refused_not_read(tmp_path, on_bad_image):
  root = _image_tree(tmp_path)
  os.mkfifo(root / 'train' / 'a' / 'fifo.jpg')  # Opening it for reading had waited for a writer for ever.
  ds = data.build(_folder(root, on_bad_image=on_bad_image), 'train', batch_size=9, seed=0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    outcome = _in_a_thread(lambda: next(ds.eval_batches()))
  problem = f"image {root / 'train' / 'a' / 'fifo.jpg'} is a named pipe (FIFO), not an image file"
  if on_bad_image == 'error':
    assert isinstance(outcome['error'], data.DataError) and problem in str(outcome['error'])
  else:
    assert outcome['result']['mask'].sum() == 8
    assert [str(w.message) for w in caught if problem in str(w.message)]


def test_a_skipped_training_image_is_a_masked_copy_of_a_batch_mate(tmp_path):
  # Train-mode batch norm averages over every slot, masked or not: a zero image would skew its statistics.
  root = _image_tree(tmp_path)
  for path in (root / 'train').glob('*/*.jpg'):  # no black image: a copy must differ from a zero slot
    Image.fromarray(np.full((20, 24, 3), 100 + int(path.stem), np.uint8)).save(path)
  (root / 'train' / 'a' / 'broken.jpg').write_bytes(b'not a jpeg')
  ds = data.build(_folder(root, on_bad_image='skip'), 'train', batch_size=9, seed=0)
  with pytest.warns(SkippedImageWarning):
    batch = next(ds.train_batches())
  (skipped,) = np.flatnonzero(batch['mask'] == 0)
  assert batch['image'][skipped].any()
  assert any(np.array_equal(batch['image'][skipped], batch['image'][i]) for i in np.flatnonzero(batch['mask']))


def test_a_training_batch_with_no_readable_image_is_refused(tmp_path):
  root = _image_tree(tmp_path, per_class=2)
  for path in (root / 'train').glob('*/*.jpg'):
    path.write_bytes(b'not a jpeg')
  ds = data.build(_folder(root, on_bad_image='skip'), 'train', batch_size=4, seed=0)
  with pytest.warns(SkippedImageWarning), pytest.raises(
      data.DataError, match=r'imagefolder/train: no readable image in the training batch of step 0: all 4 of its '
                            r'files were skipped \(the first: cannot decode image .*train/[ab]/[01]\.jpg') as excinfo:
    next(ds.train_batches())  # Had trained on an all-zero, all-masked batch.
  assert '\n' not in str(excinfo.value)


def test_hidden_folders_inside_a_class_are_skipped_as_hidden_files_and_class_folders_are(tmp_path):
  # A thumbnail cache (.thumbnails/) or a notebook checkpoint had added its images to the class.
  root = _image_tree(tmp_path)
  for hidden in ('train/a/.thumbnails', 'train/.cache', 'train/a/sub/.ipynb_checkpoints'):
    (root / hidden).mkdir(parents=True)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / hidden / 'x.jpg')
  Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(root / 'train' / 'a' / 'sub' / 'y.jpg')  # not hidden: counts
  (root / 'train' / 'a' / '.z.jpg').write_bytes(b'')
  ds = data.build(_folder(root), 'train', batch_size=4, seed=0)
  assert ds.num_examples == 9 and ds.num_classes == 2
