"""Soak, the suite's share: 8 OpenAI clients x 6 chat completions (every fourth streamed) through the
real API app against 3 real daemons, after a warm-up round of the same shape: 0 errors, every
daemon's RSS within +10% of where the measured round started, every session freed after. The full
size (8 x 100) is `dllmctl bench soak -m MODEL`, the same code."""

from __future__ import annotations

from dllmctl.bench import soak
from tests.reliability.conftest import MODEL, serving_cluster


def test_eight_clients_leave_no_error_no_session_and_no_memory_growth(user_env, user, tmp_path, report_figures):
    with serving_cluster(user, tmp_path, 3) as (user, nodes):
        report = soak.run(user, nodes, MODEL, clients=8, requests=6, max_tokens=8)
    measured = report["measured"]
    report_figures(f"soak: {measured['requests']} requests, {measured['errors']} errors, RSS growth "
                   + ", ".join(f"{n} {r['before'] / 2**20:.0f}->{r['after'] / 2**20:.0f} MiB" for n, r in report["rss"].items())
                   + f", sessions left {report['sessions_left']}")
    assert measured["requests"] == 48 and measured["errors"] == 0, measured["statuses"]
    assert report["warmup"]["errors"] == 0 and measured["tokens"] > 0
    assert report["sessions_left"] == 0
    assert len(report["rss"]) == 3 and report["max_rss_growth"] <= soak.RSS_GROWTH_TARGET, report["rss"]
