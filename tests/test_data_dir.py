"""config.data.dir mistakes (`resnet_flax/data/data_dir.py`): unset, a file, an archive in
place of its extracted directory, `~`, the directory above CIFAR-10's; one line each."""

import io
import os
import socket
import tarfile
import zipfile

import pytest

from resnet_flax import data
from resnet_flax.data import data_dir
from test_cifar10 import _make_cifar
from test_image_folder import _folder, _image_tree

_CIFAR_EXPECTED = 'the extracted cifar-10-batches-py directory'
_FOLDER_EXPECTED = 'the ImageFolder root: a directory holding train/ and val/'


def _build_error(config, split='train'):
  with pytest.raises(data.DataError) as excinfo:
    data.build(config, split, batch_size=4, seed=0)
  assert '\n' not in str(excinfo.value)
  return str(excinfo.value)


@pytest.mark.parametrize('directory', [None, '', '  '])
@pytest.mark.parametrize('name,expected', [('cifar10', _CIFAR_EXPECTED), ('imagefolder', _FOLDER_EXPECTED)])
def test_an_unset_data_dir_says_so_and_what_to_set(tmp_path, directory, name, expected):
  config = _folder(tmp_path, dir=directory) if name == 'imagefolder' else {'name': name, 'dir': directory}
  # Had been "image folder root None does not exist".
  assert _build_error(config).startswith(f'config.data.dir is not set; set it to {expected}')


def _tarball(path, member='cifar-10-batches-py/readme.html'):
  with tarfile.open(path, 'w:gz') as archive:
    info = tarfile.TarInfo(member)
    archive.addfile(info, io.BytesIO(b''))
  return path


@pytest.mark.parametrize('filename', ['cifar-10-python.tar.gz', 'cifar-10-python.tar.gz.1'])  # .1: wget's copy
def test_the_cifar10_tarball_as_data_dir_says_to_extract_it(tmp_path, filename):
  tarball = _tarball(tmp_path / filename)
  message = _build_error({'name': 'cifar10', 'dir': str(tarball)})
  assert message == (f"config.data.dir='{tarball}' is an archive file, not a directory; extract it first "
                     f'(tar xf {tarball} -C {tmp_path}) and set config.data.dir to {tmp_path}/cifar-10-batches-py.')


@pytest.mark.parametrize('filename', ['imagenet.tar', 'imagenet.tar.gz', 'imagenet.zip'])
def test_an_image_folder_archive_as_data_dir_says_to_extract_it(tmp_path, filename):
  archive = tmp_path / filename
  if filename.endswith('.zip'):
    with zipfile.ZipFile(archive, 'w') as opened:
      opened.writestr('train/a/0.jpg', b'')
  else:
    with tarfile.open(archive, 'w:gz' if filename.endswith('.gz') else 'w') as opened:
      opened.addfile(tarfile.TarInfo('train/a/0.jpg'), io.BytesIO(b''))
  message = _build_error(_folder(archive))
  assert message.startswith(f"config.data.dir='{archive}' is an archive file, not a directory; extract it first "
                            f'(e.g. into {tmp_path}/imagenet) and set config.data.dir to the extracted directory '
                            'that holds train/ and val/')


@pytest.mark.parametrize('name,expected', [('cifar10', _CIFAR_EXPECTED), ('imagefolder', _FOLDER_EXPECTED)])
def test_a_plain_file_as_data_dir_is_named_a_file(tmp_path, name, expected):
  path = tmp_path / 'notes.txt'
  path.write_text('not data')
  config = _folder(path) if name == 'imagefolder' else {'name': name, 'dir': str(path)}
  assert _build_error(config) == f"config.data.dir='{path}' is a file, not a directory; set it to {expected}" + (
      ' (data_batch_1..5, test_batch) of cifar-10-python.tar.gz.' if name == 'cifar10' else
      ', each with one folder of images per class.')


def test_a_tilde_data_dir_is_expanded(tmp_path, monkeypatch):
  # A quoted '--config.data.dir=~/data' reaches the program unexpanded: it had "does not exist".
  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'cifar-10-batches-py').mkdir()
  _make_cifar(tmp_path / 'cifar-10-batches-py')
  assert data.build({'name': 'cifar10', 'dir': '~/cifar-10-batches-py'}, 'test', batch_size=4, seed=0).num_examples == 5
  _image_tree(tmp_path / 'images')
  assert data.build(_folder('~/images'), 'train', batch_size=4, seed=0).num_examples == 8
  # A missing one is named as expanded, so the user sees which home was meant.
  assert _build_error({'name': 'cifar10', 'dir': '~/nowhere'}).startswith(
      f"config.data.dir='{tmp_path}/nowhere' does not exist; set it to {_CIFAR_EXPECTED}")


def test_the_directory_above_cifar_10_batches_py_names_the_one_to_pass(tmp_path):
  (tmp_path / 'cifar-10-batches-py').mkdir()
  _make_cifar(tmp_path / 'cifar-10-batches-py')
  for split in ('train', 'test'):
    assert _build_error({'name': 'cifar10', 'dir': str(tmp_path)}, split) == (
        f"config.data.dir='{tmp_path}' holds cifar-10-batches-py/ but no CIFAR-10 batch files; "
        f'set config.data.dir to {tmp_path}/cifar-10-batches-py.')


def test_a_file_of_zeros_is_a_file_not_an_archive(tmp_path):
  # tarfile.is_tarfile says yes to 512 zero bytes; such a file is no archive to extract.
  path = tmp_path / 'blank.img'
  path.write_bytes(bytes(4096))
  assert _build_error({'name': 'cifar10', 'dir': str(path)}).startswith(
      f"config.data.dir='{path}' is a file, not a directory; set it to {_CIFAR_EXPECTED}")


def test_special_files_are_named_by_kind(tmp_path):
  # Each would hang or mislead a read: a data file that is one is refused by this name.
  os.mkfifo(tmp_path / 'fifo')
  with socket.socket(socket.AF_UNIX) as unix:
    unix.bind(str(tmp_path / 'socket'))
    (tmp_path / 'null').symlink_to('/dev/null')  # a link to a device is the device
    (tmp_path / 'image.jpg').write_bytes(b'\xff\xd8')
    assert [data_dir.special_file_kind(str(tmp_path / name)) for name in ('fifo', 'socket', 'null', 'image.jpg')] == [
        'a named pipe (FIFO)', 'a socket', 'a character device', None]
  assert data_dir.special_file_kind(str(tmp_path)) == 'a directory'
  assert data_dir.special_file_kind(str(tmp_path / 'missing')) is None
