"""``models.keyed``: one posterior per key, all keys of a micro-batch stepped together."""

from __future__ import annotations

import pytest
import torch

from fogline.models import keyed_batch as kb
from fogline.models.config import ModelConfig
from fogline.models.fprior import EXTRA_KEY, LR_SCALE_KEY, FunctionalPrior
from fogline.models.keyed import (
    Population,
    fleet_prior,
    key_seed,
    keyed_step,
    keyed_step_loop,
    new_key_state,
)
from fogline.models.network import layout, noise_scale
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.stream import stream_step
from fogline.models.svi import init_state


# ---- autograd references of the hand-written gradients in models/keyed_batch.py
def _log_lik(
    out: torch.Tensor, y: torch.Tensor, config: ModelConfig, df: torch.Tensor | None
) -> torch.Tensor:
    """log p(y | raw outputs) elementwise, [K, n] (the formulas of torch.distributions):
    the autograd reference of :func:`fogline.models.keyed_batch._head_grad`."""
    if config.likelihood == "bernoulli":
        return -torch.nn.functional.binary_cross_entropy_with_logits(
            out[..., 0], y, reduction="none"
        )
    loc = out[..., 0]
    scale = noise_scale(out[..., 1], config)
    if config.likelihood == "student-t":
        if df is None:
            assert config.df is not None
            df = torch.full_like(loc[:, :1], config.df)
        z = (y - loc) / scale
        return kb._student_t_log_prob(z * z, scale, df)
    return -((y - loc) ** 2) / (2 * scale * scale) - scale.log() - kb._HALF_LOG_2PI


