"""Shared test setup: one torch thread (a busy second core makes model calls far slower),
float64 helpers and seeded generators."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded with 0."""
    return torch.Generator().manual_seed(0)
