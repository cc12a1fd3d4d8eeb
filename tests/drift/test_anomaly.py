"""The anomaly score: tail probability on the log scale, normal scores, anomaly likelihood."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fogline.drift.anomaly import (
    RATE_TAIL_DECADES,
    AnomalyLikelihood,
    LikelihoodConfig,
    anomaly_likelihood,
    log_tail_probability,
    normal_scores,
    suppress_repeats,
    window_means,
    written_score,
)
from fogline.drift.pot import TailConfig
from fogline.drift.signals import _moments_and_scores
from fogline.models.config import ModelConfig
from fogline.models.predictive import sample_ensemble
from fogline.models.svi import init_state


def _ensemble() -> object:
    state = init_state(ModelConfig.model_validate({"in_features": 3, "hidden": (8,)}), seed=0)
    return sample_ensemble(state, 16, 0)


def test_log_tail_matches_the_mixture_cdf_and_keeps_resolution_in_the_tail() -> None:
    ens = _ensemble()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen)
    mean, var, _, cdf = _moments_and_scores(ens, x, torch.zeros(40))  # type: ignore[arg-type]
    assert cdf is not None
    lp = log_tail_probability(ens, x, torch.zeros(40))  # type: ignore[arg-type]
    expect = (2 * torch.minimum(cdf, 1 - cdf)).double().log().numpy()
    ok = expect > -8.0  # where float32's 1 - F still has digits
    assert ok.sum() > 20 and np.all(lp[~ok] < -7.0)
    np.testing.assert_allclose(lp[ok], expect[ok], rtol=1e-3, atol=1e-5)
    far = mean + 60 * var.sqrt()  # 1 - F rounds to 0 in float32 here
    lp_far = log_tail_probability(ens, x, far)  # type: ignore[arg-type]
    assert np.all(np.isfinite(lp_far)) and np.all(lp_far < -500)
    floored = log_tail_probability(ens, x, far, noise_floor=10.0)  # type: ignore[arg-type]
    assert np.all(floored > lp_far)  # a noise floor tempers the tail


def test_normal_scores_are_standard_normal_for_uniform_tails() -> None:
    rng = np.random.default_rng(0)
    z = normal_scores(np.log(rng.uniform(size=20_000)))
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    assert normal_scores([-math.inf, 0.0], cap=5.0).tolist() == [5.0, -5.0]


@pytest.mark.parametrize("tail", ["gaussian", "student_t", "calibrated"])
def test_streaming_equals_the_vectorised_score_across_a_restart(tail: str) -> None:
    extra = {"calibration": TailConfig(window=400, min_history=100)} if tail == "calibrated" else {}
    cfg = LikelihoodConfig(
        short=(5, 20),
        long=300,
        min_history=50,
        tail="gaussian" if tail == "calibrated" else tail,  # type: ignore[arg-type]
        **extra,  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(1)
    zeta = rng.standard_normal(900)
    zeta[600:640] += 3.0
    score, log10_q = anomaly_likelihood(zeta, cfg)
    first = AnomalyLikelihood(cfg)
    s1, q1 = first.update(zeta[:421])
    second = AnomalyLikelihood.from_state(first.state_dict(), cfg)
    s2, q2 = second.update(zeta[421:])
    np.testing.assert_allclose(np.r_[s1, s2], score, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.r_[q1, q2], log10_q, rtol=0, atol=1e-12)
    assert np.all(score[:50] == 0)


def test_a_threshold_is_a_false_alarm_rate_on_calibrated_noise() -> None:
    """Per-record rate of raw score >= 1 - q is about q on i.i.d. N(0, 1)
    (the Bonferroni bound over the scales makes it at most q, up to sampling error)."""
    cfg = LikelihoodConfig()
    rng = np.random.default_rng(2)
    score, lam = anomaly_likelihood(rng.standard_normal(60_000), cfg)
    raw = written_score(lam, cfg)
    live = raw[cfg.long :]
    for decades in (1.0, 2.0, 3.0):  # measured ratios on seeds 0-2: 1.0-1.6
        nominal = 10**-decades
        rate = float(np.mean(live >= 1 - nominal))
        assert 0.5 * nominal <= rate <= 2.0 * nominal, (rate, nominal)
        # the written score keeps the first record of each excursion: fewer, never more
        kept = float(np.mean(score[cfg.long :] >= 1 - nominal))
        assert 0 < kept <= rate
    assert np.all((score == raw) | (score == 0))


def test_the_rate_and_log_scales_rank_records_alike() -> None:
    rng = np.random.default_rng(4)
    zeta = rng.standard_normal(5000)
    zeta[3000:3020] += 2.5
    rate, lam = anomaly_likelihood(zeta, LikelihoodConfig())
    log, lam_log = anomaly_likelihood(zeta, LikelihoodConfig(scale="log"))
    np.testing.assert_array_equal(lam, lam_log)
    np.testing.assert_array_equal(rate > 0, log > 0)  # the same records kept
    np.testing.assert_allclose(rate, np.where(rate > 0, 1 - 10.0**-lam, 0.0), rtol=0, atol=1e-15)
    np.testing.assert_allclose(log, np.where(log > 0, lam / (lam + 10.0), 0.0), rtol=0, atol=1e-15)
    kept = rate > 0
    order_rate, order_log = (
        np.argsort(rate[kept], kind="stable"),
        np.argsort(log[kept], kind="stable"),
    )
    np.testing.assert_array_equal(order_rate, order_log)


def test_repeat_suppression_keeps_the_first_record_of_an_excursion() -> None:
    s = np.array([0.1, 0.5, 0.52, 0.6, 0.3, 0.2, 0.1, 0.1, 0.55, 0.7])
    out = suppress_repeats(s, window=4, ratio=0.9)
    # 0.5 is a new high; 0.52 climbs < 1/0.9 over it; 0.6 does (0.54 > 0.52); 0.55 comes
    # after four records below 0.9 * 0.55; 0.7 climbs enough over 0.55
    np.testing.assert_allclose(out, [0.1, 0.5, 0, 0.6, 0, 0, 0, 0, 0.55, 0.7])
    for h in (0.15, 0.4, 0.58):  # at any threshold the first crossing is kept
        first = int(np.argmax(s >= h))
        assert out[first] == s[first]
    np.testing.assert_array_equal(suppress_repeats(s, window=0), s)


def test_one_noisy_record_is_not_an_anomaly_but_a_change_is_found_quickly() -> None:
    cfg = LikelihoodConfig()
    rng = np.random.default_rng(3)
    zeta = rng.standard_normal(3000)
    spike = zeta.copy()
    spike[2000] = 6.0  # one record with a tail probability of 1e-9
    s_spike, lam_spike = anomaly_likelihood(spike, cfg)
    assert s_spike[2000:2010].max() < 1 - 5e-4  # q > 5e-4: not an alarm
    assert 10 ** -lam_spike[2000:2010].max() > 5e-4  # nor is its unsuppressed score
    # the cap bounds one record's weight: a record at p = 1e-40 or 1e-300 counts as one at
    # the cap (p = 1.8e-33), which an unclipped normal score (37 at 1e-300) would outweigh
    assert normal_scores(np.log([1e-40, 1e-300]), cfg.cap).tolist() == [cfg.cap, cfg.cap]
    at_cap, beyond = zeta.copy(), zeta.copy()
    at_cap[2000], beyond[2000] = cfg.cap, float(normal_scores([-math.inf], 40.0)[0])
    lam_cap = anomaly_likelihood(at_cap, cfg)[1]
    lam_beyond = anomaly_likelihood(beyond, cfg)[1]
    assert lam_beyond[2000:2010].max() > lam_cap[2000:2010].max() + 20
    shift = zeta.copy()
    shift[2000:] += 4.0  # a real change: every record now 4 sd out
    s_shift, _ = anomaly_likelihood(shift, cfg)
    first = int(np.argmax(s_shift[2000:] >= 1 - 1e-10))  # q = 1e-10
    assert s_shift[2000 + first] >= 1 - 1e-10 and first < min(cfg.short)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_history"):
        LikelihoodConfig(long=10, min_history=20)
    with pytest.raises(ValueError, match="short"):
        LikelihoodConfig(short=(0,))


def test_the_student_t_tail_is_heavier_and_nears_the_gaussian_one() -> None:
    rng = np.random.default_rng(5)
    zeta = rng.standard_normal(4000)
    zeta[3000:3010] += 3.0
    # the tails' shapes compared without the recurrence floor, which caps both alike
    _, lam_g = anomaly_likelihood(zeta, LikelihoodConfig(recurrence=0))
    _, lam_t = anomaly_likelihood(zeta, LikelihoodConfig(tail="student_t", recurrence=0))
    big = lam_g > 1.0
    assert big.any() and np.all(lam_t[big] < lam_g[big])  # a heavier tail: less surprise
    # K = 8 windows over W = 1000 records: n_eff = 125, nearly Gaussian at moderate z
    short = LikelihoodConfig(short=(8,), tail="student_t", recurrence=0)
    _, lam_t8 = anomaly_likelihood(zeta, short)
    _, lam_g8 = anomaly_likelihood(zeta, LikelihoodConfig(short=(8,), recurrence=0))
    mid = (lam_g8 > 1.0) & (lam_g8 < 3.0)
    np.testing.assert_allclose(lam_t8[mid], lam_g8[mid], rtol=0.15)


def test_the_calibrated_score_holds_its_rate_on_heavy_tailed_residuals() -> None:
    """Student-t(3) normal scores: the Gaussian-tailed score alarms far too often deep in the
    tail; the calibrated one (stage 5) keeps alarm events near the nominal rate."""
    rng = np.random.default_rng(6)
    zeta = rng.standard_t(3, size=60_000)
    plain, _ = anomaly_likelihood(zeta, LikelihoodConfig())
    cal, _ = anomaly_likelihood(zeta, LikelihoodConfig(calibration=TailConfig()))
    assert np.all((cal == 0) == (plain == 0))  # the same records kept
    live = slice(5000, None)
    for q in (1e-2, 1e-3):
        rate = float(np.mean(cal[live] >= 1 - q)) / q
        assert 0.5 <= rate <= 1.5, (q, rate)
    # measured: events 0.32 / 1.0 / 4.7 x nominal at 1e-2 / 1e-3 / 1e-4 uncalibrated,
    # 0.97 / 0.85 / 1.09 calibrated; the raw (unsuppressed) Gaussian score 1.7 / 6.7 / 33
    assert float(np.mean(plain[live] >= 1 - 1e-4)) > 3 * 1e-4
    assert float(np.mean(cal[live] >= 1 - 1e-4)) < 2 * 1e-4


def test_a_list_of_ensembles_scores_under_their_pooled_mixture() -> None:
    from fogline.models.predictive import Ensemble

    config = ModelConfig.model_validate({"in_features": 3, "hidden": (8,)})
    a = sample_ensemble(init_state(config, seed=0), 16, 0)
    b = sample_ensemble(init_state(config, seed=1), 16, 1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen), 3 * torch.randn(40, generator=gen)
    one = log_tail_probability(a, x, y, noise_floor=0.01)
    np.testing.assert_array_equal(log_tail_probability([a], x, y, noise_floor=0.01), one)
    pooled = Ensemble(
        config,
        tuple(
            (torch.cat([wa, wb]), torch.cat([ba, bb]))
            for (wa, ba), (wb, bb) in zip(a.layers, b.layers, strict=True)
        ),
    )
    mixed = log_tail_probability([a, b], x, y, noise_floor=0.01)
    np.testing.assert_allclose(mixed, log_tail_probability(pooled, x, y, 0.01), atol=1e-12)
    two = log_tail_probability(b, x, y, noise_floor=0.01)
    assert not np.allclose(mixed, one) and not np.allclose(mixed, two)
    # the mixture's tail mass is at least half of each member's on the same side
    assert np.all(mixed >= np.minimum(one, two) - math.log(2) - 1e-9)
    with pytest.raises(ValueError, match="no ensemble"):
        log_tail_probability([], x, y)


def test_the_relative_noise_floor_follows_the_one_step_scale() -> None:
    from fogline.drift.anomaly import effective_noise_floor, one_step_scale

    rng = np.random.default_rng(0)
    noise = 0.5 * rng.standard_normal(20_000)
    assert one_step_scale(noise) == pytest.approx(0.5, rel=0.03)  # i.i.d.: sigma
    assert one_step_scale(np.full(50, 3.0)) == 0.0 and one_step_scale([1.0]) == 0.0
    cfg = LikelihoodConfig(noise_floor=0.01, noise_floor_relative=0.2)
    assert effective_noise_floor(cfg, noise) == pytest.approx(0.1, rel=0.03)
    assert effective_noise_floor(cfg, np.zeros(10)) == 0.01  # never below the fixed floor
    default = LikelihoodConfig()  # c = 0.2 (docs/drift.md: seeds 0-9 on NAB)
    assert effective_noise_floor(default, noise) == pytest.approx(0.1, rel=0.03)
    fixed = LikelihoodConfig(noise_floor_relative=0.0)
    assert effective_noise_floor(fixed, noise) == 0.01  # c = 0: the fixed floor alone


def test_the_members_mean_normal_score() -> None:
    from scipy.stats import norm

    from fogline.drift.anomaly import mean_normal_score_log_tail

    lp_a = np.log(np.array([0.5, 0.01, 1e-12]))
    lp_b = np.log(np.array([0.5, 0.2, 0.3]))
    out = mean_normal_score_log_tail([lp_a, lp_b], cap=6.0)
    zeta = (normal_scores(lp_a, 6.0) + normal_scores(lp_b, 6.0)) / 2
    np.testing.assert_allclose(out, norm.logcdf(-zeta), rtol=1e-12)
    np.testing.assert_allclose(mean_normal_score_log_tail([lp_a], 6.0)[:2], lp_a[:2], rtol=1e-9)
    assert out[2] == pytest.approx(norm.logcdf(-(6.0 + normal_scores(lp_b, 6.0)[2]) / 2))
    with pytest.raises(ValueError, match="no member"):
        mean_normal_score_log_tail([])


def test_the_recurrence_floor_caps_a_pattern_the_history_holds_but_not_a_new_event() -> None:
    """A spike every 250 records on a quiet series is a q ~ 1e-4 window mean to the
    Gaussian tail; with the floor q_t >= m c_t / n_t, c_t the past window means as high
    (checked by brute force on one scale).  A first-of-its-kind event (two spikes in a
    row, c = 0) keeps the Gaussian tail."""
    rng = np.random.default_rng(5)
    zeta = 0.05 * rng.standard_normal(3000)
    zeta[100::250] = 6.0  # the regular pattern
    zeta[2650:2652] = 6.0  # higher than anything before it
    off = LikelihoodConfig(short=(8,), recurrence=0.0, suppress=0)
    on = LikelihoodConfig(short=(8,), suppress=0)
    _, lam_off = anomaly_likelihood(zeta, off)
    _, lam_on = anomaly_likelihood(zeta, on)
    m = window_means(zeta, 8)
    for t in range(on.min_history, len(zeta)):
        past = m[max(0, t - on.long) : t]
        c = int(np.count_nonzero(past >= m[t]))
        cap = -math.log10(on.recurrence * c / len(past)) if c else math.inf
        assert lam_on[t] == pytest.approx(min(lam_off[t], cap), abs=1e-12), t
    spikes = np.arange(1100, 2600, 250)
    assert lam_off[spikes].min() > 4.0 and np.all(lam_on[spikes] < lam_off[spikes] - 0.3)
    assert lam_on[2651] == lam_off[2651] > 15.0  # the new event: c = 0, nothing capped
    # the streaming scorer applies the same floor, on both scales of the default
    both = LikelihoodConfig(suppress=0)
    _, lam_both = anomaly_likelihood(zeta, both)
    _, lam_stream = AnomalyLikelihood(both).update(zeta)
    np.testing.assert_allclose(lam_stream, lam_both, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="recurrence"):
        LikelihoodConfig(recurrence=1.5)


def test_the_rate_score_keeps_extreme_records_apart_and_below_one() -> None:
    cfg = LikelihoodConfig()
    l0 = RATE_TAIL_DECADES
    lam = np.array([0.0, 3.0, 9.5, l0, 15.0, 16.5, 40.0, 300.0, 1000.0, 1001.0, math.inf])
    out = written_score(lam, cfg)
    # down to q_0 = 1e-10 the score is 1 - q: a threshold 1 - q is the rate q
    assert out[0] == 0.0 and out[1] == pytest.approx(1 - 1e-3, abs=1e-15)
    assert 1.0 - out[2] == pytest.approx(10**-9.5, rel=1e-6)
    assert 1.0 - out[3] == pytest.approx(1e-10, rel=1e-6)
    # beyond it 1 - q_0 D / (x + D): every record keeps its order (1 - q would round to 1
    # from q = 2^-53 on, lambda = 15.95), continuous at L_0, and below 1 (inf: the cap)
    assert np.all(np.diff(out) > 0)
    assert out[-1] == np.nextafter(1.0, 0.0) < 1.0
    d = cfg.decades
    for lv, s in zip(lam[4:-1], out[4:-1], strict=True):
        assert 1.0 - s == pytest.approx(1e-10 * d / (lv - l0 + d), rel=1e-5)
    below, above = written_score(np.array([l0 - 1e-3, l0 + 1e-3]), cfg)
    assert 0.0 < above - below < 1e-12  # 1 - q moves by 2.3e-13 over those 1e-3 decades
    # the streaming scorer writes the same scale
    zeta = np.r_[np.random.default_rng(3).standard_normal(400), np.full(64, 12.0)]
    loose = LikelihoodConfig(suppress=0)
    s_vec, lam_vec = anomaly_likelihood(zeta, loose)
    s_stream, _ = AnomalyLikelihood(loose).update(zeta)
    assert lam_vec.max() > l0 + 5
    np.testing.assert_allclose(s_stream, s_vec, rtol=0, atol=1e-15)
    # records that extreme keep their order on the log scale too
    log = written_score(np.array([16.5, 40.0]), cfg.model_copy(update={"scale": "log"}))
    assert log[0] < log[1] < 1.0
