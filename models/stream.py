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

Either way it is the one step of :func:`fogline.models.svi.step` (the
functional prior is a term of its objective, the factor's scale a parameter
group of its optimizer): pure, same state layout, randomness from
``state.rng_state``, so it resumes bit for bit after a restart.
"""

from __future__ import annotations

from fogline.models.fprior import LR_SCALE_KEY, FunctionalPrior
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
    """Absorb ``batch``: :func:`fogline.models.svi.step` with the terms the state carries.

    The functional-prior term is on when ``functional_prior`` is and the state
    carries one (``extra["functional_prior"]``); a low-rank state's factor
    steps with the scale it carries (``extra["cov_factor_lr_scale"]``, else 1).
    """
    fprior = FunctionalPrior.of(state) if functional_prior else None
    lr_scale = float(state.extra.get(LR_SCALE_KEY, 1.0)) if "cov_factor" in state.params else 1.0
    return step(
        state,
        batch,
        num_steps=num_steps,
        data_size=data_size,
        likelihood_weight=likelihood_weight,
        functional_prior=fprior,
        cov_factor_lr_scale=lr_scale,
    )
