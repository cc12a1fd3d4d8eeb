"""The streaming update the daemon and the drift loop run: ``stream_step(state, batch)``.

Per batch the objective is the per-observation negative ELBO of
:mod:`fogline.models.svi` (data size N, likelihood weight beta),

    L = -(beta/n) sum_i E_q log p(y_i | x_i, w) + KL(q || pi_t) / N,

plus, when the state carries a functional prior (the warm start stores one
in ``extra["functional_prior"]``), the function-space term of
:mod:`fogline.models.fprior` at inputs beyond the warm-start data's range,

    + gamma * mean_j KL( N(m(x~_j), v(x~_j)) || N(mu_0, sigma_0^2) ).

Without that term, streaming updates on in-range data slowly undo the
out-of-range uncertainty the warm start learned (measured on the California
recipe, 60 epochs, then batches of 64 training rows with N = N_train: 95%
coverage beyond |x0| >= 3 went 0.993 -> 0.865 after 200 batches, 0.515 after
1,000 and 0.379 after 2,000; with it 0.995, 0.992, 0.989).

A low-rank state from the warm start also carries its factor's step scale
(``extra["cov_factor_lr_scale"]``, 0.05 by default): Adam moves every entry of
the factor V by about lr at once, which at lr 0.005 makes the guide diverge
within a few steps (docs/model.md), so its streaming updates keep the smaller
step too.

Both paths are pure, keep the state layout, take their randomness from
``state.rng_state`` and so resume bit for bit after a restart.
"""

from __future__ import annotations

from fogline.models.fprior import LR_SCALE_KEY, FunctionalPrior, streaming_step
from fogline.models.state import Minibatch, PosteriorState, StepInfo
from fogline.models.svi import step


def stream_step(
    state: PosteriorState,
    batch: Minibatch,
    *,
    num_steps: int = 1,
    data_size: int | None = None,
    likelihood_weight: float = 1.0,
    functional_prior: bool = True,
) -> tuple[PosteriorState, StepInfo]:
    """Absorb ``batch``: :func:`fogline.models.svi.step`, or :func:`fogline.models.fprior.streaming_step`
    when ``functional_prior`` is on and the state carries one (see the module docstring),
    or when a low-rank state carries a step scale for its factor
    (``extra["cov_factor_lr_scale"]``: the factor V moves by ``lr * scale``)."""
    fprior = FunctionalPrior.of(state) if functional_prior else None
    if fprior is not None and fprior.weight <= 0:
        fprior = None
    lr_scale = float(state.extra.get(LR_SCALE_KEY, 1.0)) if "cov_factor" in state.params else 1.0
    if fprior is None and lr_scale == 1.0:
        return step(
            state,
            batch,
            num_steps=num_steps,
            data_size=data_size,
            likelihood_weight=likelihood_weight,
        )
    return streaming_step(
        state,
        batch,
        fprior=fprior,
        num_steps=num_steps,
        data_size=data_size,
        likelihood_weight=likelihood_weight,
        cov_factor_lr_scale=lr_scale,
    )
