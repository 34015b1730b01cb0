"""Freed heap pages go back to the system (glibc), so a long run-missing process does not ratchet up."""
import pytest
import torch

from cfsam.core import memory

MB = 1 << 20


@pytest.mark.skipif(memory._LIBC is None or memory.resident_bytes() is None, reason="needs glibc and /proc")
def test_release_hands_freed_heap_pages_back():
    # freeing a 30 MB mmapped block raises glibc's mmap threshold to 30 MB: the 8 MB tensors below then
    # come from the heap, and the last one pins its top, so free() alone returns none of the others
    block = torch.ones(30 * MB, dtype=torch.uint8)
    del block
    tensors = [torch.ones(8 * MB, dtype=torch.uint8) for _ in range(40)]
    pin = tensors.pop()
    before = memory.resident_bytes()
    del tensors
    freed_only = memory.resident_bytes()
    memory.release()
    after = memory.resident_bytes()
    assert before - freed_only < 100 * MB  # free() kept the pages: the ratchet
    assert freed_only - after > 200 * MB   # release() handed them back
    assert int(pin[0]) == 1
