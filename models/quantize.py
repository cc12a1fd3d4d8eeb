"""8-bit posterior ensembles and their accuracy loss against float32.

Each weight matrix sample W_s [out, in] is stored as int8 codes with one
float32 scale per output row (symmetric, per-channel):

    scale_{s,o} = max_i |W_{s,o,i}| / 127,    code = round(W / scale) in [-127, 127],
    W ≈ code * scale    (error <= scale / 2 per entry).

Biases stay float32 (they are a small share of the parameters).  A
:class:`QuantizedEnsemble` takes about a quarter of the memory of the float32
:class:`~fogline.models.predictive.Ensemble`; :meth:`QuantizedEnsemble.dequantize`
rebuilds a float32 ensemble from the codes, which is what prediction runs on.

:func:`quantization_report` measures what the rounding costs: the maximum
absolute difference of the predictive mean, standard deviations and interval
bounds between the float32 and the 8-bit ensemble on :func:`reference_grid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fogline.models.config import ModelConfig
from fogline.models.predictive import Ensemble, predict

#: Central credible levels used by the accuracy report.
REPORT_LEVELS: tuple[float, ...] = (0.5, 0.9, 0.95)


@dataclass(frozen=True)
class QuantizedEnsemble:
    """int8 weight codes [S, out, in] with float32 row scales [S, out, 1]; float32 biases."""

    config: ModelConfig
    codes: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    df: float | None = None

    @property
    def size(self) -> int:
        """Number of samples S."""
        return int(self.codes[0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        tensors = (*self.codes, *self.scales, *self.biases)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self) -> Ensemble:
        """A float32 :class:`Ensemble` with weights ``code * scale``."""
        layers = tuple(
            (code.to(scale.dtype) * scale, bias)
            for code, scale, bias in zip(self.codes, self.scales, self.biases, strict=True)
        )
        return Ensemble(self.config, layers, self.df)


def ensemble_nbytes(ens: Ensemble) -> int:
    """Bytes held by an ensemble's tensors."""
    return sum(t.numel() * t.element_size() for layer in ens.layers for t in layer)


def quantize_ensemble(ens: Ensemble) -> QuantizedEnsemble:
    """Symmetric per-output-row int8 quantisation of every weight sample."""
    codes, scales, biases = [], [], []
    for weight, bias in ens.layers:
        w = weight.float()
        scale = w.abs().amax(dim=-1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes.append(torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        scales.append(scale.contiguous())
        biases.append(bias.float().contiguous())
    return QuantizedEnsemble(ens.config, tuple(codes), tuple(scales), tuple(biases), ens.df)


def reference_grid(
    config: ModelConfig,
    *,
    points: int = 25,
    span: float = 3.0,
    random_rows: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Inputs [N, D] for accuracy reports.

    Each feature swept alone over ``linspace(-span, span, points)`` (the others
    0), plus ``random_rows`` draws from N(0, I) (seeded).
    """
    d = config.in_features
    t = torch.linspace(-span, span, points)
    axes = torch.zeros(d * points, d)
    for j in range(d):
        axes[j * points : (j + 1) * points, j] = t
    g = torch.Generator().manual_seed(seed)
    return torch.cat([axes, torch.randn(random_rows, d, generator=g)])


def quantization_report(
    ens: Ensemble,
    quantized: QuantizedEnsemble | None = None,
    grid: torch.Tensor | None = None,
    levels: tuple[float, ...] = REPORT_LEVELS,
) -> dict[str, Any]:
    """Accuracy loss of the 8-bit ensemble versus float32 on a reference grid.

    Returns a JSON-able dict: ``grid_rows``, ``levels``, ``max_abs_mean``,
    ``max_abs_total_std``, ``max_abs_interval`` (over every level and both
    bounds), ``max_abs_interval_rel`` (that, divided by the median float32
    total std), ``bytes_float32`` and ``bytes_int8``.
    """
    q = quantized if quantized is not None else quantize_ensemble(ens)
    x = grid if grid is not None else reference_grid(ens.config)
    ref = predict(ens, x, levels=levels)
    got = predict(q.dequantize(), x, levels=levels)
    interval = max(
        float((got.intervals[lv][i] - ref.intervals[lv][i]).abs().max())
        for lv in levels
        for i in (0, 1)
    )
    median_std = float(ref.total_std.median())
    return {
        "grid_rows": int(x.shape[0]),
        "levels": list(levels),
        "max_abs_mean": float((got.mean - ref.mean).abs().max()),
        "max_abs_total_std": float((got.total_std - ref.total_std).abs().max()),
        "max_abs_interval": interval,
        "max_abs_interval_rel": interval / median_std if median_std > 0 else float("nan"),
        "bytes_float32": ensemble_nbytes(ens),
        "bytes_int8": q.nbytes,
    }
