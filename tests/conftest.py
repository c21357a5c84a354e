"""Shared pytest set-up.

Builders of test inputs live in :mod:`tests.factories`; the independent AC-Norm formula (an
oracle) in ``tests/reference_acnorm.py``. Every test starts from the same random state, so that a
test that draws from the global generators without its own seed still draws the same numbers in
every run, alone or in any order (tests that need particular numbers seed their own generator).
"""
import random

import numpy as np
import pytest
import torch

#: the global seed every test starts from
TEST_SEED = 0


@pytest.fixture(autouse=True)
def fixed_global_seed():
    """Seed Python's, NumPy's and torch's global generators (CPU and CUDA) before each test."""
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)
    yield
