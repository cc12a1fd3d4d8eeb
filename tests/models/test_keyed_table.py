"""``models.keyed_table``: keys resident as rows of one stacked tensor, stepped in place.

The resident step is checked against the slow exact reference (``stream_step``
per key, to float tolerance) and against ``keyed_step`` over per-key states
(byte for byte: the same passes, kernels and noise), through growth, row
reuse, eviction and reload, and rejection.
"""

from __future__ import annotations

import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.fprior import EXTRA_KEY, LR_SCALE_KEY, FunctionalPrior
from fogline.models.keyed import fleet_prior, keyed_step, new_key_state
from fogline.models.keyed_table import KeyTable, table_bytes_per_key
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.stream import stream_step
from fogline.models.svi import init_state

#: as tests/models/test_keyed.py (init_scale 0.03: see there)
CFG = ModelConfig(in_features=3, hidden=(8, 8), init_scale=0.03)


def _fleet(cfg: ModelConfig | None = None, *, fprior: bool = False) -> PosteriorState:
    st = init_state(cfg or CFG, seed=0, lr=5e-3)
    if fprior:
        fp = FunctionalPrior(weight=0.05, scale=1.5, lo=(-2.0,) * 3, hi=(2.0,) * 3)
        st = st.replace(extra={EXTRA_KEY: fp.to_dict(), LR_SCALE_KEY: 0.05})
    return fleet_prior(st)


def _batch(rows: int, seed: int, *, bernoulli: bool = False) -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=g)
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(rows, generator=g)
    return Minibatch(x, (y > 0).float() if bernoulli else y)


def _resident(table: KeyTable, states: dict[str, PosteriorState]) -> dict[str, int]:
    return {k: table.add(st) for k, st in states.items()}


CASES = [
    ({}, False),
    ({}, True),
    ({"guide": "lowrank", "rank": 3}, True),
    ({"likelihood": "student-t"}, True),
    ({"likelihood": "student-t", "df": 4.0, "activation": "tanh", "noise_head": "bounded"}, False),
    ({"likelihood": "bernoulli"}, True),
]
IDS = ["meanfield", "meanfield-fprior", "lowrank", "student-t-learned-df", "student-t", "bernoulli"]


@pytest.mark.parametrize(("cfg", "fprior"), CASES, ids=IDS)
@pytest.mark.parametrize("num_steps", [1, 3])
def test_resident_keys_step_as_each_key_alone_and_as_keyed_step(
    cfg: dict[str, object], fprior: bool, num_steps: int
) -> None:
    config = CFG.model_copy(update=cfg)
    fleet = _fleet(config, fprior=fprior)
    keys = [f"k{i}" for i in range(6)]
    states = {k: new_key_state(fleet, k) for k in keys}
    table = KeyTable(config, capacity=2)  # grows twice on the way
    rows = _resident(table, states)
    bern = config.likelihood == "bernoulli"
    for t in range(2):
        batches = {k: _batch(1 + 3 * i + t, 10 * t + i, bernoulli=bern) for i, k in enumerate(keys)}
        infos = table.step(
            [rows[k] for k in keys], [batches[k] for k in keys], num_steps=num_steps
        ).infos
        new, ref_infos = keyed_step(states, batches, num_steps=num_steps)
        for k, info in zip(keys, infos, strict=True):
            alone, alone_info = stream_step(states[k], batches[k], num_steps=num_steps)
            got = table.state(rows[k])
            assert not info.rejected and info.rows == batches[k].rows
            assert to_bytes(got) == to_bytes(new[k])  # same passes, kernels, noise
            assert info == ref_infos[k]
            for name, v in alone.params.items():  # the slow exact reference
                torch.testing.assert_close(got.params[name], v, rtol=1e-4, atol=1e-5)
            assert torch.equal(got.rng_state, alone.rng_state)
            assert got.step_count == alone.step_count == (t + 1) * num_steps
            assert info.nll == pytest.approx(alone_info.nll, rel=1e-4, abs=1e-5)
        states = new


def test_keys_of_different_pass_groups_share_one_table() -> None:
    """Keys with and without a functional prior, at other counts and rates: keyed_step's bits."""
    plain, fp = _fleet(), _fleet(fprior=True)
    old = stream_step(new_key_state(plain, "old"), _batch(6, 1), num_steps=7)[0].replace(lr=1e-3)
    states = {"old": old, "young": new_key_state(plain, "young"), "fp": new_key_state(fp, "fp")}
    table = KeyTable(CFG)
    rows = _resident(table, states)
    batches = {"old": _batch(4, 2), "young": _batch(9, 3), "fp": _batch(5, 4)}
    keys = sorted(batches)
    table.step([rows[k] for k in keys], [batches[k] for k in keys])
    want = keyed_step(states, batches)[0]
    for k in keys:
        assert to_bytes(table.state(rows[k])) == to_bytes(want[k])
    assert float(table.state(rows["old"]).opt_state["step"]) == 8.0


def test_the_table_grows_by_doubling_and_reuses_the_lowest_free_row() -> None:
    fleet = _fleet()
    table = KeyTable(CFG, capacity=1)
    states = {k: new_key_state(fleet, k) for k in "abcde"}
    rows = _resident(table, states)
    assert list(rows.values()) == [0, 1, 2, 3, 4] and table.capacity == 8 and len(table) == 5
    table.step([rows["b"]], [_batch(3, 0)])
    blob_b = to_bytes(table.state(rows["b"]))
    table.release(rows["d"])
    table.release(rows["a"])
    assert table.add(states["e"]) == 0 and table.add(states["d"]) == 3 and len(table) == 5
    for _ in range(8):  # growth copies the rows: b is unchanged
        table.add(fleet)
    assert table.capacity == 16 and to_bytes(table.state(rows["b"])) == blob_b
    assert table.row_bytes() == (3 * table.prog.total + 1) * 4
    assert table_bytes_per_key(table) >= table.row_bytes()
    with pytest.raises(ValueError, match="not in use"):
        table.release(table.capacity - 1)


