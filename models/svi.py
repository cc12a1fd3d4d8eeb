"""Streaming stochastic variational inference as a pure function: ONE update step.

The model is a Pyro program over ONE flat weight site ``w`` [P]::

    w ~ N(prior.loc, diag(prior.scale^2))                         (prior pi_t)
    y_i | x_i, w ~ p(y | f_w(x_i))        for i in the minibatch  (likelihood)

and the guide is a hand-written Gaussian q_lambda(w): mean-field
N(m, diag(s^2)) or low-rank N(m, V V^T + diag(s^2)).

There is one objective and one step (:func:`step`); the variants are terms
and parameters of it (BlackJAX's ``vi/_gaussian_vi.py``): the functional
prior of :mod:`fogline.models.fprior` is an optional term, the likelihood
weight beta and the data size N_t are parameters, the low-rank factor's step
scale is an optimizer parameter group.  See :func:`step` for the mathematics.

Speed (docs/performance.md).  The objective is Pyro's mean-field ELBO
particle of this model and guide (built from public ``poutine.trace`` /
``poutine.replay`` traces), plus the optional functional term, traced once
per (config, device, variant) by ``torch.jit.trace`` and then run by
TorchScript's interpreter with eager autograd (identical bits on every call,
so a restarted process resumes exactly); inside one call the packed
parameters theta [T] are one tensor, the Adam moments are updated by torch's
fused kernel in place, the diagnostics are taken on the last inner step only,
and the host is synchronised once.

Randomness is carried, not swapped: the reparameterisation noise (and the
functional prior's out-of-data inputs) are drawn from an explicit
``torch.Generator`` on the state's device, built from ``state.rng_state``;
its new state is stored back in the returned state.  Torch's global RNG is
never read or set, and the traced graph draws nothing (the noise is an
input).

Private torch entry points (``torch._fused_adam_``, the autograd engine's
``run_backward``) are used when present and have public fallbacks chosen at
import (``torch.optim.adam.adam(fused=True)``, ``torch.autograd.grad``) that
compute the same bits; ``tests/models/test_svi_speedpath.py`` checks both.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    Normal,
    kl_divergence,
    register_kl,
)
from torch.optim.adam import adam as _public_adam
from torch.types import _size

from fogline.models.config import ModelConfig
from fogline.models.fprior import FunctionalPrior, functional_kl_tensor, lowrank_kl
from fogline.models.likelihoods import df_from_unconstrained, df_to_unconstrained, observation_dist
from fogline.models.network import _ACTIVATIONS, Layout, forward_layers, layout, unflatten
from fogline.models.priors import default_prior, kl_to_prior
from fogline.models.state import Minibatch, PosteriorState, PriorSpec, StepInfo, _fresh_rng_state

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_EMPTY = torch.Size()
#: Run the traced objective through TorchScript's profiling/optimising executor?
#: Off: the graph is interpreted op by op and differentiated by eager autograd,
#: which gives the same numbers on every call (the optimised graph's symbolic
#: gradients differ in the last bits from the profiling runs', which broke
#: bit-exact resumption in a fresh process) at the same speed (docs/performance.md).
_OPTIMIZED_EXECUTION = False

#: torch's fused Adam kernel (private; the kernel ``adam(fused=True)`` calls), or None.
_FUSED_ADAM: Callable[..., None] | None = getattr(torch, "_fused_adam_", None)
#: The autograd engine's ``run_backward`` (private; what ``autograd.grad`` calls), or None.
_ENGINE_RUN_BACKWARD: Callable[..., tuple[torch.Tensor, ...]] | None = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None
)


# ---------------------------------------------------------------------------
# closed-form KL for the low-rank guide against a diagonal prior
# ---------------------------------------------------------------------------
@register_kl(LowRankMultivariateNormal, Independent)
def _kl_lowrank_diag(q: LowRankMultivariateNormal, p: Independent) -> torch.Tensor:
    """KL(N(mu, V V^T + D) || N(m, diag(s^2))): :func:`fogline.models.fprior.lowrank_kl`.

    The one low-rank KL of the package (float64 Cholesky of the capacitance);
    registered so Pyro's mean-field ELBO dispatches to it.
    """
    base = p.base_dist
    if not isinstance(base, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    scale = getattr(q, "diag_scale", None)
    if scale is None:
        scale = q.cov_diag.sqrt()
    return lowrank_kl(q.loc, q.cov_factor, scale, base.loc, base.scale)


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


def _param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    p = layout(config).size
    shapes: dict[str, tuple[int, ...]] = {"loc": (p,), "scale_unconstrained": (p,)}
    if config.guide == "lowrank":
        shapes["cov_factor"] = (p, config.rank)
    if config.learns_df:
        shapes["df_unconstrained"] = (1,)
    return shapes


@dataclass(frozen=True)
class _Slot:
    """Where one variational parameter sits in the packed vector theta [T]."""

    start: int
    end: int
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------
# the guide's distributions: reparameterised draws from GIVEN noise
# ---------------------------------------------------------------------------
def draw_weights(
    loc: torch.Tensor,
    scale: torch.Tensor,
    eps: torch.Tensor,
    cov_factor: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """w = m + s * eps (+ z V^T): q's reparameterised draw for given standard-normal noise.

    ``eps`` is [P] or [S, P]; for the low-rank guide ``z`` is [R] or [S, R]
    and ``cov_factor`` V is [P, R], so w ~ N(m, diag(s^2) + V V^T).
    """
    w = loc + eps * scale
    if cov_factor is not None and z is not None:
        w = w + torch.matmul(z, cov_factor.T)
    return w


class _NoisedNormal(dist.Normal):
    """Pyro's ``Normal`` whose reparameterised sample uses the noise it is given.

    rsample() = loc + eps * scale for the ``eps`` passed in (the step draws it
    from the state's generator); with ``eps=None`` it is the parent class.
    Every other method, and the closed-form KL dispatch (on the ``Normal``
    base), is the parent's.
    """

    def __init__(
        self, loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor | None = None
    ) -> None:
        super().__init__(loc, scale)
        self.eps = eps

    def rsample(self, sample_shape: _size = _EMPTY) -> torch.Tensor:
        if self.eps is None:
            return super().rsample(sample_shape)
        return draw_weights(self.loc, self.scale, self.eps)


class _NoisedLowRank(dist.LowRankMultivariateNormal):
    """N(loc, V V^T + diag(s^2)) whose reparameterised sample uses given noise (eps [P], z [R])."""

    def __init__(
        self,
        loc: torch.Tensor,
        cov_factor: torch.Tensor,
        diag_scale: torch.Tensor,
        eps: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> None:
        super().__init__(loc, cov_factor, diag_scale.pow(2))
        self.diag_scale = diag_scale
        self.eps = eps
        self.z = z

    def rsample(self, sample_shape: _size = _EMPTY) -> torch.Tensor:
        if self.eps is None or self.z is None:
            return super().rsample(sample_shape)
        return draw_weights(self.loc, self.diag_scale, self.eps, self.cov_factor, self.z)


def _forward_one(w_p: torch.Tensor, x_nd: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Raw outputs [N, O] of the MLP for ONE flat weight vector ``w_p`` [P].

    The same function as ``models.network.forward(w_p[None], x_nd)[0]``
    (h_{l+1} = act(h_l W_l^T + b_l)), specialised to one sample: one
    ``split`` of ``w_p`` into the layers' W and b (its backward is one
    ``cat``, where a slice per tensor would each scatter into a zero [P]
    buffer) and 2-D ``linear`` instead of ``unsqueeze`` + ``baddbmm``.
    """
    act = _ACTIVATIONS[config.activation]
    lay = layout(config)
    parts = w_p.split(_layer_sizes(lay))
    last = len(lay.layers) - 1
    h = x_nd
    for i, layer in enumerate(lay.layers):
        weight = parts[2 * i].view(layer.fan_out, layer.fan_in)
        h = F.linear(h, weight, parts[2 * i + 1])
        if i < last:
            h = act(h)
    return h


def _forward_many(w_sp: torch.Tensor, x_nd: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Raw outputs [S, N, O] for S weight vectors ``w_sp`` [S, P] at shared rows ``x_nd`` [N, D].

    :func:`fogline.models.network.forward_layers`, whose ``expand(S, -1, -1)`` keeps a
    trace of it generic in N.
    """
    return forward_layers(unflatten(w_sp, layout(config)), x_nd, config.activation)


@functools.cache
def _layer_sizes(lay: Layout) -> list[int]:
    """[|W_1|, |b_1|, |W_2|, |b_2|, ...]: the split of the flat vector into tensors."""
    return [n for layer in lay.layers for n in (layer.fan_in * layer.fan_out, layer.fan_out)]


def mean_field_elbo_particle(
    model_trace: poutine.Trace, guide_trace: poutine.Trace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, log-likelihood) of one particle of Pyro's ``TraceMeanField_ELBO``.

    loss = sum_latent scale_q KL(q_site || p_site) - sum_observed scale_p log p(value),
    the particle ``TraceMeanField_ELBO`` differentiates, built from the public
    trace API (``poutine.trace``/``poutine.replay`` traces, ``kl_divergence``);
    also returned, unscaled: KL = sum_latent KL(q || p) in nats and
    log-likelihood = sum_observed log p(value).  Every guide site must be a
    model site with a closed-form KL (true of this program).
    """
    loss: torch.Tensor | float = 0.0
    kl: torch.Tensor | float = 0.0
    lp: torch.Tensor | float = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            lp_site = (
                cast(Distribution, site["fn"]).log_prob(cast(torch.Tensor, site["value"])).sum()
            )
            lp = lp + lp_site
            loss = loss - site["scale"] * lp_site
        else:
            q_site = guide_trace.nodes[name]
            q_fn, p_fn = cast(Distribution, q_site["fn"]), cast(Distribution, site["fn"])
            kl_site = kl_divergence(q_fn, p_fn).sum()
            kl = kl + kl_site
            loss = loss + q_site["scale"] * kl_site
    assert isinstance(loss, torch.Tensor) and isinstance(kl, torch.Tensor)
    assert isinstance(lp, torch.Tensor)
    return loss, kl, lp


@dataclass(frozen=True)
class Variant:
    """Which terms the objective has (one trace per variant).

    ``particles`` reparameterised draws estimate the expected log-likelihood
    (Pyro's ``num_particles``: the ELBO particles are averaged); ``samples``
    is the number S >= particles of noise rows drawn (the functional term
    uses all S, the first ``particles`` shared with the ELBO); ``functional``
    adds the functional-prior term.
    """

    particles: int = 1
    samples: int = 1
    functional: bool = False


class Program:
    """The Pyro model and guide of one :class:`ModelConfig`, with its objective.

    Model and guide take every tensor as an argument: ``(x [N,D], y [N],
    theta [T], prior_loc [P], prior_scale [P], obs_scale [], kl_scale [],
    eps [P] | None, z [R] | None)``, where ``theta`` packs the variational
    parameters (:attr:`slots`) and ``eps``/``z`` are the standard-normal noise
    of the guide's draw (``None``: Pyro draws it, e.g. under ``Predictive``).
    ``obs_scale`` = beta / n and ``kl_scale`` = 1 / N_t scale the two ELBO
    terms (see :func:`step`).

    :meth:`objective` is the per-observation loss of :func:`step` for one
    :class:`Variant`.  With ``jit=True`` each variant is traced once by
    ``torch.jit.trace`` (Pyro validation off; the trace draws nothing) and
    the TorchScript function is called directly afterwards, run unoptimised
    (see ``_OPTIMIZED_EXECUTION``).  The trace is shape-generic in the batch
    rows N.
    """

    def __init__(
        self, config: ModelConfig, *, jit: bool = True, device: torch.device | str = "cpu"
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.jit = jit
        self.names = param_names(config)
        self.size = layout(config).size
        shapes = _param_shapes(config)
        self.slots: dict[str, _Slot] = {}
        pos = 0
        for name in self.names:
            n = math.prod(shapes[name])
            self.slots[name] = _Slot(pos, pos + n, shapes[name])
            pos += n
        self.total = pos
        self.lowrank = config.guide == "lowrank"
        self.rank = config.rank if self.lowrank else 0
        self.model = self._model
        self.guide = self._guide
        self._traced: dict[Variant, Callable[..., tuple[torch.Tensor, ...]]] = {}
        self._split = [sl.end - sl.start for sl in self.slots.values()]
        self._scalars: dict[float, torch.Tensor] = {}
        self._groups: dict[float, tuple[ParamGroup, ...]] = {}

    # -- packing -----------------------------------------------------------
    def pack(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """theta [T]: a fresh tensor holding ``params`` in packing order."""
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def unpack(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` [T] by parameter name (inverse of :meth:`pack`)."""
        parts = theta.split(self._split)
        out = dict(zip(self.names, parts, strict=True))
        if self.lowrank:
            out["cov_factor"] = out["cov_factor"].view(self.slots["cov_factor"].shape)
        return out

    def scalar(self, value: float) -> torch.Tensor:
        """A cached 0-d tensor holding ``value`` on this program's device (read-only)."""
        t = self._scalars.get(value)
        if t is None:
            if len(self._scalars) >= 256:
                self._scalars.clear()
            t = self._scalars[value] = torch.tensor(value, device=self.device)
        return t

    def groups(self, cov_factor_lr_scale: float = 1.0) -> tuple[ParamGroup, ...]:
        """The optimizer's parameter groups (:func:`param_groups`), memoised."""
        g = self._groups.get(cov_factor_lr_scale)
        if g is None:
            g = self._groups[cov_factor_lr_scale] = param_groups(self, cov_factor_lr_scale)
        return g

    # -- the Pyro program --------------------------------------------------
    def _df(self, theta: torch.Tensor) -> torch.Tensor | None:
        if self.config.learns_df:
            return df_from_unconstrained(theta[-1])
        return None

    def _model(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        theta: torch.Tensor,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        obs_scale: torch.Tensor,
        kl_scale: torch.Tensor,
        eps: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> None:
        with poutine.scale(scale=kl_scale):
            w = pyro.sample("w", dist.Normal(prior_loc, prior_scale).to_event(1))
        out = _forward_one(w, x, self.config)
        # The n rows form one event of shape [n] rather than a pyro.plate: the
        # same log-likelihood sum, without the plate's subsample index (arange)
        # and scale ops in the traced graph.
        obs = observation_dist(out, self.config, self._df(theta)).to_event(1)
        with poutine.scale(scale=obs_scale):
            pyro.sample("obs", obs, obs=y)

    def _guide(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        theta: torch.Tensor,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        obs_scale: torch.Tensor,
        kl_scale: torch.Tensor,
        eps: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> None:
        parts = theta.split(self._split)
        loc = parts[0]
        scale = F.softplus(parts[1])
        with poutine.scale(scale=kl_scale):
            if self.lowrank:
                factor = parts[2].view(self.slots["cov_factor"].shape)
                pyro.sample("w", _NoisedLowRank(loc, factor, scale, eps, z))
            else:
                pyro.sample("w", _NoisedNormal(loc, scale, eps).to_event(1))

    def _particle(
        self, args: tuple[torch.Tensor | None, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        guide_trace = poutine.trace(self.guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*args)
        return mean_field_elbo_particle(model_trace, guide_trace)

    def _eager_objective(
        self, variant: Variant, *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, theta, prior_loc, prior_scale, obs_scale, kl_scale, eps = tensors[:8]
        z = tensors[8] if self.lowrank else None
        rest = tensors[9:] if self.lowrank else tensors[8:]
        loss, kl, lp = self._particle(
            (x, y, theta, prior_loc, prior_scale, obs_scale, kl_scale, eps[0], _row(z, 0))
        )
        for s in range(1, variant.particles):
            loss_s, _, lp_s = self._particle(
                (x, y, theta, prior_loc, prior_scale, obs_scale, kl_scale, eps[s], _row(z, s))
            )
            loss, lp = loss + loss_s, lp + lp_s
        if variant.particles > 1:
            loss, lp = loss / variant.particles, lp / variant.particles
        if variant.functional:
            x_ood, f_weight, f_loc, f_scale = rest
            p = self.unpack(theta)
            w_sp = draw_weights(
                p["loc"], F.softplus(p["scale_unconstrained"]), eps, p.get("cov_factor"), z
            )
            mean_sn = _forward_many(w_sp, x_ood, self.config)[..., 0]
            loss = loss + f_weight * functional_kl_tensor(mean_sn, f_loc, f_scale)
        return loss, kl.detach(), lp.detach()

    def objective(
        self, variant: Variant, *tensors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(differentiable loss, KL(q || prior) in nats, log-likelihood sum; both detached).

        ``tensors`` = ``(x, y, theta, prior_loc, prior_scale, obs_scale,
        kl_scale, eps [S, P])``, then ``z [S, R]`` for the low-rank guide, then
        for a functional variant ``(x_ood [N, D], gamma [], mu_0 [], sigma_0 [])``.
        The log-likelihood is sum_i log p(y_i | x_i, w), averaged over the
        particles.  The diagnostics come from the same traced graph, so they
        cost no extra dispatch per step.
        """
        if not self.jit:
            return self._eager_objective(variant, *tensors)
        fn = self._traced.get(variant)
        if fn is None:
            fn = self._traced[variant] = self._trace(variant, tensors)
        with torch.jit.optimized_execution(_OPTIMIZED_EXECUTION):
            loss, kl, lp = fn(*tensors)
        return loss, kl, lp

    def loss(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Differentiable per-observation negative ELBO (one particle, no functional term)."""
        return self.objective(Variant(), *tensors)[0]

    def _trace(
        self, variant: Variant, args: tuple[torch.Tensor, ...]
    ) -> Callable[..., tuple[torch.Tensor, ...]]:
        """``torch.jit.trace`` of one variant of the objective (draws nothing: the noise is input)."""

        def objective(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self._eager_objective(variant, *tensors)

        with pyro.validation_enabled(False), warnings.catch_warnings():
            # shape checks inside torch.distributions are constant for a fixed P
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced: Callable[..., tuple[torch.Tensor, ...]] = torch.jit.trace(
                objective, args, check_trace=False
            )
        return traced

    # -- diagnostics -------------------------------------------------------
    def kl(self, theta: torch.Tensor, prior: PriorSpec) -> torch.Tensor:
        """KL(q_theta || prior) in nats (closed form; mean-field or low-rank)."""
        p = self.unpack(theta)
        scale = F.softplus(p["scale_unconstrained"])
        if self.lowrank:
            return lowrank_kl(p["loc"], p["cov_factor"], scale, prior.loc, prior.scale)
        return kl_to_prior(p["loc"], scale, prior)


def _row(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if t is None else t[i]


_PROGRAMS: dict[tuple[ModelConfig, torch.device, bool], Program] = {}


def program(config: ModelConfig, device: torch.device, *, jit: bool = True) -> Program:
    """The (memoised) :class:`Program` of ``config``; JIT traces are per device.

    Keyed on the (frozen, hashable) config itself: equal configs share one
    program and one trace per variant.
    """
    key = (config, device, jit)
    prog = _PROGRAMS.get(key)
    if prog is None:
        prog = _PROGRAMS[key] = Program(config, jit=jit, device=device)
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
    marginal variance matches; a learned Student-t df starts at 10.  The
    state's RNG is a fresh generator of ``device`` seeded with ``seed``.
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
# the optimizer: one Adam over parameter groups of the packed vector
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamGroup:
    """A contiguous slice ``[start, end)`` of theta [T] stepped with ``lr * lr_scale``."""

    start: int
    end: int
    lr_scale: float = 1.0


def param_groups(prog: Program, cov_factor_lr_scale: float = 1.0) -> tuple[ParamGroup, ...]:
    """Parameter groups of ``prog``'s packed vector: the low-rank factor V may have its own lr.

    Adam moves every entry by about lr at once; for V that is coherent along
    a column (one draw z then perturbs all weights together), so the warm
    start gives V the step ``lr * cov_factor_lr_scale``.  Neighbouring
    parameters with the same multiplier form one group (a mean-field state is
    one group: one kernel call).
    """
    groups: list[ParamGroup] = []
    for name in prog.names:
        sl = prog.slots[name]
        c = cov_factor_lr_scale if name == "cov_factor" else 1.0
        if groups and groups[-1].lr_scale == c and groups[-1].end == sl.start:
            groups[-1] = ParamGroup(groups[-1].start, sl.end, c)
        else:
            groups.append(ParamGroup(sl.start, sl.end, c))
    return tuple(groups)


def fused_adam_kernel(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    lr: float,
) -> None:
    """torch's fused Adam kernel (private ``torch._fused_adam_``) with fogline's constants.

    Each step count in ``steps`` must already be incremented (the kernel reads t).
    Only call it when this torch has the kernel (``_FUSED_ADAM is not None``);
    :func:`adam_` falls back to the public function otherwise.
    """
    assert _FUSED_ADAM is not None
    _FUSED_ADAM(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        amsgrad=False,
        lr=lr,
        beta1=ADAM_BETAS[0],
        beta2=ADAM_BETAS[1],
        weight_decay=0.0,
        eps=ADAM_EPS,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )


def adam_(
    theta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    opt_step: torch.Tensor,
    lr: float,
    groups: Sequence[ParamGroup],
    *,
    fused: bool | None = None,
) -> None:
    """One in-place Adam step on theta [T] over parameter ``groups`` (shared step count t).

    t <- t + 1;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    theta_G <- theta_G - lr c_G (m_G / (1 - b1^t)) / (sqrt(v_G / (1 - b2^t)) + eps)
    for each group G with multiplier c_G.  ``fused=True`` calls torch's fused
    kernel directly (``torch._fused_adam_``, private); ``False`` the public
    ``torch.optim.adam.adam(fused=True)``, which runs the same kernel after
    its per-call dispatch (same bits); ``None`` picks the kernel when this
    torch has it.
    """
    fast = _FUSED_ADAM is not None if fused is None else fused
    whole = len(groups) == 1 and groups[0].start == 0 and groups[0].end == theta.shape[0]
    # the public function increments the count itself: it gets a copy of t - 1 per group
    t_before = None if fast else opt_step.clone()
    opt_step.add_(1)  # the kernel reads the incremented count t
    for g in groups:
        sl = slice(g.start, g.end)
        p, d, m, v = (
            (theta, grad, exp_avg, exp_avg_sq)
            if whole
            else (
                theta[sl],
                grad[sl],
                exp_avg[sl],
                exp_avg_sq[sl],
            )
        )
        if fast:
            fused_adam_kernel([p], [d], [m], [v], [opt_step], lr * g.lr_scale)
        else:
            assert t_before is not None
            _public_adam(
                [p],
                [d],
                [m],
                [v],
                [],
                [t_before.clone()],
                fused=True,
                amsgrad=False,
                beta1=ADAM_BETAS[0],
                beta2=ADAM_BETAS[1],
                lr=lr * g.lr_scale,
                weight_decay=0.0,
                eps=ADAM_EPS,
                maximize=False,
            )


def grad_(
    loss: torch.Tensor, theta: torch.Tensor, one: torch.Tensor, *, engine: bool | None = None
) -> torch.Tensor:
    """d loss / d theta: ``torch.autograd.grad(loss, theta)``, or the engine call it makes.

    ``engine=True`` calls the autograd engine's ``run_backward`` directly
    (private; skips ~40 us of argument normalisation a call, 3-6% of a step
    at batch 256); ``False`` the public function; ``None`` picks the engine
    when this torch has it.  Both compute the same gradient.
    """
    fast = _ENGINE_RUN_BACKWARD is not None if engine is None else engine
    if not fast:
        return torch.autograd.grad(loss, (theta,), grad_outputs=(one,))[0]
    assert _ENGINE_RUN_BACKWARD is not None
    return _ENGINE_RUN_BACKWARD((loss,), (one,), False, False, (theta,), False, False)[0]


# ---------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------
def check_step_args(batch: Minibatch, num_steps: int, likelihood_weight: float) -> None:
    """The argument checks of :func:`step` (ValueError naming the argument)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if not 0.0 <= likelihood_weight <= 1.0:
        raise ValueError(f"likelihood_weight must lie in [0, 1], got {likelihood_weight}")
    if batch.rows == 0:
        raise ValueError("empty minibatch")


def generator_of(state: PosteriorState) -> torch.Generator:
    """A ``torch.Generator`` on the state's device holding ``state.rng_state``."""
    gen = torch.Generator(device=state.device)
    gen.set_state(state.rng_state)
    return gen


def step(
    state: PosteriorState,
    batch: Minibatch,
    *,
    num_steps: int = 1,
    data_size: int | None = None,
    likelihood_weight: float = 1.0,
    functional_prior: FunctionalPrior | None = None,
    particles: int = 1,
    cov_factor_lr_scale: float = 1.0,
    jit: bool = True,
) -> tuple[PosteriorState, StepInfo]:
    """Absorb ``batch``: ``num_steps`` Adam steps on ONE per-observation objective.

    Mathematics.  With prior pi_t (the base prior p0, the previous posterior
    for streaming VB, or the forgetting mix of :mod:`fogline.drift.policy`),
    likelihood weight beta in [0, 1], data size N_t (``data_size``, default
    the batch's rows n) and, optionally, a functional prior with weight
    gamma >= 0 (:class:`fogline.models.fprior.FunctionalPrior`), each inner
    step takes one Adam step on

        L(lambda) = -(beta/n) sum_{i<=n} E_q log p(y_i | x_i, w)     (likelihood)
                    + KL(q_lambda || pi_t) / N_t                      (weight space)
                    + gamma mean_j KL(N(m(x~_j), v(x~_j)) || N(mu_0, sigma_0^2))

    (the last term only with a functional prior; m, v are the moments of the
    mean output at out-of-data inputs x~ under S draws of w ~ q).  The
    expectation uses ``particles`` reparameterised draws, the KLs in weight
    space are closed-form (Pyro's ``TraceMeanField_ELBO``; the low-rank one
    by a float64 Cholesky).  With gamma = 0, q after the call approximates

        p_t(w) ∝ pi_t(w) · prod_i p(y_i | x_i, w)^(beta N_t / n) ≈ p(w | D_1:t),

    i.e. the batch stands for N_t observations: ``data_size = n`` is plain
    posterior-as-prior streaming, a large ``data_size`` with a frozen prior
    classic minibatch SVI of a fixed data set, beta < 1 tempers an anomalous
    batch (generalised Bayes).  gamma > 0 adds the data prior in function
    space (Hafner et al. 2019): N_t gamma times the functional KL acts as a
    log-prior over functions at x~.

    Optimizer.  One Adam (:func:`adam_`) over the packed parameters theta with
    parameter groups (:func:`param_groups`): the low-rank factor V moves with
    ``lr * cov_factor_lr_scale``.  Its moments and step count live in
    ``state.opt_state``.

    Randomness.  The noise (eps [S, P], z [S, R], then x~) of each inner
    step is drawn from a generator on the state's device restored from
    ``state.rng_state``; its new state is returned in the new state.  Torch's
    global RNG is neither read nor set: same state and batch, same bits.

    Returns the new state (``step_count`` + ``num_steps``; ``records_absorbed``
    + the batch's rows, the one place the models layer counts records;
    offsets are the caller's business) and a :class:`StepInfo` whose
    ``loss``, ``kl``, ``nll`` (unweighted, per observation) and
    ``grad_norm`` are those of the last inner step at the parameters it was
    evaluated at.  A non-finite loss or parameter returns ``state`` itself
    with ``rejected=True`` (NumPyro's ``stable_update``).  Never mutates
    ``state``.
    """
    check_step_args(batch, num_steps, likelihood_weight)
    if particles < 1:
        raise ValueError("particles must be >= 1")
    fp = functional_prior if functional_prior is not None and functional_prior.weight > 0 else None
    variant = Variant(
        particles, max(particles, fp.samples if fp is not None else 1), fp is not None
    )
    n = batch.rows
    big_n = float(data_size if data_size is not None else n)
    dev = state.device
    prog = program(state.config, dev, jit=jit)
    groups = prog.groups(cov_factor_lr_scale if prog.lowrank else 1.0)
    x = batch.x.to(dev, torch.float32)
    y = batch.y.to(dev, torch.float32)
    theta = prog.pack(state.params).requires_grad_(True)  # a fresh copy: state is not touched
    exp_avg = state.opt_state["exp_avg"].clone()
    exp_avg_sq = state.opt_state["exp_avg_sq"].clone()
    opt_step = state.opt_state["step"].clone()
    # (prior_loc [P], prior_scale [P], obs_scale = beta / n, kl_scale = 1 / N_t)
    fixed = (
        state.prior.loc,
        state.prior.scale,
        prog.scalar(likelihood_weight / n),
        prog.scalar(1.0 / big_n),
    )
    fterm = (
        () if fp is None else (prog.scalar(fp.weight), prog.scalar(fp.loc), prog.scalar(fp.scale))
    )
    gen = generator_of(state)
    one = prog.scalar(1.0)
    last = num_steps - 1
    diag = torch.empty(0)
    s, p, r = variant.samples, prog.size, prog.rank
    with _no_fusion(prog.lowrank):
        for k in range(num_steps):
            eps = torch.randn(s, p, generator=gen, device=dev)
            noise = (eps, torch.randn(s, r, generator=gen, device=dev)) if r else (eps,)
            extra = () if fp is None else (fp.ood_inputs(x, gen), *fterm)
            try:
                loss, kl, lp = prog.objective(variant, x, y, theta, *fixed, *noise, *extra)
            except ValueError:  # argument validation (eager path): a non-finite value
                nan = float("nan")
                return state, StepInfo(nan, nan, nan, nan, n, num_steps, rejected=True)
            grad = grad_(loss, theta, one)
            with torch.no_grad():
                if k == last:
                    diag = torch.stack((loss.detach(), kl, lp, torch.linalg.vector_norm(grad)))
                adam_(theta, grad, exp_avg, exp_avg_sq, opt_step, state.lr, groups)
    theta = theta.detach()
    # sum(theta) is finite iff every entry is (or the sum overflows, |theta| ~ 1e38:
    # rejected too); then the one host synchronisation of the call
    loss_f, kl_f, lp_f, grad_norm_f, theta_sum = torch.cat((diag, theta.sum().reshape(1))).tolist()
    nll = -lp_f / n
    if not (math.isfinite(loss_f) and math.isfinite(theta_sum)):
        return state, StepInfo(loss_f, nll, kl_f, grad_norm_f, n, num_steps, rejected=True)
    new = state.replace(
        params=prog.unpack(theta),
        opt_state={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": opt_step},
        step_count=state.step_count + num_steps,
        rng_state=gen.get_state(),
        records_absorbed=state.records_absorbed + n,
    )
    return new, StepInfo(loss_f, nll, kl_f, grad_norm_f, n, num_steps)


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
    anneal: float = 0.0,
    average: float = 0.0,
) -> FitResult:
    """Classic minibatch SVI of a fixed data set (frozen prior, data_size = N).

    Shuffles with a generator seeded by ``seed``; each epoch is one pass.

    ``anneal`` a in [0, 1): over the last A = round(a E) of the E epochs the
    step size decays by a half cosine, lr_e = lr_0 (1 + cos(pi (j + 1) / (A + 1))) / 2
    for the j-th of them (j = 0 .. A - 1), so the last steps settle the
    iterate instead of leaving it where the last minibatch's noise put it;
    the returned state carries lr_0 again.  ``average`` v in [0, 1): the
    returned variational parameters are the mean of the end-of-epoch iterates
    lambda_e over the last V = round(v E) epochs (stochastic weight
    averaging / Polyak averaging in lambda = (m, softplus^-1 s[, V])), the
    optimizer state that of the last iterate.  Both 0: plain SVI, the last
    iterate.
    """
    if not (0.0 <= anneal < 1.0 and 0.0 <= average < 1.0):
        raise ValueError(f"anneal and average must be in [0, 1), got {anneal}, {average}")
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    lr0 = state.lr
    n_anneal, n_average = round(anneal * epochs), round(average * epochs)
    sums: dict[str, torch.Tensor] | None = None
    losses: list[float] = []
    for epoch in range(epochs):
        j = epoch - (epochs - n_anneal)
        if j >= 0:
            state = state.replace(
                lr=lr0 * 0.5 * (1.0 + math.cos(math.pi * (j + 1) / (n_anneal + 1)))
            )
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            state, info = step(state, Minibatch(x[idx], y[idx]), data_size=n, jit=jit)
            total += info.loss
            count += 1
        losses.append(total / max(count, 1))
        if epoch >= epochs - n_average:
            params = {k: v.detach().double() for k, v in state.params.items()}
            sums = params if sums is None else {k: sums[k] + v for k, v in params.items()}
        if on_epoch is not None:
            on_epoch(epoch, losses[-1], state)
    if sums is not None:
        mean = {k: (v / n_average).to(state.params[k].dtype) for k, v in sums.items()}
        state = state.replace(params=mean)
    if n_anneal:
        state = state.replace(lr=lr0)
    return FitResult(state, losses)
