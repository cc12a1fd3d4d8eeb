"""The resident key table: the keys of one model as rows of preallocated stacked tensors.

A daemon in keyed mode holds up to ``keyed.max_keys`` keys in memory and steps
every key of a micro-batch together.  :class:`KeyTable` keeps what the batched
step changes -- each key's packed row

    row_k = [theta_k (T) | exp_avg_k (T) | exp_avg_sq_k (T) | t_k (1)]   (float32)

(the layout of :func:`fogline.models.keyed_batch.batched_step`'s fresh rows),
its generator, step count and records absorbed -- as row k of one
``[capacity, 3T + 1]`` tensor, and what it does not change (config, prior,
learning rate, ``extra``, ``aux``, offsets, schema) in the key's last
:class:`~fogline.models.state.PosteriorState`, its *template*.  The capacity
grows by doubling; a released row is reused (lowest free row first).

:meth:`KeyTable.step` is :func:`fogline.models.keyed.keyed_step` on rows of
the table: the same passes (keys grouped by the functional prior's sample
count and the low-rank factor's multiplier, sorted by row count, ``CHUNK``
keys a pass), each run by :func:`fogline.models.keyed_batch.step_pass` with

* theta gathered into the pass's working copy (a reused buffer) by one
  ``index_select`` for the forward pass and the gradient,
* theta, the Adam moments and counts stepped in place in the table (the
  fused kernel takes the table rows' views; the count column is bumped by
  one ``index_add_``), a rejected key's row left as it was,
* each key's resident generator drawn from in place (no per-key
  ``rng_state`` round trip; the state is read out only when the key's
  :class:`PosteriorState` is materialised, or every ``REPLAY_MAX`` steps),

and no :class:`PosteriorState` built per key per step: :meth:`KeyTable.state`
materialises a key's state only when it is needed (checkpoint, eviction,
query, the drift loop), as views of a clone of its row.  The noise contract is
``stream_step``'s: key k draws from its own generator in the single step's
order, so a key stepped here, materialised, serialised and reloaded continues
bit for bit, and its blob is byte-identical to the one ``keyed_step`` writes
for the same history (tests/models/test_keyed_table.py).

Rejection: a key whose step is rejected (non-finite loss or gradient, see
:func:`~fogline.models.keyed_batch.step_pass`) keeps its row, count and
generator exactly: its Adam step is skipped, with ``num_steps > 1`` its row is
restored from a copy taken before the pass, and its generator is rewound by
replaying, from its state at the last read-out, the draws of the steps since
(the step's draws come before its outcome is known; saving every key's
generator state before every step cost more than the rest of the table's
bookkeeping).
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fogline.models.config import ModelConfig
from fogline.models.fprior import FunctionalPrior
from fogline.models.keyed import CHUNK
from fogline.models.keyed_batch import (
    NoiseBuffers,
    PassKeys,
    PassRows,
    _evolve,
    _longs,
    _lr_scale,
    _new_row,
    row_state,
    step_pass,
)
from fogline.models.state import Minibatch, PosteriorState, StepInfo
from fogline.models.svi import program

#: Steps a key takes between two reads of its generator state: a rejected step
#: rewinds the generator by replaying the draws since the last read (at most this many).
REPLAY_MAX = 32


@dataclass(frozen=True)
class TableStep:
    """One :meth:`KeyTable.step`: per input row, in order, its :class:`StepInfo`."""

    infos: list[StepInfo]


class KeyTable:
    """Resident rows of the keys of one model (config and device).

    >>> from fogline.models.config import ModelConfig
    >>> from fogline.models.svi import init_state
    >>> s = init_state(ModelConfig(in_features=1), seed=0)
    >>> t = KeyTable(s.config, s.device, capacity=1)
    >>> a, b = t.add(s), t.add(s)
    >>> (a, b, t.capacity, len(t))
    (0, 1, 2, 2)
    >>> t.release(a); t.add(s)
    0
    """

    def __init__(
        self, config: ModelConfig, device: torch.device | str = "cpu", *, capacity: int = 64
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.config = config
        self.device = torch.device(device)
        self.prog = program(config, self.device)
        self.width = 3 * self.prog.total + 1
        self.data = torch.zeros(capacity, self.width, device=self.device)
        self._template: list[PosteriorState | None] = [None] * capacity
        # the key's current state while one is alive: the state written (until the key
        # steps), else a weak reference to the last one materialised (memory: a row and
        # its template per idle key, not a second copy of its parameters)
        self._state: list[PosteriorState | weakref.ref[PosteriorState] | None] = [None] * capacity
        self._gen: list[torch.Generator | None] = [None] * capacity
        self._fp: list[FunctionalPrior | None] = [None] * capacity
        self._group: list[tuple[int, float] | None] = [None] * capacity
        self._group_no_fp: list[tuple[int, float] | None] = [None] * capacity
        self._steps = [0] * capacity
        self._records = [0] * capacity
        # each key's generator state at its last write or read-out, and the draws since
        # (rows, inner steps, with the functional prior's draws) to replay on a rejection
        self._anchor: list[torch.Tensor | None] = [None] * capacity
        self._since: list[list[tuple[int, int, bool]]] = [[] for _ in range(capacity)]
        self._free = list(range(capacity))  # a heap: the lowest free row first
        self._used = 0
        self._views()
        # a pass's working copy of theta and its gradient [CHUNK, T], with their row views:
        # reused pass after pass (the step's largest temporaries, and no unbind per pass)
        t = self.prog.total
        self._work = torch.empty(CHUNK, t, device=self.device)
        self._grad = torch.empty(CHUNK, t, device=self.device)
        self._work_rows = list(self._work.unbind(0))
        self._noise: NoiseBuffers = {}
        self._grad_rows = list(self._grad.unbind(0))

    # -- storage -------------------------------------------------------------
    def _views(self) -> None:
        t = self.prog.total
        d = self.data
        self._theta = d[:, :t]
        self._theta_rows = list(self._theta.unbind(0))
        self._m = list(d[:, t : 2 * t].unbind(0))
        self._v = list(d[:, 2 * t : 3 * t].unbind(0))
        self._t = list(d[:, 3 * t :].unbind(0))
        self._tcol = d[:, 3 * t]

    @property
    def capacity(self) -> int:
        """Rows allocated (used + free)."""
        return int(self.data.shape[0])

    def __len__(self) -> int:
        return self._used

    def row_bytes(self) -> int:
        """Bytes of one key's row of the stacked tensor (params, moments, count)."""
        return self.width * self.data.element_size()

    def _grow(self) -> None:
        old = self.capacity
        data = torch.zeros(2 * old, self.width, device=self.device)
        data[:old] = self.data
        self.data = data
        for lst in (
            self._template,
            self._state,
            self._gen,
            self._fp,
            self._group,
            self._group_no_fp,
        ):
            lst.extend([None] * old)  # type: ignore[list-item]
        self._steps.extend([0] * old)
        self._records.extend([0] * old)
        self._anchor.extend([None] * old)
        self._since.extend([] for _ in range(old))
        for r in range(old, 2 * old):
            heapq.heappush(self._free, r)
        self._views()

    def accepts(self, state: PosteriorState) -> bool:
        """Whether ``state`` is of this table's model (config and device)."""
        return (
            state.config is self.config or state.config == self.config
        ) and state.device == self.device

    def add(self, state: PosteriorState) -> int:
        """A row holding ``state`` (the lowest free one; the table doubles when full)."""
        if not self.accepts(state):
            raise ValueError("key table: the state is of another model (config or device)")
        if not self._free:
            self._grow()
        row = heapq.heappop(self._free)
        self._used += 1
        self.write(row, state)
        return row

    def write(self, row: int, state: PosteriorState) -> None:
        """Row ``row`` holds ``state`` from now on (its template too)."""
        if not self.accepts(state):
            raise ValueError("key table: the state is of another model (config or device)")
        self.data[row].copy_(_new_row(self.prog, state))
        gen = self._gen[row]
        if gen is None:
            gen = self._gen[row] = torch.Generator(device=self.device)
        gen.set_state(state.rng_state)
        self._anchor[row] = state.rng_state
        self._since[row] = []
        self._template[row] = _evolve(state, params={}, opt_state={})  # the other fields
        self._state[row] = state
        fp = self._fp[row] = FunctionalPrior.of(state)
        # the pass group of keyed_step (group_key without the shared config and device)
        scale = _lr_scale(state)
        self._group[row] = (fp.samples if fp is not None and fp.weight > 0 else 0, scale)
        self._group_no_fp[row] = (0, scale)
        self._steps[row] = state.step_count
        self._records[row] = state.records_absorbed

    def release(self, row: int) -> None:
        """Free ``row`` for reuse (its key left memory)."""
        if self._template[row] is None:
            raise ValueError(f"key table: row {row} is not in use")
        self._template[row] = self._state[row] = self._fp[row] = self._anchor[row] = None
        self._since[row] = []
        self._group[row] = self._group_no_fp[row] = None
        self._used -= 1
        heapq.heappush(self._free, row)

    def state(self, row: int) -> PosteriorState:
        """The key's :class:`PosteriorState`, materialised from its row.

        Params and moments are views of ONE clone of the row, the RNG state is
        its generator's; every other field is the key's template's.  The same
        object again while the key has not stepped and someone still holds it.
        """
        held = self._state[row]
        st = held() if isinstance(held, weakref.ref) else held
        if st is not None:
            return st
        template, gen = self._template[row], self._gen[row]
        if template is None or gen is None:
            raise ValueError(f"key table: row {row} is not in use")
        t = self.prog.total
        packed = self.data[row].clone()
        rng = self._anchor[row] = gen.get_state()
        self._since[row] = []
        st = row_state(
            self.prog,
            template,
            packed,
            packed.split((t, t, t, 1)),
            rng,
            step_count=self._steps[row],
            records_absorbed=self._records[row],
        )
        self._state[row] = weakref.ref(st)
        return st

    def _rewind(self, row: int) -> None:
        """A rejected key's generator back to where it was before the step (replayed)."""
        gen, anchor = self._gen[row], self._anchor[row]
        assert gen is not None and anchor is not None
        fp = self._fp[row]
        _rewind_draws(gen, anchor, self._since[row], fp, self.prog.size, self.prog.rank)

    # -- the step ------------------------------------------------------------
    def step(
        self,
        rows: Sequence[int],
        batches: Sequence[Minibatch],
        *,
        num_steps: int = 1,
        data_size: int | None = None,
        likelihood_weight: float = 1.0,
        functional_prior: bool = True,
    ) -> TableStep:
        """Step the keys at ``rows`` on ``batches`` (aligned) in place; their infos in order.

        The objective, passes and bits of :func:`fogline.models.keyed.keyed_step`
        over the same states (module docstring); ``data_size`` N (``None``: each
        key's own row count), ``likelihood_weight`` beta and ``functional_prior``
        as there, one value for every key.
        """
        if len(rows) != len(batches):
            raise ValueError("key table: rows and batches differ in length")
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if not 0.0 <= likelihood_weight <= 1.0:
            raise ValueError(f"likelihood_weight must lie in [0, 1], got {likelihood_weight}")
        n = [mb.x.shape[0] for mb in batches]  # torch.Size holds ints
        group = self._group if functional_prior else self._group_no_fp
        keyed = list(map(group.__getitem__, rows))
        groups: dict[tuple[int, float], list[int]] = {}
        if keyed and None not in keyed and 0 not in n and keyed.count(keyed[0]) == len(keyed):
            first = keyed[0]
            assert first is not None
            groups[first] = list(range(len(rows)))  # the usual case: one group
        else:
            for i, (r, g) in enumerate(zip(rows, keyed, strict=True)):
                if g is None:
                    raise ValueError(f"key table: row {r} is not in use")
                if n[i] == 0:
                    raise ValueError(f"key table: empty minibatch for row {r}")
                members = groups.get(g)
                if members is None:
                    groups[g] = [i]
                else:
                    members.append(i)
        infos: list[StepInfo | None] = [None] * len(rows)
        for (samples, lr_scale), members in groups.items():
            members.sort(key=n.__getitem__)  # keyed_step's passes
            for c in range(0, len(members), CHUNK):
                part = members[c : c + CHUNK]
                got = self._pass(
                    list(map(rows.__getitem__, part)),
                    list(map(batches.__getitem__, part)),
                    list(map(n.__getitem__, part)),
                    samples > 0,
                    lr_scale,
                    num_steps,
                    data_size,
                    likelihood_weight,
                )
                for i, info in zip(part, got, strict=True):
                    infos[i] = info
        return TableStep([info for info in infos if info is not None])

    def _pass(
        self,
        rows: list[int],
        batches: list[Minibatch],
        n: list[int],
        with_fp: bool,
        lr_scale: float,
        num_steps: int,
        data_size: int | None,
        likelihood_weight: float,
    ) -> list[StepInfo]:
        dev = self.device
        idx = _longs(rows, dev)
        # per-row lists picked with map (no Python frame per row)
        templates = list(map(self._template.__getitem__, rows))
        gens = list(map(self._gen.__getitem__, rows))
        backup = self.data.index_select(0, idx) if num_steps > 1 else None
        tcol = self._tcol

        def bump(active: Sequence[int]) -> None:
            at = idx if len(active) == len(rows) else idx[list(active)]
            tcol.index_add_(0, at, torch.ones(len(active), device=dev))

        k = len(rows)
        theta = self._work[:k]

        def refresh() -> None:  # the working copy <- the rows' theta
            torch.index_select(self._theta, 0, idx, out=theta)

        refresh()
        prs = PassRows(
            theta,
            list(map(self._m.__getitem__, rows)),
            list(map(self._v.__getitem__, rows)),
            list(map(self._t.__getitem__, rows)),
            [g for g in gens if g is not None],
            bump,
            self._grad[:k],
            self._work_rows[:k],
            self._grad_rows[:k],
            list(map(self._theta_rows.__getitem__, rows)),
            refresh,
            self._noise,
        )
        keys = PassKeys(
            batches,
            [float(data_size if data_size is not None else n_i) for n_i in n],
            [likelihood_weight] * k,
            list(map(self._fp.__getitem__, rows)) if with_fp else [None] * k,
            [st.lr for st in templates if st is not None],
            [st.prior for st in templates if st is not None],
            lr_scale,
            n,
        )
        res = step_pass(self.config, dev, prs, keys, num_steps=num_steps)
        ok = res.ok
        if not all(ok):
            lost = [i for i, v in enumerate(ok) if not v]
            for i in lost:
                self._rewind(rows[i])
            if backup is not None:
                at = torch.tensor(lost, dtype=torch.long, device=dev)
                self.data.index_copy_(0, idx[at], backup[at])
        steps, records, states, since = self._steps, self._records, self._state, self._since
        # one replay-log entry per distinct row count, shared by the pass's keys
        entry = {n_i: (n_i, num_steps, with_fp) for n_i in n}
        for r, n_i, good in zip(rows, n, ok, strict=True):
            if good:
                steps[r] += num_steps
                records[r] += n_i
                states[r] = None
                log = since[r]
                log.append(entry[n_i])
                if len(log) >= REPLAY_MAX:  # a new anchor: replays stay short
                    gen = self._gen[r]
                    assert gen is not None
                    self._anchor[r] = gen.get_state()
                    since[r] = []
        # StepInfo(...) without the frozen dataclass's __init__ (one per key per step): the
        # same object (StepInfo has no __post_init__ or slots), its fields set in the
        # instance dict at once, not one object.__setattr__ each
        new = object.__new__
        out: list[StepInfo] = []
        append = out.append
        for n_i, loss_f, kl_f, lp_f, gn_f, good in zip(
            n, res.loss, res.kl, res.log_lik, res.grad_norm, ok, strict=True
        ):
            info = new(StepInfo)
            info.__dict__.update(
                loss=loss_f,
                nll=-lp_f / n_i,
                kl=kl_f,
                grad_norm=gn_f,
                rows=n_i,
                steps=num_steps,
                rejected=not good,
            )
            append(info)
        return out


