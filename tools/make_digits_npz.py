"""Writes resnet_flax/data/digits.npz: scikit-learn's 1,797 8x8 digits as uint8 0..16 and labels.

scikit-learn is needed only here, not at run time. The archive is byte-reproducible
(fixed member timestamps), so re-running this script leaves git with nothing to commit.

  python tools/make_digits_npz.py [--out resnet_flax/data/digits.npz]
"""

import argparse
import io
import pathlib
import zipfile

import numpy as np
from sklearn.datasets import load_digits

_DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / 'resnet_flax' / 'data' / 'digits.npz'


def digits_arrays() -> dict[str, np.ndarray]:
  """scikit-learn's digits as {'images': uint8 (1797, 8, 8) in 0..16, 'labels': uint8 (1797,)}."""
  digits = load_digits()
  images = digits.images
  # The pixels are counts of set bits in 4x4 blocks of a 32x32 bitmap: integers 0..16.
  assert images.shape == (1797, 8, 8) and np.array_equal(images, np.round(images))
  assert images.min() == 0 and images.max() == 16
  assert set(np.unique(digits.target)) == set(range(10))
  return {'images': images.astype(np.uint8), 'labels': digits.target.astype(np.uint8)}


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Like np.savez_compressed, but with fixed timestamps so the bytes depend only on the arrays."""
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
    for name, array in sorted(arrays.items()):
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
      info = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      archive.writestr(info, buffer.getvalue())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=_DEFAULT_OUT)
  args = parser.parse_args()
  write_npz(args.out, digits_arrays())
  print(f'wrote {args.out} ({args.out.stat().st_size} bytes)')


if __name__ == '__main__':
  main()
