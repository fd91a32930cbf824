"""Peak RSS measurement: the peak of a phase, after a reset."""

import mmap

import numpy as np

from lorafleet.export.runtime.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

MIB = 1 << 20


def _touched(nbytes: int) -> mmap.mmap:
    """Fresh anonymous pages, all written: resident whatever the process's allocator keeps cached."""
    block = mmap.mmap(-1, nbytes)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    return block


def test_peak_rss_sees_an_allocation_and_resets():
    start = current_rss_bytes()
    block = _touched(64 * MIB)
    assert peak_rss_bytes() >= start + 60 * MIB
    block.close()  # unmapped: the pages leave the RSS, the peak stays
    before = peak_rss_bytes()
    assert before >= current_rss_bytes() + 60 * MIB
    if reset_peak_rss():
        after = peak_rss_bytes()
        assert after < before - 32 * MIB and after <= current_rss_bytes() + 8 * MIB  # the peak is now the RSS
        block = _touched(32 * MIB)
        assert peak_rss_bytes() >= after + 30 * MIB
        block.close()
