"""Test-session settings.

The models under test are tiny: intra-op threads only add contention (8x slower steps
measured on a loaded 2-core machine), so the suite runs torch on one thread.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Default dtype float64 for one test (exact-trajectory comparisons)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
