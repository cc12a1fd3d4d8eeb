"""``frozen_replace``: the copy ``dataclasses.replace`` makes, without running ``__init__``."""

from __future__ import annotations

import dataclasses

import pytest

from fogline.drift.config import PolicyConfig
from fogline.drift.policy import init as policy_init
from fogline.models.config import ModelConfig
from fogline.models.state import PriorSpec, frozen_replace
from fogline.models.svi import init_state


def _fields(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


def test_the_same_copy_as_dataclasses_replace() -> None:
    state = init_state(ModelConfig(in_features=3, hidden=[4]), seed=1, lr=1e-2)
    changes = {"lr": 0.5, "step_count": 7, "extra": {"a": 1}}
    fast, slow = state.replace(**changes), dataclasses.replace(state, **changes)
    assert type(fast) is type(slow)
    assert _fields(fast).keys() == _fields(slow).keys()
    for name, value in _fields(slow).items():
        assert getattr(fast, name) is value, name  # the same objects, shallow as replace
    assert state.lr == 1e-2 and state.step_count == 0 and state.extra == {}  # original kept
    ps = policy_init(PolicyConfig())
    assert frozen_replace(ps, batch=3).batch == 3 and ps.batch == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.lr = 1.0  # type: ignore[misc]


def test_unknown_field_and_post_init_classes_refused() -> None:
    state = init_state(ModelConfig(in_features=3, hidden=[4]), seed=1, lr=1e-2)
    with pytest.raises(TypeError, match="no field"):
        state.replace(learning_rate=0.1)
    with pytest.raises(TypeError, match="not a plain dataclass"):
        frozen_replace(state.prior, loc=state.prior.loc)  # PriorSpec validates in __post_init__
    assert isinstance(state.prior, PriorSpec)
