"""Shared pytest setup: deterministic, single-threaded-friendly CPU runs."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