def _forward(w: torch.Tensor, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Raw outputs [B, n, O] for flat weights ``w`` [B, P] at rows ``x`` [B, n, D], by autograd
    ops: the reference of :func:`fogline.models.keyed_batch._net_forward` / ``_net_backward``."""
    act = kb._ACTIVATIONS[config.activation]
    lay = layout(config)
    b = w.shape[0]
    parts = w.split(kb._layer_sizes(lay), dim=1)
    last = len(lay.layers) - 1
    h = x
    for i, layer in enumerate(lay.layers):
        weight = parts[2 * i].view(b, layer.fan_out, layer.fan_in)
        h = torch.baddbmm(parts[2 * i + 1].unsqueeze(1), h, weight.transpose(1, 2))
        if i < last:
            h = act(h)
    return h


def _functional_kl(
    mean_ksn: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    f_loc: torch.Tensor,
    f_scale: torch.Tensor,
) -> torch.Tensor:
    """mean_{j<=n_k} KL(N(m_kj, v_kj) || N(mu0_k, sigma0_k^2)) per key [K] (masked rows): the
    autograd reference of :func:`fogline.models.keyed_batch._functional_kl_grad`."""
    m = mean_ksn.mean(1)
    v = mean_ksn.var(1) + 1e-8
    s = f_scale.unsqueeze(1)
    kl = s.log() - 0.5 * v.log() + (v + (m - f_loc.unsqueeze(1)).pow(2)) / (2 * s * s) - 0.5
    return torch.where(mask, kl, torch.zeros_like(kl)).sum(-1) / rows


#: init_scale 0.03, not the default 1e-3: at 1e-3 the functional term's variance over
#: the draws, v ~ 1e-6, is a difference of nearly equal numbers, and its gradient (via
#: 1/v) changes by ~1e-4 relative with the summation order of the padded matmul.
CFG = ModelConfig(in_features=3, hidden=(8, 8), init_scale=0.03)


def _fleet(cfg: ModelConfig | None = None, *, fprior: bool = False) -> PosteriorState:
    st = init_state(cfg or CFG, seed=0, lr=5e-3)
    if fprior:
        fp = FunctionalPrior(weight=0.05, scale=1.5, lo=(-2.0,) * 3, hi=(2.0,) * 3)
        st = st.replace(extra={EXTRA_KEY: fp.to_dict(), LR_SCALE_KEY: 0.05})
    return fleet_prior(st)


def _batch(rows: int, seed: int, d: int = 3) -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    return Minibatch(x, torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(rows, generator=g))


def test_new_keys_start_from_the_fleet_prior_with_their_own_rng() -> None:
    warm = init_state(ModelConfig(in_features=3, hidden=(8,)), seed=1)
    warm, _ = stream_step(warm, _batch(16, 0))
    fleet = fleet_prior(warm)
    assert fleet.step_count == 0 and fleet.records_absorbed == 0 and not fleet.offsets
    assert torch.equal(fleet.params["loc"], warm.params["loc"])
    assert all(float(v.abs().sum()) == 0 for v in fleet.opt_state.values())
    a, b = new_key_state(fleet, "host-a"), new_key_state(fleet, "host-b")
    assert not torch.equal(a.rng_state, b.rng_state)
    assert torch.equal(a.rng_state, new_key_state(fleet, "host-a").rng_state)
    assert key_seed("host-a") == key_seed("host-a") != key_seed("host-b")


@pytest.mark.parametrize("step_fn", [keyed_step, keyed_step_loop])
def test_each_key_is_stepped_as_stream_step_steps_it_alone(step_fn) -> None:  # type: ignore[no-untyped-def]
    fleet = _fleet(fprior=True)
    keys = ["a", "b", "c", "d"]
    states = {k: new_key_state(fleet, k) for k in keys}
    rows = {"a": 1, "b": 5, "c": 17, "d": 9}
    batches = {k: _batch(rows[k], i) for i, k in enumerate(keys[:3])}  # "d" not in the batch
    weights = {"a": 1.0, "b": 0.5, "c": 0.8}
    new, infos = step_fn(
        states, batches, data_size={"a": None, "b": 50, "c": None}, likelihood_weight=weights
    )
    assert set(new) == set(infos) == {"a", "b", "c"}
    for k, n_k in (("a", None), ("b", 50), ("c", None)):
        ref, info = stream_step(states[k], batches[k], data_size=n_k, likelihood_weight=weights[k])
        assert info.rows == infos[k].rows == rows[k]
        assert new[k].records_absorbed == rows[k] and new[k].step_count == 1
        for name, v in ref.params.items():
            torch.testing.assert_close(new[k].params[name], v, rtol=1e-5, atol=1e-6)
        for name, v in ref.opt_state.items():
            torch.testing.assert_close(new[k].opt_state[name], v, rtol=1e-4, atol=1e-6)
        assert torch.equal(new[k].rng_state, ref.rng_state)
        assert infos[k].loss == pytest.approx(info.loss, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        {"guide": "lowrank", "rank": 3},
        {"likelihood": "student-t"},
        {"likelihood": "student-t", "df": 4.0, "activation": "tanh", "noise_head": "bounded"},
        {"likelihood": "bernoulli"},
    ],
    ids=["lowrank", "student-t-learned-df", "student-t-fixed-df", "bernoulli"],
)
def test_keys_stepped_together_match_each_key_alone(cfg: dict[str, object]) -> None:
    config = CFG.model_copy(update=cfg)
    fleet = _fleet(config, fprior=True)
    keys = [f"k{i}" for i in range(5)]
    states = {k: new_key_state(fleet, k) for k in keys}
    batches = {}
    for i, k in enumerate(keys):
        b = _batch(1 + 3 * i, 20 + i)
        y = (b.y > 0).float() if config.likelihood == "bernoulli" else b.y
        batches[k] = Minibatch(b.x, y)
    new, infos = keyed_step(states, batches, num_steps=3, data_size=100)
    for k in keys:
        ref, info = stream_step(states[k], batches[k], num_steps=3, data_size=100)
        assert not infos[k].rejected and new[k].step_count == 3
        for name, v in ref.params.items():
            torch.testing.assert_close(new[k].params[name], v, rtol=1e-4, atol=1e-5)
        assert float(new[k].opt_state["step"]) == float(ref.opt_state["step"]) == 3.0
        assert torch.equal(new[k].rng_state, ref.rng_state)
        assert infos[k].kl == pytest.approx(info.kl, rel=1e-4)
        assert infos[k].nll == pytest.approx(info.nll, rel=1e-4, abs=1e-5)


def test_bias_correction_follows_each_keys_own_step_count() -> None:
    """Keys at different step counts and learning rates in one call: each as if alone."""
    fleet = _fleet()
    old = stream_step(new_key_state(fleet, "old"), _batch(6, 1), num_steps=7)[0]
    old = old.replace(lr=1e-3)
    young = new_key_state(fleet, "young")
    batches = {"old": _batch(4, 2), "young": _batch(9, 3)}
    new, _ = keyed_step({"old": old, "young": young}, batches)
    for k, st in (("old", old), ("young", young)):
        ref, _ = stream_step(st, batches[k])
        torch.testing.assert_close(new[k].params["loc"], ref.params["loc"], rtol=1e-5, atol=1e-6)
    assert float(new["old"].opt_state["step"]) == 8.0


def test_consecutive_batched_steps_follow_stream_step() -> None:
    """A state made by keyed_step is gathered by its packed row next time: same results."""
    fleet = _fleet(fprior=True)
    states = {k: new_key_state(fleet, k) for k in "abc"}
    alone = dict(states)
    for t in range(4):
        batches = {k: _batch(2 + 3 * i + t, 10 * t + i) for i, k in enumerate("abc")}
        if t == 2:
            del batches["b"]  # b skips a batch; restored blobs take the general path
            states = {k: from_bytes(to_bytes(s)) for k, s in states.items()}
        states = {**states, **keyed_step(states, batches, num_steps=2)[0]}
        for k, b in batches.items():
            alone[k] = stream_step(alone[k], b, num_steps=2)[0]
    for k in "abc":
        assert states[k].step_count == alone[k].step_count
        for name, v in alone[k].params.items():
            torch.testing.assert_close(states[k].params[name], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(states[k].rng_state, alone[k].rng_state)


def test_a_batched_state_with_edited_tensors_is_read_by_its_tensors() -> None:
    """A keyed_step state whose params were swapped is not read from its old row."""
    fleet = _fleet()
    batch = {"a": _batch(5, 1)}
    st = keyed_step({"a": new_key_state(fleet, "a")}, batch)[0]["a"]
    # new params, the same opt_state mapping (its moments still views of the old row)
    edited = st.replace(params={**st.params, "loc": st.params["loc"] + 0.5})
    got = keyed_step({"a": edited}, batch)[0]["a"]
    # the reference: the same values in plain tensors (no packed row at all)
    plain = edited.replace(
        params={k: v.clone() for k, v in edited.params.items()},
        opt_state={k: v.clone() for k, v in edited.opt_state.items()},
    )
    want = stream_step(plain, batch["a"])[0]
    for name, v in want.params.items():
        torch.testing.assert_close(got.params[name], v, rtol=1e-4, atol=1e-5)
    ref = keyed_step({"a": plain}, batch)[0]["a"]
    for name, v in ref.params.items():
        assert torch.equal(got.params[name], v)


def test_a_non_finite_key_is_rejected_alone() -> None:
    fleet = _fleet()
    states = {k: new_key_state(fleet, k) for k in "ab"}
    bad = _batch(4, 0)
    bad = Minibatch(bad.x, torch.full_like(bad.y, float("nan")))
    new, infos = keyed_step(states, {"a": bad, "b": _batch(4, 1)})
    assert infos["a"].rejected and new["a"] is states["a"]
    assert not infos["b"].rejected and new["b"].step_count == 1


def test_keyed_step_is_bit_identical_run_to_run() -> None:
    fleet = _fleet()
    states = {k: new_key_state(fleet, k) for k in "xyz"}
    batches = {k: _batch(3 + 4 * i, i) for i, k in enumerate("xyz")}
    one, _ = keyed_step(states, batches, num_steps=3)
    two, _ = keyed_step(states, batches, num_steps=3)
    assert all(to_bytes(one[k]) == to_bytes(two[k]) for k in "xyz")


def test_a_key_without_a_state_is_a_clear_error() -> None:
    fleet = _fleet()
    with pytest.raises(ValueError, match="without a state"):
        keyed_step({"a": fleet}, {"b": _batch(2, 0)})


def test_population_is_the_moment_matched_mixture_and_round_trips() -> None:
    fleet = _fleet()
    states = [stream_step(new_key_state(fleet, k), _batch(8, i))[0] for i, k in enumerate("abc")]
    pop = Population(fleet.num_weights)
    for s in states:
        pop.add(s)
    stepped = stream_step(states[1], _batch(8, 9))[0]
    pop.replace(states[1], stepped)
    now = [states[0], stepped, states[2]]
    m = torch.stack([s.params["loc"].double() for s in now])
    v = torch.stack([s.posterior_scale().double() ** 2 for s in now])
    mean, var = pop.moments()
    torch.testing.assert_close(mean, m.mean(0))
    torch.testing.assert_close(var, (v + m * m).mean(0) - m.mean(0) ** 2, rtol=1e-6, atol=1e-12)
    back = Population.from_json(pop.to_json())
    assert torch.equal(back.moments()[0], mean) and back.count == 3
    st = pop.state(fleet)
    torch.testing.assert_close(st.posterior_scale().double(), var.sqrt(), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="sum_m"):
        Population.from_json({**pop.to_json(), "sum_m": [0.0]})


def test_bench_keyed_prints_one_json_object_last(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fogline.bench.keyed import main

    assert main(["--keys", "6", "--rows", "3", "--hidden", "8", "--repeats", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["benchmark"] == "keyed" and rec["keys"] == 6
    assert rec["batched_key_steps_per_s"] > 0 and rec["loop_key_steps_per_s"] > 0
    assert rec["max_abs_loc_difference"] < 1e-4  # both paths took the same steps
    assert rec["resident_blobs_equal_state_batched"]  # the daemon's path writes keyed_step's bytes
    assert rec["table_bytes_per_key"] >= rec["table_row_bytes_per_key"] > rec["num_weights"] * 4
    assert rec["blob_bytes_per_key"] > rec["num_weights"] * 4
    assert rec["with_drift_blob_bytes_per_key"] > rec["blob_bytes_per_key"]


def test_lowrank_kl_gradient_in_closed_form_matches_autograd() -> None:
    """The batched step's closed-form low-rank KL gradients equal autograd's (float64)."""
    from fogline.models.keyed_batch import _kl_lowrank, _kl_lowrank_grad

    g = torch.Generator().manual_seed(0)
    k, p, r = 4, 50, 5
    m = torch.randn(k, p, generator=g, dtype=torch.float64)
    v = 0.3 * torch.randn(k, p, r, generator=g, dtype=torch.float64)
    s = torch.rand(k, p, generator=g, dtype=torch.float64) + 0.1
    m0 = torch.randn(1, p, generator=g, dtype=torch.float64)
    s0 = torch.rand(1, p, generator=g, dtype=torch.float64) + 0.5
    leaves = [t.clone().requires_grad_(True) for t in (m, v, s)]
    kl = _kl_lowrank(*leaves, m0, s0)
    want = torch.autograd.grad(kl.sum(), leaves)
    kl2, *got = _kl_lowrank_grad(m, v, s, m0, s0)
    torch.testing.assert_close(kl2, kl.detach())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["relu", "tanh", "silu", "gelu"])
def test_net_backward_by_hand_matches_autograd(activation: str) -> None:
    """The batched step's backpropagation through the nets equals autograd's, bit for bit."""
    from fogline.models.keyed_batch import _net_backward, _net_forward

    config = ModelConfig(in_features=3, hidden=(6, 5), activation=activation)
    g = torch.Generator().manual_seed(1)
    b, n, p = 4, 7, init_state(config).num_weights
    w = 0.5 * torch.randn(b, p, generator=g)
    x = torch.randn(b, n, 3, generator=g)
    g_out = torch.randn(b, n, config.out_features, generator=g)
    leaf = w.clone().requires_grad_(True)
    want = torch.autograd.grad(_forward(leaf, x, config), leaf, g_out)[0]
    out, tape = _net_forward(w, x, config)
    assert torch.equal(out, _forward(w, x, config))
    got = torch.full_like(w, float("nan"))  # every entry written
    _net_backward(tape, g_out, config, got)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"noise_head": "exp"},
        {"noise_head": "softplus"},
        {"likelihood": "student-t"},
        {"likelihood": "student-t", "df": 4.0, "noise_head": "softplus"},
        {"likelihood": "bernoulli"},
    ],
    ids=["gaussian-bounded", "gaussian-exp", "gaussian-softplus", "t-learned", "t-fixed", "bern"],
)
def test_likelihood_gradient_in_closed_form_matches_autograd(cfg: dict[str, object]) -> None:
    """The batched step's closed-form data-term gradient equals autograd's of ``_log_lik``."""
    from fogline.models.keyed_batch import _head_grad
    from fogline.models.likelihoods import df_from_unconstrained

    config = ModelConfig(in_features=2, hidden=(4,), **cfg)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(2)
    k, n = 5, 6
    out = torch.randn(k, n, config.out_features, generator=g, dtype=torch.float64)
    y = torch.randn(k, n, generator=g, dtype=torch.float64)
    if config.likelihood == "bernoulli":
        y = (y > 0).double()
    mask = torch.arange(n).unsqueeze(0) < torch.tensor([1, 6, 3, 2, 5]).unsqueeze(1)
    obs = torch.rand(k, generator=g, dtype=torch.float64)
    df_u = torch.randn(k, 1, generator=g, dtype=torch.float64) if config.learns_df else None
    leaves = [out.clone().requires_grad_(True)]
    if df_u is not None:
        leaves.append(df_u.clone().requires_grad_(True))
    df = df_from_unconstrained(leaves[1]) if df_u is not None else None
    lp_rows = _log_lik(leaves[0], y, config, df)
    lp = torch.where(mask, lp_rows, torch.zeros_like(lp_rows)).sum(-1)
    want = torch.autograd.grad((-obs * lp).sum(), leaves)
    lp2, g_out, g_df = _head_grad(out, y, mask, obs, config, df_u)
    torch.testing.assert_close(lp2, lp.detach())
    torch.testing.assert_close(g_out, want[0])
    if df_u is not None:
        assert g_df is not None
        torch.testing.assert_close(g_df, want[1])
    else:
        assert g_df is None


def test_functional_kl_gradient_in_closed_form_matches_autograd() -> None:
    """The functional term's closed-form gradient w.r.t. the draws' means equals autograd's."""
    from fogline.models.keyed_batch import _functional_kl_grad

    g = torch.Generator().manual_seed(3)
    k, s, n = 4, 8, 5
    mean = torch.randn(k, s, n, generator=g, dtype=torch.float64)
    mask = torch.arange(n).unsqueeze(0) < torch.tensor([5, 1, 3, 4]).unsqueeze(1)
    rows = mask.sum(1).double()
    f_loc = torch.randn(k, generator=g, dtype=torch.float64)
    f_scale = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    f_w = torch.rand(k, generator=g, dtype=torch.float64)
    leaf = mean.clone().requires_grad_(True)
    kl = f_w * _functional_kl(leaf, mask, rows, f_loc, f_scale)
    want = torch.autograd.grad(kl.sum(), leaf)[0]
    kl2, got = _functional_kl_grad(mean, mask, rows, f_loc, f_scale, f_w)
    torch.testing.assert_close(kl2, kl.detach())
    torch.testing.assert_close(got, want)
