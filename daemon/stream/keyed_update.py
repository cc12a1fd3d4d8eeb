"""The keyed update behind one function: a new key's state and one step over a batch's keys.

Keyed mode (``keyed.enabled``) keeps one full
:class:`~fogline.models.state.PosteriorState` per source key.  A micro-batch of
one partition is split by key; each key's rows form its minibatch and every
key present is stepped (``stream.steps_per_batch`` SVI steps) in one call of
:func:`fogline.models.keyed.keyed_step`; keys without rows are untouched.  A
key's update therefore depends only on its own record sequence, which is a
function of its partition's record sequence (count batching): any daemon that
owns the partition rebuilds the same per-key posteriors bit for bit.

A key seen for the first time starts from the *fleet prior* (:func:`new_key`):
:func:`fogline.models.keyed.fleet_prior` of the start state (warm-start file,
else the spec's fresh prior) without its drift loop, with the key's own RNG
(:func:`fogline.models.keyed.new_key_state`, seeded from the key's name), so a
key's noise does not depend on which daemon met it first.

With ``drift.policy = "off"`` the daemon steps the keys where they live, in
their rows of the key cache's resident table (:meth:`KeyedUpdate.step_cached`:
the same bits as :func:`step_keys`, no per-key state built per batch).

This module is the one switch point between the daemon and the model side's
keyed API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from fogline.daemon.stream.keycache import KeyCache
from fogline.drift.config import PolicyConfig
from fogline.drift.keyed import KeyedDriftLoop
from fogline.drift.runner import without_loop
from fogline.models.keyed import Population, fleet_prior, keyed_step, new_key_state
from fogline.models.state import Minibatch, PosteriorState, StepInfo

if TYPE_CHECKING:
    from fogline.daemon.config import Settings

log = structlog.get_logger(__name__)


def fleet_state(start: PosteriorState) -> PosteriorState:
    """The fleet prior every new key starts from: ``start`` as a fresh stream, no drift loop."""
    return fleet_prior(without_loop(start))


def population_fleet(population: Population, fleet: PosteriorState) -> PosteriorState:
    """The fleet prior of ``keyed.fleet = "population"``: ``fleet`` with q = the population.

    q = N(mean, diag(var)) of the moment-matched mixture of the keys'
    posteriors (:class:`fogline.models.keyed.Population`); the KL prior,
    learning rate and the rest stay ``fleet``'s; ``fleet`` itself while the
    population has no key yet.
    """
    if population.count == 0:
        return fleet
    return fleet_prior(population.state(fleet))


def new_population(fleet: PosteriorState) -> Population:
    """An empty population over ``fleet``'s variational parameters."""
    return Population(int(fleet.params["loc"].numel()))


def key_policy(settings: Settings) -> PolicyConfig:
    """The drift settings each key's loop runs with.

    ``settings.drift`` itself, except that ``calibration = "history"`` needs
    ``keyed.rows_per_key``: a key's batches hold its own rows, a few of the
    micro-batch's ``stream.batch_size``, and an alarm threshold fitted for the
    mean of ``stream.batch_size`` history records is far too tight for the mean of
    a key's few (measured: 51 false alarms where 2.2 were expected, 50 keys of 16
    rows, docs/drift.md).  Unset, every key calibrates on its own first
    ``drift.calibration_batches`` batches (``calibration = "stream"``, fitted for
    the median of its own row counts), as a key without a history does; logged
    once as ``keyed_drift_calibration``.
    """
    drift = settings.drift
    if drift.calibration != "history" or settings.keyed.rows_per_key is not None:
        return drift
    log.info(
        "keyed_drift_calibration",
        source="stream",
        reason="keyed.rows_per_key is not set: a key's history threshold would be fitted for "
        "stream.batch_size records per batch",
        batches=drift.calibration_batches,
    )
    return PolicyConfig.model_validate({**drift.model_dump(), "calibration": "stream"})


def new_key(fleet: PosteriorState, key: str) -> PosteriorState:
    """Key ``key``'s initial state: the fleet prior with an RNG seeded from the key."""
    return new_key_state(fleet, key)


