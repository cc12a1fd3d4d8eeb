"""Explicit inference state: everything needed to resume a posterior exactly.

Following BlackJAX/NumPyro, no inference state is hidden in a global store:
``step(state, batch) -> (state, info)`` reads and returns a
:class:`PosteriorState`.  States are immutable; a step builds new tensors and
never mutates the old ones, so a rejected step can simply return its input.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from fogline.models.config import ModelConfig
from fogline.models.fingerprint import RecordFingerprint as RecordFingerprint  # re-exported
from fogline.models.schema import DataSchema


def frozen_replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace(obj, **changes)`` for a frozen dataclass without
    ``__post_init__``, ``InitVar`` or ``init=False`` fields: the same copy, about 6x
    cheaper (the fields' dict copied instead of ``__init__`` run field by field).

    The per-key drift loop replaces several small states per key and batch;
    with a thousand keys that is most of its bookkeeping.  An unknown field
    raises ``TypeError`` as ``dataclasses.replace`` does.
    """
    names = _FIELD_NAMES.get(type(obj))
    if names is None:
        cls = type(obj)
        if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
            raise TypeError(f"frozen_replace: {cls.__name__} is not a plain dataclass")
        if any(not f.init for f in dataclasses.fields(cls)):
            raise TypeError(f"frozen_replace: {cls.__name__} has init=False fields")
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))
    unknown = changes.keys() - names
    if unknown:
        raise TypeError(f"{type(obj).__name__}: no field(s) {sorted(unknown)}")
    new = object.__new__(type(obj))
    d = new.__dict__
    d.update(obj.__dict__)
    d.update(changes)
    return new


#: Field names per class, for :func:`frozen_replace`.
_FIELD_NAMES: dict[type, frozenset[str]] = {}


@dataclass(frozen=True)
class PriorSpec:
    """A diagonal Gaussian prior over the flat weight vector: N(loc, diag(scale^2)).

    Shapes: ``loc`` [P], ``scale`` [P] (strictly positive).
    """

    loc: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.loc.shape != self.scale.shape or self.loc.dim() != 1:
            raise ValueError(
                f"prior loc {tuple(self.loc.shape)} and scale {tuple(self.scale.shape)} must be equal 1-D shapes"
            )

    def to(self, device: torch.device | str) -> PriorSpec:
        """Copy onto ``device``."""
        return PriorSpec(self.loc.to(device), self.scale.to(device))


