"""Drift signals for all keys of a micro-batch at once: shared passes, stacked passes, per-key sums.

The keyed drift loop (:class:`fogline.drift.keyed.KeyedDriftLoop`) needs, for
every key k of a micro-batch with rows (x_ki, y_ki), i = 1..n_k, the signals
:mod:`fogline.drift.signals` defines for one model; this module computes them
for the K keys in a few tensor operations instead of K rounds of them.

Pre-update (:func:`pre_signals`), under key k's reference ensemble w_ks, s = 1..S
(mu_ksi, sigma_ksi = f_{w_ks}(x_ki)):

    nll_ki = -log (1/S) sum_s p(y_ki | mu_ksi, sigma_ksi)        (log-mean-exp over s)
    F_ki   = (1/S) sum_s F_s(y_ki),   a_ki = 1 - 2 min(F_ki, 1 - F_ki),   o_ki = a_ki > 0.9999
    m_ki   = mean_s mu_ksi,   v_ki = var_s mu_ksi + mean_s sigma_ksi^2

and the batch statistics of key k: ``surprisal`` = mean_i nll_ki,
``surprisal_median`` (the lower median, as ``torch.median``), ``outlier_fraction``
f_k = #{i: o_ki} / n_k, ``surprisal_inlier`` = the mean of nll_ki over the
records that are not outliers (all records when f_k > ``max_outlier_fraction``
or none is left), ``anomaly_mean`` = mean_i a_ki.  Keys holding the *same*
reference (every new key of one fleet prior, until it re-anchors) are scored
by ONE pass of that ensemble over their concatenated rows
(:func:`fogline.drift.signals.record_scores`; rows are independent of each
other); the keys with a reference of their own (re-anchored, or restored
with another reference) in one stacked pass over their ensembles
[K S, out, in] and zero-padded rows (:func:`stacked_record_scores`, Gaussian
likelihood; others alone).  The per-key means are sums over each key's rows of
a zero-padded [K, n_max] matrix.

Post-update (:func:`post_signals`), with key k's posterior after the step
q_k = N(m_k, diag(s_k^2)) (+ V_k V_k^T) and before it (q'_k), each as an
ensemble of the loop's common draws eps [S, P] (z [S, R]):

    w_ks = m_k + s_k * eps_s (+ V_k z_s)       per layer, all keys at once (:func:`stacked_layers`)

evaluated on the first r_k rows of the key (:func:`fogline.drift.runner.post_rows`)
in ONE stacked pass over every key's weights [K S, out, in] and its
zero-padded rows [K, r_max, D] (keys sorted by r_k and taken in chunks, so the
padding stays small), giving m^q_ki, v^q_ki as above, and

    predictive_kl_k = mean_{i <= r_k} KL(N(m^q_ki, v^q_ki) || N(m_ki, v_ki))
    step_kl_k       = mean_{i <= r_k} KL(N(m^q_ki, v^q_ki) || N(m^q'_ki, v^q'_ki))
    weight_kl_k     = sum_j KL(N(m_kj, s~_kj^2) || N(m^ref_kj, s^ref_kj^2))

(s~ the marginal scale, the low-rank part included; ``step_kl`` NaN for the
keys whose step KL no later batch reads).  Gaussian likelihood only
(:func:`stacked_supported`); the keyed loop computes the others per key.

Equality with the per-key loop.  The values equal those of
:meth:`fogline.drift.runner.DriftLoop.prepare` / ``post_signals`` on each key
alone to float rounding, not bit for bit: the matrix products run over other
shapes and the means sum in another order (~1e-7 relative in float32).  The
selections are exact: the median is an element, f_k is the float32 quotient
count / n_k as ``torch.mean`` of 0/1 gives it, and it is compared with
``max_outlier_fraction`` in float64, as the per-key loop compares the Python
float.  Every operation is deterministic, so a micro-batch (its keys, their
order and rows) gives the same bits on every run and after every restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fogline.drift.ensemble_pass import _ACTIVATIONS_
from fogline.drift.signals import (
    MAX_OUTLIER_FRACTION,
    OUTLIER_SCORE,
    RecordScores,
    Reference,
    gaussian_kl,
    gaussian_mixture_moments,
    gaussian_mixture_nll,
    record_scores,
    two_sided_anomaly,
)
from fogline.models.config import ModelConfig
from fogline.models.network import layout, noise_scale
from fogline.models.state import PosteriorState

#: Per layer (W [K, S, out, in], b [K, S, out]) of K ensembles of S draws.
Layers = list[tuple[torch.Tensor, torch.Tensor]]

#: Hidden activations of one chunk of keys in a stacked pass (float elements, 4 MB in float32).
STACK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class KeyScores:
    """One key's pre-update result: its signals, record scores and calibration record.

    ``signals``: ``surprisal``, ``surprisal_median``, ``surprisal_inlier``,
    ``outlier_fraction``, ``anomaly_mean`` (as :func:`~fogline.drift.signals.pre_update_signals`);
    ``scores``: the key's :class:`~fogline.drift.signals.RecordScores` (views of the
    group's tensors); ``record``: [n_k, 2] float64 (NLL, outlier flag), the calibration
    window's entry for this batch (its own array).
    """

    signals: dict[str, float]
    scores: RecordScores
    record: np.ndarray


def _segments(sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(key index [N], position in its key [N], n_max) of rows laid out key after key."""
    n = torch.as_tensor(list(sizes), dtype=torch.long)
    seg = torch.repeat_interleave(torch.arange(len(sizes)), n)
    starts = torch.cumsum(n, 0) - n
    pos = torch.arange(int(n.sum())) - starts[seg]
    return seg, pos, int(n.max())


