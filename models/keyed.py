"""A posterior per key: all keys of a micro-batch stepped in one batched call.

Each source (host, sensor, tenant: the record field ``model.key`` names) has
its own full :class:`~fogline.models.state.PosteriorState` (variational
parameters, Adam moments, prior, learning rate, step count, RNG state).  The
objective of key k is exactly the one of :func:`fogline.models.stream.stream_step`
(:func:`fogline.models.svi.step` plus the terms the state carries) on that
key's rows; :func:`keyed_step` steps every key of a micro-batch together,
:func:`keyed_step_loop` is the reference that calls ``stream_step`` per key.

A key seen for the first time starts from the fleet prior: :func:`fleet_prior`
of the warm-start posterior (or of a :class:`Population` posterior), made the
key's own by :func:`new_key_state` (RNG seeded from the key's name).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch

from fogline.models.fprior import FunctionalPrior
from fogline.models.keyed_batch import KeyJob, batched_step, group_key
from fogline.models.state import Minibatch, PosteriorState, StepInfo, _fresh_rng_state
from fogline.models.stream import stream_step

#: Keys per batched pass.  A key's result depends on the other keys of its pass only
#: through the pass's longest row count n_max: its rows are padded to n_max, and the
#: weight gradients' sums over rows (G^T h, n_max terms, the padding's zeros among
#: them) round differently for a different n_max (checked: a key stepped alone and
#: beside a key of fewer or as many rows gives the same bits, beside a key of more
#: rows not).  Passes are a function of the batch's keys and row counts (sorted by
#: rows, then cut every CHUNK keys), so a partition's record sequence fixes every
#: key's bits, as the keyed daemon needs; this constant is part of that function.
#: Passes of ~100 keys keep the [keys, params] temporaries small enough to be reused
#: by the allocator (1,000 keys at once spent more time in page faults of fresh
#: 5-30 MB buffers than in arithmetic: docs/model.md).
CHUNK = int(os.environ.get("FOGLINE_KEYED_CHUNK", "128"))

#: One full posterior state per key.
KeyedStates = Mapping[str, PosteriorState]


def _per_key(value: Any, key: str) -> Any:
    """``value[key]`` for a mapping, else ``value`` itself (one setting for every key)."""
    if isinstance(value, Mapping):
        if key not in value:
            raise ValueError(f"no value for key {key!r} in the per-key mapping")
        return value[key]
    return value


def _check_keys(states: KeyedStates, batches: Mapping[str, Minibatch]) -> None:
    missing = [k for k in batches if k not in states]
    if missing:
        raise ValueError(f"batches: keys without a state: {sorted(missing)[:5]}")


def keyed_step_loop(
    states: KeyedStates,
    batches: Mapping[str, Minibatch],
    *,
    data_size: int | Mapping[str, int | None] | None = None,
    likelihood_weight: float | Mapping[str, float] = 1.0,
    num_steps: int = 1,
    functional_prior: bool = True,
) -> tuple[dict[str, PosteriorState], dict[str, StepInfo]]:
    """The reference: :func:`fogline.models.stream.stream_step` for each key of ``batches``.

    ``data_size`` and ``likelihood_weight`` may be one value for every key or
    a mapping key -> value; ``functional_prior`` as in ``stream_step``.  Only the keys in ``batches`` are stepped and
    returned (in the order of ``batches``).
    """
    _check_keys(states, batches)
    out: dict[str, PosteriorState] = {}
    infos: dict[str, StepInfo] = {}
    for key, batch in batches.items():
        out[key], infos[key] = stream_step(
            states[key],
            batch,
            num_steps=num_steps,
            data_size=_per_key(data_size, key),
            likelihood_weight=float(_per_key(likelihood_weight, key)),
            functional_prior=functional_prior,
        )
    return out, infos


def keyed_step(
    states: KeyedStates,
    batches: Mapping[str, Minibatch],
    *,
    data_size: int | Mapping[str, int | None] | None = None,
    likelihood_weight: float | Mapping[str, float] = 1.0,
    num_steps: int = 1,
    functional_prior: bool = True,
) -> tuple[dict[str, PosteriorState], dict[str, StepInfo]]:
    """All keys of a micro-batch in ONE batched call.

    Params stacked per key, batched matmuls, per-key row counts absorbed with
    their true size, padding masked (:func:`fogline.models.keyed_batch.batched_step`,
    whose docstring has the mathematics: the objective of ``stream_step`` per
    key).  Keys of different models (config, device, functional prior's
    sample count) are stepped in one call per model.  Arguments as
    :func:`keyed_step_loop`.  Deterministic: the result for the same
    ``(states, batches)`` is bit-identical run to run; randomness only from
    each key's own ``rng_state``.  Only the keys in ``batches`` are stepped and
    returned.
    """
    _check_keys(states, batches)
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    groups: dict[tuple[object, ...], list[tuple[str, KeyJob]]] = {}
    configs: dict[int, object] = {}  # id -> a canonical equal config (pydantic hashing is slow)
    for key, batch in batches.items():
        state = states[key]
        cfg = configs.get(id(state.config))
        if cfg is None:
            cfg = next((c for c in configs.values() if c == state.config), state.config)
            configs[id(state.config)] = cfg
        beta = float(_per_key(likelihood_weight, key))
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"likelihood_weight of key {key!r} must lie in [0, 1], got {beta}")
        if batch.rows == 0:
            raise ValueError(f"empty minibatch for key {key!r}")
        fp = FunctionalPrior.of(state) if functional_prior else None
        fp = fp if fp is not None and fp.weight > 0 else None
        n_k = _per_key(data_size, key)
        job = KeyJob(state, batch, float(n_k if n_k is not None else batch.rows), beta, fp)
        groups.setdefault((id(cfg), *group_key(state, fp)[1:]), []).append((key, job))
    done: dict[str, tuple[PosteriorState, StepInfo]] = {}
    for members in groups.values():
        # keys of similar row counts together (less padding), CHUNK keys per pass
        members.sort(key=lambda m: m[1].batch.rows)
        for c in range(0, len(members), CHUNK):
            part = members[c : c + CHUNK]
            results = batched_step([job for _, job in part], num_steps=num_steps)
            done.update(zip((key for key, _ in part), results, strict=True))
    return {k: done[k][0] for k in batches}, {k: done[k][1] for k in batches}


# ----------------------------------------------------------------------------- new keys
def key_seed(key: str) -> int:
    """A 31-bit seed derived from the key's name (SHA-256; stable across processes)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def fleet_prior(warm: PosteriorState) -> PosteriorState:
    """A new key's initial state, from the fleet's posterior ``warm``.

    The variational parameters, prior, learning rate, schema, ``extra`` and
    ``aux`` of ``warm`` (functional prior, factor lr scale, a history
    reference) are kept; the optimizer is fresh (zero moments, step 0),
    ``step_count`` and ``records_absorbed`` are 0, offsets and fingerprints
    empty.  Its RNG is a placeholder: :func:`new_key_state` seeds it per key.
    """
    return warm.replace(
        params={k: v.detach().clone() for k, v in warm.params.items()},
        opt_state={k: torch.zeros_like(v) for k, v in warm.opt_state.items()},
        step_count=0,
        records_absorbed=0,
        offsets={},
        fingerprints={},
        rng_state=_fresh_rng_state(warm.device, 0),
    )


