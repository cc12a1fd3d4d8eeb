"""The functional prior's out-of-data region: robust quantile edges on every feature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fogline.models.fprior import GAP, MARGIN, TAIL, FunctionalPrior, robust_support


def _heavy(n: int = 4000) -> torch.Tensor:
    """[n, 3]: a normal column, a Pareto-tailed one (AveOccup-like), a mostly-zero one."""
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(n, generator=g, dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    pareto = (1 - u).pow(-1 / 1.2)  # tail index 1.2: max >> 99.5th percentile
    sparse = torch.zeros(n, dtype=torch.float64)
    sparse[:40] = 1.0  # 1 % ones: IQR 0, 0.5 % / 99.5 % quantiles 0 and 1
    return torch.stack((normal, (pareto - pareto.mean()) / pareto.std(), sparse), 1)


def test_robust_support_is_numpys_quantiles_with_an_iqr_fallback() -> None:
    x = torch.cat((_heavy(), torch.full((4000, 1), 2.5, dtype=torch.float64)), 1)
    sup = robust_support(x)
    q = np.quantile(x.numpy(), [TAIL, 0.25, 0.5, 0.75, 1 - TAIL], axis=0)
    np.testing.assert_allclose(sup.q_lo.numpy(), q[0], atol=1e-12)
    np.testing.assert_allclose(sup.q_hi.numpy(), q[4], atol=1e-12)
    np.testing.assert_allclose(sup.median.numpy(), q[2], atol=1e-12)
    np.testing.assert_allclose(sup.spread[:2].numpy(), (q[3] - q[1])[:2], atol=1e-12)
    assert float(sup.spread[2]) == pytest.approx(1.0)  # IQR 0 -> 99.5 % - 0.5 % quantile
    assert float(sup.spread[3]) == 1.0  # constant column -> 1


def test_robust_support_rejects_bad_rows() -> None:
    x = torch.randn(10, 3)
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match="row 7, column 2"):
        robust_support(x)
    with pytest.raises(ValueError, match="N >= 2"):
        robust_support(torch.randn(1, 3))
    with pytest.raises(ValueError, match="tail"):
        robust_support(torch.randn(10, 3), tail=0.3)


def test_edges_come_from_quantiles_not_the_extremes() -> None:
    x = _heavy()
    fp = FunctionalPrior.from_data(x, weight=0.05, scale=1.0)
    sup = robust_support(x)
    assert fp.features is None and fp.active_features == (0, 1, 2)
    assert fp.margin == MARGIN
    for j in range(3):
        assert fp.lo[j] == pytest.approx(float(sup.q_lo[j] - GAP * sup.spread[j]))
        assert fp.hi[j] == pytest.approx(float(sup.q_hi[j] + GAP * sup.spread[j]))
        assert fp.spread is not None and fp.spread[j] == pytest.approx(float(sup.spread[j]))
    # the heavy tail: the region starts far below the maximum (min/max would start beyond it)
    assert fp.hi[1] < 0.25 * float(x[:, 1].max())
    # a light tail: the region reaches well beyond the data on both sides
    assert fp.spread is not None
    assert fp.lo[0] - fp.margin * fp.spread[0] < float(x[:, 0].min()) - 1.0
    assert fp.hi[0] + fp.margin * fp.spread[0] > float(x[:, 0].max()) + 1.0


def test_ood_inputs_cover_every_feature_on_both_sides() -> None:
    x = _heavy().float()
    fp = FunctionalPrior.from_data(x, weight=0.05, scale=1.0)
    assert fp.spread is not None
    xt = fp.ood_inputs(x, torch.Generator().manual_seed(1))
    moved = xt != x
    assert torch.all(moved.sum(1) == 1)
    for f in range(3):
        v = xt[moved[:, f], f]
        lo, hi, s = fp.lo[f], fp.hi[f], fp.spread[f]
        below, above = v <= lo, v >= hi
        assert below.any() and above.any()  # both sides
        assert torch.all(below | above)
        assert torch.all(v >= lo - MARGIN * s - 1e-5) and torch.all(v <= hi + MARGIN * s + 1e-5)
    with pytest.raises(ValueError, match="covers 3 features, rows have 2"):
        fp.ood_inputs(x[:, :2], torch.Generator())


def test_a_chosen_feature_list_moves_only_those() -> None:
    x = _heavy().float()
    fp = FunctionalPrior.from_data(x, weight=0.05, scale=1.0, features=(1,), margin=2.0, gap=0.0)
    xt = fp.ood_inputs(x, torch.Generator().manual_seed(0))
    assert torch.equal(xt[:, [0, 2]], x[:, [0, 2]])
    assert fp.hi[1] == pytest.approx(float(robust_support(x).q_hi[1]))
    with pytest.raises(ValueError, match="indices in"):
        FunctionalPrior.from_data(x, weight=0.05, scale=1.0, features=(3,))


def test_round_trip_and_old_dicts_keep_their_region() -> None:
    fp = FunctionalPrior.from_data(_heavy(), weight=0.05, scale=1.5)
    assert FunctionalPrior.from_dict(fp.to_dict()) == fp
    # a dict written before the robust rule: min/max edges, x0 only, absolute margin 3
    old = {
        "weight": 0.05,
        "scale": 1.6,
        "lo": [-1.77, -2.0],
        "hi": [2.0, 2.0],
        "features": [0],
        "loc": 0.0,
        "margin": 3.0,
        "samples": 8,
    }
    fp_old = FunctionalPrior.from_dict(old)
    assert fp_old.spread is None and fp_old.active_features == (0,) and fp_old.margin == 3.0
    x = torch.rand(400, 2) * 2 - 1
    xt = fp_old.ood_inputs(x, torch.Generator().manual_seed(3))
    # the same draws as the rule of those states: j, U(0, margin), side
    g = torch.Generator().manual_seed(3)
    torch.randint(1, (400,), generator=g)
    dist = torch.rand(400, generator=g) * 3.0
    left = torch.rand(400, generator=g) < 0.5
    expected = torch.where(left, -1.77 - dist, 2.0 + dist)
    assert torch.equal(xt[:, 0], expected) and torch.equal(xt[:, 1], x[:, 1])
    legacy = {k: v for k, v in old.items() if k not in ("features", "margin")}
    assert FunctionalPrior.from_dict(legacy).active_features == (0,)
    assert FunctionalPrior.from_dict(legacy).margin == 3.0


def test_bad_descriptions_are_refused() -> None:
    with pytest.raises(ValueError, match="one value per feature"):
        FunctionalPrior(weight=0.1, scale=1.0, lo=(0.0, 0.0), hi=(1.0,))
    with pytest.raises(ValueError, match="one value per feature"):
        FunctionalPrior(weight=0.1, scale=1.0, lo=(0.0,), hi=(1.0,), spread=(1.0, 1.0))
    with pytest.raises(ValueError, match="spread must be > 0"):
        FunctionalPrior(weight=0.1, scale=1.0, lo=(0.0,), hi=(1.0,), spread=(0.0,))
    with pytest.raises(ValueError, match="gap"):
        FunctionalPrior.from_data(torch.randn(10, 2), weight=0.1, scale=1.0, gap=-1.0)