def _pad(
    values: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, shape: tuple[int, int], fill: float
) -> torch.Tensor:
    """``values`` [N] (rows key after key) as a [K, n_max] matrix, ``fill`` past each key's rows."""
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    out[seg, pos] = values
    return out


def batch_statistics(
    rs: RecordScores, sizes: Sequence[int], max_outlier_fraction: float = MAX_OUTLIER_FRACTION
) -> list[dict[str, float]]:
    """The pre-update batch statistics of keys whose rows lie key after key in ``rs``.

    ``sizes``: n_k per key (in order, each >= 1).  Returns per key the dict of
    :func:`~fogline.drift.signals.pre_update_signals` (module docstring).
    """
    k = len(sizes)
    seg, pos, n_max = _segments(sizes)
    seg, pos = seg.to(rs.nll.device), pos.to(rs.nll.device)
    n = torch.as_tensor(list(sizes), dtype=rs.nll.dtype, device=rs.nll.device)
    nll = _pad(rs.nll, seg, pos, (k, n_max), 0.0)
    out = _pad(rs.outlier.to(rs.nll.dtype), seg, pos, (k, n_max), 0.0)
    surprisal = nll.sum(1) / n
    frac = out.sum(1) / n  # the float32 quotient count / n_k, as torch.mean of 0/1
    trim = frac.double() <= max_outlier_fraction  # float64, as the Python comparison
    keep = (~rs.outlier) | ~trim[seg]
    kept = _pad(keep.to(nll.dtype), seg, pos, (k, n_max), 0.0).sum(1)
    inlier_sum = _pad(torch.where(keep, rs.nll, 0.0), seg, pos, (k, n_max), 0.0).sum(1)
    inlier = torch.where(kept > 0, inlier_sum / kept.clamp(min=1.0), surprisal)
    anomaly = _pad(rs.anomaly, seg, pos, (k, n_max), 0.0).sum(1) / n
    ordered = _pad(rs.nll, seg, pos, (k, n_max), float("inf")).sort(1).values
    mid = ((n.long() - 1) // 2).unsqueeze(1)
    median = ordered.gather(1, mid).squeeze(1)
    cols = zip(
        surprisal.tolist(),
        median.tolist(),
        inlier.tolist(),
        frac.tolist(),
        anomaly.tolist(),
        strict=True,
    )
    return [
        {
            "surprisal": s,
            "surprisal_median": m,
            "surprisal_inlier": i,
            "outlier_fraction": f,
            "anomaly_mean": a,
        }
        for s, m, i, f, a in cols
    ]


def pre_signals(
    references: Sequence[Reference],
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    *,
    outlier_score: float = OUTLIER_SCORE,
    max_outlier_fraction: float = MAX_OUTLIER_FRACTION,
) -> list[KeyScores]:
    """Pre-update signals of K keys (aligned sequences): key k's rows ``xs[k]`` [n_k, D],
    ``ys[k]`` [n_k] scored under ``references[k]`` (module docstring).

    Keys holding the same :class:`~fogline.drift.signals.Reference` object are
    scored in one pass over their concatenated rows.
    """
    groups: dict[int, list[int]] = {}
    for i, ref in enumerate(references):
        groups.setdefault(id(ref), []).append(i)
    alone = [m[0] for m in groups.values() if len(m) == 1]
    parts = [m for m in groups.values() if len(m) > 1]
    stacked = len(alone) > 1 and stacked_supported(references[alone[0]].ensemble.config)
    if stacked:
        parts.append(alone)  # the keys with references of their own: one stacked pass
    else:
        parts.extend([i] for i in alone)
    out: list[KeyScores | None] = [None] * len(references)
    for members in parts:
        ref = references[members[0]]
        sizes = [int(xs[i].shape[0]) for i in members]
        if stacked and members is alone:
            rs = stacked_record_scores(
                [references[i] for i in members],
                [xs[i] for i in members],
                [ys[i] for i in members],
                outlier_score,
            )
        elif len(members) == 1:
            rs = record_scores(ref, xs[members[0]], ys[members[0]], outlier_score)
        else:
            x = torch.cat([xs[i] for i in members])
            y = torch.cat([ys[i] for i in members])
            rs = record_scores(ref, x, y, outlier_score)
        stats = batch_statistics(rs, sizes, max_outlier_fraction)
        rec = np.stack([rs.nll.numpy(), rs.outlier.numpy().astype(np.float64)], 1)
        at = 0
        for i, n, st in zip(members, sizes, stats, strict=True):
            key_rs = rs if len(members) == 1 else _rows(rs, at, at + n)
            out[i] = KeyScores(st, key_rs, rec[at : at + n].copy())
            at += n
    return [ks for ks in out if ks is not None]


def _rows(rs: RecordScores, lo: int, hi: int) -> RecordScores:
    return RecordScores(
        rs.nll[lo:hi], rs.anomaly[lo:hi], rs.outlier[lo:hi], rs.mean[lo:hi], rs.var[lo:hi]
    )


# ----------------------------------------------------------------------------- stacked pass
def stacked_supported(config: ModelConfig) -> bool:
    """Whether :func:`post_signals` serves keys of this model (Gaussian likelihood)."""
    return config.likelihood == "gaussian"


def stacked_layers(
    config: ModelConfig,
    states: Sequence[PosteriorState],
    eps: torch.Tensor,
    z: torch.Tensor | None,
) -> Layers:
    """Each state's ensemble of the draws ``eps`` [S, P] (``z`` [S, R]), per layer:
    (W [K, S, out, in], b [K, S, out]) with W_ks = m_k + s_k * eps_s (+ z_s V_k^T).

    The weights of :meth:`fogline.drift.signals.NoiseCache.ensemble` for each
    state (to float rounding: one fused multiply-add per element), built layer
    by layer straight into the memory layout :func:`stacked_components`'
    products read (the first layer's W as [K, in, S, out], the hidden layers'
    as [K, S, in, out], the output layer's as [K, S, out, in]; each returned as
    a [K, S, out, in] view), so no [K, S, P] tensor is formed, copied into
    layers and transposed again inside every batched product, and the hidden
    layers' products run on contiguous operands (:func:`post_signals` of 167
    keys with their step KL, hidden 32 x 2: 59-72 -> 42-51 ms; docs/drift.md).
    """
    lay = layout(config).layers
    last = len(lay) - 1
    with torch.no_grad():  # no graph: the parameters are read, never differentiated here
        loc = torch.stack([st.params["loc"] for st in states])
        scale = torch.nn.functional.softplus(
            torch.stack([st.params["scale_unconstrained"] for st in states])
        )
        v = torch.stack([st.params["cov_factor"] for st in states]) if z is not None else None
        k, s = int(loc.shape[0]), int(eps.shape[0])
        out: Layers = []
        for j, layer in enumerate(lay):
            o, i = layer.fan_out, layer.fan_in
            w_sl = slice(layer.w_start, layer.b_start)
            b_sl = slice(layer.b_start, layer.b_start + o)
            m_w, s_w, e_w = loc[:, w_sl], scale[:, w_sl], eps[:, w_sl]
            # the permutation of [out, in] each operand is laid out in (small copies),
            # and how the [K, S, out, in] view is read off the result
            if j == 0 and last > 0:  # [K, in, S, out]
                m = m_w.reshape(k, o, i).transpose(1, 2).unsqueeze(2).contiguous()
                sc = s_w.reshape(k, o, i).transpose(1, 2).unsqueeze(2).contiguous()
                e = e_w.reshape(s, o, i).permute(2, 0, 1).unsqueeze(0).contiguous()
                dims = (0, 2, 3, 1)
            elif j < last:  # [K, S, in, out]
                m = m_w.reshape(k, o, i).transpose(1, 2).unsqueeze(1).contiguous()
                sc = s_w.reshape(k, o, i).transpose(1, 2).unsqueeze(1).contiguous()
                e = e_w.reshape(s, o, i).transpose(1, 2).unsqueeze(0).contiguous()
                dims = (0, 1, 3, 2)
            else:  # [K, S, out, in]
                m = m_w.reshape(k, 1, o, i)
                sc = s_w.reshape(k, 1, o, i)
                e = e_w.reshape(1, s, o, i)
                dims = (0, 1, 2, 3)
            # m_k + s_k * eps_s in one pass
            weight = torch.addcmul(m, sc, e).permute(*dims)
            bias = torch.addcmul(
                loc[:, b_sl].unsqueeze(1), scale[:, b_sl].unsqueeze(1), eps[:, b_sl]
            )
            if z is not None and v is not None:
                weight.add_(torch.matmul(z, v[:, w_sl].transpose(1, 2)).view(k, s, o, i))
                bias.add_(torch.matmul(z, v[:, b_sl].transpose(1, 2)))
            out.append((weight, bias))
    return out


def stacked_components(
    config: ModelConfig, layers: Layers, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample predictive parameters (mu, sigma) [K, S, n] of K ensembles on their own rows.

    ``layers``: per layer (W [K, S, out, in], b [K, S, out]); ``x`` [K, n, D]
    (padding rows are computed like the others; the caller masks them).
    h_1 = act(x W_1^T + b_1) as one [K] batch of [n, D] x [D, S H_1] products
    (every sample's first layer side by side: one wide product per key), then
    [K S] batches of [n, in] x [in, out] per hidden layer and [out, in] x [in, n]
    for the output layer, which leaves (mu, raw scale) [K S, 2, n] with the rows
    contiguous; sigma = noise_scale(raw) on a contiguous tensor (torch's
    vectorised kernel; on a strided slice softplus took ~13x longer).  Gaussian
    likelihood.  A key's values do not depend on the other keys of the chunk.
    Against the rows-last layout of the first version ([S H_1, D] x [D, n]
    products) the values agree to float rounding (1e-7 relative); the moments
    of 128 ensembles of S = 64 on 8 rows (D = 4, H = 16) took 3.7-4.0 ms against
    7.7-11.2 ms (docs/drift.md).  A net without hidden layers is its output layer
    on the rows.  The products read their weights as :func:`stacked_layers` lays
    them out without a copy (any layout gives the same values to float rounding).
    """
    w0, b0 = layers[0]
    k, s, h0, d = w0.shape
    n = int(x.shape[1])
    if len(layers) == 1:  # no hidden layer: the output layer reads every sample's rows
        h = x.to(w0.dtype).unsqueeze(1).expand(k, s, n, d).reshape(k * s, n, d)
    else:
        act = _ACTIVATIONS_[config.activation]  # in place: every h is a fresh product
        h = torch.baddbmm(
            b0.reshape(k, 1, s * h0), x.to(w0.dtype), w0.reshape(k, s * h0, d).transpose(1, 2)
        )  # [K, n, S H_1]
        act(h)
        # [K S, n, H_1]: each sample's rows together (one copy)
        h = h.view(k, n, s, h0).transpose(1, 2).reshape(k * s, n, h0)
        for weight, bias in layers[1:-1]:
            out_f, in_f = int(weight.shape[2]), int(weight.shape[3])
            h = torch.baddbmm(
                bias.reshape(k * s, 1, out_f),
                h,
                weight.reshape(k * s, out_f, in_f).transpose(1, 2),
            )
            act(h)
    weight, bias = layers[-1]
    out_f, in_f = int(weight.shape[2]), int(weight.shape[3])
    out = torch.baddbmm(
        bias.reshape(k * s, out_f, 1), weight.reshape(k * s, out_f, in_f), h.transpose(1, 2)
    ).view(k, s, out_f, n)  # [K, S, 2, n]
    return out[:, :, 0].contiguous(), noise_scale(out[:, :, 1].contiguous(), config)


def stacked_record_scores(
    references: Sequence[Reference],
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    outlier_score: float = OUTLIER_SCORE,
) -> RecordScores:
    """:func:`~fogline.drift.signals.record_scores` of K keys, each under its own reference,
    in one stacked pass; the rows come back key after key (Gaussian likelihood).

    nll = -(logsumexp_s log N(y; mu_s, sigma_s^2) - log S), F = mean_s Phi((y - mu_s) / sigma_s),
    as the one-model scores (module docstring).
    """
    config = references[0].ensemble.config
    sizes = [int(x.shape[0]) for x in xs]
    starts = np.cumsum([0, *sizes])
    total = int(starts[-1])
    dtype = references[0].ensemble.layers[0][0].dtype
    cols = [torch.empty(total, dtype=dtype) for _ in range(4)]  # nll, anomaly, mean, var
    s = references[0].ensemble.size
    widest = max(int(w.shape[1]) for w, _ in references[0].ensemble.layers)
    for chunk in _chunks(sizes, s * widest):
        c_sizes = [sizes[i] for i in chunk]
        seg, pos, n_max = _segments(c_sizes)
        k = len(chunk)
        x_all = torch.cat([xs[i] for i in chunk])
        x = torch.zeros(k, n_max, x_all.shape[1], dtype=x_all.dtype)
        x[seg, pos] = x_all
        with torch.no_grad():
            layers = [
                (
                    torch.stack([references[i].ensemble.layers[j][0] for i in chunk]),
                    torch.stack([references[i].ensemble.layers[j][1] for i in chunk]),
                )
                for j in range(len(references[0].ensemble.layers))
            ]
            mu, sigma = stacked_components(config, layers, x)  # [K, S, n]
            y_all = torch.cat([ys[i] for i in chunk]).to(mu.dtype)
            y = _pad(y_all, seg, pos, (k, n_max), 0.0).unsqueeze(1)
            z = (y - mu) / sigma
            nll = gaussian_mixture_nll(z, sigma, 1)
            cdf = (0.5 * (1.0 + torch.erf(z * 0.7071067811865476))).mean(1)
            mean, var = gaussian_mixture_moments(mu, sigma, 1)
            anomaly = two_sided_anomaly(cdf)
        # the chunk's rows back to their place among all keys' rows
        dest = torch.as_tensor(starts[chunk], dtype=torch.long)[seg] + pos
        for col, v in zip(cols, (nll, anomaly, mean, var), strict=True):
            col[dest] = v[seg, pos]
    nll_r, anomaly_r, mean_r, var_r = cols
    return RecordScores(nll_r, anomaly_r, anomaly_r > outlier_score, mean_r, var_r)


@dataclass(frozen=True)
class PostJob:
    """One key's post-update inputs: the posterior after (and, for the step KL, before) the
    step, its first ``rows`` rows, their reference moments, and its reference marginals."""

    after: PosteriorState
    before: PosteriorState | None
    x: torch.Tensor
    ref_mean: torch.Tensor
    ref_var: torch.Tensor
    ref_loc: torch.Tensor
    ref_scale: torch.Tensor


def _chunks(rows: Sequence[int], per_row: int) -> list[list[int]]:
    """Job indices sorted by rows, cut so a chunk's padded activations stay within
    :data:`STACK_ELEMENTS` (``per_row`` activations per key and row); a function of the
    row counts only."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * per_row * rows[i] > STACK_ELEMENTS:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def post_signals(
    jobs: Sequence[PostJob], eps: torch.Tensor, z: torch.Tensor | None
) -> list[dict[str, float]]:
    """``predictive_kl``, ``weight_kl`` and ``step_kl`` of every job (module docstring).

    Every job's model is the same Gaussian-likelihood one (:func:`stacked_supported`);
    ``eps`` [S, P] / ``z`` [S, R] are the loop's common draws.  ``step_kl`` is NaN for a
    job without ``before``.
    """
    if not jobs:
        return []
    config = jobs[0].after.config
    s = int(eps.shape[0])
    widest = max(layer.fan_out for layer in layout(config).layers)
    rows = [int(j.x.shape[0]) for j in jobs]
    pred = [0.0] * len(jobs)
    step = [float("nan")] * len(jobs)
    for chunk in _chunks(rows, s * widest * (2 if any(j.before for j in jobs) else 1)):
        part = [jobs[i] for i in chunk]
        sizes = [rows[i] for i in chunk]
        seg, pos, n_max = _segments(sizes)
        kc = len(part)
        x_all = torch.cat([j.x for j in part])
        x = torch.zeros(kc, n_max, x_all.shape[1], dtype=x_all.dtype)
        x[seg, pos] = x_all
        with_before = [c for c, j in enumerate(part) if j.before is not None]
        states = [j.after for j in part] + [part[c].before for c in with_before]
        layers = stacked_layers(config, states, eps, z)  # type: ignore[arg-type]
        xs = torch.cat([x, x[with_before]]) if with_before else x
        with torch.no_grad():
            mean, var = gaussian_mixture_moments(*stacked_components(config, layers, xs), 1)
        m0 = _pad(torch.cat([j.ref_mean for j in part]), seg, pos, (kc, n_max), 0.0)
        v0 = _pad(torch.cat([j.ref_var for j in part]), seg, pos, (kc, n_max), 1.0)
        mask = _pad(torch.ones(len(seg), dtype=torch.bool), seg, pos, (kc, n_max), False)
        n = torch.as_tensor(sizes, dtype=mean.dtype)
        kl = torch.where(mask, gaussian_kl(mean[:kc], var[:kc], m0, v0), 0.0)
        for c, v in zip(range(kc), (kl.sum(1) / n).tolist(), strict=True):
            pred[chunk[c]] = v
        if with_before:
            idx = torch.as_tensor(with_before)
            skl = gaussian_kl(mean[idx], var[idx], mean[kc:], var[kc:])
            skl = torch.where(mask[idx], skl, 0.0).sum(1) / n[idx]
            for c, v in zip(with_before, skl.tolist(), strict=True):
                step[chunk[c]] = v
    with torch.no_grad():
        loc = torch.stack([j.after.params["loc"] for j in jobs])
        raw = torch.stack([j.after.params["scale_unconstrained"] for j in jobs])
        scale = torch.nn.functional.softplus(raw)
        if (
            "cov_factor" in jobs[0].after.params
        ):  # the marginal scale (PosteriorState.posterior_scale)
            v = torch.stack([j.after.params["cov_factor"] for j in jobs])
            scale = torch.sqrt(scale * scale + v.pow(2).sum(-1))
        ref_loc = torch.stack([j.ref_loc for j in jobs])
        ref_scale = torch.stack([j.ref_scale for j in jobs])
        wkl = gaussian_kl(loc, scale.pow(2), ref_loc, ref_scale.pow(2)).sum(1).tolist()
    return [
        {"predictive_kl": p, "weight_kl": wk, "step_kl": sk}
        for p, wk, sk in zip(pred, wkl, step, strict=True)
    ]


__all__ = [
    "STACK_ELEMENTS",
    "KeyScores",
    "PostJob",
    "batch_statistics",
    "post_signals",
    "pre_signals",
    "stacked_components",
    "stacked_layers",
    "stacked_record_scores",
    "stacked_supported",
]
