"""Streaming stochastic variational inference as a pure function.

The model is a Pyro program over ONE flat weight site ``w`` [P]::

    w ~ N(prior.loc, diag(prior.scale^2))                         (prior pi_t)
    y_i | x_i, w ~ p(y | f_w(x_i))        for i in the minibatch  (likelihood)

and the guide is a hand-written Gaussian q_lambda(w): mean-field
N(m, diag(s^2)) or low-rank N(m, V V^T + diag(s^2)).

Update (one call of :func:`step`, K inner gradient steps).  With prior pi_t
(the base prior p0, the previous posterior for streaming VB, or the forgetting
mix of :mod:`drift.policy`), likelihood weight beta and data size N_t, each
inner step does one Adam step on the per-observation negative ELBO

    L(lambda) = -(1/N_t) [ beta (N_t / n) sum_{i<=n} E_q log p(y_i | x_i, w)
                           - KL(q_lambda || pi_t) ]

using one reparameterised sample of w and the closed-form KL (Pyro's
``TraceMeanField_ELBO``).  q after the call approximates

    p_t(w) ∝ pi_t(w) · prod_i p(y_i | x_i, w)^(beta N_t / n),

i.e. the batch stands for N_t observations.  ``data_size = n`` (the default)
is plain posterior-as-prior streaming; a large ``data_size`` with a frozen
prior is the classic minibatch SVI of a fixed data set.  beta < 1 tempers an
anomalous batch (generalised Bayes).

Stability (NumPyro's ``stable_update``): if the loss or any parameter is not
finite after the call, the input state is returned unchanged with
``rejected=True``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.ops.jit
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import Independent, LowRankMultivariateNormal, Normal, register_kl
from torch.optim.adam import adam as _functional_adam

from models.config import ModelConfig
from models.likelihoods import df_from_unconstrained, df_to_unconstrained, observation_dist
from models.network import forward, layout
from models.priors import default_prior, kl_to_prior
from models.state import Minibatch, PosteriorState, PriorSpec, StepInfo, _fresh_rng_state

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


# ---------------------------------------------------------------------------
# closed-form KL for the low-rank guide against a diagonal prior
# ---------------------------------------------------------------------------
@register_kl(LowRankMultivariateNormal, Independent)
def _kl_lowrank_diag(q: LowRankMultivariateNormal, p: Independent) -> torch.Tensor:
    """KL(N(mu, V V^T + D) || N(m, diag(s^2))).

    = 1/2 [ tr(S^-1 Sigma) + (m - mu)^T S^-1 (m - mu) - P + log|S| - log|Sigma| ]
    with tr(S^-1 Sigma) = sum_i (D_i + sum_r V_ir^2) / s_i^2 and
    log|Sigma| = log|D| + log|I_R + V^T D^-1 V| (matrix determinant lemma).
    """
    base = p.base_dist
    if not isinstance(base, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    s2 = base.scale.pow(2)
    d = q.cov_diag
    v = q.cov_factor
    trace = ((d + v.pow(2).sum(-1)) / s2).sum(-1)
    maha = ((base.loc - q.loc).pow(2) / s2).sum(-1)
    cap = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device) + (v.transpose(-1, -2) / d) @ v
    logdet_sigma = d.log().sum(-1) + torch.linalg.slogdet(cap)[1]
    return 0.5 * (trace + maha - q.loc.shape[-1] + s2.log().sum(-1) - logdet_sigma)


# ---------------------------------------------------------------------------
# parameter packing
# ---------------------------------------------------------------------------
def param_names(config: ModelConfig) -> tuple[str, ...]:
    """Names of the variational parameters, in packing order."""
    names = ["loc", "scale_unconstrained"]
    if config.guide == "lowrank":
        names.append("cov_factor")
    if config.learns_df:
        names.append("df_unconstrained")
    return tuple(names)


def _pack(params: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1) for k in names])


def _unpack(
    theta: torch.Tensor, like: dict[str, torch.Tensor], names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    pos = 0
    for k in names:
        n = like[k].numel()
        out[k] = theta[pos : pos + n].reshape(like[k].shape)
        pos += n
    return out


# ---------------------------------------------------------------------------
# the Pyro program
# ---------------------------------------------------------------------------
class _FixedJitTraceMeanField_ELBO(pyro.infer.JitTraceMeanField_ELBO):
    """Pyro 1.9.2's JitTraceMeanField_ELBO re-traces every call (it tests one
    cached attribute name and stores another); this caches correctly."""

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["_pyro_model_id"] = id(model)
        kwargs["_pyro_guide_id"] = id(guide)
        if getattr(self, "_differentiable_loss", None) is None:
            weakself = weakref.ref(self)

            @pyro.ops.jit.trace(
                ignore_warnings=self.ignore_jit_warnings, jit_options=self.jit_options
            )
            def differentiable_loss(*args: Any, **kwargs: Any) -> Any:
                kwargs.pop("_pyro_model_id")
                kwargs.pop("_pyro_guide_id")
                self = weakself()
                assert self is not None
                loss: Any = 0.0
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                    _, loss_particle = self._differentiable_loss_particle(model_trace, guide_trace)
                    loss = loss + loss_particle / self.num_particles
                return loss

            self._differentiable_loss = differentiable_loss
        return self._differentiable_loss(*args, **kwargs)


class Program:
    """The Pyro model and guide of one :class:`ModelConfig`, with a bound ELBO.

    Model and guide are bound once (Pyro's JIT caches on their identity) and
    take every tensor as an argument: ``(x [N,D], y [N], theta [T],
    prior_loc [P], prior_scale [P], obs_scale [], kl_scale [])``, where
    ``theta`` packs the variational parameters.  ``obs_scale`` = beta / n and
    ``kl_scale`` = 1 / N_t scale the two ELBO terms (see the module docstring).
    """

    def __init__(self, config: ModelConfig, *, jit: bool = True) -> None:
        self.config = config
        self.names = param_names(config)
        self.size = layout(config).size
        self.like = _template(config)
        self.elbo = (
            _FixedJitTraceMeanField_ELBO(ignore_jit_warnings=True) if jit else TraceMeanField_ELBO()
        )
        self.model = self._model
        self.guide = self._guide

    def _df(self, theta: torch.Tensor) -> torch.Tensor | None:
        if self.config.learns_df:
            return df_from_unconstrained(theta[-1])
        return None

    def _model(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        theta: torch.Tensor,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        obs_scale: torch.Tensor,
        kl_scale: torch.Tensor,
    ) -> None:
        with poutine.scale(scale=kl_scale):
            w = pyro.sample("w", dist.Normal(prior_loc, prior_scale).to_event(1))
        out = forward(w.unsqueeze(0), x, self.config).squeeze(0)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=obs_scale):
            pyro.sample("obs", observation_dist(out, self.config, self._df(theta)), obs=y)

    def _guide(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        theta: torch.Tensor,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        obs_scale: torch.Tensor,
        kl_scale: torch.Tensor,
    ) -> None:
        p = _unpack(theta, self.like, self.names)
        scale = F.softplus(p["scale_unconstrained"])
        with poutine.scale(scale=kl_scale):
            if "cov_factor" in p:
                pyro.sample(
                    "w", dist.LowRankMultivariateNormal(p["loc"], p["cov_factor"], scale.pow(2))
                )
            else:
                pyro.sample("w", dist.Normal(p["loc"], scale).to_event(1))

    def loss(self, *args: torch.Tensor) -> torch.Tensor:
        """Differentiable per-observation negative ELBO for the packed arguments."""
        return self.elbo.differentiable_loss(self.model, self.guide, *args)


def _template(config: ModelConfig) -> dict[str, torch.Tensor]:
    p = layout(config).size
    t = {"loc": torch.empty(p), "scale_unconstrained": torch.empty(p)}
    if config.guide == "lowrank":
        t["cov_factor"] = torch.empty(p, config.rank)
    if config.learns_df:
        t["df_unconstrained"] = torch.empty(1)
    return t


_PROGRAMS: dict[tuple[str, str, bool], Program] = {}


def program(config: ModelConfig, device: torch.device, *, jit: bool = True) -> Program:
    """The (memoised) :class:`Program` of ``config``; JIT traces are per device."""
    key = (config.model_dump_json(), str(device), jit)
    prog = _PROGRAMS.get(key)
    if prog is None:
        prog = _PROGRAMS[key] = Program(config, jit=jit)
    return prog


# ---------------------------------------------------------------------------
# state construction
# ---------------------------------------------------------------------------
def init_state(
    config: ModelConfig,
    *,
    seed: int = 0,
    lr: float = 5e-3,
    prior: PriorSpec | None = None,
    init_loc: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> PosteriorState:
    """A fresh state: q centred on ``init_loc`` (LeCun-normal draws by default).

    The initial posterior scale is ``config.init_scale`` for every weight; the
    low-rank factor starts at ``init_scale / sqrt(rank)`` (random signs) so its
    marginal variance matches; a learned Student-t df starts at 10.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    lay = layout(config)
    if init_loc is None:
        loc = torch.zeros(lay.size)
        for layer in lay.layers:
            n = layer.fan_in * layer.fan_out
            loc[layer.w_start : layer.w_start + n] = torch.randn(n, generator=gen) / math.sqrt(
                layer.fan_in
            )
    else:
        if init_loc.shape != (lay.size,):
            raise ValueError(
                f"init_loc has shape {tuple(init_loc.shape)}, the model needs ({lay.size},)"
            )
        loc = init_loc.detach().float().clone()
    s0 = torch.tensor(config.init_scale)
    params = {
        "loc": loc,
        "scale_unconstrained": torch.full((lay.size,), float(s0 + torch.log(-torch.expm1(-s0)))),
    }
    if config.guide == "lowrank":
        params["cov_factor"] = (
            torch.randn(lay.size, config.rank, generator=gen)
            * config.init_scale
            / math.sqrt(config.rank)
        )
    if config.learns_df:
        params["df_unconstrained"] = df_to_unconstrained(10.0)
    total = sum(v.numel() for v in params.values())
    opt = {
        "exp_avg": torch.zeros(total),
        "exp_avg_sq": torch.zeros(total),
        "step": torch.tensor(0.0),
    }
    return PosteriorState(
        config=config,
        params={k: v.to(dev) for k, v in params.items()},
        opt_state={k: v.to(dev) for k, v in opt.items()},
        prior=(prior or default_prior(config)).to(dev),
        lr=lr,
        rng_state=_fresh_rng_state(dev, seed),
    )


def reset_optimizer(state: PosteriorState) -> PosteriorState:
    """Zero the Adam moments (e.g. after a prior swap)."""
    return state.replace(opt_state={k: torch.zeros_like(v) for k, v in state.opt_state.items()})


# ---------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------
class _DeviceRng:
    """Run a block under the state's generator and capture it afterwards."""

    def __init__(self, device: torch.device, rng_state: torch.Tensor) -> None:
        self.device = device
        self.rng_state = rng_state
        self.saved: torch.Tensor | None = None

    def __enter__(self) -> _DeviceRng:
        if self.device.type == "cuda":
            self.saved = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.rng_state, self.device)
        else:
            self.saved = torch.get_rng_state()
            torch.set_rng_state(self.rng_state)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.saved is not None
        if self.device.type == "cuda":
            self.rng_state = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.saved, self.device)
        else:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(self.saved)


