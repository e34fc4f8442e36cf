"""`GET /metrics` of a real `slm serve` process, parsed by prometheus-client's own parser: requests
by route and status (refusals included), tokens in and out that match the replies' usage, time to
first token and inter-token histograms with one observation per token, the queue and rows, the
prefix cache, and the receipt's energy and CO2 so far."""

from __future__ import annotations

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families



def scrape(server) -> dict[tuple[str, tuple], float]:
    status, body = server.request("GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_metrics_count_what_the_server_did(server):
    client = server.client()
    before = scrape(server)
    assert before[("slm_running_sequences", ())] == 0 and before[("slm_kv_cache_rows", ())] == 4
    usage = []
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0)
    usage.append(client.chat.completions.create(**kw).usage)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    usage.append(chunks[-1].usage)
    usage.append(client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=9, temperature=0).usage)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=10**6)
    after = scrape(server)

    def grew(name, labels=()):
        return after.get((name, tuple(sorted(labels))), 0) - before.get((name, tuple(sorted(labels))), 0)
    assert grew("slm_requests_total", {"route": "/v1/chat/completions", "status": "200"}.items()) == 2
    assert grew("slm_requests_total", {"route": "/v1/completions", "status": "200"}.items()) == 1
    assert grew("slm_requests_total", {"route": "/v1/completions", "status": "400"}.items()) == 1
    assert grew("slm_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    generated = sum(u.completion_tokens for u in usage)
    assert grew("slm_generation_tokens_total") == generated
    assert grew("slm_time_to_first_token_seconds_count") == 3  # one first token per sequence
    assert grew("slm_inter_token_latency_seconds_count") == generated - 3
    assert after[("slm_time_to_first_token_seconds_sum", ())] > 0
    assert grew("slm_prefix_cache_hits_total") + grew("slm_prefix_cache_misses_total") == 3
    assert grew("slm_prefix_cache_hits_total") >= 1  # the second chat repeats the first's prompt
    assert after[("slm_prefix_cache_entries", ())] >= 1 and after[("slm_prefix_cache_bytes", ())] > 0
    assert after[("slm_waiting_requests", ())] == 0 and after[("slm_kv_cache_usage_ratio", ())] == 0
    assert after[("slm_energy_kwh_total", ())] > 0 and after[("slm_co2_grams_total", ())] > 0  # the receipt's
    status, _ = server.request("GET", "/nowhere")
    assert status == 404 and scrape(server)[("slm_requests_total", (("route", "other"), ("status", "404")))] == 1
