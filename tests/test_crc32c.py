"""crc32c (Castagnoli) against RFC 3720 vectors, and the fast path against the bytewise one."""

import numpy as np
import pytest

from resnet_flax.slim import crc32c


def test_crc32c_known_values():
  assert crc32c.crc32c(b'123456789') == 0xe3069283
  assert crc32c.crc32c(bytes(32)) == 0x8a9136aa  # RFC 3720 B.4 test vectors
  assert crc32c.crc32c(b'\xff' * 32) == 0x62a8ab43
  assert crc32c.crc32c(b'6789', crc32c.crc32c(b'12345')) == 0xe3069283
  for crc in (0, 1, 0xe3069283, 0xffffffff):
    assert crc32c.unmask_crc(crc32c.mask_crc(crc)) == crc


@pytest.mark.parametrize('n', [4, 1023, 1024, 1025, 4097, 100_003])
def test_crc32c_numpy_path_matches_bytewise(n):
  data = np.random.default_rng(n).bytes(n)
  assert crc32c._crc32c_numpy(data, 0) == crc32c._crc32c_python(data, 0)
  assert crc32c._crc32c_numpy(data, 0x12345678) == crc32c._crc32c_python(data, 0x12345678)
