"""Token and slot arguments: every accepted container gives the same int32/int64 buffer, without a
copy when the input already is one, and the engine answers the same whatever the container."""

from __future__ import annotations

import array
import ctypes

import numpy
import pytest
import torch

from lmcache_native import SlotBuffer, TokenBuffer, as_int32_buffer, as_int64_buffer

VALUES = [5, 0, 2**31 - 1, -2**31, 7, 123456]
INTERLEAVED = [value for pair in zip(VALUES, [99] * len(VALUES)) for value in pair]  # [::2] gives VALUES


def read_back(buffer, c_type):
    return list((c_type * buffer.length).from_address(buffer.address)) if buffer.length else []


@pytest.mark.parametrize("make", [
    lambda: list(VALUES),
    lambda: tuple(VALUES),
    lambda: array.array("i", VALUES),
    lambda: array.array("q", VALUES),
    lambda: numpy.array(VALUES, dtype=numpy.int32),
    lambda: numpy.array(VALUES, dtype=numpy.int64),
    lambda: numpy.array(INTERLEAVED, dtype=numpy.int32)[::2],  # strided
    lambda: numpy.array(VALUES, dtype=">i4"),  # big-endian
    lambda: torch.tensor(VALUES, dtype=torch.int32),
    lambda: torch.tensor(VALUES, dtype=torch.int64),
    lambda: torch.tensor(INTERLEAVED, dtype=torch.int32)[::2],  # strided
], ids=["list", "tuple", "array_i", "array_q", "np_int32", "np_int64", "np_strided", "np_big_endian",
        "torch_int32", "torch_int64", "torch_strided"])
def test_int32_conversion(make):
    buffer = as_int32_buffer(make())
    assert isinstance(buffer, TokenBuffer)
    assert read_back(buffer, ctypes.c_int32) == VALUES


def test_no_copy_when_the_input_already_fits():
    source = numpy.array(VALUES, dtype=numpy.int32)
    assert as_int32_buffer(source).address == source.ctypes.data
    tensor = torch.tensor(VALUES, dtype=torch.int32)
    assert as_int32_buffer(tensor).address == tensor.data_ptr()
    arr = array.array("i", VALUES)
    assert as_int32_buffer(arr).address == arr.buffer_info()[0]
    slots = torch.tensor(VALUES, dtype=torch.int64)
    assert as_int64_buffer(slots).address == slots.data_ptr()
    buffer = as_int32_buffer(VALUES)
    assert as_int32_buffer(buffer) is buffer


def test_int64_conversion_keeps_minus_one():
    slots = [3, -1, 2**40, 0]
    for make in (list, lambda v: numpy.array(v), lambda v: torch.tensor(v), lambda v: array.array("q", v)):
        buffer = as_int64_buffer(make(slots))
        assert isinstance(buffer, SlotBuffer)
        assert read_back(buffer, ctypes.c_int64) == slots


def test_converted_buffer_owns_its_memory():
    buffer = as_int32_buffer(torch.arange(10, dtype=torch.int64))  # converted: the copy is the owner
    import gc

    gc.collect()
    assert read_back(buffer, ctypes.c_int32) == list(range(10))


def test_empty_and_invalid_inputs():
    assert as_int32_buffer([]).length == 0 and as_int32_buffer([]).address is None
    with pytest.raises(OverflowError):
        as_int32_buffer([2**31])
    with pytest.raises(ValueError):
        as_int32_buffer(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        as_int32_buffer(numpy.zeros((2, 3), dtype=numpy.int32))


def test_engine_gives_the_same_answer_for_every_container(make_rig):
    rig = make_rig()
    tokens = rig.tokens(64)
    rig.engine.store(tokens.tolist(), rig.slots(64).numpy())
    as_list = tokens.tolist()
    containers = [as_list, tuple(as_list), array.array("i", as_list), numpy.array(as_list, dtype=numpy.int64),
                  tokens, tokens.to(torch.int64), as_int32_buffer(as_list)]
    assert [rig.engine.lookup(container) for container in containers] == [64] * len(containers)