def step_keys(
    states: Mapping[str, PosteriorState],
    batches: Mapping[str, Minibatch],
    *,
    num_steps: int = 1,
    data_size: int | None = None,
    functional_prior: bool = True,
) -> tuple[dict[str, PosteriorState], dict[str, StepInfo]]:
    """Step every key of ``batches`` on its own rows; return the new states and step infos.

    The objective per key is :func:`fogline.models.stream.stream_step`'s (per-
    observation ELBO with data size N), so a key with few rows is absorbed with
    its true row count.  A rejected step (non-finite) returns the key's old
    state with ``info.rejected``.  Deterministic: randomness only from each
    key's ``rng_state``.  Keys are stepped in sorted order.
    """
    ordered = {k: batches[k] for k in sorted(batches)}
    return keyed_step(
        states,
        ordered,
        num_steps=num_steps,
        data_size=data_size,
        functional_prior=functional_prior,
    )


@dataclass(frozen=True)
class KeyedOutcome:
    """One batch's per-key results: new states, step infos, and the keys that alarmed."""

    states: dict[str, PosteriorState]
    infos: dict[str, StepInfo]
    alarmed: tuple[str, ...] = ()
    not_stable: int = 0


class KeyedUpdate:
    """The per-batch update of keyed mode for ``settings.drift.policy``.

    ``off``: :func:`step_keys`.  Otherwise every key runs the drift loop of
    :class:`fogline.drift.keyed.KeyedDriftLoop`: its own monitor, alarm and
    policy state, calibrated on its own first batches, restored from (and
    stored back into) the key's own state, so a key's blob carries its drift
    exactly and an evicted or re-owned key resumes it bit for bit.
    """

    def __init__(self, settings: Settings) -> None:
        s = settings.stream
        self.settings = settings
        self.loop: KeyedDriftLoop | None = None
        if settings.drift.policy != "off":
            self.loop = KeyedDriftLoop(
                key_policy(settings),
                base_lr=s.lr,
                data_size=s.data_size,
                num_steps=s.steps_per_batch,
                seed=s.seed,
                functional_prior=s.functional_prior,
                batch_size=settings.keyed.rows_per_key,
                metrics=False,  # no per-key signal is exported: skip the unread passes
            )

    def new_key(self, fleet: PosteriorState, key: str) -> PosteriorState:
        """Key ``key``'s first state (the fleet prior, own RNG, no drift loop yet)."""
        return new_key(fleet, key)

    @property
    def in_place(self) -> bool:
        """Whether keys are stepped in their rows of the key cache (``drift.policy = off``)."""
        return self.loop is None

    def step_cached(self, cache: KeyCache, batches: Mapping[str, Minibatch]) -> dict[str, StepInfo]:
        """:func:`step_keys` on keys held in ``cache``, stepped in place in their table rows.

        The same objective, passes and bits as :func:`step_keys` over the
        keys' states (:class:`fogline.models.keyed_table.KeyTable`), without a
        :class:`PosteriorState` per key: the cache materialises one when it is
        read.  The caller marks the stepped keys dirty (:meth:`KeyCache.mark_dirty`).
        """
        s = self.settings.stream
        keys = sorted(batches)
        return cache.step(
            keys,
            [batches[k] for k in keys],
            num_steps=s.steps_per_batch,
            data_size=s.data_size,
            functional_prior=s.functional_prior,
        )

    def __call__(
        self, states: Mapping[str, PosteriorState], batches: Mapping[str, Minibatch]
    ) -> KeyedOutcome:
        s = self.settings.stream
        if self.loop is None:
            new, infos = step_keys(
                states,
                batches,
                num_steps=s.steps_per_batch,
                data_size=s.data_size,
                functional_prior=s.functional_prior,
            )
            return KeyedOutcome(new, infos)
        keys = sorted(batches)
        drifts = {k: self.loop.drift_for(states[k]) for k in keys}
        res = self.loop.step(
            drifts, {k: states[k] for k in keys}, {k: (batches[k].x, batches[k].y) for k in keys}
        )
        return KeyedOutcome(res.states, res.infos, res.fleet.alarmed, res.fleet.not_stable)
