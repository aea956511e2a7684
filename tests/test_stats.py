"""The statistical core against closed-form oracles, brute force, and simulation of the guarantee."""

from math import comb

import numpy as np
import pytest
from scipy import stats

from ctd.stats import calibrate as cal
from ctd.stats.pvalues import (
    binomial_pvalue,
    binomial_ucb,
    binomial_upper_pvalue,
    clopper_pearson,
    hoeffding_bentkus_pvalue,
    max_certifiable_count,
    min_certifiable_n,
)
from ctd.stats.testing import bonferroni, fixed_sequence_test, holm, multiple_test


def binom_cdfs_exact(n, a):
    """[P(Binom(n, a) <= k) for k = 0..n] from the probability mass function, term by term."""
    out, acc = [], 0.0
    for j in range(n + 1):
        acc += comb(n, j) * a**j * (1 - a) ** (n - j)
        out.append(acc)
    return out


def binom_cdf_exact(k, n, a):
    return binom_cdfs_exact(n, a)[k] if k >= 0 else 0.0


# ------------------------------------------------------------------ p-values
def test_binomial_pvalue_matches_exact_sum():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(0, n + 1))
        a = float(rng.uniform(0.01, 0.99))
        assert binomial_pvalue(k, n, a) == pytest.approx(binom_cdf_exact(k, n, a), rel=1e-9, abs=1e-12)