def test_a_key_evicted_and_reloaded_continues_bit_for_bit() -> None:
    """Row -> state -> blob -> another row: the same bytes as stepping it all along."""
    fleet = _fleet(fprior=True)
    keys = ["a", "b", "c"]
    states = {k: new_key_state(fleet, k) for k in keys}
    stay, move = KeyTable(CFG), KeyTable(CFG)
    r_stay = _resident(stay, states)
    r_move = _resident(move, states)
    for t in range(4):
        batches = [_batch(2 + i + t, 7 * t + i) for i in range(3)]
        stay.step([r_stay[k] for k in keys], batches, num_steps=2)
        move.step([r_move[k] for k in keys], batches, num_steps=2)
        if t == 1:  # evict "b" to its blob, reuse its row for another key, reload it
            blob = to_bytes(move.state(r_move["b"]))
            move.release(r_move["b"])
            assert move.add(fleet) == r_move["b"]
            r_move["b"] = move.add(from_bytes(blob))
    for k in keys:
        assert to_bytes(move.state(r_move[k])) == to_bytes(stay.state(r_stay[k]))


@pytest.mark.parametrize("num_steps", [1, 3])
def test_a_non_finite_key_is_rejected_alone_and_keeps_its_row(num_steps: int) -> None:
    fleet = _fleet()
    table = KeyTable(CFG)
    states = {k: new_key_state(fleet, k) for k in "ab"}
    rows = _resident(table, states)
    table.step([rows["a"], rows["b"]], [_batch(4, 0), _batch(4, 1)])  # both stepped once
    before = to_bytes(table.state(rows["a"]))
    good = _batch(4, 2)
    bad = Minibatch(good.x, torch.full_like(good.y, float("nan")))
    want_b = stream_step(table.state(rows["b"]), good, num_steps=num_steps)[0]
    infos = table.step([rows["a"], rows["b"]], [bad, good], num_steps=num_steps).infos
    assert infos[0].rejected and not infos[1].rejected
    assert to_bytes(table.state(rows["a"])) == before  # params, moments, count, RNG
    got_b = table.state(rows["b"])
    torch.testing.assert_close(got_b.params["loc"], want_b.params["loc"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got_b.rng_state, want_b.rng_state)


def test_bad_input_is_a_clear_error() -> None:
    fleet = _fleet()
    table = KeyTable(CFG)
    row = table.add(fleet)
    empty = Minibatch(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="empty minibatch"):
        table.step([row], [empty])
    with pytest.raises(ValueError, match="differ in length"):
        table.step([row], [])
    with pytest.raises(ValueError, match="likelihood_weight"):
        table.step([row], [_batch(2, 0)], likelihood_weight=2.0)
    with pytest.raises(ValueError, match="not in use"):
        table.step([row + 1], [_batch(2, 0)])
    other = init_state(ModelConfig(in_features=2), seed=0)
    with pytest.raises(ValueError, match="another model"):
        table.add(other)


@pytest.mark.parametrize(("cfg", "fprior"), [CASES[1], CASES[2]], ids=[IDS[1], IDS[2]])
@pytest.mark.parametrize(("num_steps", "before"), [(1, 3), (3, 2), (1, 40)])
def test_a_rejected_key_rewinds_its_generator_and_continues_as_keyed_step(
    cfg: dict[str, object], fprior: bool, num_steps: int, before: int
) -> None:
    """Steps since the last read-out (past ``REPLAY_MAX`` too), then a rejection, then more."""
    config = CFG.model_copy(update=cfg)
    fleet = _fleet(config, fprior=fprior)
    states = {k: new_key_state(fleet, k) for k in "ab"}
    table = KeyTable(config)
    rows = _resident(table, states)
    for t in range(before + 2):
        batches = {"a": _batch(3 + t % 4, 2 * t), "b": _batch(2 + t % 3, 2 * t + 1)}
        if t == before:
            good = batches["a"]
            batches["a"] = Minibatch(good.x, torch.full_like(good.y, float("nan")))
        infos = table.step(
            [rows["a"], rows["b"]], [batches["a"], batches["b"]], num_steps=num_steps
        )
        states, ref = keyed_step(states, batches, num_steps=num_steps)
        assert infos.infos[0].rejected == ref["a"].rejected == (t == before)
    for k in "ab":
        assert to_bytes(table.state(rows[k])) == to_bytes(states[k])


def test_a_materialised_state_is_reused_while_held_and_rebuilt_after_a_step() -> None:
    fleet = _fleet()
    table = KeyTable(CFG)
    st = new_key_state(fleet, "a")
    row = table.add(st)
    assert table.state(row) is st  # the state written, until the key steps
    table.step([row], [_batch(3, 0)])
    one = table.state(row)
    assert table.state(row) is one and one.step_count == 1
    assert one.params["loc"].untyped_storage().data_ptr() != table.data.untyped_storage().data_ptr()
    blob = to_bytes(one)
    del one  # nothing holds it: the table keeps no second copy of the parameters
    assert to_bytes(table.state(row)) == blob
    table.step([row], [_batch(3, 1)])
    assert table.state(row).step_count == 2
