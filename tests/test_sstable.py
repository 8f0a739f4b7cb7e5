"""Protobuf wire-format helpers used by the SSTable / TensorBundle code."""

import os

import pytest

from resnet_flax.slim import crc32c, sstable

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'tensor_bundle')


def test_protobuf_varints():
  for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
    assert sstable.decode_varint(sstable.encode_varint(value), 0) == (value, len(
        sstable.encode_varint(value)))
  assert sstable.to_signed64(sstable.decode_varint(sstable.encode_varint(-5), 0)[0]) == -5
  with pytest.raises(ValueError, match='truncated'):
    sstable.decode_varint(b'\x80\x80', 0)
  with pytest.raises(ValueError, match='wire type'):
    list(sstable.iter_fields(sstable.varint_field(2, 1), {2: sstable.WIRE_BYTES}))


# Guards against restart points after the first prefix-compressed; empty block
# without its restart point (`restarts or [0]` dropped: metaindex bytes differ from TF's);
# _short_successor wrong; footer handles swapped. The reader reads its own writer, so
# only TF's own bytes pin the writer (dtypes has 26 entries: 2 restart points).
@pytest.mark.parametrize('fixture,prefix', [('dtypes', 'model.ckpt'), ('saver', 'model.ckpt-3'),
                                            ('sharded', 'model.ckpt'), ('tf2_object', 'model.ckpt')])
def test_table_rebuilt_from_a_tf_index_is_byte_identical(fixture, prefix):
  with open(os.path.join(FIXTURES, fixture, prefix + '.index'), 'rb') as f:
    tf_bytes = f.read()
  assert sstable.build_table(sstable.read_table(tf_bytes, fixture)) == tf_bytes


# Guards against _shortest_separator falling back to `limit`, (_short_successor
# appending instead of bumping). Values by hand from LevelDB's BytewiseComparatorImpl.
def test_index_keys_follow_leveldb_bytewise_comparator():
  assert sstable._shortest_separator(b'abc1xyz', b'abc3') == b'abc2'
  assert sstable._shortest_separator(b'abc', b'abd') == b'abc'  # c + 1 == d: no room
  assert sstable._shortest_separator(b'ab', b'abc') == b'ab'  # a prefix: unchanged
  assert sstable._short_successor(b'abc') == b'b'
  assert sstable._short_successor(b'\xff\xffab') == b'\xff\xffb'
  assert sstable._short_successor(b'\xff\xff') == b'\xff\xff'


def _index_block(table):
  footer = table[-sstable.FOOTER_SIZE:]
  _, pos = sstable._decode_handle(footer, 0)
  (offset, size), _ = sstable._decode_handle(footer, pos)
  return table[offset:offset + size]


# Guards against `estimate + 4 >= block_size` -> `estimate >= block_size` and a
# (index block restart interval other than 1). LevelDB flushes when BlockBuilder's
# CurrentSizeEstimate (buffer + 4 per restart + 4) reaches block_size: entry ('a', 20 bytes) is
# 3 varint bytes + 1 + 20 = 24, so 24 + 4 + 4 = 32.
def test_blocks_are_cut_at_leveldbs_size_estimate_and_index_restarts_every_entry():
  entries = [(k, b'x' * 20) for k in (b'a', b'b', b'c')]
  index = _index_block(sstable.build_table(entries, block_size=32))
  assert len(list(sstable._iter_block(index, 'i'))) == 3
  assert int.from_bytes(index[-4:], 'little') == 3  # one restart point per index entry
  index = _index_block(sstable.build_table(entries, block_size=33))
  assert len(list(sstable._iter_block(index, 'i'))) == 2  # a+b: 24 + 24 + 8 = 56 >= 33; c alone
  assert sstable.read_table(sstable.build_table(entries, block_size=32), 't') == entries


# Guards against accepting a crc over the block contents without the type byte
# (LevelDB's trailer crc covers contents + compression byte).
def test_block_checksum_must_cover_the_compression_byte():
  table = bytearray(sstable.build_table([(b'k', b'v')]))
  (offset, size), _ = sstable._decode_handle(sstable._iter_block(_index_block(table), 'i').__next__()[1], 0)
  contents = bytes(table[offset:offset + size])
  table[offset + size + 1:offset + size + 5] = crc32c.mask_crc(crc32c.crc32c(contents)).to_bytes(4, 'little')
  with pytest.raises(ValueError, match='^t: data block at byte 0 fails its checksum'):
    sstable.read_table(bytes(table), 't')


# Guards against index value with bytes after its block handle accepted.
def test_index_handle_with_trailing_bytes_is_corrupt():
  block = sstable.encode_block([(b'k', b'v')], 16)
  meta = sstable.encode_block([], 16)
  table = block + sstable.block_trailer(block)
  meta_handle = sstable.encode_varint(len(table)) + sstable.encode_varint(len(meta))
  table += meta + sstable.block_trailer(meta)
  handle = sstable.encode_varint(0) + sstable.encode_varint(len(block)) + b'\x00'
  index = sstable.encode_block([(b'l', handle)], 1)
  index_handle = sstable.encode_varint(len(table)) + sstable.encode_varint(len(index))
  table += index + sstable.block_trailer(index)
  table += (meta_handle + index_handle).ljust(40, b'\0') + sstable.TABLE_MAGIC.to_bytes(8, 'little')
  with pytest.raises(ValueError, match=r'^t: corrupted index block \(bad block handle\)'):
    sstable.read_table(table, 't')


# Guards against an entry sharing more bytes than the previous key has, accepted.
def test_entry_sharing_more_than_the_previous_key_is_corrupt():
  block = (sstable.encode_varint(3) + sstable.encode_varint(1) + sstable.encode_varint(0) + b'k'
           + (0).to_bytes(4, 'little') + (1).to_bytes(4, 'little'))
  with pytest.raises(ValueError, match='^t: corrupted block'):
    list(sstable._iter_block(block, 't'))


# Guards against (length check against 8 instead of the 48-byte footer: the message
# then blames the magic number instead of saying the file is too short).
def test_file_shorter_than_a_footer_says_so():
  with pytest.raises(ValueError, match='^f: only 20 bytes, too short'):
    sstable.read_table(bytes(20), 'f')


# Guards against `>= 1 << 63` -> `> 1 << 63`: two's complement by hand.
def test_to_signed64_boundaries():
  assert sstable.to_signed64(2**63 - 1) == 2**63 - 1
  assert sstable.to_signed64(2**63) == -2**63
  assert sstable.to_signed64(2**64 - 1) == -1
