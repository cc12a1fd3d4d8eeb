"""The batched key step: K posteriors of one model stepped in ONE batched pass.

:func:`batched_step` is :func:`fogline.models.stream.stream_step` for K keys
at once (:func:`fogline.models.keyed.keyed_step` groups the keys of a
micro-batch by model and calls it per group).  It computes the same objective
as :func:`fogline.models.svi.step`, written directly in torch over stacked
tensors instead of traced from Pyro.

Mathematics.  Key k has packed variational parameters theta_k [T] (stacked:
Theta [K, T]), prior pi_k = N(m0_k, diag(s0_k^2)), likelihood weight beta_k,
data size N_k (default its own row count n_k) and n_k rows (X [K, n_max, D]
zero-padded, row mask M [K, n_max]).  Each inner step draws, from key k's own
generator and in the single step's order, eps_k [S, P] (then z_k [S, R] for a
low-rank guide, then the functional prior's inputs x~_k [n_k, D]) and forms

    w_ks = m_k + s_k * eps_ks (+ V_k z_ks),       s_k = softplus(u_k)

(one reparameterised draw w_k0 for the ELBO, all S for the functional term);
the net is evaluated for all keys at once with ``torch.baddbmm`` over
[K, n_max, D] (h_{l+1} = act(h_l W_kl^T + b_kl)).  Key k's objective is

    L_k = -(beta_k / n_k) sum_i M_ki log p(y_ki | x_ki, w_k0)
          + KL(q_k || pi_k) / N_k
          + gamma_k mean_{j<=n_k} KL(N(m_k(x~_kj), v_k(x~_kj)) || N(mu0_k, sigma0_k^2))

(the last term only for keys carrying a functional prior; m, v the sample
mean and unbiased variance over the S draws, v + 1e-8), with the Gaussian,
Student-t or Bernoulli log-density of :mod:`fogline.models.likelihoods`, the
closed-form mean-field KL, and for the low-rank guide

    KL = 1/2 [ sum (s^2 + sum_r V^2) / s0^2 + sum (m - m0)^2 / s0^2 - P
               + sum log s0^2 - sum log s^2 - log det(I_R + V^T diag(s^-2) V) ]

in float64 with a batched Cholesky (:func:`fogline.models.fprior.lowrank_kl`).
The gradient of sum_k L_k gives every key its own (L_k depends on theta_k
only); it is written out in closed form (:func:`step_pass`: the likelihood's,
the functional term's and the KL's derivatives, backpropagation through the
nets, the reparameterisation's chain rule; each checked against autograd in
tests/models/test_keyed.py), and one Adam update over Theta [K, T] follows, per key with
its own step count t_k (bias correction), learning rate lr_k and the
low-rank factor's multiplier c (``extra["cov_factor_lr_scale"]``):

    t_k <- t_k + 1;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    theta_k <- theta_k - (lr_k c / (1 - b1^t_k)) m / (sqrt(v) / sqrt(1 - b2^t_k) + eps).

Correspondence with the Pyro program.  :class:`fogline.models.svi.Program`'s
model samples one site ``w ~ N(m0, diag(s0^2))`` under ``poutine.scale(1/N)``
and observes ``y`` under ``poutine.scale(beta/n)``; its guide samples ``w``
from q_lambda.  Pyro's ``TraceMeanField_ELBO`` particle of that pair is
``(1/N) KL(q || p) - (beta/n) log p(y | w)``: exactly L_k without the
functional term.  The K keys are K independent copies of the program (as if
under a ``pyro.plate("keys", K)`` with per-key scales), so the batched loss is
the sum of the K particles and its gradient in theta_k is key k's.  The
equivalence is tested numerically against ``stream_step``
(tests/models/test_keyed.py): same noise bits, parameters equal to float
tolerance (the reductions run in a different order; Adam is torch's fused
kernel, the single step's, over the K keys' rows with their own step counts,
or this module's vectorised form of it where torch lacks the kernel).

Determinism.  Every operation is a deterministic CPU/CUDA kernel and the
noise comes only from each key's ``rng_state``: the same states and batches
give the same bits on every run.  A key whose loss or parameters are not
finite is returned unchanged with ``rejected=True``; its NaNs never reach
another key's row (a failed Cholesky marks only its own key).
"""

from __future__ import annotations

import array
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fogline.models.config import ModelConfig
from fogline.models.fprior import LR_SCALE_KEY, FunctionalPrior
from fogline.models.likelihoods import df_from_unconstrained
from fogline.models.network import _ACTIVATIONS, layout
from fogline.models.state import Minibatch, PosteriorState, PriorSpec, StepInfo
from fogline.models.svi import (
    _FUSED_ADAM,
    ADAM_BETAS,
    ADAM_EPS,
    Program,
    _layer_sizes,
    fused_adam_kernel,
    program,
)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class KeyJob:
    """One key's part of a batched step: its state, rows and step parameters."""

    state: PosteriorState
    batch: Minibatch
    data_size: float
    likelihood_weight: float
    functional_prior: FunctionalPrior | None


def _lr_scale(state: PosteriorState) -> float:
    """The low-rank factor's step multiplier a state carries (as ``stream_step`` reads it)."""
    if "cov_factor" not in state.params:
        return 1.0
    return float(state.extra.get(LR_SCALE_KEY, 1.0))


def group_key(state: PosteriorState, fp: FunctionalPrior | None) -> tuple[object, ...]:
    """Keys with equal group keys can share one :func:`batched_step` call.

    (model config, device, the functional prior's sample count, the low-rank
    factor's step multiplier.)
    """
    return (state.config, state.device, fp.samples if fp is not None else 0, _lr_scale(state))


def _evolve(state: PosteriorState, **changes: object) -> PosteriorState:
    """``state.replace(**changes)`` without re-running the dataclass ``__init__``.

    A shallow copy with the changed fields set (``PosteriorState`` is a frozen
    dataclass without ``__post_init__`` or slots, so this builds the same object);
    ``dataclasses.replace`` costs ~10 us a key, a quarter of a key's share of
    the batched step at 1,000 keys.
    """
    new = object.__new__(type(state))
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


