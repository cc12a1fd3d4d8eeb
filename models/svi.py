"""Streaming stochastic variational inference as a pure function.

The model is a Pyro program over ONE flat weight site ``w`` [P]::

    w ~ N(prior.loc, diag(prior.scale^2))                         (prior pi_t)
    y_i | x_i, w ~ p(y | f_w(x_i))        for i in the minibatch  (likelihood)

and the guide is a hand-written Gaussian q_lambda(w): mean-field
N(m, diag(s^2)) or low-rank N(m, V V^T + diag(s^2)).

Update (one call of :func:`step`, K inner gradient steps).  With prior pi_t
(the base prior p0, the previous posterior for streaming VB, or the forgetting
mix of :mod:`fogline.drift.policy`), likelihood weight beta and data size N_t, each
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

Speed (docs/performance.md).  The ELBO is Pyro's mean-field ELBO particle of
this model and guide, traced once per (config, device) by ``torch.jit.trace``
and then run by TorchScript's interpreter with eager autograd (identical bits
on every call, so a restarted process resumes exactly); inside one call the
packed parameters theta [T] are one tensor, the Adam moments are updated by
torch's fused kernel in place, the KL and gradient-norm diagnostics are taken
on the last inner step only, and the host is synchronised once.  The RNG
stream stays explicit: the state's generator state is restored before and
captured after the call, and tracing draws nothing from it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import Independent, LowRankMultivariateNormal, Normal, register_kl
from torch.types import _size

from fogline.models.config import ModelConfig
from fogline.models.likelihoods import df_from_unconstrained, df_to_unconstrained, observation_dist
from fogline.models.network import _ACTIVATIONS, Layout, layout
from fogline.models.priors import default_prior, kl_to_prior
from fogline.models.state import Minibatch, PosteriorState, PriorSpec, StepInfo, _fresh_rng_state

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
_EMPTY = torch.Size()
#: Run the traced ELBO through TorchScript's profiling/optimising executor?  Off:
#: the graph is interpreted op by op and differentiated by eager autograd, which
#: gives the same numbers on every call (the optimised graph's symbolic
#: gradients differ in the last bits from the profiling runs', which broke
#: bit-exact resumption in a fresh process) at the same speed (docs/performance.md).
_OPTIMIZED_EXECUTION = False


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
# the Pyro program
# ---------------------------------------------------------------------------
class _RandnNormal(dist.Normal):
    """Pyro's ``Normal`` drawing its reparameterised noise with one ``randn``.

    rsample() = loc + scale * eps, eps ~ N(0, I): the same draw as the parent
    class, but torch.distributions emits ``zeros``, ``ones`` and ``normal``
    (three graph nodes) for eps while being traced; this emits one.  Every
    other method, and the closed-form KL dispatch (on the ``Normal`` base),
    is the parent's.
    """

    def rsample(self, sample_shape: _size = _EMPTY) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + eps * self.scale


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


@functools.cache
def _layer_sizes(lay: Layout) -> list[int]:
    """[|W_1|, |b_1|, |W_2|, |b_2|, ...]: the split of the flat vector into tensors."""
    return [n for layer in lay.layers for n in (layer.fan_in * layer.fan_out, layer.fan_out)]


class Program:
    """The Pyro model and guide of one :class:`ModelConfig`, with its ELBO.

    Model and guide take every tensor as an argument: ``(x [N,D], y [N],
    theta [T], prior_loc [P], prior_scale [P], obs_scale [], kl_scale [])``,
    where ``theta`` packs the variational parameters (:attr:`slots`).
    ``obs_scale`` = beta / n and ``kl_scale`` = 1 / N_t scale the two ELBO
    terms (see the module docstring).

    :meth:`loss` is the one-particle negative ELBO of Pyro's
    ``TraceMeanField_ELBO`` for this model and guide (its
    ``_differentiable_loss_particle``, as Pyro's own JIT ELBO sums it).  With
    ``jit=True`` it is traced once by ``torch.jit.trace`` (Pyro validation
    off, RNG untouched by the trace) and the TorchScript function is called
    directly afterwards, run unoptimised (see ``_OPTIMIZED_EXECUTION``): the
    graph is the Pyro program's ELBO, without Pyro's per-call JIT
    bookkeeping.  The trace is shape-generic in the batch rows N.
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
        self.elbo = TraceMeanField_ELBO()
        self.model = self._model
        self.guide = self._guide
        self._traced: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        self._split = [sl.end - sl.start for sl in self.slots.values()]
        self._scalars: dict[float, torch.Tensor] = {}

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

    # -- the Pyro program --------------------------------------------------
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
        y: torch.Tensor,
        theta: torch.Tensor,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        obs_scale: torch.Tensor,
        kl_scale: torch.Tensor,
    ) -> None:
        parts = theta.split(self._split)
        loc = parts[0]
        scale = F.softplus(parts[1])
        with poutine.scale(scale=kl_scale):
            if self.lowrank:
                factor = parts[2].view(self.slots["cov_factor"].shape)
                pyro.sample("w", dist.LowRankMultivariateNormal(loc, factor, scale.pow(2)))
            else:
                pyro.sample("w", _RandnNormal(loc, scale).to_event(1))

    def _eager_loss_and_kl(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The mean-field ELBO particle, summed as Pyro's JitTraceMeanField_ELBO
        # does: ``TraceMeanField_ELBO.differentiable_loss`` returns
        # L + (S - item(S)), whose item() would be frozen into a trace as a
        # constant (right gradient, wrong value for any other input).
        # One particle (num_particles = 1), so no accumulation op in the graph.
        ((model_trace, guide_trace),) = self.elbo._get_traces(self.model, self.guide, args, {})
        _, loss = self.elbo._differentiable_loss_particle(model_trace, guide_trace)
        # loss = kl_scale KL - obs_lp with obs_lp = obs_scale sum_i log p(y_i | x_i, w)
        # (the model trace's scaled log-likelihood), so the ELBO's own KL term is
        # KL = (loss + obs_lp) / kl_scale: two scalar ops instead of re-deriving
        # it from theta (float32 cancellation: ~1e-7 * N_t nats, negligible).
        obs_lp = model_trace.nodes["obs"]["log_prob_sum"].detach()
        return loss, (loss.detach() + obs_lp) / args[6]

    def loss_and_kl(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(differentiable per-observation negative ELBO, KL(q || prior) in nats, detached).

        The KL diagnostic is part of the same traced graph (recovered from the
        ELBO's two terms), so it costs no extra dispatch per step.
        """
        if not self.jit:
            return self._eager_loss_and_kl(*args)
        fn = self._traced
        if fn is None:
            fn = self._traced = self._trace(args)
        with torch.jit.optimized_execution(_OPTIMIZED_EXECUTION):
            return fn(*args)

    def loss(self, *args: torch.Tensor) -> torch.Tensor:
        """Differentiable per-observation negative ELBO for the packed arguments."""
        return self.loss_and_kl(*args)[0]

    def _trace(
        self, args: tuple[torch.Tensor, ...]
    ) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """``torch.jit.trace`` of the ELBO; the tracing run's draws do not touch the RNG stream."""
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=cuda),
            pyro.validation_enabled(False),
            warnings.catch_warnings(),
        ):
            # shape checks inside torch.distributions are constant for a fixed P
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            traced: Callable[..., tuple[torch.Tensor, torch.Tensor]] = torch.jit.trace(
                self._eager_loss_and_kl, args, check_trace=False
            )
        return traced

    # -- diagnostics -------------------------------------------------------
    def kl(self, theta: torch.Tensor, prior: PriorSpec) -> torch.Tensor:
        """KL(q_theta || prior) in nats (closed form; mean-field or low-rank)."""
        p = self.unpack(theta)
        scale = F.softplus(p["scale_unconstrained"])
        if self.lowrank:
            q = LowRankMultivariateNormal(p["loc"], p["cov_factor"], scale.pow(2))
            return _kl_lowrank_diag(q, Independent(Normal(prior.loc, prior.scale), 1))
        return kl_to_prior(p["loc"], scale, prior)


_PROGRAMS: dict[tuple[ModelConfig, torch.device, bool], Program] = {}


def program(config: ModelConfig, device: torch.device, *, jit: bool = True) -> Program:
    """The (memoised) :class:`Program` of ``config``; JIT traces are per device.

    Keyed on the (frozen, hashable) config itself: equal configs share one
    program and one trace.
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


def _adam_(
    theta: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    opt_step: torch.Tensor,
    lr: float,
) -> None:
    """One in-place Adam step on theta (torch's fused kernel, CPU or CUDA).

    t <- t + 1;  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    theta <- theta - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    The same kernel ``torch.optim.adam.adam(fused=True)`` calls, without its
    per-call dispatch over devices and dtypes.
    """
    opt_step.add_(1)
    torch._fused_adam_(
        [theta],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [opt_step],
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


_ENGINE_RUN_BACKWARD = getattr(
    getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None
)


def _grad(loss: torch.Tensor, theta: torch.Tensor, one: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d loss / d theta: ``torch.autograd.grad(loss, theta)`` without its Python wrapper.

    The wrapper's argument normalisation costs ~40 us a call here (3-6% of a
    step at batch 256); the engine call is the one it makes.  Falls back to
    the public function where the engine entry point is absent.
    """
    if _ENGINE_RUN_BACKWARD is None:
        return torch.autograd.grad(loss, (theta,), grad_outputs=(one,))
    grads: tuple[torch.Tensor, ...] = _ENGINE_RUN_BACKWARD(
        (loss,), (one,), False, False, (theta,), False, False
    )
    return grads


def check_step_args(batch: Minibatch, num_steps: int, likelihood_weight: float) -> None:
    """The argument checks every streaming step shares (ValueError naming the argument)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if not 0.0 <= likelihood_weight <= 1.0:
        raise ValueError(f"likelihood_weight must lie in [0, 1], got {likelihood_weight}")
    if batch.rows == 0:
        raise ValueError("empty minibatch")


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

    ``StepInfo.loss`` is the loss of the last inner step, and ``kl`` and
    ``grad_norm`` are taken at the parameters that loss was evaluated at (the
    diagnostics of earlier inner steps are not computed).
    """
    check_step_args(batch, num_steps, likelihood_weight)
    n = batch.rows
    big_n = float(data_size if data_size is not None else n)
    dev = state.device
    prog = program(state.config, dev, jit=jit)
    x = batch.x.to(dev, torch.float32)
    y = batch.y.to(dev, torch.float32)
    theta = prog.pack(state.params).requires_grad_(True)  # a fresh copy: state is not touched
    exp_avg = state.opt_state["exp_avg"].clone()
    exp_avg_sq = state.opt_state["exp_avg_sq"].clone()
    opt_step = state.opt_state["step"].clone()
    obs_scale = prog.scalar(likelihood_weight / n)
    kl_scale = prog.scalar(1.0 / big_n)
    prior = state.prior
    one = prog.scalar(1.0)
    last = num_steps - 1
    diag = torch.empty(0)
    with _DeviceRng(dev, state.rng_state) as rng, _no_fusion(prog.lowrank):
        for k in range(num_steps):
            loss, kl = prog.loss_and_kl(x, y, theta, prior.loc, prior.scale, obs_scale, kl_scale)
            (grad,) = _grad(loss, theta, one)
            with torch.no_grad():
                if k == last:
                    diag = torch.stack((loss.detach(), kl, torch.linalg.vector_norm(grad)))
                _adam_(theta, grad, exp_avg, exp_avg_sq, opt_step, state.lr)
    theta = theta.detach()
    # sum(theta) is finite iff every entry is (or the sum overflows, |theta| ~ 1e38:
    # rejected too); then the one host synchronisation of the call
    loss_f, kl_f, grad_norm_f, theta_sum = torch.cat((diag, theta.sum().reshape(1))).tolist()
    nll = (loss_f - kl_f / big_n) / likelihood_weight if likelihood_weight > 0 else float("nan")
    if not (math.isfinite(loss_f) and math.isfinite(theta_sum)):
        return state, StepInfo(loss_f, nll, kl_f, grad_norm_f, n, num_steps, rejected=True)
    new = state.replace(
        params=prog.unpack(theta),
        opt_state={"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": opt_step},
        step_count=state.step_count + num_steps,
        rng_state=rng.rng_state,
        records_absorbed=state.records_absorbed + n,
    )
    return new, StepInfo(loss_f, nll, kl_f, grad_norm_f, n, num_steps)


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
