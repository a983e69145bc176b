"""Host-to-device packing of a step's metadata: lists and int32 arrays (block tables) give the same
tensors, each section starts on a 16-byte boundary, and values past the type follow torch's rules."""

from array import array

import pytest
import torch

from kiln.runtime.sequence import block_table
from kiln.runtime.transfer import ALIGN_BYTES, host_tensor, sections_to_device

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.int32, torch.long])
def test_array_and_list_sections_pack_alike(dtype):
    lists = [[3, 1], list(range(7)), [], [9]]
    mixed = [lists[0], block_table(lists[1]), block_table(), lists[3]]
    got, want = sections_to_device(mixed, CPU, dtype), sections_to_device(lists, CPU, dtype)
    per = ALIGN_BYTES // torch.tensor([], dtype=dtype).element_size()
    for g, w, values in zip(got, want, lists):
        assert g.dtype == dtype and g.tolist() == w.tolist() == values
        assert g.storage_offset() % per == 0  # each section aligned, whatever came before


def test_host_tensor_copies_an_array():
    ids = block_table([4, 5, 6])
    t = host_tensor(ids, torch.int32)
    ids[0] = 99  # the sequence's table changes later: the step's tensor does not
    assert t.tolist() == [4, 5, 6] and host_tensor(array("i"), torch.int32).numel() == 0


def test_values_past_the_type_follow_torch():
    with pytest.raises(RuntimeError, match="overflow"):
        sections_to_device([[1, 2**40]], CPU, torch.int32)
    assert sections_to_device([[1, 2**40]], CPU, torch.long)[0].tolist() == [1, 2**40]