def _noise_scale_and_slope(
    raw: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma = :func:`fogline.models.network.noise_scale` (r) and d sigma / d r.

    exp: sigma - noise_min = e^r;  softplus: sigmoid(r);  bounded:
    (noise_max - noise_min) sigmoid(r) (1 - sigmoid(r)).
    """
    lo = config.noise_min
    if config.noise_head == "exp":
        e = torch.exp(raw)
        return e + lo, e
    if config.noise_head == "softplus":
        return F.softplus(raw) + lo, torch.sigmoid(raw)
    sg = torch.sigmoid(raw)
    span = config.noise_max - lo
    return lo + span * sg, span * sg * (1.0 - sg)


def _head_grad(
    out: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    obs_scale: torch.Tensor,
    config: ModelConfig,
    df_u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The data term and its gradient in closed form: (lp [K], dL/d out [K, n, O], dL/d df_u).

    lp_k = sum_i M_ki log p(y_ki | out_ki) (the formulas of torch.distributions) and the gradient of
    L_k = -(beta_k / n_k) lp_k (``obs_scale`` = beta_k / n_k) w.r.t. the raw
    outputs, with z = (y - mu) / sigma:

    * Gaussian: d log p / d mu = z / sigma,  d log p / d sigma = (z^2 - 1) / sigma;
    * Student-t (nu): d log p / d mu = (nu + 1) z / ((nu + z^2) sigma),
      d log p / d sigma = ((nu + 1) z^2 / (nu + z^2) - 1) / sigma,
      d log p / d nu = 1/2 [(nu + 1) z^2 / (nu (nu + z^2)) - log1p(z^2 / nu) - 1 / nu
      - psi(nu / 2) + psi((nu + 1) / 2)], nu = 1 + softplus(df_u) when learned
      (``df_u`` [K, 1]; d nu / d df_u = sigmoid(df_u));
    * Bernoulli (logit l): d log p / d l = y - sigmoid(l);

    d sigma / d r from :func:`_noise_scale_and_slope`; padded rows (M = 0) get 0.
    """
    coef = -obs_scale.unsqueeze(1)  # dL/d log p_ki on the rows that count  [K, 1]
    g_out = torch.zeros_like(out)
    g_df = None
    loc = out[..., 0]
    if config.likelihood == "bernoulli":
        lp_rows = -F.binary_cross_entropy_with_logits(loc, y, reduction="none")
        g_out[..., 0] = (y - torch.sigmoid(loc)) * coef
    else:
        scale, slope = _noise_scale_and_slope(out[..., 1], config)
        inv = scale.reciprocal()
        z = (y - loc) * inv
        z2 = z * z
        if config.likelihood == "student-t":
            df = (
                df_from_unconstrained(df_u)
                if df_u is not None
                else torch.full_like(loc[:, :1], float(config.df or 0.0))
            )
            t = df + z2
            lp_rows = _student_t_log_prob(z2, scale, df)
            w_ = (df + 1.0) / t
            g_out[..., 0] = (w_ * z * inv) * coef
            g_out[..., 1] = ((w_ * z2 - 1.0) * inv * slope) * coef
            if df_u is not None:
                g_nu = 0.5 * (
                    (df + 1.0) * z2 / (df * t)
                    - torch.log1p(z2 / df)
                    - 1.0 / df
                    - torch.digamma(0.5 * df)
                    + torch.digamma(0.5 * (df + 1.0))
                )
                g_nu = torch.where(mask, g_nu, torch.zeros_like(g_nu))
                g_df = (g_nu * coef).sum(1, keepdim=True) * torch.sigmoid(df_u)
        else:
            lp_rows = -0.5 * z2 - scale.log() - _HALF_LOG_2PI
            g_out[..., 0] = (z * inv) * coef
            g_out[..., 1] = ((z2 - 1.0) * inv * slope) * coef
    lp = torch.where(mask, lp_rows, torch.zeros_like(lp_rows)).sum(-1)
    g_out = torch.where(mask.unsqueeze(-1), g_out, torch.zeros_like(g_out))
    return lp, g_out, g_df


def _student_t_log_prob(z2: torch.Tensor, scale: torch.Tensor, df: torch.Tensor) -> torch.Tensor:
    """log Student-t(y | mu, sigma, nu) from z^2 = ((y - mu) / sigma)^2 (torch.distributions' formula)."""
    norm = (
        scale.log()
        + 0.5 * df.log()
        + 0.5 * math.log(math.pi)
        + torch.lgamma(0.5 * df)
        - torch.lgamma(0.5 * (df + 1.0))
    )
    return -0.5 * (df + 1.0) * torch.log1p(z2 / df) - norm


def _functional_kl_grad(
    mean_ksn: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    f_loc: torch.Tensor,
    f_scale: torch.Tensor,
    weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma_k mean_{j<=n_k} KL(N(m_kj, v_kj) || N(mu0_k, sigma0_k^2)) [K] and its gradient w.r.t. the draws' means [K, S, n].

    With m = mean_s f_s, v = var_s f_s + 1e-8 (unbiased) and the row's
    KL = log sigma0 - log(v) / 2 + (v + (m - mu0)^2) / (2 sigma0^2) - 1/2:
    dKL/dm = (m - mu0) / sigma0^2, dKL/dv = (1 / sigma0^2 - 1 / v) / 2,
    dm/df_s = 1 / S, dv/df_s = 2 (f_s - m) / (S - 1); each row weighs gamma_k / n_k.
    """
    samples = mean_ksn.shape[1]
    m = mean_ksn.mean(1)
    centred = mean_ksn - m.unsqueeze(1)
    v = centred.square().sum(1) / (samples - 1) + 1e-8
    s = f_scale.unsqueeze(1)
    inv_s2 = (s * s).reciprocal()
    dm = m - f_loc.unsqueeze(1)
    kl = s.log() - 0.5 * v.log() + (v + dm * dm) * (0.5 * inv_s2) - 0.5
    zero = torch.zeros_like(kl)
    per_row = torch.where(mask, weight.unsqueeze(1) / rows.unsqueeze(1), zero)  # gamma_k / n_k
    g_m = dm * inv_s2 * (per_row / samples)
    g_v = (inv_s2 - v.reciprocal()) * (per_row / (samples - 1))  # (dKL/dv) * 2 / (S - 1)
    g = torch.addcmul(g_m.unsqueeze(1), centred, g_v.unsqueeze(1))
    return weight * torch.where(mask, kl, zero).sum(-1) / rows, g


#: An activation's backward from what its forward saved: relu and tanh from the
#: output h = act(a), silu and gelu from the input a (the kernels autograd calls).
_ACT_SAVES_OUTPUT: dict[str, bool] = {"relu": True, "tanh": True, "silu": False, "gelu": False}


def _act_backward(name: str, grad: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """d loss / d a from d loss / d h, h = act(a) (``saved``: h or a, per :data:`_ACT_SAVES_OUTPUT`)."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(grad, saved)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, saved)
    return torch.ops.aten.gelu_backward(grad, saved, approximate="none")


@dataclass
class _NetTape:
    """What :func:`_net_forward` keeps for :func:`_net_backward`: per layer l its input
    h_l [B, n, fan_in], its weight W_l [B, fan_out, fan_in] and (hidden layers) the
    activation's saved tensor."""

    inputs: list[torch.Tensor]
    weights: list[torch.Tensor]
    acts: list[torch.Tensor]


def _net_forward(
    w: torch.Tensor, x: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, _NetTape]:
    """The net's raw outputs [B, n, O] for flat weights w [B, P] at rows x [B, n, D], without autograd, keeping what its backward needs (:class:`_NetTape`)."""
    act = _ACTIVATIONS[config.activation]
    keep_out = _ACT_SAVES_OUTPUT[config.activation]
    lay = layout(config)
    b = w.shape[0]
    parts = w.split(_layer_sizes(lay), dim=1)
    last = len(lay.layers) - 1
    tape = _NetTape([], [], [])
    h = x
    for i, layer in enumerate(lay.layers):
        weight = parts[2 * i].view(b, layer.fan_out, layer.fan_in)
        tape.inputs.append(h)
        tape.weights.append(weight)
        a = torch.baddbmm(parts[2 * i + 1].unsqueeze(1), h, weight.transpose(1, 2))
        if i < last:
            h = act(a)
            tape.acts.append(h if keep_out else a)
        else:
            h = a
    return h, tape


def _net_backward(
    tape: _NetTape, g_out: torch.Tensor, config: ModelConfig, g_w: torch.Tensor
) -> None:
    """d loss / d w [B, P] into ``g_w`` from d loss / d out [B, n, O] (backpropagation).

    With a_l = h_l W_l^T + b_l (h_{l+1} = act(a_l) for hidden layers) and
    G_l = d loss / d a_l:  dW_l = G_l^T h_l,  db_l = sum_rows G_l,
    G_{l-1} = act'(a_{l-1}) * (G_l W_l): the products and kernels autograd
    runs for the forward, without its graph (the inputs x get no gradient).
    """
    lay = layout(config)
    b = g_w.shape[0]
    parts = g_w.split(_layer_sizes(lay), dim=1)
    g = g_out
    for i in range(len(lay.layers) - 1, -1, -1):
        torch.sum(g, 1, out=parts[2 * i + 1])
        parts[2 * i].copy_(torch.bmm(g.transpose(1, 2), tape.inputs[i]).view(b, -1))
        if i > 0:
            g = _act_backward(config.activation, torch.bmm(g, tape.weights[i]), tape.acts[i - 1])


def _kl_meanfield(
    diff: torch.Tensor, scale: torch.Tensor, inv_var0: torch.Tensor, log_s0: torch.Tensor
) -> torch.Tensor:
    """KL(N(m, s^2) || N(m0, s0^2)) summed over P, per key [K].

    = sum_i log s0_i - sum_i log s_i + 1/2 sum_i (s_i^2 + (m_i - m0_i)^2) / s0_i^2 - P/2
    (the closed form of ``kl_divergence(Normal, Normal)``), from ``diff`` = m - m0 [K, P],
    ``inv_var0`` = s0^-2 ([K, P] or [1, P], shared: its sum a matrix-vector product)
    and ``log_s0`` = sum_i log s0_i.
    """
    sq = diff.square()
    sq.addcmul_(scale, scale)
    quad = torch.mv(sq, inv_var0[0]) if inv_var0.shape[0] == 1 else (sq * inv_var0).sum(-1)
    return log_s0 - scale.log().sum(-1) + 0.5 * quad - 0.5 * diff.shape[-1]


def _softplus_and_slope(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s = softplus(u) = log(1 + e^u) and ds/du = sigmoid(u) = e^u / (1 + e^u).

    On the CPU, where every u <= 20 (``F.softplus``' threshold: below it
    softplus is log1p(exp(u)) too), both from one exp (two transcendental
    passes over [K, P] instead of softplus' and sigmoid's three); else, and on
    other devices (no host sync), ``F.softplus`` and ``torch.sigmoid``.
    """
    if u.device.type == "cpu" and bool(u.max() <= 20.0):
        e = torch.exp(u)
        s = torch.log1p(e)
        return s, e.div_(e + 1.0)
    return F.softplus(u), torch.sigmoid(u)


def _kl_lowrank(
    loc: torch.Tensor,
    factor: torch.Tensor,
    scale: torch.Tensor,
    p_loc: torch.Tensor,
    p_scale: torch.Tensor,
) -> torch.Tensor:
    """The low-rank KL of :func:`fogline.models.fprior.lowrank_kl`, per key [K], float64."""
    m, v, sd = loc.double(), factor.double(), scale.double()
    m0, s0 = p_loc.double(), p_scale.double()
    s02 = s0.pow(2)
    d = sd.pow(2)
    trace = ((d + v.pow(2).sum(-1)) / s02).sum(-1)
    maha = ((m - m0).pow(2) / s02).sum(-1)
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    cap = eye + torch.bmm(v.transpose(1, 2) / d.unsqueeze(1), v)
    chol, info = torch.linalg.cholesky_ex(cap)
    logdet = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet = torch.where(info == 0, logdet, torch.full_like(logdet, math.nan))
    kl = 0.5 * (trace + maha - m.shape[-1] + s02.log().sum(-1) - d.log().sum(-1) - logdet)
    return kl.to(loc.dtype)


def _kl_lowrank_grad(
    loc: torch.Tensor,
    factor: torch.Tensor,
    scale: torch.Tensor,
    p_loc: torch.Tensor,
    p_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The low-rank KL [K] of :func:`_kl_lowrank` and its gradients, in closed form (float64).

    With d = s^2, D = diag(d) and the capacitance C = I_R + V^T D^-1 V
    (Cholesky C = L L^T, C^-1 from L):

        dKL/dm = (m - m0) / s0^2
        dKL/dV = V / s0^2 - D^-1 V C^-1
        dKL/ds = s / s0^2 - 1 / s + (V C^-1 V^T)_ii / s^3

    (d logdet C / dV = 2 D^-1 V C^-1, d logdet C / d d_i = -(V C^-1 V^T)_ii / d_i^2).
    Returns (kl [K], g_m [K, P], g_v [K, P, R], g_s [K, P]) in ``loc``'s dtype;
    a key whose capacitance is not positive definite gets a NaN KL (and so
    is rejected) without touching the other keys.
    """
    # the [K, P, R] products in the parameters' dtype (float32 in the step: relative
    # error ~1e-7 of V^T D^-1 V itself), the capacitance, its Cholesky and every
    # sum of the KL in float64 (log det(I + E) keeps E's digits next to the 1)
    dt = loc.dtype
    inv_s02 = p_scale.pow(-2)
    d = scale * scale
    a = factor / d.unsqueeze(2)  # D^-1 V  [K, P, R]
    small = torch.bmm(factor.transpose(1, 2), a).double()  # V^T D^-1 V  [K, R, R]
    cap = small + torch.eye(factor.shape[-1], dtype=torch.float64, device=factor.device)
    chol, info = torch.linalg.cholesky_ex(cap)
    logdet = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet = torch.where(info == 0, logdet, torch.full_like(logdet, math.nan))
    diff = loc - p_loc
    s02 = p_scale.double().pow(2)
    dd = d.double()
    trace = ((dd + factor.pow(2).sum(-1).double()) / s02).sum(-1)
    maha = (diff.double().pow(2) / s02).sum(-1)
    kl = 0.5 * (trace + maha - loc.shape[-1] + s02.log().sum(-1) - dd.log().sum(-1) - logdet)
    a_cinv = torch.bmm(a, torch.cholesky_inverse(chol).to(dt))  # D^-1 V C^-1
    g_v = torch.addcmul(-a_cinv, factor, inv_s02.unsqueeze(-1))
    quad_over_d = (a_cinv * factor).sum(-1)  # (V C^-1 V^T)_ii / d_i
    g_s = scale * inv_s02 - (1.0 - quad_over_d) / scale
    return kl.to(dt), diff * inv_s02, g_v, g_s


def _adam(
    theta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    t: torch.Tensor,
    lr: torch.Tensor,
    lr_mult: torch.Tensor | None,
) -> None:
    """One in-place Adam step on every key's row of theta [K, T], each with its own count.

    t_k <- t_k + 1;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    theta_k <- theta_k - (lr_k c / (1 - b1^t_k)) m / (sqrt(v) / sqrt(1 - b2^t_k) + eps),
    the update of torch's fused Adam kernel (:func:`fogline.models.svi.adam_`)
    with per-key bias corrections (in float64, as the kernel computes them),
    learning rates ``lr`` [K] (float64) and the parameter groups' multipliers
    c (``lr_mult`` [T], ``None``: all 1).
    """
    b1, b2 = ADAM_BETAS
    t.add_(1)
    exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    td = t.double()
    step_size = (lr / (1 - b1**td)).float().unsqueeze(1)  # [K, 1]
    bc2_sqrt = (1 - b2**td).sqrt().float().unsqueeze(1)
    denom = exp_avg_sq.sqrt().div_(bc2_sqrt).add_(ADAM_EPS)
    upd = exp_avg * step_size
    if lr_mult is not None:
        upd.mul_(lr_mult)
    theta.addcdiv_(upd, denom, value=-1.0)


def _adam_rows(
    rows: PassRows,
    grad: torch.Tensor,
    active: Sequence[int],
    lrs: Sequence[float],
    groups: Sequence[tuple[int, int, float]],
) -> None:
    """:func:`_adam` by torch's fused kernel (:func:`fogline.models.svi.adam_`'s), per key.

    The kernel takes lists of tensors, each with its own step count: the
    ``active`` rows of ``rows.theta`` [K, T] (``unbind``, views) are the
    "parameters" whose moments and counts are ``rows``' per-key views (a
    key's own row of wherever its state lives), so each key gets its own bias
    correction in ONE call per distinct learning rate lr_k c_G (``groups``:
    (start, end, c_G) column ranges; usually one call for the pass).  The
    single-model step's kernel and update, so the same bits.
    """
    assert _FUSED_ADAM is not None
    theta = rows.theta
    every = len(active) == theta.shape[0]
    rows.bump(active)  # the kernel reads the incremented count t
    steps = rows.step if every else [rows.step[i] for i in active]
    lr0 = lrs[active[0]]
    same_lr = all(lrs[i] == lr0 for i in active)
    for start, end, mult in groups:
        whole = start == 0 and end == theta.shape[1]
        p_all = rows.home if rows.home is not None else rows.theta_rows
        if p_all is not None and not whole:
            p_all = [p[start:end] for p in p_all]
        g_all = rows.grad_rows if whole and rows.grad_rows is not None else None
        if p_all is None:
            p_all = (theta if whole else theta[:, start:end]).unbind(0)
        if g_all is None:
            g_all = (grad if whole else grad[:, start:end]).unbind(0)
        p_rows = list(p_all) if every else [p_all[i] for i in active]
        g_rows = list(g_all) if every else [g_all[i] for i in active]
        m_src = rows.exp_avg if every else [rows.exp_avg[i] for i in active]
        v_src = rows.exp_avg_sq if every else [rows.exp_avg_sq[i] for i in active]
        m_rows = m_src if whole else [m[start:end] for m in m_src]
        v_rows = v_src if whole else [v[start:end] for v in v_src]
        by_lr: dict[float, list[int]] = {}
        if same_lr:
            by_lr[lrs[active[0]] * mult] = list(range(len(active)))
        else:
            for j, i in enumerate(active):
                by_lr.setdefault(lrs[i] * mult, []).append(j)
        for lr, idx in by_lr.items():
            one = len(idx) == len(active)
            fused_adam_kernel(
                p_rows if one else [p_rows[j] for j in idx],
                g_rows if one else [g_rows[j] for j in idx],
                m_rows if one else [m_rows[j] for j in idx],
                v_rows if one else [v_rows[j] for j in idx],
                steps if one else [steps[j] for j in idx],
                lr,
            )


def _adam_stacked(
    rows: PassRows,
    grad: torch.Tensor,
    active: Sequence[int],
    lrs: Sequence[float],
    lr_mult: torch.Tensor | None,
) -> None:
    """:func:`_adam` on the ``active`` keys where torch lacks the fused kernel.

    The moments and counts are stacked from ``rows``' views, stepped, and copied back.
    """
    idx = torch.tensor(list(active), dtype=torch.long, device=grad.device)
    theta = rows.theta.index_select(0, idx)
    exp_avg = torch.stack([rows.exp_avg[i] for i in active])
    exp_avg_sq = torch.stack([rows.exp_avg_sq[i] for i in active])
    t = torch.stack([rows.step[i] for i in active])[:, 0]
    lr = torch.tensor([lrs[i] for i in active], dtype=torch.float64, device=grad.device)
    _adam(theta, grad.index_select(0, idx), exp_avg, exp_avg_sq, t, lr, lr_mult)
    if rows.home is None:
        rows.theta.index_copy_(0, idx, theta)
    else:
        for j, i in enumerate(active):
            rows.home[i].copy_(theta[j])
    for j, i in enumerate(active):
        rows.exp_avg[i].copy_(exp_avg[j])
        rows.exp_avg_sq[i].copy_(exp_avg_sq[j])
        rows.step[i].copy_(t[j : j + 1])


def _unpack(prog: Program, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of a key's packed theta [T] by parameter name (``Program.unpack``: one split)."""
    return prog.unpack(theta)


def _new_row(prog: Program, state: PosteriorState) -> torch.Tensor:
    """A fresh [3T + 1] row ``[theta | exp_avg | exp_avg_sq | t]`` holding ``state``'s values.

    One ``clone`` when the state's tensors are views of one such row
    (:func:`_packed_row`: it came from :func:`batched_step`), else one ``cat``.
    """
    row = _packed_row(prog, state)
    if row is not None:
        return row.clone()
    return torch.cat(
        (
            *(state.params[name].reshape(-1) for name in prog.names),
            state.opt_state["exp_avg"].reshape(-1),
            state.opt_state["exp_avg_sq"].reshape(-1),
            state.opt_state["step"].reshape(1).to(torch.float32),
        )
    ).to(state.device, torch.float32)


class _RowMoments(dict[str, torch.Tensor]):
    """The ``opt_state`` mapping of a state made by :func:`batched_step`.

    A plain dict of the Adam moments that also remembers the key's packed row
    and the view tensors (params in ``Program.names`` order, then ``exp_avg``,
    ``exp_avg_sq``, ``step``) cut from it, so :func:`_packed_row` recognises
    the state by the identity of its tensors (one C-level comparison) instead
    of checking every view's base and offset.
    """

    __slots__ = ("row", "views")

    def __init__(
        self, moments: dict[str, torch.Tensor], row: torch.Tensor, views: tuple[torch.Tensor, ...]
    ) -> None:
        super().__init__(moments)
        self.row = row
        self.views = views


def _packed_row(prog: Program, state: PosteriorState) -> torch.Tensor | None:
    """The [3T + 1] row a state made by :func:`batched_step` is a set of views of, else None.

    Such a state's parameters and Adam moments are views of one tensor laid out
    as ``[theta | exp_avg | exp_avg_sq | t]`` (one clone per key); the next
    call then gathers all keys with one ``stack`` instead of one ``cat`` each.
    Checked by identity of the views' base and their offsets, so any other
    state (a restored blob, a policy's reset) takes the general path.
    """
    moments = state.opt_state
    if type(moments) is _RowMoments:
        params = state.params
        now = (
            *(params.get(name) for name in prog.names),
            moments.get("exp_avg"),
            moments.get("exp_avg_sq"),
            moments.get("step"),
        )
        if len(params) == len(prog.names) and all(map(operator.is_, now, moments.views)):
            return moments.row
    loc = state.params["loc"]
    base = loc._base
    total = prog.total
    if base is None or base.dim() != 1 or base.shape[0] != 3 * total + 1:
        return None
    ptr, size = base.data_ptr(), base.element_size()
    views = [(state.params.get(name), sl.start) for name, sl in prog.slots.items()]
    views += [
        (state.opt_state.get("exp_avg"), total),
        (state.opt_state.get("exp_avg_sq"), 2 * total),
        (state.opt_state.get("step"), 3 * total),
    ]
    for tensor, start in views:
        if tensor is None or tensor._base is not base or tensor.data_ptr() != ptr + start * size:
            return None
    return base


class _OodRows:
    """The functional prior's out-of-data inputs x~ of K keys sharing ONE functional prior.

    Each key's draws (:meth:`FunctionalPrior.ood_draws`) come from its own
    generator, in the single step's order, into its slice of one [sum n_k]
    tensor per draw; :meth:`inputs` then forms x~ for every key's rows with
    one :meth:`FunctionalPrior.ood_from_draws` (row-wise, so the same values
    as key by key).
    """

    def __init__(self, fp: FunctionalPrior, xs: Sequence[torch.Tensor], n: Sequence[int]) -> None:
        self.fp = fp
        self.x = torch.cat(list(xs))
        dev = self.x.device
        total = self.x.shape[0]
        self.slot = torch.empty(total, dtype=torch.int64, device=dev)
        self.dist_u = torch.empty(total, dtype=self.x.dtype, device=dev)
        self.left_u = torch.empty(total, device=dev)
        ends = [0]
        for rows in n:
            ends.append(ends[-1] + rows)
        self.ends = ends

    def draws(self, fp: FunctionalPrior | None, i: int, gen: torch.Generator) -> None:
        """Key i's draws from its generator ``gen`` (``fp`` equals the shared prior)."""
        a, b = self.ends[i], self.ends[i + 1]
        out = (self.slot[a:b], self.dist_u[a:b], self.left_u[a:b])
        self.fp.ood_draws(b - a, gen, out=out)

    def inputs(self, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """x~ of every key's rows, zero-padded [K, n_max, D] like the rows (``at``:
        :func:`_pad_index` of ``mask``)."""
        cat = self.fp.ood_from_draws(self.x, self.slot, self.dist_u, self.left_u)
        return _scatter_padded(cat, mask, at)


def _pad_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions [sum n_k] of the real rows in a padded [K, n_max] layout.

    ``mask`` [K, n_max] marks the first n_k rows of key k; its row-major
    nonzeros k n_max + j (j < n_k) are the order of the keys' concatenated
    rows.  Computed once per pass and shared by every padded tensor of it.
    """
    return mask.view(-1).nonzero().squeeze(1)


def _scatter_padded(cat: torch.Tensor, mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The concatenated rows ``cat`` [sum n_k, ...] zero-padded into [K, n_max, ...].

    ``at`` = :func:`_pad_index` (``mask``): row i of ``cat`` goes to flat
    position ``at[i]`` (a copy, the values of ``out[mask] = cat``).
    """
    k, n_max = mask.shape
    out = torch.zeros((k * n_max, *cat.shape[1:]), device=mask.device)
    out.index_copy_(0, at, cat.to(mask.device, torch.float32))
    return out.view(k, n_max, *cat.shape[1:])


def _longs(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=torch.long, device=device)`` for Python ints.

    Through an ``array.array`` (one C loop over the list) instead of
    ``torch.tensor``'s per-element parsing (~0.3 us an element, a few lists per pass).
    """
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    out = torch.frombuffer(array.array("q", values), dtype=torch.long)
    return out if device.type == "cpu" else out.to(device)


def _floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, device=device)`` for Python floats: the same values and dtype.

    The default float dtype (float32): each float64 is rounded to it by the
    cast, as ``torch.tensor`` rounds it; through an ``array.array`` as :func:`_longs`.
    """
    if not values:
        return torch.empty(0, device=device)
    out = torch.frombuffer(array.array("d", values), dtype=torch.float64)
    return out.to(device, torch.get_default_dtype())


def _padded(parts: Sequence[torch.Tensor], mask: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The rows of ``parts`` (key k's [n_k, ...]) zero-padded into [K, n_max, ...].

    ``mask`` [K, n_max] marks the first n_k rows of key k and ``at`` is its
    :func:`_pad_index` (:func:`_scatter_padded`).
    """
    return _scatter_padded(torch.cat(list(parts)), mask, at)


@dataclass
class PassRows:
    """Where the K keys of one pass keep their optimizer state while they are stepped.

    ``theta`` [K, T] is the pass's working copy of the keys' packed
    parameters (stepped in place; the caller writes back the keys it accepts);
    ``exp_avg``, ``exp_avg_sq`` [T] and ``step`` [1] (float32) are K views of
    the keys' own rows, updated in place by Adam; ``gens`` the keys' own
    generators, drawn from in place.  ``bump(active)`` adds 1 to the active
    keys' counts (``None``: ``torch._foreach_add_`` over ``step``; a resident
    table increments its count column with one indexed add instead).
    """

    theta: torch.Tensor
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    step: list[torch.Tensor]
    gens: list[torch.Generator]
    bump_fn: Callable[[Sequence[int]], None] | None = None
    #: the gradient's buffer [K, T] (``None``: a fresh one) and the K row views of
    #: ``theta`` and of it (``None``: ``unbind`` each step), for a caller that reuses them
    grad: torch.Tensor | None = None
    theta_rows: Sequence[torch.Tensor] | None = None
    grad_rows: Sequence[torch.Tensor] | None = None
    #: where Adam writes theta: ``None``, the working copy (the caller writes it back);
    #: else K views of the keys' own rows, which ``refresh()`` gathers into the working
    #: copy again before the next inner step (the working copy keeps the old theta)
    home: Sequence[torch.Tensor] | None = None
    refresh: Callable[[], None] | None = None
    #: reusable noise buffers (``None``: fresh ones each pass)
    noise: NoiseBuffers | None = None

    def bump(self, active: Sequence[int]) -> None:
        """t_k <- t_k + 1 for the ``active`` keys."""
        if self.bump_fn is not None:
            self.bump_fn(active)
        elif len(active) == len(self.step):
            torch._foreach_add_(self.step, 1.0)
        else:
            torch._foreach_add_([self.step[i] for i in active], 1.0)


@dataclass(frozen=True)
class PassKeys:
    """The per-key inputs of one pass (K entries each): rows and step parameters.

    ``batches``: each key's rows; ``data_size``: N_k; ``likelihood_weight``:
    beta_k; ``functional_prior``: its prior or ``None``; ``lr``: lr_k;
    ``prior``: the KL prior pi_k; ``lr_scale``: the low-rank factor's step
    multiplier c, shared by the pass (:func:`group_key`).
    """

    batches: Sequence[Minibatch]
    data_size: Sequence[float]
    likelihood_weight: Sequence[float]
    functional_prior: Sequence[FunctionalPrior | None]
    lr: Sequence[float]
    prior: Sequence[PriorSpec]
    lr_scale: float = 1.0
    #: each key's row count (``None``: read from ``batches``)
    rows: Sequence[int] | None = None


@dataclass(frozen=True)
class PassResult:
    """One pass's outcome per key, as columns (K floats each, one list per quantity):
    ``loss[k]``, ``kl[k]``, ``log_lik[k]``, ``grad_norm[k]`` of the last inner step and
    ``ok[k]`` (False: rejected, its row and RNG to be restored)."""

    loss: list[float]
    kl: list[float]
    log_lik: list[float]
    grad_norm: list[float]
    ok: list[bool]


def _stacked_prior(priors: Sequence[PriorSpec]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior loc and scale [K, P], or [1, P] (broadcast) when every key shares one prior."""
    p0 = priors[0]
    if all(p.loc is p0.loc and p.scale is p0.scale for p in priors):
        return p0.loc.unsqueeze(0), p0.scale.unsqueeze(0)
    return torch.stack([p.loc for p in priors]), torch.stack([p.scale for p in priors])


def _xs(batches: Sequence[Minibatch]) -> list[torch.Tensor]:
    return [mb.x for mb in batches]


#: Reusable noise buffers of a caller: (samples, width) -> (buffer [C, samples, width],
#: its C row views); a pass of K <= C keys uses the first K.
NoiseBuffers = dict[tuple[int, int], tuple[torch.Tensor, list[torch.Tensor]]]


def _noise_buffer(
    cache: NoiseBuffers | None, k: int, samples: int, width: int, dev: torch.device
) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """A [k, samples, width] buffer for standard normals and its k row views."""
    if cache is None:
        buf = torch.empty(k, samples, width, device=dev)
        return buf, buf.unbind(0)
    got = cache.get((samples, width))
    if got is None or got[0].shape[0] < k:
        full = torch.empty(k, samples, width, device=dev)
        got = cache[(samples, width)] = (full, list(full.unbind(0)))
    return got[0][:k], got[1][:k]


@torch.no_grad()
def step_pass(
    config: ModelConfig,
    device: torch.device,
    rows: PassRows,
    keys: PassKeys,
    *,
    num_steps: int = 1,
) -> PassResult:
    """``num_steps`` Adam steps of K keys' objectives in one batched pass (module docstring).

    The keys' states live in ``rows`` (a pass of :func:`batched_step`: fresh
    per-key rows; of a resident key table: views of the table's rows); their
    inputs in ``keys``.  Every key must share one :func:`group_key`.

    The gradient, without autograd: the likelihood's and the functional
    term's w.r.t. the nets' outputs (and a learned df) in closed form
    (:func:`_head_grad`, :func:`_functional_kl_grad`), the nets
    backpropagated by hand (:func:`_net_backward`: dW_l = G_l^T h_l,
    db_l = sum_rows G_l, G_{l-1} = act'(a_{l-1}) (G_l W_l), autograd's kernels)
    to g_w = dL/dw [K, S, P], and the chain rule through w = m + s eps (+ V z),
    s = softplus(u) and the KL's gradient are applied in closed form:

        g_m = sum_s g_w + c (m - m0),   g_u = (sum_s g_w eps + c s - 1 / (N_k s)) sigmoid(u),
        c = s0^-2 / N_k

    (mean-field; the low-rank KL's gradient in closed form, float64), so the
    [K, T] tensors are touched a few times a step.

    Rejection: a key whose data loss or gradient is not finite at an inner
    step (the gradient's row sum: an entry past float32's range, ~1e38, counts
    as not finite) takes no Adam step from then on (its moments and count stay as they
    were at that step), as does a key whose total loss is not finite at the
    last step; a key whose updated theta is not finite is flagged too (with
    ``rows.home``, theta stepped in the keys' own rows, that check is not
    made: it cannot fire for a key that passed the others, since Adam's step
    is bounded by ~lr and every parameter enters the loss through the KL, or
    df through lgamma, which overflow long before theta does).  Every
    flagged key has ``ok = False``: the caller returns its old state (restores
    its row, which after a single inner step only theta's working copy has
    left, and its generator).  No other key's row is touched by its NaNs.
    """
    prog = program(config, device)
    dev = device
    k_keys = rows.theta.shape[0]
    p_size, rank = prog.size, prog.rank
    fps = keys.functional_prior
    fp0 = fps[0]
    samples = fp0.samples if fp0 is not None else 1
    n = list(keys.rows) if keys.rows is not None else [mb.rows for mb in keys.batches]
    n_max = max(n)
    d = config.in_features
    n_t = _longs(n, dev)
    f32 = torch.float32
    on_cpu = dev.type == "cpu"
    xs = [
        x if x.dtype is f32 and on_cpu and x.is_cpu else x.to(dev, f32) for x in _xs(keys.batches)
    ]
    mask = torch.arange(n_max, device=dev).unsqueeze(0) < n_t.unsqueeze(1)  # [K, n_max]
    at = _pad_index(mask)
    x = _padded(xs, mask, at)
    y = _padded([mb.y for mb in keys.batches], mask, at)
    row_f = n_t.to(torch.float32)
    obs_scale = _floats([w / n_i for w, n_i in zip(keys.likelihood_weight, n, strict=True)], dev)
    kl_scale = _floats([1.0 / v for v in keys.data_size], dev).unsqueeze(1)
    p_loc, p_scale = _stacked_prior(keys.prior)
    inv_var0 = p_scale.pow(-2)
    log_s0 = p_scale.log().sum(-1)  # [K] or [1]
    theta = rows.theta
    total = prog.total
    lrs = [float(v) for v in keys.lr]
    lr_mult = None
    adam_groups = [(0, total, 1.0)]
    if prog.lowrank:  # the parameter groups of models.svi.param_groups
        lr_mult = torch.ones(total, device=dev)
        adam_groups = []
        for grp in prog.groups(keys.lr_scale):
            lr_mult[grp.start : grp.end] = grp.lr_scale
            adam_groups.append((grp.start, grp.end, float(grp.lr_scale)))
    if fp0 is not None:
        f_w = torch.tensor([f.weight for f in fps if f is not None], device=dev)
        f_loc = torch.tensor([f.loc for f in fps if f is not None], device=dev)
        f_scale = torch.tensor([f.scale for f in fps if f is not None], device=dev)
    # one functional prior for the pass (the fleet's): x~ of every key's rows in one go
    ood = (_OodRows(fp0, xs, n),) if fp0 is not None and all(f == fp0 for f in fps) else None
    gens = rows.gens
    grad = torch.empty_like(theta) if rows.grad is None else rows.grad
    eps, eps_rows = _noise_buffer(rows.noise, k_keys, samples, p_size, dev)
    z_all, z_rows = _noise_buffer(rows.noise, k_keys, samples, rank, dev) if rank else (None, [])
    plain = ood is None and all(f is None for f in fps)  # only eps (and z) to draw
    ok = [True] * k_keys
    active: list[int] = list(range(k_keys))
    host: list[list[float]] = [[], [], [], []]
    for step_i in range(num_steps):
        last = step_i == num_steps - 1
        xo_l = []
        # each key's draws from its own generator, in stream_step's order
        # (``normal_`` on each key's [S, P] row: torch.randn's kernel and bits, less call overhead)
        if plain and not rank:
            for gen, e in zip(gens, eps_rows, strict=True):
                e.normal_(generator=gen)
        else:
            for i in range(k_keys):
                gen = gens[i]
                eps_rows[i].normal_(generator=gen)
                if rank:
                    z_rows[i].normal_(generator=gen)
                fp = fps[i]
                if ood is not None:  # the draws only; x~ of all keys' rows at once below
                    ood[0].draws(fp, i, gen)
                elif fp is not None:
                    xo_l.append(fp.ood_inputs(xs[i], gen))
        loc = theta[:, :p_size]
        u = theta[:, p_size : 2 * p_size]
        scale, slope = _softplus_and_slope(u)
        w = torch.addcmul(loc.unsqueeze(1), eps, scale.unsqueeze(1))  # [K, S, P]
        z = factor = None
        if rank:
            sl = prog.slots["cov_factor"]
            factor = theta[:, sl.start : sl.end].reshape(k_keys, p_size, rank)
            z = z_all  # [K, S, R]
            assert z is not None
            w.add_(torch.bmm(z, factor.transpose(1, 2)))
        w0 = w.view(k_keys, p_size) if samples == 1 else w[:, 0]
        out, tape = _net_forward(w0, x, config)  # [K, n_max, O]
        if fp0 is not None:
            x_ood = ood[0].inputs(mask, at) if ood is not None else _padded(xo_l, mask, at)
            x_rep = x_ood.unsqueeze(1).expand(k_keys, samples, n_max, d)
            out_f, tape_f = _net_forward(
                w.reshape(k_keys * samples, p_size), x_rep.reshape(-1, n_max, d), config
            )
        df_u = theta[:, -1:] if config.learns_df else None
        lp, g_out, g_df = _head_grad(out, y, mask, obs_scale, config, df_u)
        data_loss = -obs_scale * lp
        if fp0 is not None:
            fkl, g_mean = _functional_kl_grad(
                out_f[..., 0].reshape(k_keys, samples, n_max), mask, row_f, f_loc, f_scale, f_w
            )
            data_loss = data_loss + fkl
            g_out_f = torch.zeros_like(out_f)
            g_out_f[..., 0] = g_mean.reshape(k_keys * samples, n_max)
        g_loc = grad[:, :p_size]
        g_u = grad[:, p_size : 2 * p_size]
        # the nets' gradient w.r.t. the draws: g_w [K, S, P] (S = 1: straight into g_loc)
        if fp0 is None:
            _net_backward(tape, g_out, config, g_loc)
            g_w = g_loc.unsqueeze(1)
            torch.mul(g_loc, eps.view(k_keys, p_size), out=g_u)  # dL/ds = g_w * eps
        else:
            g_w = torch.empty_like(w)
            _net_backward(tape_f, g_out_f, config, g_w.view(k_keys * samples, p_size))
            g_data = torch.empty_like(w0)
            _net_backward(tape, g_out, config, g_data)
            g_w[:, 0].add_(g_data)
            torch.sum(g_w, 1, out=g_loc)
            torch.sum(g_w * eps, 1, out=g_u)
        # + the KL's gradient (closed form; kl_scale = 1 / N_k), then ds/du
        if factor is not None and z is not None:
            sl = prog.slots["cov_factor"]
            g_v = torch.bmm(g_w.transpose(1, 2), z)  # [K, P, R]
            kl, gk_m, gk_v, gk_s = _kl_lowrank_grad(loc, factor, scale, p_loc, p_scale)
            g_loc.addcmul_(gk_m, kl_scale)
            g_u.addcmul_(gk_s, kl_scale)
            grad[:, sl.start : sl.end] = (g_v + gk_v * kl_scale.unsqueeze(2)).reshape(k_keys, -1)
        else:
            # dKL/dm = (m - m0) / s0^2,  dKL/ds = s / s0^2 - 1 / s, both / N_k
            diff = loc - p_loc
            kl = _kl_meanfield(diff, scale, inv_var0, log_s0) if last else torch.empty(0)
            c = kl_scale * inv_var0  # [K, P]
            g_loc.addcmul_(diff, c)
            g_u.addcmul_(c, scale).addcdiv_(kl_scale, scale, value=-1.0)
        g_u.mul_(slope)  # d softplus(u) / du = sigmoid(u)
        if g_df is not None:
            grad[:, -1:] = g_df
        # a non-finite entry makes its row's sum non-finite (one pass over [K, T]); on the
        # last step the gradient's norm serves (finite norm: finite entries; a norm that
        # overflows on finite entries is told apart by the row sum, on that rare pass only)
        if last:
            loss = data_loss + kl_scale[:, 0] * kl
            gnorm = torch.linalg.vector_norm(grad, dim=1)
            # five columns of K floats (one host copy; no list per key)
            host = torch.stack((loss, kl, lp, gnorm, loss + gnorm)).tolist()
            check = host[4]
            bad = []
            if not all(map(math.isfinite, check)):
                finite = torch.isfinite(loss) & torch.isfinite(data_loss + grad.sum(1))
                check = [0.0 if f else math.nan for f in finite.tolist()]
                bad = [i for i in active if not math.isfinite(check[i])]
        else:
            finite = torch.isfinite(data_loss + grad.sum(1))
            bad = [] if bool(finite.all()) else [i for i in active if not bool(finite[i])]
        if bad:  # no Adam step for them from here on: their rows keep what they had
            for i in bad:
                ok[i] = False
            active = [i for i in active if ok[i]]
        if not active:
            continue
        if _FUSED_ADAM is not None:
            _adam_rows(rows, grad, active, lrs, adam_groups)
        else:
            _adam_stacked(rows, grad, active, lrs, lr_mult)
        if not last and rows.refresh is not None:
            rows.refresh()
    if active and rows.home is None:
        sums = theta.sum(1).tolist()
        for i in active:
            if not math.isfinite(sums[i]):
                ok[i] = False
    return PassResult(host[0], host[1], host[2], host[3], ok)


def batched_step(
    jobs: Sequence[KeyJob], *, num_steps: int = 1
) -> list[tuple[PosteriorState, StepInfo]]:
    """``num_steps`` Adam steps of every job's objective in one batched pass (module docstring).

    Every job must share one :func:`group_key` (model config, device, the
    functional prior's sample count).  Returns, per job in order, the new
    state and its :class:`StepInfo`, as ``stream_step`` would for that key.
    Each key's new state is ONE fresh row [3T + 1] = [theta | exp_avg |
    exp_avg_sq | t] (params and moments are views of it), copied once from its
    old state and stepped by :func:`step_pass`.
    """
    if not jobs:
        return []
    first = jobs[0]
    config, dev = first.state.config, first.state.device
    prog = program(config, dev)
    total = prog.total
    new_rows = [_new_row(prog, j.state) for j in jobs]
    parts = [r.split((total, total, total, 1)) for r in new_rows]
    gens = []
    for j in jobs:  # each key's own generator, loaded with its state
        gen = torch.Generator(device=dev)
        gen.set_state(j.state.rng_state)
        gens.append(gen)
    rows = PassRows(
        torch.stack([q[0] for q in parts]),
        [q[1] for q in parts],
        [q[2] for q in parts],
        [q[3] for q in parts],
        gens,
    )
    keys = PassKeys(
        [j.batch for j in jobs],
        [j.data_size for j in jobs],
        [j.likelihood_weight for j in jobs],
        [j.functional_prior for j in jobs],
        [j.state.lr for j in jobs],
        [j.state.prior for j in jobs],
        _lr_scale(first.state),
    )
    res = step_pass(config, dev, rows, keys, num_steps=num_steps)
    torch._foreach_copy_([q[0] for q in parts], list(rows.theta.unbind(0)))
    results: list[tuple[PosteriorState, StepInfo]] = []
    for i, j in enumerate(jobs):
        loss_f, kl_f, lp_f, gn_f = res.loss[i], res.kl[i], res.log_lik[i], res.grad_norm[i]
        n_i = j.batch.rows
        nll = -lp_f / n_i
        if not res.ok[i]:
            results.append((j.state, StepInfo(loss_f, nll, kl_f, gn_f, n_i, num_steps, True)))
            continue
        st = j.state
        q = parts[i]
        results.append(
            (
                _row_state(prog, st, new_rows[i], q, gens[i].get_state(), num_steps, n_i),
                StepInfo(loss_f, nll, kl_f, gn_f, n_i, num_steps),
            )
        )
    return results


def _row_state(
    prog: Program,
    old: PosteriorState,
    row: torch.Tensor,
    q: Sequence[torch.Tensor],
    rng_state: torch.Tensor,
    num_steps: int,
    rows: int,
) -> PosteriorState:
    """``old`` stepped: params and moments the views ``q`` of its packed ``row``."""
    return row_state(
        prog,
        old,
        row,
        q,
        rng_state,
        step_count=old.step_count + num_steps,
        records_absorbed=old.records_absorbed + rows,
    )


def row_state(
    prog: Program,
    template: PosteriorState,
    row: torch.Tensor,
    q: Sequence[torch.Tensor],
    rng_state: torch.Tensor,
    *,
    step_count: int,
    records_absorbed: int,
) -> PosteriorState:
    """``template`` with the params and Adam moments of a packed row [3T + 1].

    ``q`` = ``row.split((T, T, T, 1))``; the state's tensors are views of
    ``row`` (recognised by :func:`_packed_row`: the next batched step gathers
    it with one copy), every other field is ``template``'s.
    """
    params = _unpack(prog, q[0])
    step_t = q[3].view(())
    moments = _RowMoments(
        {"exp_avg": q[1], "exp_avg_sq": q[2], "step": step_t},
        row,
        (*params.values(), q[1], q[2], step_t),
    )
    return _evolve(
        template,
        params=params,
        opt_state=moments,
        step_count=step_count,
        rng_state=rng_state,
        records_absorbed=records_absorbed,
    )
