"""The drift loop's ensemble pass against the model's own predictive (the slow exact code)."""

from __future__ import annotations

import pytest
import torch

from fogline.drift import ensemble_pass
from fogline.drift.ensemble_pass import Workspace, chunk_size, component_params, raw_outputs
from fogline.models import predictive
from fogline.models.config import ModelConfig
from fogline.models.predictive import Ensemble, sample_ensemble
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state

CONFIGS = [
    {},
    {"hidden": (16,)},
    {"hidden": ()},
    {"hidden": (8, 8, 8), "activation": "tanh"},
    {"hidden": (12, 6), "activation": "silu"},
    {"hidden": (8, 8), "activation": "gelu"},
    {"likelihood": "bernoulli"},
    {"likelihood": "student-t", "df": 4.0},
    {"noise_head": "exp"},
    {"guide": "lowrank", "rank": 3},
]


def _ensemble(cfg: dict[str, object], samples: int = 24, seed: int = 3) -> Ensemble:
    state = init_state(ModelConfig.model_validate(cfg), seed=seed, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    loc = 0.5 * torch.randn(state.params["loc"].shape, generator=gen)
    scale = torch.full_like(loc, -2.0)  # softplus(-2) ~ 0.13: members that differ
    return sample_ensemble(
        state.replace(params={**state.params, "loc": loc, "scale_unconstrained": scale}),
        samples,
        seed,
    )


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_the_models_component_params(cfg: dict[str, object]) -> None:
    ens = _ensemble(cfg)
    x = torch.randn(37, ens.config.in_features)
    want = predictive.component_params(ens, x)
    got = component_params(ens, x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_warm_model_too(warm_state: PosteriorState) -> None:
    ens = sample_ensemble(warm_state, 64, 0)
    x = torch.randn(256, 8)
    for g, w in zip(component_params(ens, x), predictive.component_params(ens, x), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_chunking_changes_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    ens = _ensemble({"hidden": (16, 8)}, samples=20)
    x = torch.randn(50, 8)
    whole = raw_outputs(ens, x, Workspace())
    for elements in (1, 16 * 50 * 3, 16 * 50 * 7):
        monkeypatch.setattr(ensemble_pass, "CHUNK_ELEMENTS", elements)
        step = chunk_size(ens, 50)
        assert 1 <= step < 20
        assert torch.equal(raw_outputs(ens, x, Workspace()), whole), step


def test_chunk_size_depends_on_the_shapes_only() -> None:
    ens = _ensemble({}, samples=64)  # hidden (32, 32)
    assert chunk_size(ens, 256) == ensemble_pass.CHUNK_ELEMENTS // (32 * 256)
    assert chunk_size(ens, 1) == 64  # never more than S
    assert chunk_size(ens, 10**9) == 1  # never less than one sample
    assert chunk_size(ens, 0) == 64


def test_a_reused_workspace_gives_the_bits_of_a_fresh_one_and_never_aliases() -> None:
    ens = _ensemble({})
    ws = Workspace()
    xs = [torch.randn(n, 8) for n in (64, 256, 3, 256, 64)]
    first = [component_params(ens, x, ws) for x in xs]
    held = ws.nbytes
    again = [component_params(ens, x, ws) for x in xs]
    assert ws.nbytes == held  # no growth once the largest pass has run
    for x, a, b in zip(xs, first, again, strict=True):
        fresh = component_params(ens, x, Workspace())
        for t_first, t_again, t_fresh in zip(a, b, fresh, strict=True):
            # earlier results survived later passes: they do not share the scratch memory
            assert torch.equal(t_first, t_fresh) and torch.equal(t_again, t_fresh)


def test_any_slice_of_a_decoded_poll_gives_the_same_bits() -> None:
    ens = _ensemble({})
    poll = torch.randn(300, 8)
    for start in (0, 1, 7, 44):
        rows = poll[start : start + 256]
        assert torch.equal(raw_outputs(ens, rows), raw_outputs(ens, rows.clone()))


def test_empty_batch_and_bad_input() -> None:
    ens = _ensemble({})
    mu, sigma = component_params(ens, torch.zeros(0, 8))
    assert mu.shape == sigma.shape == (24, 0)
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        component_params(ens, torch.zeros(24, 5, 8))
    with pytest.raises(ValueError, match="x has 5 features, the ensemble expects 8"):
        component_params(ens, torch.zeros(5, 5))


def test_threads_get_their_own_workspace() -> None:
    import threading

    seen: list[Workspace] = []
    t = threading.Thread(target=lambda: seen.append(ensemble_pass.default_workspace()))
    t.start()
    t.join()
    assert seen and seen[0] is not ensemble_pass.default_workspace()