def new_key_state(fleet: PosteriorState, key: str) -> PosteriorState:
    """Key ``key``'s first state: ``fleet`` (a :func:`fleet_prior`) with its own RNG.

    The generator is seeded from the key's name (:func:`key_seed`), so the same
    key starts from the same state in every process.
    """
    return fleet.replace(rng_state=_fresh_rng_state(fleet.device, key_seed(key)))


# ----------------------------------------------------------------------------- population
class Population:
    """A population posterior: the moment-matched mixture of the keys' posteriors.

    With each key's marginal posterior q_k(w) = N(m_k, diag(s_k^2)) (a low-rank
    key's marginal variances included) and equal weights, the mixture
    (1/K) sum_k q_k is moment-matched per coordinate by

        mean  m = (1/K) sum_k m_k,
        var   v = (1/K) sum_k (s_k^2 + m_k^2) - m^2,

    kept as running float64 sums (K, sum m_k, sum (s_k^2 + m_k^2)) so a key's
    contribution is replaced in O(P) when its posterior changes
    (:meth:`replace`).  :meth:`state` turns it into a mean-field posterior a new
    key can start from (through :func:`fleet_prior`).
    """

    def __init__(
        self,
        size: int,
        count: int = 0,
        sum_m: torch.Tensor | None = None,
        sum_sq: torch.Tensor | None = None,
    ) -> None:
        self.size = int(size)
        self.count = int(count)
        self.sum_m: torch.Tensor = (
            torch.zeros(size, dtype=torch.float64) if sum_m is None else sum_m.double().cpu()
        )
        self.sum_sq: torch.Tensor = (
            torch.zeros(size, dtype=torch.float64) if sum_sq is None else sum_sq.double().cpu()
        )

    @staticmethod
    def _moments(state: PosteriorState) -> tuple[torch.Tensor, torch.Tensor]:
        m = state.params["loc"].detach().double().cpu()
        s = state.posterior_scale().detach().double().cpu()
        return m, s * s + m * m

    def add(self, state: PosteriorState) -> None:
        """Add one key's posterior to the mixture."""
        m, sq = self._moments(state)
        self.sum_m += m
        self.sum_sq += sq
        self.count += 1

    def remove(self, state: PosteriorState) -> None:
        """Remove one key's posterior (as it was added) from the mixture."""
        if self.count == 0:
            raise ValueError("population: nothing to remove")
        m, sq = self._moments(state)
        self.sum_m -= m
        self.sum_sq -= sq
        self.count -= 1

    def replace(self, old: PosteriorState | None, new: PosteriorState) -> None:
        """A key's posterior changed from ``old`` (None: a new key) to ``new``."""
        if old is not None:
            self.remove(old)
        self.add(new)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [P], variance [P]) of the moment-matched mixture (float64)."""
        if self.count == 0:
            raise ValueError("population: no key yet")
        mean = self.sum_m / self.count
        var = (self.sum_sq / self.count - mean * mean).clamp_min(1e-30)
        return mean, var

    def state(self, template: PosteriorState) -> PosteriorState:
        """``template`` with q = N(mean, diag(var)) of the mixture (a low-rank factor zeroed)."""
        mean, var = self.moments()
        dev = template.device
        sd = var.sqrt().float()
        params = dict(template.params)
        params["loc"] = mean.float().to(dev)
        # inverse softplus: s = softplus(u)  <=>  u = s + log(-expm1(-s))
        params["scale_unconstrained"] = (sd + torch.log(-torch.expm1(-sd))).to(dev)
        if "cov_factor" in params:
            params["cov_factor"] = torch.zeros_like(params["cov_factor"])
        return template.replace(params=params)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (float64 values as Python floats)."""
        return {
            "size": self.size,
            "count": self.count,
            "sum_m": self.sum_m.tolist(),
            "sum_sq": self.sum_sq.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Population:
        """Inverse of :meth:`to_json` (ValueError naming the field on bad input)."""
        try:
            size = int(data["size"])
            sum_m = torch.tensor(data["sum_m"], dtype=torch.float64)
            sum_sq = torch.tensor(data["sum_sq"], dtype=torch.float64)
            count = int(data["count"])
        except KeyError as e:
            raise ValueError(f"population: missing field {e.args[0]!r}") from e
        for name, t in (("sum_m", sum_m), ("sum_sq", sum_sq)):
            if t.shape != (size,) or not bool(torch.isfinite(t).all()):
                raise ValueError(f"population: field {name!r} must be {size} finite numbers")
        if count < 0:
            raise ValueError("population: field 'count' must be >= 0")
        return cls(size, count, sum_m, sum_sq)


__all__ = [
    "KeyedStates",
    "Population",
    "fleet_prior",
    "key_seed",
    "keyed_step",
    "keyed_step_loop",
    "new_key_state",
]
