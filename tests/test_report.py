"""The morning report: the headline in words, the nights before (history and `ctd report history`),
redacted excerpts, and the calibration report that explains itself. No Ray here: published runs are
made with the real run layout on the local filesystem."""

import json
import re

import numpy as np
import pytest

from ctd import storage
from ctd.audit.cost import Bill, PoolUse
from ctd.audit.report import AuditReport
from ctd.calibration.calibrator import CalibrationScores, Calibrator
from ctd.calibration.report import explain
from ctd.cli import main
from ctd.config import CalibrationConfig
from ctd.reporting.plots import plot_history
from ctd.reporting.redact import excerpt, redact
from ctd.runs.history import History, history, history_text
from ctd.runs.layout import RunLayout
from ctd.stats.calibrate import threshold_grid
from ctd.stats.pvalues import binomial_pvalue, min_certifiable_n, rows_to_certify, simulation_draws


def report_body(
    run_id,
    day,
    created,
    *,
    calibration="cal-A",
    scored=1000,
    passed=100,
    unsafe=120,
    by_judge=50,
    quarantined=10,
    e_value=1.0,
    alarm=False,
    **over,
) -> dict:
    body = dict(
        run_id=run_id,
        audited_date=day,
        attempt="a1",
        created_at=created,
        config_hash="c",
        corpus="s3://b/corpus",
        model_id="m",
        model_fingerprint="f",
        layer=2,
        safety_probe_hash="s",
        dv_probe_hash="d",
        calibration_uri="s3://b/cal",
        calibration_hash=calibration,
        alpha=0.1,
        delta=0.1,
        lambda_star=0.3,
        calibration_n=800,
        calibration_message="ok",
        rows_read=scored + quarantined,
        rows_scored=scored,
        rows_quarantined=quarantined,
        rows_truncated=0,
        invariant_ok=True,
        quarantine_reasons={"malformed JSON": quarantined - 2, "empty text": 2} if quarantined else {},
        delegated_by_threshold=passed,
        delegated=passed,
        realised_rate=passed / scored,
        rate_pvalue=0.5,
        drift_alpha=0.01,
        drift_alarm=alarm,
        drift_message="m",
        drift_e_value=e_value,
        expert_kind="vllm",
        expert_calls=passed,
        expert_failures=0,
        expert_status={"ok": passed},
        expert_pool={
            "rows": passed,
            "replicas": 2,
            "needed": 1,
            "expected_seconds": 60.0,
            "target_seconds": 3600.0,
            "target_met": True,
        },
        decisions_unsafe=unsafe,
        unsafe_by_judge=by_judge,
        judge_overruled=7,
        expert_tokens=12345,
        stages=[{"stage": "expert", "seconds": 90.0, "rows": passed, "rows_per_second": passed / 90}],
        cost=Bill(
            "USD",
            PoolUse("activations", 30.0, 1, 1.0),
            PoolUse("judge", 90.0, 2, 2.0, 4.0),
            judged_rows=passed,
            rows=scored,
            latency={"n": passed, "p50": 0.25, "p95": 0.8},
        ).to_dict(),
    )
    body.update(over)
    return AuditReport.model_validate(body).model_dump()


def publish(output, body):
    layout = RunLayout.new_attempt(output, body["run_id"])
    uri = storage.join(layout.attempt_root, "report.json")
    storage.write_json(uri, body)
    layout.publish({"audited_date": body["audited_date"]}, [uri])


@pytest.fixture
def nights(tmp_path):
    """Five published runs: three nights with calibration A (the second night run twice: the later
    run replaces it), one night with another calibration, and one run of today with calibration A."""
    out = str(tmp_path / "out")
    publish(out, report_body("audit-2026-11-20", "2026-11-20", "2026-11-21T02:00:00+00:00", passed=90))
    publish(out, report_body("audit-2026-11-21", "2026-11-21", "2026-11-22T02:00:00+00:00", passed=95))
    publish(out, report_body("rerun-2026-11-21", "2026-11-21", "2026-11-22T09:00:00+00:00", passed=97))
    publish(out, report_body("other-cal", "2026-11-22", "2026-11-23T02:00:00+00:00", calibration="cal-B"))
    publish(
        out, report_body("audit-2026-11-23", "2026-11-23", "2026-11-24T02:00:00+00:00", passed=140, e_value=150.0, alarm=True)
    )
    return out


