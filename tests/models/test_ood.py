"""Per-feature epistemic ratios at probes outside the training support (models/ood.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fogline.models.config import ModelConfig
from fogline.models.ood import PROBE_IQRS, epistemic_ratios, probes
from fogline.models.predictive import Ensemble

#: Orthogonal +-1 patterns over S = 4 samples, one per feature: mean 0, mean square 1.
_PATTERNS = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])


def _linear_ensemble(c: tuple[float, float, float], bias: float = 0.3) -> Ensemble:
    """A linear 'net' mu_s(x) = sum_j c_j e_sj x_j + bias, so sd_e(x) = sqrt(sum_j c_j^2 x_j^2)."""
    cfg = ModelConfig(in_features=3, hidden=(), feature_names=("a", "b", "c"))
    w = torch.zeros(4, 2, 3)
    w[:, 0, :] = _PATTERNS * torch.tensor(c)
    b = torch.zeros(4, 2)
    b[:, 0] = bias
    return Ensemble(cfg, ((w, b),))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 3, generator=g)
    x[:, 2] = torch.exp(x[:, 2])  # skewed: the two sides differ
    return x, x[:500]


def test_probes_are_the_tail_quantiles_pushed_out_by_iqrs() -> None:
    x, _ = _data()
    xp, pos = probes(x)
    q = np.quantile(x.double().numpy(), [0.005, 0.25, 0.5, 0.75, 0.995], axis=0)
    iqr = q[3] - q[1]
    assert xp.shape == (3 * 2 * len(PROBE_IQRS), 3)
    rows = xp.reshape(3, 2, len(PROBE_IQRS), 3)
    for j in range(3):
        for i, k in enumerate(PROBE_IQRS):
            assert float(pos[j, 0, i]) == pytest.approx(q[0, j] - k * iqr[j], abs=1e-6)
            assert float(pos[j, 1, i]) == pytest.approx(q[4, j] + k * iqr[j], abs=1e-6)
            for side in range(2):
                others = [o for o in range(3) if o != j]
                np.testing.assert_allclose(rows[j, side, i, others].numpy(), q[2, others], 1e-6)
                assert float(rows[j, side, i, j]) == pytest.approx(float(pos[j, side, i]))


def test_ratios_against_the_closed_form_of_a_linear_ensemble() -> None:
    c = (0.5, 2.0, 0.0)  # feature c carries no epistemic uncertainty of its own
    ens = _linear_ensemble(c)
    x, x_in = _data()
    rep = epistemic_ratios(ens, x, x_in, ("a", "b", "c"))
    cc = np.array(c) ** 2
    sd_in = float(np.sqrt((x_in.double().numpy() ** 2 * cc).sum(1)).mean())
    assert rep.epistemic_in == pytest.approx(sd_in, rel=1e-5)
    q = np.quantile(x.double().numpy(), [0.005, 0.25, 0.5, 0.75, 0.995], axis=0)
    iqr, med = q[3] - q[1], q[2]
    for j, name in enumerate("abc"):
        for k in PROBE_IQRS:
            sds = []
            for edge in (q[0, j] - k * iqr[j], q[4, j] + k * iqr[j]):
                point = med.copy()
                point[j] = edge
                sds.append(float(np.sqrt((point**2 * cc).sum())))
            f = rep.features[j]
            assert f.sd["lo"][k] == pytest.approx(sds[0], rel=1e-5)
            assert f.sd["hi"][k] == pytest.approx(sds[1], rel=1e-5)
            assert f.ratio[k] == pytest.approx(min(sds) / sd_in, rel=1e-5)
        assert rep.epistemic_ratio[name] == rep.features[j].ratio[4.0]
    # the confident feature is the minimum, well below the uncertain ones
    assert rep.epistemic_ratio_min == rep.epistemic_ratio["c"]
    assert rep.epistemic_ratio["c"] < 0.5 * rep.epistemic_ratio["a"]
    assert rep.epistemic_ratio_2iqr["b"] < rep.epistemic_ratio["b"]


def test_report_json_and_table() -> None:
    x, x_in = _data()
    rep = epistemic_ratios(_linear_ensemble((1.0, 1.0, 1.0)), x, x_in, ("a", "b", "c"))
    doc = json.loads(json.dumps(rep.to_json()))
    assert set(doc["epistemic_ratio"]) == {"a", "b", "c"}
    assert doc["epistemic_ratio_min"] == min(doc["epistemic_ratio"].values())
    assert doc["features"]["b"]["ratio"]["4iqr"] == doc["epistemic_ratio"]["b"]
    assert set(doc["features"]["a"]["epistemic_sd"]) == {"lo", "hi"}
    table = rep.table()
    assert len(table) == 2 + 3 and table[2].startswith("| a |")


def test_shapes_are_checked_with_names() -> None:
    ens = _linear_ensemble((1.0, 1.0, 1.0))
    x, x_in = _data()
    with pytest.raises(ValueError, match="x_in must be"):
        epistemic_ratios(ens, x, x_in[:, :2], ("a", "b", "c"))
    with pytest.raises(ValueError, match="x_train must be"):
        epistemic_ratios(ens, x[:, :2], x_in, ("a", "b", "c"))
    with pytest.raises(ValueError, match="2 names for a model with in_features=3"):
        epistemic_ratios(ens, x[:, :2], x_in[:, :2], ("a", "b"))
