"""The warm start's minibatch SVI loop, shared by the recipe and the generic fit.

One epoch is one shuffled pass over the training rows: for each minibatch B
of at most ``batch`` rows, one :func:`fogline.models.svi.step` with
``data_size = N_train`` (the prior is the frozen base prior, so after the
loop q approximates p(w | D_train)), the optional functional prior
(:mod:`fogline.models.fprior`), ``particles`` likelihood samples and the
low-rank factor's step scale.  The shuffle draws from a generator seeded with
``seed``; the step's own noise comes from the state's RNG.  After every epoch
the held-out negative log predictive density

    NLPD = -(1/M) sum_i log (1/S) sum_s p(y_i | x_i, w_s),   S = 20, w_s ~ q

is recorded (model units), with the mean training loss of the epoch's
accepted steps and the number of rejected (non-finite) steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fogline.models.fprior import FunctionalPrior
from fogline.models.predictive import log_predictive_density, sample_ensemble
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.svi import step

#: Posterior samples of the per-epoch held-out NLPD.
HELD_OUT_SAMPLES = 20

OnEpoch = Callable[[int, dict[str, float]], None]


def train_epochs(
    state: PosteriorState,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    seed: int,
    functional_prior: FunctionalPrior | None = None,
    particles: int = 1,
    cov_factor_lr_scale: float = 1.0,
    on_epoch: OnEpoch | None = None,
) -> tuple[PosteriorState, list[dict[str, float]]]:
    """Run ``epochs`` shuffled passes (see the module docstring); return the state and history.

    ``x_train`` [N, D], ``y_train`` [N], ``x_held`` [M, D], ``y_held`` [M] are
    model-unit float32 tensors.  Each history record has ``epoch``, ``loss``,
    ``held_out_nlpd`` and ``rejected``; ``on_epoch(epoch, record)`` is called
    after each epoch (0-based ``epoch``).
    """
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total, count, rejected = 0.0, 0, 0
        for start in range(0, n, batch):
            idx = perm[start : start + batch]
            mb = Minibatch(x_train[idx], y_train[idx])
            state, info = step(
                state,
                mb,
                data_size=n,
                functional_prior=functional_prior,
                particles=particles,
                cov_factor_lr_scale=cov_factor_lr_scale,
            )
            rejected += int(info.rejected)
            if not info.rejected:
                total += info.loss
                count += 1
        ens = sample_ensemble(state, HELD_OUT_SAMPLES, seed=seed + epoch)
        held = -float(log_predictive_density(ens, x_held, y_held).mean())
        record = {
            "epoch": float(epoch + 1),
            "loss": total / max(count, 1),
            "held_out_nlpd": held,
            "rejected": float(rejected),
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, record)
    return state, history


__all__ = ["HELD_OUT_SAMPLES", "OnEpoch", "train_epochs"]