def test_history_is_one_point_per_audited_day_with_one_calibration(nights):
    h = history(nights).nights  # default: the latest night's calibration (A)
    assert [x["audited_date"] for x in h] == ["2026-11-20", "2026-11-21", "2026-11-23"]
    assert [x["run_id"] for x in h] == ["audit-2026-11-20", "rerun-2026-11-21", "audit-2026-11-23"]  # the later run of a day wins
    assert [x["audited_date"] for x in history(nights, calibration_hash="cal-B").nights] == ["2026-11-22"]
    assert [x["run_id"] for x in history(nights, last=2).nights] == ["rerun-2026-11-21", "audit-2026-11-23"]
    # the audit's own use: this run id and this day left out (a rerun replaces them)
    assert [
        x["audited_date"]
        for x in history(nights, calibration_hash="cal-A", exclude_run="audit-2026-11-23", before_day="2026-11-21").nights
    ] == ["2026-11-20"]
    # a backfill of 2026-11-22 sees only the nights before it, never later ones
    assert [x["audited_date"] for x in history(nights, calibration_hash="cal-A", before_day="2026-11-22").nights] == [
        "2026-11-20",
        "2026-11-21",
    ]
    assert [x["audited_date"] for x in history(nights, calibration_hash="cal-B").nights] == ["2026-11-22"]  # a prefix is enough:
    assert len(history(nights, calibration_hash="cal-A"[:5]).nights) == 3
    with pytest.raises(ValueError, match="matches 2 calibrations"):
        history(nights, calibration_hash="cal")


