"""Test-session settings.

The models under test are tiny: intra-op threads only add contention (8x slower steps
measured on a loaded 2-core machine), so the suite runs torch on one thread.
"""

import torch

torch.set_num_threads(1)
