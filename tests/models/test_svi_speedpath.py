"""Tests of the fast streaming step's hot path (:mod:`fogline.models.svi`).

Bit-exact resumption (also from a fresh, untraced program), ``num_steps``
semantics, rejected steps, purity, carried randomness (torch's global RNG is
never touched), the private fast paths against their public fallbacks
(fused Adam, the autograd engine, Pyro's own ELBO), the optimizer's parameter
groups, the benchmark's output contract and the CUDA path (marked ``gpu``,
skipped without CUDA).
No timings are asserted here: speed lives in ``fogline/bench/svi.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from fogline.models import svi
from fogline.models.config import ModelConfig
from fogline.models.priors import kl_to_prior
from fogline.models.serialize import from_bytes, to_bytes
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.svi import init_state, program, step

ROOT = Path(__file__).resolve().parents[2]


def _batch(n: int = 256, seed: int = 0, device: str = "cpu") -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return Minibatch(x.to(device), y.to(device))


def _assert_same(a: PosteriorState, b: PosteriorState) -> None:
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert torch.equal(a.params[k].cpu(), b.params[k].cpu()), k
    for k in a.opt_state:
        assert torch.equal(a.opt_state[k].cpu(), b.opt_state[k].cpu()), k
    assert torch.equal(a.rng_state, b.rng_state)
    assert a.step_count == b.step_count


CONFIGS = {
    "meanfield": ModelConfig(),
    "lowrank": ModelConfig(guide="lowrank", rank=3, hidden=(16,)),
    "student-t": ModelConfig(likelihood="student-t", hidden=(16,)),
}


def _fprior_kwargs(name: str) -> dict[str, object]:
    """Step arguments of a case: the ``+fprior`` cases add every optional term."""
    if not name.endswith("+fprior"):
        return {}
    from fogline.models.fprior import FunctionalPrior

    fp = FunctionalPrior.from_data(_batch().x, weight=0.05, scale=1.5, features=(0, 3))
    return {"functional_prior": fp, "particles": 2, "cov_factor_lr_scale": 0.05}


RESUME_CASES = [*sorted(CONFIGS), "meanfield+fprior", "lowrank+fprior"]


@pytest.mark.parametrize("name", RESUME_CASES)
def test_resume_through_bytes_is_bit_exact_even_with_a_fresh_program(name: str) -> None:
    config = CONFIGS[name.split("+")[0]]
    kw = _fprior_kwargs(name)
    s = init_state(config, seed=4)
    for i in range(3):
        s, _ = step(s, _batch(seed=i), **kw)  # type: ignore[arg-type]
    blob = to_bytes(s)
    a = s
    for i in range(3, 6):
        a, _ = step(a, _batch(seed=i), num_steps=2, **kw)  # type: ignore[arg-type]
    # a restarted process: no cached program, so the first call traces again;
    # tracing must not consume draws from the state's RNG stream
    svi._PROGRAMS.clear()
    b = from_bytes(blob)
    for i in range(3, 6):
        b, _ = step(b, _batch(seed=i), num_steps=2, **kw)  # type: ignore[arg-type]
    _assert_same(a, b)


def test_k_inner_steps_equal_k_calls_bit_for_bit() -> None:
    s0 = init_state(ModelConfig(), seed=1)
    batch = _batch()
    many, info = step(s0, batch, num_steps=4, data_size=1000)
    one = s0
    for _ in range(4):
        one, last = step(one, batch, data_size=1000)
    assert torch.equal(many.params["loc"], one.params["loc"])
    assert torch.equal(many.params["scale_unconstrained"], one.params["scale_unconstrained"])
    assert torch.equal(many.rng_state, one.rng_state)
    # diagnostics are those of the last inner step
    assert info.loss == last.loss and info.kl == last.kl and info.grad_norm == last.grad_norm
    assert info.steps == 4 and many.step_count == 4
    # the batch is absorbed once, however many inner steps
    assert many.records_absorbed == 256 and one.records_absorbed == 4 * 256


def test_step_info_diagnostics_are_taken_before_the_update() -> None:
    s0 = init_state(ModelConfig(), seed=2)
    _, info = step(s0, _batch(), data_size=512, likelihood_weight=0.5)
    scale = F.softplus(s0.params["scale_unconstrained"])
    kl = float(kl_to_prior(s0.params["loc"], scale, s0.prior))
    assert info.kl == pytest.approx(kl, rel=1e-5)
    assert info.nll == pytest.approx((info.loss - info.kl / 512) / 0.5, rel=1e-6)
    assert info.grad_norm > 0 and not info.rejected


def test_step_is_pure_and_successive_states_do_not_share_storage() -> None:
    s0 = init_state(ModelConfig(), seed=0)
    s1, _ = step(s0, _batch())
    snapshot = {k: v.clone() for k, v in s1.params.items()}
    opt = {k: v.clone() for k, v in s1.opt_state.items()}
    s2, _ = step(s1, _batch(seed=1), num_steps=3)
    for k, v in s1.params.items():
        assert torch.equal(v, snapshot[k])
    for k, v in s1.opt_state.items():
        assert torch.equal(v, opt[k])
    assert s2.params["loc"].data_ptr() != s1.params["loc"].data_ptr()


def test_program_is_shared_by_equal_configs() -> None:
    cpu = torch.device("cpu")
    assert program(ModelConfig(), cpu) is program(ModelConfig(), cpu)
    assert program(ModelConfig(), cpu) is not program(ModelConfig(), cpu, jit=False)
    assert program(ModelConfig(), cpu) is not program(ModelConfig(hidden=(8,)), cpu)


def test_varying_batch_sizes_match_the_eager_program() -> None:
    s = init_state(ModelConfig(), seed=5)
    for n in (256, 100, 300, 7):
        a, ia = step(s, _batch(n, seed=n))
        b, ib = step(s, _batch(n, seed=n), jit=False)
        assert ia.loss == pytest.approx(ib.loss, rel=1e-5)
        assert torch.allclose(a.params["loc"], b.params["loc"], atol=1e-6)
        s = a


@pytest.mark.parametrize(
    "bad",
    ["nan_y", "inf_x", "huge_lr"],
)
def test_non_finite_steps_are_rejected(bad: str) -> None:
    s0, _ = step(init_state(ModelConfig(), seed=0), _batch())
    batch = _batch(16)
    if bad == "nan_y":
        batch = Minibatch(batch.x, torch.full((16,), float("nan")))
    elif bad == "inf_x":
        x = batch.x.clone()
        x[3, 0] = float("inf")
        batch = Minibatch(x, batch.y)
    else:
        s0 = s0.replace(lr=float("inf"))
    new, info = step(s0, batch, num_steps=3)
    assert info.rejected and new is s0
    assert info.steps == 3 and info.rows == 16
    # the rejected call left nothing behind: the next good step is as from s0
    good_a, _ = step(s0.replace(lr=1e-3), _batch())
    good_b, _ = step(s0.replace(lr=1e-3), _batch())
    assert torch.equal(good_a.params["loc"], good_b.params["loc"])


def test_argument_checks() -> None:
    s = init_state(ModelConfig(), seed=0)
    with pytest.raises(ValueError, match="num_steps"):
        step(s, _batch(), num_steps=0)
    with pytest.raises(ValueError, match="likelihood_weight"):
        step(s, _batch(), likelihood_weight=1.5)
    with pytest.raises(ValueError, match="empty"):
        step(s, Minibatch(torch.empty(0, 8), torch.empty(0)))
    with pytest.raises(ValueError, match="particles"):
        step(s, _batch(), particles=0)
    # beta = 0: the data term is off, the (unweighted) NLL is still reported
    _, info = step(s, _batch(), likelihood_weight=0.0)
    _, ref = step(s, _batch())
    assert math.isfinite(info.nll) and info.nll == ref.nll and not info.rejected


def _adam_reference(
    theta: torch.Tensor,
    grads: list[torch.Tensor],
    lrs: list[tuple[slice, float]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.optim.Adam itself, one param group per slice (the textbook optimizer)."""
    parts = [torch.nn.Parameter(theta[sl].clone()) for sl, _ in lrs]
    opt = torch.optim.Adam(
        [{"params": [p], "lr": lr} for p, (_, lr) in zip(parts, lrs, strict=True)],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    for grad in grads:
        for p, (sl, _) in zip(parts, lrs, strict=True):
            p.grad = grad[sl].clone()
        opt.step()
    m = torch.cat([opt.state[p]["exp_avg"] for p in parts])
    v = torch.cat([opt.state[p]["exp_avg_sq"] for p in parts])
    return torch.cat([p.detach() for p in parts]), m, v


@pytest.mark.parametrize("fused", [True, False])
def test_adam_groups_match_torch_adam_and_fast_equals_fallback(fused: bool) -> None:
    if fused and svi._FUSED_ADAM is None:
        pytest.skip("this torch has no torch._fused_adam_")
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(50, generator=g)
    grads = [torch.randn(50, generator=g) for _ in range(5)]
    groups = (svi.ParamGroup(0, 30), svi.ParamGroup(30, 50, 0.05))
    results = {}
    for path in (fused, not fused):
        if path and svi._FUSED_ADAM is None:
            continue
        theta, m, v, t = theta0.clone(), torch.zeros(50), torch.zeros(50), torch.tensor(0.0)
        for grad in grads:
            svi.adam_(theta, grad, m, v, t, 0.01, groups, fused=path)
        assert float(t) == 5.0
        results[path] = (theta, m, v)
    # fast (private kernel) and fallback (public adam(fused=True)): the same bits
    first = results[fused]
    for other in results.values():
        assert all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # and the maths of torch.optim.Adam with one param group per lr
    ref = _adam_reference(theta0, grads, [(slice(0, 30), 0.01), (slice(30, 50), 0.0005)])
    for a, b in zip(first, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_param_groups_merge_equal_multipliers() -> None:
    cpu = torch.device("cpu")
    mf = program(ModelConfig(), cpu)
    assert svi.param_groups(mf) == (svi.ParamGroup(0, mf.total),)
    lr = program(ModelConfig(guide="lowrank", rank=3, hidden=(16,)), cpu)
    v = lr.slots["cov_factor"]
    assert svi.param_groups(lr, 0.05) == (
        svi.ParamGroup(0, v.start),
        svi.ParamGroup(v.start, v.end, 0.05),
    )
    assert svi.param_groups(lr, 1.0) == (svi.ParamGroup(0, lr.total),)


def test_lowrank_factor_group_moves_by_its_lr_multiplier() -> None:
    """One Adam step from zero moments moves each entry by ~lr * c (|m/sqrt(v)| = 1)."""
    cfg = ModelConfig(guide="lowrank", rank=3, hidden=(16,))
    s0 = init_state(cfg, seed=0, lr=1e-3)
    a, _ = step(s0, _batch(), cov_factor_lr_scale=0.05)
    b, _ = step(s0, _batch())
    move_a = (a.params["cov_factor"] - s0.params["cov_factor"]).abs()
    move_b = (b.params["cov_factor"] - s0.params["cov_factor"]).abs()
    assert float(move_a.max()) == pytest.approx(0.05e-3, rel=1e-3)
    assert float(move_b.max()) == pytest.approx(1e-3, rel=1e-3)
    # the other groups take the full step either way, from the same draws
    assert torch.equal(a.params["loc"], b.params["loc"])


@pytest.mark.parametrize("engine", [True, False])
def test_engine_gradient_equals_public_autograd_grad(engine: bool) -> None:
    if engine and svi._ENGINE_RUN_BACKWARD is None:
        pytest.skip("this torch has no engine entry point")
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(40, generator=g, requires_grad=True)
    w = torch.randn(40, generator=g)
    one = torch.tensor(1.0)

    def loss() -> torch.Tensor:
        return (torch.tanh(theta * w).pow(2) + theta.sin()).sum()

    got = svi.grad_(loss(), theta, one, engine=engine)
    (ref,) = torch.autograd.grad(loss(), (theta,))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_step_never_touches_the_global_rng_and_is_deterministic(name: str) -> None:
    """Randomness is carried in the state: two steps from one state agree bit for bit."""
    config = CONFIGS[name]
    s0 = init_state(config, seed=3)
    svi._PROGRAMS.clear()  # the first call traces: that must not draw either
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = step(s0, _batch(), num_steps=2)
    assert torch.equal(torch.get_rng_state(), before)
    # a different global RNG state changes nothing
    torch.manual_seed(999)
    b, _ = step(s0, _batch(), num_steps=2)
    assert to_bytes(a) == to_bytes(b)
    assert not torch.equal(a.rng_state, s0.rng_state)  # the state's own stream advanced
    # the eager program draws the same noise from the same state
    c, _ = step(s0, _batch(), num_steps=2, jit=False)
    assert torch.equal(c.rng_state, a.rng_state)
    assert torch.allclose(c.params["loc"], a.params["loc"], atol=1e-6)


def test_functional_prior_step_never_touches_the_global_rng() -> None:
    from fogline.models.fprior import FunctionalPrior

    s0 = init_state(CONFIGS["lowrank"], seed=3)
    fp = FunctionalPrior.from_data(_batch().x, weight=0.05, scale=1.5)
    before = torch.get_rng_state()
    a, _ = step(s0, _batch(), functional_prior=fp, particles=2, cov_factor_lr_scale=0.05)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = step(s0, _batch(), functional_prior=fp, particles=2, cov_factor_lr_scale=0.05)
    assert to_bytes(a) == to_bytes(b)


def _bench_module() -> ModuleType:
    return importlib.import_module("fogline.bench.svi")


def test_bench_svi_prints_one_json_object_last(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench_module()
    argv = ["--steps", "4", "--textbook-steps", "2", "--repeats", "2", "--warmup", "1"]
    assert bench.main([*argv, "--batch", "32", "--hidden", "8", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rec = json.loads(last)
    for key in ("textbook_steps_per_s", "fast_steps_per_s", "ratio", "batch", "hidden"):
        assert key in rec
    assert rec["batch"] == 32 and rec["hidden"] == 8 and rec["threads"] == 1
    assert rec["device"] == "cpu" and rec["torch"] == torch.__version__
    assert rec["ratio"] == pytest.approx(
        rec["fast_steps_per_s"] / rec["textbook_steps_per_s"], rel=0.02
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_bench_svi_cuda_fails_clearly_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench_module().main(["--device", "cuda"]) == 2
    assert "torch.cuda.is_available() == False" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_resumes_bit_exactly_and_matches_cpu_maths() -> None:
    config = ModelConfig()
    s = init_state(config, seed=0, device="cuda")
    assert s.device.type == "cuda" and s.opt_state["step"].device.type == "cuda"
    for i in range(3):
        s, info = step(s, _batch(seed=i, device="cuda"))
        assert not info.rejected
    blob = to_bytes(s)
    a = s
    for i in range(3, 5):
        a, _ = step(a, _batch(seed=i, device="cuda"), num_steps=2)
    svi._PROGRAMS.clear()
    # from_bytes(blob, device="cuda") re-seeds the RNG when the device type
    # changes (PosteriorState.to); move by hand to keep the stored CUDA stream
    loaded = from_bytes(blob)
    b = loaded.to("cuda").replace(rng_state=loaded.rng_state)
    for i in range(3, 5):
        b, _ = step(b, _batch(seed=i, device="cuda"), num_steps=2)
    _assert_same(a, b)
    # the same ELBO as the CPU program for the same parameters and draws of w
    prog_gpu = program(config, torch.device("cuda"), jit=False)
    prog_cpu = program(config, torch.device("cpu"), jit=False)
    cpu = s.to("cpu")
    big = _batch(4096, seed=9)
    theta = prog_cpu.pack(cpu.params)
    eps = torch.randn(1, theta.shape[0] // 2, generator=torch.Generator().manual_seed(0))
    args = (big.x, big.y, theta, cpu.prior.loc, cpu.prior.scale)
    scales = (torch.tensor(1 / 4096), torch.tensor(1 / 4096), eps)
    cuda_args = tuple(t.cuda() for t in (*args, *scales))
    with torch.no_grad():
        # the same draw of w on both devices: loss, KL and log-likelihood agree
        gpu = prog_gpu.objective(svi.Variant(), *cuda_args)
        cpu_out = prog_cpu.objective(svi.Variant(), *args, *scales)
    for a, b in zip(gpu, cpu_out, strict=True):
        assert torch.allclose(a.cpu(), b, rtol=1e-4)


def test_one_lowrank_kl_is_the_dense_gaussian_kl_and_serves_the_elbo() -> None:
    """fprior.lowrank_kl (float64 Cholesky) = the dense KL of N(m, VV^T + D) to N(m0, S0) in
    float64, also at the warm start's tiny scales where the capacitance is ~1e5; the KL
    registered for Pyro's ELBO and Program.kl are that same function."""
    from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

    from fogline.models.fprior import lowrank_kl

    g = torch.Generator().manual_seed(0)
    p, r = 40, 3
    for s_scale in (0.3, 1e-3):
        loc = torch.randn(p, generator=g)
        factor = torch.randn(p, r, generator=g) * 0.3
        scale = torch.rand(p, generator=g) * s_scale + s_scale
        m0, s0 = torch.randn(p, generator=g), torch.rand(p, generator=g) + 0.5
        got = lowrank_kl(loc, factor, scale, m0, s0)
        cov = (factor.double() @ factor.double().T) + torch.diag(scale.double().pow(2))
        dense = kl_divergence(
            MultivariateNormal(loc.double(), covariance_matrix=cov),
            MultivariateNormal(m0.double(), covariance_matrix=torch.diag(s0.double().pow(2))),
        )
        assert float(got) == pytest.approx(float(dense), rel=1e-5)
        q = svi._NoisedLowRank(loc, factor, scale)
        registered = kl_divergence(q, Independent(Normal(m0, s0), 1))
        assert torch.equal(registered, got)
    cfg = ModelConfig(guide="lowrank", rank=3, hidden=(4,))
    st = init_state(cfg, seed=0)
    prog = program(cfg, torch.device("cpu"))
    pr = st.prior
    ref = lowrank_kl(
        st.params["loc"],
        st.params["cov_factor"],
        F.softplus(st.params["scale_unconstrained"]),
        pr.loc,
        pr.scale,
    )
    assert torch.equal(prog.kl(prog.pack(st.params), pr), ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_torch_without_the_private_entry_points_steps_the_same_bits(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``torch._fused_adam_`` and the engine entry point absent (as import would find
    them on a torch without them), the step takes the public fallbacks: same bits."""
    kw = {"cov_factor_lr_scale": 0.05} if name == "lowrank" else {}
    s0 = init_state(CONFIGS[name], seed=7)
    fast, _ = step(s0, _batch(), num_steps=3, **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(svi, "_FUSED_ADAM", None)
    monkeypatch.setattr(svi, "_ENGINE_RUN_BACKWARD", None)
    public, _ = step(s0, _batch(), num_steps=3, **kw)  # type: ignore[arg-type]
    assert to_bytes(fast) == to_bytes(public)