def test_report_history_in_the_terminal(nights, capsys):
    assert main(["report", "history", nights, "--last", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 audited night(s) with calibration cal-A") and "α = 10.00%" in out[0]
    assert out[1].split()[:2] == ["night", "run"]
    rows = out[2:]
    assert len(rows) == 2 and rows[0].startswith("2026-11-21") and "9.70%" in rows[0] and "97" in rows[0].split()
    assert rows[1].startswith("2026-11-23") and "14.00%" in rows[1]
    assert rows[1].endswith("ALARM: the delegation rate has drifted up (e-detector 150, alarm at 100)")
    assert history_text(History()) == "no published audit runs"


def test_history_plot_draws_every_night(nights):
    png = plot_history(history(nights).nights)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    one = plot_history(history(nights, last=1).nights)  # a first night alone still draws
    assert one[:4] == b"\x89PNG"


def test_headline_says_the_numbers_in_words():
    r = AuditReport.model_validate(report_body("n1", "2026-11-24", "2026-11-25T02:00:00+00:00"))
    text = [t for _, t in r.headline()]
    assert text[0] == (
        "1,010 conversations of 2026-11-24 were read: 1,000 audited; 10 could not be audited and were quarantined "
        "(malformed JSON: 8, empty text: 2)."
    )
    assert text[1] == "120 flagged unsafe (12.0% of those audited): 50 by the judge, 70 by the probe alone."
    assert (
        text[2].startswith("100 went to the judge (10.0%) against a budget of α = 10%")
        and "verdict on 7 of the 100 rows it saw" in text[2]
    )
    assert (
        "100 judge calls" in text[3]
        and "12,345 tokens" in text[3]
        and "the judge 90 s × 2 replica(s), 2 GPU each = 0.10 GPU-hours, 0.40 USD at 4 USD per GPU-hour" in text[3]
        and "stage 1 30 s × 1 actor(s), 1 GPU each = 0.0083 GPU-hours;" in text[3]
        and "No price is configured for a pool with GPUs" in text[3]
        and "would cost about 4.00 USD" in text[3]
        and "median 0.25 s, 95th percentile 0.8 s" in text[3]
    )
    assert r.headline()[-1][0] == "ok" and text[-1].startswith("Nothing needs attention")
    # each attention item is its own alarm sentence
    r = AuditReport.model_validate(
        report_body(
            "n1",
            "2026-11-24",
            "2026-11-25T02:00:00+00:00",
            drift_alarm=True,
            judge_alarm=True,
            judge_message="30 of 100 judged rows failed",
            over_cap=12,
            budget_cap=100,
        )
    )
    alarms = [t for k, t in r.headline() if k == "alarm"]
    assert len(alarms) == 3 and alarms[0].startswith("Drift") and "30 of 100" in alarms[1] and "12 rows" in alarms[2]
    assert [k for k, _ in r.headline()[:3]] == ["alarm"] * 3  # a night that needs someone leads with why
    assert "hard cap of 100 calls" in r.headline()[5][1]
    html = r.html({}, None, None)
    assert html.index("The night in brief") < html.index("Rows") and "30 of 100 judged rows failed" in html
    assert "review.parquet" not in html  # no review list: no link to it


def test_excerpts_are_redacted_cut_and_can_be_off():
    secret = "hunter2-very-secret-value"
    text = (
        f"my password={secret} and key AKIAABCDEFGHIJKLMNOP, bearer abcdefghijklmnop; also the env value {secret[::-1]} "
        + "x" * 300
    )
    e = excerpt(text, 120, secrets=[secret[::-1]])
    assert len(e) == 120 and e.endswith("…")
    for leaked in (secret, "AKIAABCDEFGHIJKLMNOP", "abcdefghijklmnop", secret[::-1]):
        assert leaked not in e, leaked
    assert e.startswith("my password=*** and key *** and ***") or e.startswith("my password=*** and key ***")
    assert excerpt(text, 0) is None and excerpt(None, 50) is None and excerpt("  \n ", 50) is None
    # the same redaction as the logs: what redact() hides, the excerpt hides
    assert excerpt(text, 10_000, [secret[::-1]]) == " ".join(redact(text, [secret[::-1]]).split())
    # a key cut by the length limit is still hidden: redaction runs on the whole text first
    cut = excerpt("token: " + "Z" * 40 + " tail", 20)
    assert "ZZZZ" not in cut
    chat = json.dumps([{"role": "user", "content": "help   me"}, {"role": "assistant", "content": "sure"}])
    assert excerpt(chat, 100, is_chat=True) == "user: help me / assistant: sure"


def test_credential_shapes_are_redacted():
    shaped = [
        "sk-proj-abcdefghijklmnopqrstuvwxyz0123",
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "xoxb-1234567890-abcdef",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEabc\n-----END RSA PRIVATE KEY-----",
        "Basic dXNlcjpwYXNzd29yZA==",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijk",
        "AKIAABCDEFGHIJKLMNOP",
        "Bearer abcdefghijkl",
    ]
    for key in shaped:
        assert key not in redact(f"here: {key} ok") and redact(f"here: {key} ok").endswith(" ok"), key
    assert redact("my password is hunter2, really") == "my password is ***, really"
    digest = "a" * 64  # content hashes in reports stay readable
    assert redact(f"sha256 {digest}") == f"sha256 {digest}"


def test_the_activation_stage_redacts_its_excerpts_with_the_configured_secrets(monkeypatch):
    """Stage 1 writes excerpts for flagged and delegated rows only, with the values of the
    environment variables the config names (and credential shapes) replaced."""
    import pyarrow as pa

    from ctd.pipeline.stages import ActivationSpec, ActivationStage

    monkeypatch.setenv("CTD_TEST_REVIEW_KEY", "judge-key-0123456789")
    stage = object.__new__(ActivationStage)  # the excerpt step alone: no model needed
    stage.spec = ActivationSpec(model_dir="m", layers=(1,), score_layer=1, excerpts=True, secret_envs=("CTD_TEST_REVIEW_KEY",))
    batch = pa.table(
        {
            "input": [
                "my key is judge-key-0123456789 please help " + "x" * 100,
                "calm row",
                "delegated sk-abcdefghijklmnopqrstuvwxyz",
                json.dumps([{"role": "user", "content": "password=hunter2"}]),
            ],
            "is_chat": [False, False, False, True],
        }
    )
    cols = {"probe": pa.array([0.9, 0.1, 0.2, 0.7]), "delegated": pa.array([False, False, True, False])}
    ex = stage._excerpts(batch, cols, np.ones(4, dtype=bool), cols["delegated"]).to_pylist()
    assert ex[1] is None  # neither flagged nor delegated: no text kept
    assert ex[0] == "my key is *** please help " + "x" * 100 and "judge-key" not in ex[0]  # cut by the report, not here
    assert ex[2] == "delegated ***" and ex[3] == "user: password=***"


def test_secret_envs_name_what_the_config_names():
    from ctd.config import JobConfig

    cfg = JobConfig.model_validate(
        {
            "model": {"path": "m", "layer": 1},
            "probes": {"safety": "s", "dv": "d"},
            "calibration": {"alpha": 0.1, "delta": 0.1},
            "expert": {
                "kind": "http",
                "http": {"base_url": "http://x", "model": "j", "tokenizer": "t", "api_key_env": "MY_JUDGE_KEY"},
            },
        }
    )
    names = cfg.secret_envs()
    assert "MY_JUDGE_KEY" in names and "AWS_SECRET_ACCESS_KEY" in names


def test_rows_to_certify_is_where_the_binomial_test_starts_to_pass_for_good():
    """Against the exact binomial p-value at every n up to the Hoeffding bound (past it the test
    passes for certain): it fails at n - 1 and passes from n on. The p-value is a sawtooth in n:
    at α = δ = 0.05 and rate 0.011 it first passes at 59 but fails again at 91; the answer is 93."""
    assert rows_to_certify(0.011, 0.05, 0.05) == 93
    rng = np.random.default_rng(7)
    for alpha, delta, frac in zip(rng.uniform(0.02, 0.4, 60), rng.uniform(0.01, 0.3, 60), rng.uniform(0, 0.9, 60)):
        rate = frac * alpha
        n = rows_to_certify(rate, alpha, delta)
        bound = int(np.ceil(np.log(1 / delta) / (2 * (alpha - rate) ** 2)))
        ns = np.arange(1, max(bound, n) + 1)
        p = binomial_pvalue(np.floor(ns * rate + 1e-9).astype(int), ns, alpha)
        assert (p[n - 1 :] <= delta).all() and (n == 1 or p[n - 2] > delta), (alpha, delta, rate, n)
    for alpha, delta in [(0.1, 0.1), (0.05, 0.01), (0.3, 0.2)]:
        assert rows_to_certify(0.0, alpha, delta) == min_certifiable_n(alpha, delta)
        assert rows_to_certify(alpha, alpha, delta) is None and rows_to_certify(1.5 * alpha, alpha, delta) is None
    # past n_max the answer is unknown: None, not n_max (84 values of n in [1377, 1546] fail)
    assert rows_to_certify(0.09, 0.1, 0.1, n_max=1377) is None and rows_to_certify(0.09, 0.1, 0.1) == 1546
    # a tie is decided exactly: (1 - 0.3)^1 = 0.7 <= 0.7
    assert min_certifiable_n(0.3, 0.7) == 1 and min_certifiable_n(0.5, 0.25) == 2


def test_rows_to_certify_with_a_stated_chance():
    """With ``chance`` c, n rows certify a threshold of true rate r with probability >= c over the draw
    of the rows (exactly: P(Binom(n, r) <= k*(n)) from every n on, and not at n - 1), and a simulation
    of calibrations agrees. The expected-count answer (chance None) certifies only ~60% of the time:
    rate 0.1 at α 0.2, δ 0.1 gives 32 rows, which certify with probability 0.600."""
    from scipy import stats as st

    from ctd.stats.pvalues import certifiable_counts, max_certifiable_count

    assert rows_to_certify(0.1, 0.2, 0.1) == 32
    assert st.binom.cdf(max_certifiable_count(32, 0.2, 0.1), 32, 0.1) == pytest.approx(0.600, abs=5e-4)
    rng = np.random.default_rng(5)
    for alpha, delta, frac, c in zip(
        rng.uniform(0.05, 0.4, 25), rng.uniform(0.01, 0.3, 25), rng.uniform(0, 0.8, 25), rng.uniform(0.5, 0.95, 25)
    ):
        rate = frac * alpha
        n = rows_to_certify(rate, alpha, delta, chance=c)
        ns = np.arange(max(1, n - 1), n + 400)
        power = st.binom.cdf(certifiable_counts(ns, alpha, delta), ns, rate)
        assert (power[(ns >= n)] >= c).all() and (n == 1 or power[0] < c), (alpha, delta, rate, c, n)
    n = rows_to_certify(0.1, 0.2, 0.1, chance=0.9)
    draws = 20_000
    counts = rng.binomial(n, 0.1, draws)
    certified = np.mean(binomial_pvalue(counts, n, 0.2) <= 0.1)
    assert certified >= 0.9 - 3 * np.sqrt(0.09 / draws)  # within 3 standard errors of the stated chance, or above


def synthetic_scores(n, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    probe = np.clip(0.5 + 0.35 * (2 * y - 1) * rng.random(n) + 0.2 * rng.normal(size=n), 0, 1)
    expert = np.clip(0.9 * y + 0.05 + 0.05 * rng.normal(size=n), 0, 1)
    dv = np.abs(y - probe) - 0.3 + 0.2 * rng.normal(size=n)
    ids = np.array([f"r{i:05d}" for i in range(n)], dtype=object)
    return CalibrationScores(ids, y, probe, expert, dv)


def fit(scores, **settings):
    return Calibrator(CalibrationConfig(**settings)).fit(scores, threshold_grid())


def test_calibration_report_explains_tomorrows_bill_and_what_to_do():
    art = fit(synthetic_scores(3000), alpha=0.2, delta=0.1)
    words = explain(art.result)
    assert words[0].startswith(f"Tomorrow's threshold is λ* = {art.result.lambda_hat:.4g}")
    assert (
        "conversations are delegated to the judge (DV score above λ*) is at most α = 20%, with probability at least 1 − δ = 90%"
        in words[1]
    )
    assert "a night of 10,000 conversations delegates at most 2,066 with probability at least 85%" in words[2]
    assert (
        "Only a hard cap on the night's judge calls (the audit's budget cap) bounds" in words[2] and "control sample" in words[2]
    )
    assert "audit." not in " ".join(words)  # words for the reader, no config keys
    # the night-level count for the configured night size: the demo's 1,210 rows
    from scipy import stats

    q = int(stats.binom.ppf(0.95, 1210, 0.2))
    assert f"a night of 1,210 conversations delegates at most {q:,} with probability at least 85%" in explain(art.result, 1210)[2]
    assert f"{art.result.certified_count:,} of the 1,001 thresholds" in words[3]
    r = art.result
    # the probe alone, the judge alone and the cascade in one sentence, read off the calibration's own curve
    perf = 1 - np.asarray(r.performance_risk)
    i = int(np.searchsorted(r.grid, r.lambda_hat))
    (compare,) = [w for w in words if w.startswith("On the calibration rows, accuracy")]
    assert f"the cascade at λ* {perf[i]:.3f} with {r.budget_risk[i]:.1%} of rows sent" in compare
    assert f"{perf[-1]:.3f}" in compare and f"{perf[0]:.3f}" in compare
    worse = "worse" if perf[0] < perf[-1] else "better" if perf[0] > perf[-1] else "no better"
    assert f"The judge alone is {worse} than the probe alone" in compare
    # too few rows: nothing certified, and how many would do
    small = fit(synthetic_scores(12, seed=1), alpha=0.2, delta=0.1)
    assert not small.result.delegates
    words = explain(small.result)
    assert words[0].startswith("Nothing could be certified") and "there were 12" in words[1]
    need = int(re.search(r"about ([\d,]+) labelled", words[1]).group(1).replace(",", ""))
    rates = np.asarray(small.result.budget_risk)
    rate = min(rates[rates < 0.2], key=lambda r: abs(r - 0.1))  # the threshold nearest half the budget
    assert f"sends {rate:.1%} of the rows" in words[1]
    assert need == int(np.ceil(rows_to_certify(rate, 0.2, 0.1, chance=0.9) / 0.7)) > 12  # Pareto tests on 70% of the rows
    assert "with a 90% chance" in words[1]
    # Holm's first test runs at δ/m: the count is for that level
    holm = fit(synthetic_scores(12, seed=1), alpha=0.2, delta=0.1, pareto=False, method="holm")
    words = explain(holm.result)
    rates = np.asarray(holm.result.budget_risk)
    rate = min(rates[rates < 0.2], key=lambda r: abs(r - 0.1))
    m = len(holm.result.grid)
    assert (
        f"about {rows_to_certify(rate, 0.2, 0.1 / m, chance=0.9):,} labelled" in words[1] and f"holm tests at δ/{m:,}" in words[1]
    )


def test_the_browser_check_sees_a_broken_image_a_missing_link_and_a_script_error(tmp_path):
    """The check the report pages pass (tests/test_pipeline.py) fails on a page that is broken."""
    from conftest import missing

    from ctd.testing.browser import check_page, chromium

    if chromium() is None:
        missing("chromium is not installed (Debian: apt-get install -y chromium)")
    (tmp_path / "here.json").write_text("{}")
    good = tmp_path / "good.html"
    good.write_text("<!doctype html><html><body><a href='here.json'>ok</a></body></html>")
    assert check_page(str(good))["ok"]
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><html><body><img alt='broken' src='data:image/png;base64,AAAA'/><a href='gone.parquet'>x</a>"
        "<a href='here.json'>ok</a><script>undefinedFunction();</script></body></html>"
    )
    r = check_page(str(bad))
    assert not r["ok"] and r["broken_images"] == ["broken"] and r["missing_links"] == ["gone.parquet"] and r["console_errors"]
    logged = tmp_path / "logged.html"
    logged.write_text("<!doctype html><html><body><p>x</p><script>console.error('a plot failed');</script></body></html>")
    r = check_page(str(logged))
    assert not r["ok"] and "a plot failed" in r["console_errors"]


def test_a_nights_count_is_bounded_as_the_calibration_report_says():
    """The calibration report's night-level sentence, by simulation of whole calibrations: 800 calibration
    rows (d ~ U(-1, 1), so the true rate at λ is (1 - λ)/2), α 0.2, δ 0.1, then a night of 1,000 rows at the
    certified λ̂'s true rate. P(count > q) <= δ + 0.05 holds; the old claim, "at most α·N judge calls per N
    conversations with probability at least 90%", fails (the count passes 200 in about 16% of calibrations)."""
    from test_stats import check_rate

    from ctd.calibration.report import night_count_bound
    from ctd.stats.calibrate import calibrate_counts, exceedance_counts

    assert night_count_bound(0.2, 10_000, 0.05) == 2066
    q = night_count_bound(0.2, 1000, 0.05)
    draws = simulation_draws(0.1)
    rng = np.random.default_rng(17)
    g = threshold_grid(size=1001)
    counts = exceedance_counts(rng.uniform(-1, 1, (draws, 800)), g)
    lam = np.array([calibrate_counts(g, c, 800, 0.2, 0.1).lambda_hat for c in counts])
    rate = np.where(np.isfinite(lam), (1 - lam) / 2, 0.0)
    night = rng.binomial(1000, rate)
    check_rate(int((night > q).sum()), draws, 0.15)
    with pytest.raises(AssertionError, match="significantly above"):
        check_rate(int((night > 200).sum()), draws, 0.1)


def test_the_holm_failure_message_counts_at_the_level_holm_tests():
    """50 rows, α 0.05, δ 0.1, 1,001 thresholds: Holm's first test runs at δ/1001, where even a threshold
    that delegates none of the 50 rows fails ((0.95)^50 = 0.077 > 1e-4). The message says so (and how
    many rows would do), not "no threshold delegates at most k* = 0" while such thresholds exist."""
    from ctd.stats.calibrate import calibrate, exceedance_counts

    d = np.random.default_rng(0).uniform(-1, 1, 50)
    g = threshold_grid(size=1001)
    r = calibrate(d, g, 0.05, 0.1, method="holm")
    assert not r.delegates and (exceedance_counts(d, g) == 0).any()
    assert "(1-α)^n > δ/1001" in r.message and f"at least {min_certifiable_n(0.05, 0.1 / 1001)} are needed" in r.message
    assert min_certifiable_n(0.05, 0.1 / 1001) == 180


def test_every_figure_on_a_page_has_a_caption_in_words():
    """Issue #24 item 3: a page refuses a figure without a caption (no file name such as "dv_histogram" under
    a plot); the calibration report's and the audit report's figures all have one."""
    from ctd.audit.report import FIGURE_CAPTIONS
    from ctd.reporting.pages import html_page

    with pytest.raises(ValueError, match="figures without a caption: \\['dv_histogram'\\]"):
        html_page("t", [], {"dv_histogram": b"x"})
    page = html_page("t", [], {"dv_histogram": b"x"}, {"dv_histogram": "How the values spread"})
    assert "<figcaption>How the values spread</figcaption>" in page
    assert set(FIGURE_CAPTIONS) == {"dv_histogram", "score_histogram"} and all(" " in c for c in FIGURE_CAPTIONS.values())


def test_the_drift_statistic_is_said_in_words_first():
    from ctd.reporting.pages import drift_words

    assert drift_words(4.3e-14, 0.01) == "no evidence of drift (e-detector 4.3e-14, alarm at 100)"
    assert drift_words(25.0, 0.01).startswith("some evidence of a higher rate, 25% of the way to the alarm")
    assert drift_words(150.0, 0.01).startswith("ALARM: the delegation rate has drifted up")
