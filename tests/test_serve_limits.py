"""``dllmctl serve``'s limits without a server: the token bucket against a fake clock, rates as
typed, and the Host names that pass the DNS-rebinding check."""

from __future__ import annotations

import pytest

from dllmctl.frontends.serve_limits import MAX_TRACKED, RateLimiter, allowed_hosts, host_allowed, parse_rate, retry_after


def test_a_bucket_per_caller_refills_at_the_rate():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5) and retry_after(0.5) == "1"
    assert limiter.take("b") == 0.0  # another caller has its own bucket
    now[0] = 0.5  # one token back
    assert limiter.take("a") == 0.0 and limiter.take("a") > 0
    now[0] = 100.0  # idle: never more than the burst
    assert [limiter.take("a") for _ in range(4)][-1] > 0
    for i in range(MAX_TRACKED + 5):  # a flood of addresses does not grow the table without bound
        limiter.take(f"addr {i}")
    assert len(limiter._buckets) <= MAX_TRACKED + 1


def test_rates_and_hosts():
    assert parse_rate("10/s") == 10 and parse_rate("600/min") == 10 and parse_rate(" 1.5 / second ") == 1.5
    for bad in ("10", "0/s", "-1/s", "ten/s", "5/h"):
        with pytest.raises(ValueError, match="such as 10/s"):
            parse_rate(bad)
    hosts = allowed_hosts("0.0.0.0", ["LLM.Home.Arpa."])
    assert all(host_allowed(h, hosts) for h in ("localhost:8000", "127.0.0.1", "[::1]:80", "llm.home.arpa",
                                                  "llm.home.arpa.:8000", "192.168.1.5:8000", "[fe80::1]"))
    assert not any(host_allowed(h, hosts) for h in ("evil.example", "localhost.evil.example:80", "", None,
                                                      "0.0.0.0.evil.example"))
    assert host_allowed("box.lan", allowed_hosts("box.lan", [])) and not host_allowed("box.lan", hosts)
