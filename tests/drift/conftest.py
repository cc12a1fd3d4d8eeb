"""Shared fixtures of the drift tests: seeded, one thread, a small warm-started model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.state import PosteriorState
from fogline.models.svi import fit, init_state
from fogline.replay_data.generator import generate


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def warm_state() -> PosteriorState:
    """A (16, 16) BNN warm-started on 4,096 regime-0 records (~600 steps)."""
    torch.set_num_threads(1)
    s = generate("stable", seed=1000, n_batches=16, batch_size=256)
    config = ModelConfig.model_validate({"in_features": 8, "hidden": (16, 16)})
    state = init_state(config, seed=0, lr=1e-2)
    return fit(state, torch.from_numpy(s.x), torch.from_numpy(s.y), epochs=40, batch_size=256).state