def _rewind_draws(
    gen: torch.Generator,
    anchor: torch.Tensor,
    since: Sequence[tuple[int, int, bool]],
    fp: FunctionalPrior | None,
    size: int,
    rank: int,
) -> None:
    """Set ``gen`` to ``anchor`` advanced by the draws of the steps ``since``.

    Per inner step, :func:`~fogline.models.keyed_batch.step_pass`'s draws of one
    key in its order: eps [S, P], z [S, R] (low rank), the functional prior's
    x~ draws for the key's n rows (S = the prior's sample count, else 1).
    """
    gen.set_state(anchor)
    for n, num_steps, with_fp in since:
        prior = fp if with_fp else None
        samples = prior.samples if prior is not None else 1
        for _ in range(num_steps):
            torch.randn(samples, size, generator=gen)
            if rank:
                torch.randn(samples, rank, generator=gen)
            if prior is not None:
                prior.ood_draws(n, gen)


def table_bytes_per_key(table: KeyTable) -> float:
    """Bytes the table holds per used row: its stacked tensor plus one generator state each."""
    if len(table) == 0:
        return math.nan
    gen = torch.Generator(device=table.device).get_state()
    return table.data.nbytes / len(table) + gen.numel() * gen.element_size()


__all__ = ["KeyTable", "TableStep", "table_bytes_per_key"]