@contextlib.contextmanager
def _no_fusion(active: bool) -> Iterator[None]:
    """Disable TorchScript's fusion groups while ``active``.

    The profiling executor's fused CPU graph of the low-rank guide fails after
    its profiling runs (a reshape of an empty slice, torch 2.13); with fusion
    off the same graph runs correctly.
    """
    if not active:
        yield
        return
    old = torch.jit.set_fusion_strategy([("STATIC", 0), ("DYNAMIC", 0)])
    try:
        yield
    finally:
        torch.jit.set_fusion_strategy(old)


def step(
    state: PosteriorState,
    batch: Minibatch,
    *,
    num_steps: int = 1,
    data_size: int | None = None,
    likelihood_weight: float = 1.0,
    jit: bool = True,
) -> tuple[PosteriorState, StepInfo]:
    """Absorb ``batch``: ``num_steps`` Adam steps on the per-observation negative ELBO.

    See the module docstring for the objective.  ``data_size`` is N_t (default:
    the batch's rows), ``likelihood_weight`` is beta in [0, 1].  The returned
    state has ``step_count`` advanced and ``records_absorbed`` increased by the
    batch's rows; offsets are the caller's business.  Never mutates ``state``.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if not 0.0 <= likelihood_weight <= 1.0:
        raise ValueError(f"likelihood_weight must lie in [0, 1], got {likelihood_weight}")
    n = batch.rows
    if n == 0:
        raise ValueError("empty minibatch")
    big_n = float(data_size if data_size is not None else n)
    dev = state.device
    prog = program(state.config, dev, jit=jit)
    x = batch.x.to(dev, torch.float32)
    y = batch.y.to(dev, torch.float32)
    theta = _pack(state.params, prog.names).detach().clone().requires_grad_(True)
    exp_avg = state.opt_state["exp_avg"].clone()
    exp_avg_sq = state.opt_state["exp_avg_sq"].clone()
    opt_step = state.opt_state["step"].clone()
    obs_scale = torch.tensor(likelihood_weight / n, device=dev)
    kl_scale = torch.tensor(1.0 / big_n, device=dev)
    prior_loc, prior_scale = state.prior.loc, state.prior.scale
    loss = torch.tensor(float("nan"))
    kl = torch.tensor(float("nan"))
    grad_norm = torch.tensor(float("nan"))
    with _DeviceRng(dev, state.rng_state) as rng, _no_fusion(state.config.guide == "lowrank"):
        for k in range(num_steps):
            loss = prog.loss(x, y, theta, prior_loc, prior_scale, obs_scale, kl_scale)
            (grad,) = torch.autograd.grad(loss, [theta])
            if k == num_steps - 1:
                with torch.no_grad():
                    grad_norm = grad.norm()
                    kl = _kl(theta.detach(), state, prog)
            with torch.no_grad():
                _functional_adam(
                    [theta],
                    [grad],
                    [exp_avg],
                    [exp_avg_sq],
                    [],
                    [opt_step],
                    fused=True,
                    amsgrad=False,
                    beta1=ADAM_BETAS[0],
                    beta2=ADAM_BETAS[1],
                    lr=state.lr,
                    weight_decay=0.0,
                    eps=ADAM_EPS,
                    maximize=False,
                )
    theta = theta.detach()
    loss_f, kl_f = float(loss.detach()), float(kl)
    nll = (loss_f - kl_f / big_n) / likelihood_weight if likelihood_weight > 0 else float("nan")
    if not (math.isfinite(loss_f) and bool(torch.isfinite(theta).all())):
        return state, StepInfo(loss_f, nll, kl_f, float(grad_norm), n, num_steps, rejected=True)
    new = state.replace(
        params=_unpack(theta, state.params, prog.names),
        opt_state={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": opt_step},
        step_count=state.step_count + num_steps,
        rng_state=rng.rng_state,
        records_absorbed=state.records_absorbed + n,
    )
    return new, StepInfo(loss_f, nll, kl_f, float(grad_norm), n, num_steps)


def _kl(theta: torch.Tensor, state: PosteriorState, prog: Program) -> torch.Tensor:
    p = _unpack(theta, state.params, prog.names)
    scale = F.softplus(p["scale_unconstrained"])
    if "cov_factor" in p:
        q = LowRankMultivariateNormal(p["loc"], p["cov_factor"], scale.pow(2))
        prior = Independent(Normal(state.prior.loc, state.prior.scale), 1)
        return _kl_lowrank_diag(q, prior)
    return kl_to_prior(p["loc"], scale, state.prior)


StepCallback = Callable[[PosteriorState, StepInfo, int], "PosteriorState | None"]


def scan(
    batches: Iterable[Minibatch],
    state: PosteriorState,
    callback: StepCallback | None = None,
    **step_kwargs: Any,
) -> PosteriorState:
    """Fold :func:`step` over ``batches``.

    After each step ``callback(state, info, index)`` may return a replacement
    state (e.g. a policy swapping the prior); ``None`` keeps the stepped one.
    The daemon, the replay experiments and the tests all drive updates
    through this one loop.
    """
    for i, batch in enumerate(batches):
        state, info = step(state, batch, **step_kwargs)
        if callback is not None:
            replaced = callback(state, info, i)
            if replaced is not None:
                state = replaced
    return state


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`: the final state and the per-epoch mean losses."""

    state: PosteriorState
    losses: list[float]


def fit(
    state: PosteriorState,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 256,
    seed: int = 0,
    jit: bool = True,
    on_epoch: Callable[[int, float, PosteriorState], None] | None = None,
) -> FitResult:
    """Classic minibatch SVI of a fixed data set (frozen prior, data_size = N).

    Shuffles with a generator seeded by ``seed``; each epoch is one pass.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    losses: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            state, info = step(state, Minibatch(x[idx], y[idx]), data_size=n, jit=jit)
            total += info.loss
            count += 1
        losses.append(total / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1], state)
    return FitResult(state, losses)