@dataclass(frozen=True)
class Minibatch:
    """A batch of observations: ``x`` [N, D] float, ``y`` [N] float (0/1 for Bernoulli)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 2 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Minibatch needs x [N, D] and y [N]; got {tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )

    @property
    def rows(self) -> int:
        """Number of observations N."""
        return int(self.x.shape[0])


@dataclass(frozen=True)
class StepInfo:
    """What one call of :func:`fogline.models.svi.step` did.

    ``loss`` is the step's objective per observation (negative ELBO, plus the
    functional-prior term when on), ``nll`` the expected negative
    log-likelihood per observation, unweighted by beta (Monte Carlo over the
    step's particles; also for beta = 0), ``kl`` the KL(q || prior) in nats,
    ``grad_norm`` the L2 norm of the last gradient.  ``rejected`` is True when the step produced a
    non-finite loss or parameter and the old state was returned.
    """

    loss: float
    nll: float
    kl: float
    grad_norm: float
    rows: int
    steps: int
    rejected: bool = False


@dataclass(frozen=True)
class PosteriorState:
    """The whole streaming-inference state of one model.

    Attributes
    ----------
    config:
        The model (architecture, likelihood, guide family).
    params:
        Variational parameters: ``loc`` [P], ``scale_unconstrained`` [P]
        (s = softplus(.)), for the low-rank guide ``cov_factor`` [P, R], and for a
        learned Student-t ``df_unconstrained`` [1] (df = 1 + softplus(.)).
    opt_state:
        Adam moments over the concatenated parameter vector: ``exp_avg`` [T],
        ``exp_avg_sq`` [T] and ``step`` [] (float, as torch's Adam keeps it).
    prior:
        The prior the next update regularises towards (base prior, previous
        posterior, or a widened mix; see :mod:`fogline.drift.policy`).
    lr:
        Adam learning rate of the next update.
    step_count:
        Gradient steps taken so far.
    rng_state:
        State (uint8) of the step's own ``torch.Generator`` on the params'
        device: every step builds its generator from it and stores the new
        state back, so a resumed run draws the same noise.  Torch's global
        RNG is never read or set (default: a CPU generator seeded with 0).
    offsets:
        ``(topic, partition) -> next offset to read``: the stream position this
        posterior has absorbed up to (spelt ``"topic:partition"`` only in the
        serialised JSON, see :func:`fogline.models.serialize.offsets_to_json`).
    records_absorbed:
        Valid records absorbed.
    fingerprints:
        ``(topic, partition) -> RecordFingerprint`` of a record before that
        partition's offset in ``offsets`` (written: the last one absorbed or
        dead-lettered before it), so a restart can check that the partition
        still holds the stream this posterior absorbed (a recreated topic does
        not).  A partition without one is not checked.
    extra:
        JSON-able slot for other layers (drift/policy state).
    aux:
        Named auxiliary tensors other layers need to resume exactly (e.g. the
        drift layer's reference posterior and base prior); serialised under
        ``aux.<name>``; never touched by :func:`fogline.models.svi.step`.
    schema:
        The named record fields and their fitted transforms (raw units <->
        model units, :mod:`fogline.models.schema`), set by a warm start on
        the user's data; ``None``: the features of ``config``, target ``y``,
        inputs and target used as they come (see :meth:`data_schema`).
    """

    config: ModelConfig
    params: dict[str, torch.Tensor]
    opt_state: dict[str, torch.Tensor]
    prior: PriorSpec
    lr: float
    step_count: int = 0
    rng_state: torch.Tensor = field(
        default_factory=lambda: _fresh_rng_state(torch.device("cpu"), 0)
    )
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    records_absorbed: int = 0
    fingerprints: dict[tuple[str, int], RecordFingerprint] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    schema: DataSchema | None = None

    def data_schema(self) -> DataSchema:
        """The stored :class:`DataSchema`, else identity columns named by ``config``."""
        if self.schema is not None:
            return self.schema
        return DataSchema.identity(self.config.features())

    @property
    def device(self) -> torch.device:
        """Device the variational parameters live on."""
        return self.params["loc"].device

    @property
    def num_weights(self) -> int:
        """Length P of the flat weight vector."""
        return int(self.params["loc"].shape[0])

    def posterior_scale(self) -> torch.Tensor:
        """Marginal posterior standard deviations [P] (low-rank part included)."""
        s = torch.nn.functional.softplus(self.params["scale_unconstrained"])
        if "cov_factor" in self.params:
            return torch.sqrt(s * s + self.params["cov_factor"].pow(2).sum(-1))
        return s

    def replace(self, **changes: Any) -> PosteriorState:
        """A copy with ``changes`` applied (``dataclasses.replace``, :func:`frozen_replace`)."""
        return frozen_replace(self, **changes)  # type: ignore[no-any-return]

    def to(self, device: torch.device | str) -> PosteriorState:
        """Copy every tensor onto ``device``.

        Across device types the generator kind changes (CPU Mersenne Twister,
        CUDA Philox), so the RNG state is re-seeded with a seed derived from
        the current state's bytes (deterministic; torch's global RNG is not
        read).
        """
        dev = torch.device(device)
        if dev == self.device:
            return self
        rng = self.rng_state
        if dev.type != self.device.type:
            digest = hashlib.sha256(rng.cpu().numpy().tobytes()).digest()
            rng = _fresh_rng_state(dev, int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)
        return dataclasses.replace(
            self,
            params={k: v.to(dev) for k, v in self.params.items()},
            opt_state={k: v.to(dev) for k, v in self.opt_state.items()},
            prior=self.prior.to(dev),
            aux={k: v.to(dev) for k, v in self.aux.items()},
            rng_state=rng,
        )


def _fresh_rng_state(device: torch.device, seed: int) -> torch.Tensor:
    """A generator state for ``device`` seeded with ``seed`` (CPU uint8 tensor)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen.get_state()
