"""error_lines: the one line an error is shown as, and which errors are running out of memory."""

import pytest

from resnet_flax import error_lines


class _Listing(ValueError):
  summary = '3 of 10 images could not be read; see the log'


def test_the_first_line_is_a_summary_else_the_message_else_the_type():
  listing = _Listing('a.jpg: truncated\nb.jpg: empty')
  assert error_lines.first_line(listing) == '3 of 10 images could not be read; see the log'
  assert error_lines.first_line(ValueError('\n  first\nsecond')) == 'first'
  assert error_lines.first_line(KeyError()) == 'KeyError'


def _raised_from(cause: BaseException) -> Exception:
  try:
    try:
      raise cause
    except BaseException as inner:  # pylint: disable=broad-except
      raise Exception('Encountered error while reading array index 3') from inner
  except Exception as outer:  # pylint: disable=broad-except
    return outer


@pytest.mark.parametrize('error, memory', [
    (MemoryError('Unable to allocate 112. GiB for an array with shape (4, 100000, 100000, 3)'), 'host'),
    (RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 7406166528 bytes.\nBufferAssignment '
                  'OOM Debugging.'), 'device'),  # GPU
    (RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 2305843009213693952 bytes.'), 'device'),  # CPU
    # XLA:CPU running a jitted evaluation step whose buffers do not fit (it had been a traceback).
    (RuntimeError('INTERNAL: Error dispatching computation: Error dispatching computation: %s: Out of memory '
                  'allocating 111151110784 bytes.'), 'device'),
    (RuntimeError('RESOURCE_EXHAUSTED: Failed to allocate request for 1.50GiB (1610612736B) on device ordinal 0'),
     'device'),
    (RuntimeError('RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 8.00G. That was not '
                  'possible. There are 2.50G free.'), 'device'),  # TPU
    (RuntimeError('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm.'),
     'device'),
    (_raised_from(MemoryError()), 'host'),
    (_raised_from(RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.00GiB.')), 'device'),
    # A full disk is tensorstore's RESOURCE_EXHAUSTED too: not memory.
    (ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/ckpt/4/d/0\": [OS error 28: No space left on "
                "device] [os_error_code='28']"), None),
    (ValueError('OUT_OF_RANGE: Error reading "params/w"'), None),
    (ValueError('DATA_LOSS: "Out of memory.jpg" is truncated'), None),  # the words alone are no XLA error
    (_raised_from(ValueError('DATA_LOSS: checksum mismatch')), None),
])
def test_out_of_memory_is_told_apart_from_other_errors(error, memory):
  found = error_lines.out_of_memory(error)
  if memory is None:
    assert found is None
    return
  # The error that says so, not a wrapper naming an array index.
  assert found is (error.__cause__ if error.__cause__ is not None else error)
  assert isinstance(found, MemoryError) == (memory == 'host')


def test_an_error_raised_from_none_while_handling_one_out_of_memory_is_not_out_of_memory():
  try:
    try:
      raise MemoryError('Unable to allocate 1 GiB')
    except MemoryError:
      raise KeyError('a bug in the handler') from None
  except KeyError as error:
    assert error_lines.out_of_memory(error) is None


def test_an_error_whose_message_cannot_be_shown_is_no_memory_error():
  class Unprintable(Exception):
    def __str__(self):
      raise RuntimeError('no')

  assert error_lines.out_of_memory(Unprintable()) is None
  cycle = ValueError('a')
  cycle.__context__ = ValueError('b')
  cycle.__context__.__context__ = cycle
  assert error_lines.out_of_memory(cycle) is None


def test_running_out_of_memory_while_another_error_is_handled_is_found_too():
  # An error raised in an `except` block without `from` (a cleanup that failed after the OOM)
  # keeps the OOM only as its __context__.
  try:
    try:
      raise MemoryError('Unable to allocate 112. GiB')
    except MemoryError:
      raise RuntimeError('cleanup after the failed allocation failed too')  # pylint: disable=raise-missing-from
  except RuntimeError as error:
    assert error.__cause__ is None
    assert isinstance(error_lines.out_of_memory(error), MemoryError)
