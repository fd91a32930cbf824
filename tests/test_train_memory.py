"""Peak RSS measurement: the peak of a phase, after a reset."""

import numpy as np

from edge_client.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss


def test_peak_rss_sees_an_allocation_and_resets():
    block = np.ones(64 << 17)  # 64 MiB of float64, touched
    del block
    before = peak_rss_bytes()
    assert before >= current_rss_bytes() and before > 64 << 20
    if reset_peak_rss():
        after = peak_rss_bytes()
        assert after < before
        block = np.ones(32 << 17)
        assert peak_rss_bytes() >= after + (30 << 20)
        del block