def test_binomial_pvalue_rejects_non_integer_counts_and_bad_levels():
    with pytest.raises(ValueError, match="integer"):
        binomial_pvalue(3.5, 10, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        binomial_pvalue(3, 10, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        binomial_pvalue(11, 10, 0.1)
    # float counts that are whole numbers are accepted
    assert binomial_pvalue(np.array([3.0]), 10, 0.1)[0] == pytest.approx(binom_cdf_exact(3, 10, 0.1))


def test_upper_pvalue_is_the_other_tail():
    for k in range(0, 11):
        assert binomial_upper_pvalue(k, 10, 0.3) == pytest.approx(1 - binom_cdf_exact(k - 1, 10, 0.3))


def test_max_certifiable_count_oracle_including_tiny_n():
    for n in [1, 2, 5, 10, 44, 45, 100, 800]:
        for a in [0.01, 0.05, 0.2, 0.5, 0.9]:
            for dlt in [0.01, 0.1, 0.3]:
                cdfs = binom_cdfs_exact(n, a)
                ks = [k for k in range(n + 1) if cdfs[k] <= dlt]
                assert max_certifiable_count(n, a, dlt) == (max(ks) if ks else -1)
    # n too small to certify anything at alpha=0.05, delta=0.1: (0.95)^44 > 0.1 >= (0.95)^45
    assert min_certifiable_n(0.05, 0.1) == 45
    assert max_certifiable_count(44, 0.05, 0.1) == -1 and max_certifiable_count(45, 0.05, 0.1) == 0


def test_hoeffding_bentkus_with_a_float_sum_just_above_an_integer_is_valid():
    # S = 12.00000005 > 12: the Bentkus term must use ceil(S) = 13 (p ≈ 0.105); rounding it down to 12
    # gave p ≈ 0.069, too small (issue #13, item 3)
    s, n, a = 12.00000005, 100, 0.2
    r = s / n
    h1 = r * np.log(r / a) + (1 - r) * np.log((1 - r) / (1 - a))
    expected = min(np.exp(-n * h1), np.e * stats.binom.cdf(13, n, a))
    assert hoeffding_bentkus_pvalue(s, n, a) == pytest.approx(expected, rel=1e-12)
    assert hoeffding_bentkus_pvalue(s, n, a) > 0.1
    assert hoeffding_bentkus_pvalue(12.0, n, a) == pytest.approx(hoeffding_bentkus_pvalue(12, n, a), rel=1e-12)  # exact integers unchanged


def test_hoeffding_bentkus_closed_form_and_validity():
    # closed form at one point
    n, a, s = 100, 0.2, 10
    r = s / n
    h1 = r * np.log(r / a) + (1 - r) * np.log((1 - r) / (1 - a))
    expected = min(np.exp(-n * h1), np.e * stats.binom.cdf(s, n, a))
    assert hoeffding_bentkus_pvalue(s, n, a) == pytest.approx(expected)
    assert hoeffding_bentkus_pvalue(50, 100, 0.2) == 1.0  # risk above the level: no evidence
    # super-uniform at the boundary R = alpha, for a 0/1 loss and a continuous [0,1] loss
    rng = np.random.default_rng(1)
    sums01 = rng.binomial(200, 0.2, size=20000)
    cont = rng.beta(2, 8, size=(20000, 200)).sum(axis=1)  # mean 0.2
    for sums in (sums01, cont):
        p = hoeffding_bentkus_pvalue(sums, 200, 0.2)
        for t in (0.05, 0.1, 0.2):
            assert np.mean(p <= t) <= t + 0.01


def test_clopper_pearson_and_ucb():
    lo, hi = clopper_pearson(np.array([0, 5, 10]), 10, 0.95)
    assert lo[0] == 0 and hi[2] == 1
    ref = stats.binomtest(5, 10).proportion_ci(0.95, method="exact")
    assert lo[1] == pytest.approx(ref.low) and hi[1] == pytest.approx(ref.high)
    u = binomial_ucb(3, 50, 0.1)
    assert stats.binom.cdf(3, 50, u) == pytest.approx(0.1, abs=1e-6)


# ------------------------------------------------------------------ multiple testing
def test_fixed_sequence_stops_at_first_failure():
    p = np.array([0.01, 0.02, 0.5, 0.01])
    assert fixed_sequence_test(p, 0.05).tolist() == [True, True, False, False]
    assert fixed_sequence_test(np.array([[0.2, 0.01], [0.01, 0.01]]), 0.05).tolist() == [[False, False], [True, True]]


def test_bonferroni_and_holm_against_definitions():
    rng = np.random.default_rng(2)
    for _ in range(200):
        m = int(rng.integers(1, 12))
        p = rng.uniform(0, 0.2, m)
        d = 0.1
        assert np.array_equal(bonferroni(p, d), p <= d / m)
        # Holm by its definition
        order = np.argsort(p, kind="stable")
        rej = np.zeros(m, bool)
        for i, j in enumerate(order):
            if p[j] <= d / (m - i):
                rej[j] = True
            else:
                break
        assert np.array_equal(holm(p, d), rej)
        assert np.all(bonferroni(p, d) <= holm(p, d))  # Holm is uniformly more powerful


def test_multiple_tests_control_fwer_under_global_null():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=(20000, 10))
    for method in ("bonferroni", "holm", "fixed_sequence"):
        fwer = multiple_test(p, 0.1, method).any(axis=-1).mean()
        assert fwer <= 0.1 + 0.01, method
    with pytest.raises(ValueError, match="unknown"):
        multiple_test(p, 0.1, "bh")


# ------------------------------------------------------------------ counts and curves
def test_exceedance_counts_strict_and_batched():
    grid = np.array([0.0, 0.5, 1.0])
    s = np.array([[0.5, 0.5, 1.0, -1.0], [2.0, 0.0, 0.7, 0.2]])
    assert cal.exceedance_counts(s, grid).tolist() == [[3, 1, 0], [3, 2, 1]]  # score == λ not delegated


def test_loss_sums_and_auroc_curve_match_brute_force():
    from ctd.metrics import auroc
    from ctd.policies import cascade_scores

    rng = np.random.default_rng(4)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        d = rng.integers(-3, 4, n) / 3.0  # ties on purpose, some equal to grid values
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            y[0] = 1 - y[0]
        p, e = rng.uniform(size=n), rng.uniform(size=n)
        grid = np.linspace(-1.5, 1.5, 10)
        for mode in ("switch", "mean"):
            lk, ld = cal.cascade_losses(p, e, y, mode=mode)
            sums = cal.delegation_loss_sums(d, lk, ld, grid)
            aucs = cal.cascade_auroc_curve(d, p, e, y, grid, mode=mode)
            for gi, lam in enumerate(grid):
                m = d > lam
                f = cascade_scores(p, e, m, mode)
                assert sums[gi] == np.sum((f >= 0.5).astype(int) != y)
                assert aucs[gi] == pytest.approx(auroc(y, f))


def test_pareto_front_matches_brute_force_domination():
    rng = np.random.default_rng(5)
    for _ in range(200):
        G = int(rng.integers(1, 15))
        counts = np.sort(rng.integers(0, 6, G))[::-1]  # non-increasing along an ascending grid
        perf = rng.integers(0, 4, G).astype(float)
        # equal counts mean the same delegated set, hence the same performance
        for c in np.unique(counts):
            perf[counts == c] = perf[counts == c][0]
        front = cal.pareto_front(counts, perf)
        for i in range(G):
            dominated = any(
                (counts[j] <= counts[i] and perf[j] <= perf[i]) and (counts[j] < counts[i] or perf[j] < perf[i])
                for j in range(G)
            )
            duplicate_of_larger = any(counts[j] == counts[i] and perf[j] == perf[i] and j > i for j in range(G))
            assert front[i] == (not dominated and not duplicate_of_larger)


# ------------------------------------------------------------------ LTT: closed-form oracle
def oracle_lambda(d, grid, n, a, dlt):
    cdfs = binom_cdfs_exact(n, a)
    ks = [k for k in range(n + 1) if cdfs[k] <= dlt]
    if not ks:
        return np.inf
    k_star = max(ks)
    ok = [lam for lam in grid if np.sum(d > lam) <= k_star]
    return min(ok) if ok else np.inf


def test_budget_ltt_matches_closed_form_oracle_on_many_random_cases():
    """k* = max{k : BinomCDF(k; n, α) <= δ}; λ̂ = smallest grid value with #{d > λ} <= k*.
    Conventions: delegate iff d > λ (strict); ties in d share one decision; none certified -> +inf."""
    rng = np.random.default_rng(6)
    for case in range(400):
        n = int(rng.choice([1, 3, 10, 30, 60]))
        a = float(rng.choice([0.05, 0.1, 0.3, 0.5]))
        dlt = float(rng.choice([0.05, 0.1, 0.2]))
        grid = np.unique(np.round(rng.uniform(-2, 2, int(rng.integers(1, 25))), 1))
        if case % 2:  # discrete scores that hit grid values exactly: boundary convention
            d = rng.choice(np.concatenate([grid, [-3.0, 3.0]]), n)
        else:
            d = rng.normal(size=n)
        res = cal.calibrate(d, grid, a, dlt)
        assert res.lambda_hat == oracle_lambda(d, grid, n, a, dlt), (n, a, dlt)
        if not res.delegates:
            assert "never delegates" in res.message
        # Holm and Bonferroni are valid too, and never certify more than FST does here
        for m in ("holm", "bonferroni"):
            r2 = cal.calibrate(d, grid, a, dlt, method=m)
            assert r2.lambda_hat >= res.lambda_hat


def test_tiny_n_certifies_nothing_and_says_why():
    r = cal.calibrate(np.zeros(10), cal.threshold_grid(size=11), 0.05, 0.1)
    assert not r.delegates and r.lambda_hat == np.inf
    assert "45" in r.message and "never delegates" in r.message
    assert r.to_dict()["lambda_hat"] is None


def test_grid_from_reference_is_fixed_and_bad_grids_rejected():
    g = cal.threshold_grid(reference=np.random.default_rng(0).normal(size=500), size=101)
    assert np.all(np.diff(g) > 0) and g[0] <= -1 and g[-1] >= 1
    with pytest.raises(ValueError, match="strictly increasing"):
        cal.calibrate(np.zeros(5), np.array([0.0, 0.0]), 0.1, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        cal.calibrate(np.zeros(5), np.array([0.0]), 1.5, 0.1)
    with pytest.raises(ValueError, match="NaN"):
        cal.calibrate(np.array([np.nan, 1.0]), np.array([0.0]), 0.1, 0.1)


def test_result_round_trips_through_json():
    import json

    rng = np.random.default_rng(7)
    n = 300
    y = rng.integers(0, 2, n)
    r = cal.calibrate(rng.normal(size=n), cal.threshold_grid(size=51, low=-3, high=3), 0.2, 0.1,
                      labels=y, probe=rng.uniform(size=n), expert=rng.uniform(size=n), pareto=True)
    back = cal.CalibrationResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.lambda_hat == r.lambda_hat
    assert np.array_equal(back.certified, r.certified)
    assert np.allclose(np.nan_to_num(back.pvalues, posinf=9), np.nan_to_num(r.pvalues, posinf=9))


# ------------------------------------------------------------------ the guarantee, by simulation
def synthetic_population(rng, n):
    """Scores d ~ N(0, 1) (true budget risk of λ is 1 - Φ(λ)); labels, probe and expert such that
    the expert helps on high-d rows and hurts on low-d rows (a finite delegation capacity)."""
    d = rng.normal(size=n)
    y = rng.integers(0, 2, n)
    probe = np.clip(0.5 + (2 * y - 1) * (0.1 - 0.1 * d) + 0.2 * rng.normal(size=n), 0, 1)
    expert = np.clip(0.5 + (2 * y - 1) * 0.3 * np.tanh(d) + 0.1 * rng.normal(size=n), 0, 1)
    return d, y, probe, expert


def violation_interval(violations, draws):
    lo, hi = clopper_pearson(np.array([violations]), draws, 0.999)
    return float(lo[0]), float(hi[0])


@pytest.mark.parametrize("pareto", [False, True])
def test_guarantee_holds_over_1000_random_calibration_draws(pareto):
    rng = np.random.default_rng(8 + pareto)
    alpha, delta, n, draws = 0.15, 0.1, 400, 1000
    grid = cal.threshold_grid(size=401, low=-4, high=4)  # fixed before any draw
    violations = 0
    for r in range(draws):
        d, y, p, e = synthetic_population(rng, n)
        res = cal.calibrate(d, grid, alpha, delta, labels=y, probe=p, expert=e, pareto=pareto, seed=r)
        true_rate = stats.norm.sf(res.lambda_hat)
        violations += true_rate > alpha
    lo, hi = violation_interval(violations, draws)
    # the violation frequency is not significantly above δ
    assert lo <= delta, (violations, lo, hi)


def test_the_guarantee_check_can_fail():
    """The same criterion flags a naive rule (pick the threshold whose empirical rate is <= α
    without any correction), which violates about half of the time."""
    rng = np.random.default_rng(10)
    alpha, delta, n, draws = 0.15, 0.1, 400, 1000
    grid = cal.threshold_grid(size=401, low=-4, high=4)
    violations = 0
    for _ in range(draws):
        d = rng.normal(size=n)
        k = cal.exceedance_counts(d, grid)
        lam = grid[np.argmax(k / n <= alpha)]
        violations += stats.norm.sf(lam) > alpha
    lo, _ = violation_interval(violations, draws)
    assert lo > delta


def test_joint_control_certifies_performance_too():
    rng = np.random.default_rng(11)
    d, y, p, e = synthetic_population(rng, 2000)
    grid = cal.threshold_grid(size=201, low=-4, high=4)
    loose = cal.calibrate(d, grid, 0.3, 0.1, labels=y, probe=p, expert=e, pareto=True, performance_target=0.49)
    assert loose.delegates and loose.performance_pvalues is not None
    impossible = cal.calibrate(d, grid, 0.3, 0.1, labels=y, probe=p, expert=e, pareto=True, performance_target=0.01)
    assert not impossible.delegates and "jointly" in impossible.message


# ------------------------------------------------------------------ drift across nights
def test_drift_eprocess_is_anytime_valid_and_detects_a_shift():
    from ctd.stats.drift import detection_delay, drift_eprocess, log_e_values

    # closed form for one alternative
    le = log_e_values([30], [200], 0.1, alternatives=(2.0,))
    assert le[0] == pytest.approx(30 * np.log(0.2 / 0.1) + 170 * np.log(0.8 / 0.9))
    # at the boundary rate α the e-detector's average run length is >= 1/level: over 20 nights at
    # level 0.05 the share of histories with an alarm stays near or below 20 x 0.05 = 1 (Markov), far below
    # in practice; the plain e-process alarms with probability <= level over the whole history (Ville)
    null = detection_delay(0.1, 0.1, 2000, nights_before=20, max_nights=1, level=0.05, sims=4000)
    assert null["false_alarm_before_shift"] <= 0.2
    rng = np.random.default_rng(0)
    d = rng.binomial(2000, 0.1, size=(4000, 60))
    proc = np.cumsum(log_e_values(d, np.full(d.shape, 2000), 0.1), axis=1)
    lo, _ = clopper_pearson(np.array([int((proc >= np.log(20)).any(axis=1).sum())]), 4000, 0.999)
    assert lo[0] <= 0.05
    shift = detection_delay(0.1, 0.15, 2000, level=0.01, sims=500)
    assert shift["share_detected"] > 0.99 and shift["median_delay_nights"] <= 3
    r = drift_eprocess([180, 200, 210], [2000, 2000, 2000], 0.1)
    assert r["alarm"] is False and len(r["log_e_detector"]) == 3
    assert drift_eprocess([180, 200, 300], [2000, 2000, 2000], 0.1)["alarm"] is True
