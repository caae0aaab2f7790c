"""Prefix routing through `mesh gateway` onto two real llama-server hosts (gemma-3-270m).

Which host served a request is read from the hosts themselves (llama-server's
/metrics: tokens generated, requests being processed); that the repeated prefix
was reused is llama-server's own `cached_tokens`. Nothing here depends on time.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.gateway import GatewayProcess, llama_args, start_gateway
from e2e.llama import LlamaProcess, start_llama_server
from mesh_operator.gateway.affinity import preferred, prefix_key

pytestmark = pytest.mark.integration

SLOTS = 2
WORDS = ("amber", "birch", "cloud", "delta", "ember", "fjord", "grove", "heron", "iris", "jade")


def document(number: int) -> str:
    rng = random.Random(f"routing-test-{number}")
    return f"Note {number}.\n" + " ".join(rng.choice(WORDS) for _ in range(250))


def messages(number: int, question: str) -> list[Any]:
    return [
        {"role": "system", "content": document(number)},
        {"role": "user", "content": question},
    ]


def host_metric(host: LlamaProcess, name: str) -> float:
    with urllib.request.urlopen(f"{host.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in {host.url}/metrics")


def predicted(hosts: list[LlamaProcess]) -> list[float]:
    return [host_metric(h, "llamacpp:tokens_predicted_total") for h in hosts]


def processing(hosts: list[LlamaProcess]) -> list[float]:
    return [host_metric(h, "llamacpp:requests_processing") for h in hosts]


def expected_host(hosts: list[LlamaProcess], payload: dict[str, Any]) -> int:
    key = prefix_key("/v1/chat/completions", payload)
    assert key is not None
    url = preferred(key, [h.url for h in hosts], str)
    return [h.url for h in hosts].index(url or "")


@pytest.fixture(scope="module")
def hosts(
    tmp_path_factory: pytest.TempPathFactory, llama_server_bin: Path, model_file: Path
) -> Iterator[list[LlamaProcess]]:
    logs = tmp_path_factory.mktemp("gateway-routing")
    started: list[LlamaProcess] = []
    try:
        for _ in range(2):
            # 2,048 tokens per slot: room for a ~400-token prompt and long streams.
            args = llama_args(model_file, "gemma", slots=SLOTS, ctx=SLOTS * 2048)
            started.append(start_llama_server(logs, args))
        yield started
    finally:
        for host in started:
            host.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, hosts: list[LlamaProcess]
) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("gateway-routing-gw")
    urls = ",".join(h.url for h in hosts)
    gw = start_gateway(logs, ["--backend", f"gemma={urls}", "--slots", str(SLOTS)])
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, timeout=300.0)


def documents_per_host(hosts: list[LlamaProcess], each: int) -> list[int]:
    """Document numbers whose keys name each host `each` times (the ports vary)."""
    chosen: dict[int, list[int]] = {0: [], 1: []}
    number = 0
    while any(len(found) < each for found in chosen.values()):
        home = expected_host(hosts, {"messages": messages(number, "q")})
        if len(chosen[home]) < each:
            chosen[home].append(number)
        number += 1
    return chosen[0] + chosen[1]


def test_a_prefix_stays_on_its_host_and_its_cache_is_reused(
    client: openai.OpenAI, hosts: list[LlamaProcess]
) -> None:
    for number in documents_per_host(hosts, 2):
        home = expected_host(hosts, {"messages": messages(number, "q")})
        cached: list[int] = []
        prompt_tokens = 0
        for question in ("Which word is first?", "Which word is last?", "How many words?"):
            before = predicted(hosts)
            reply = client.chat.completions.create(
                model="gemma",
                messages=messages(number, question),
                max_tokens=2,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            after = predicted(hosts)
            served = [a - b for a, b in zip(after, before, strict=True)]
            # One request at a time: its home has a free slot, so it went there.
            assert served[home] == 2 and served[1 - home] == 0, (number, question, served)
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            cached.append(reply.usage.prompt_tokens_details.cached_tokens or 0)
            prompt_tokens = reply.usage.prompt_tokens
        # The first request of a document computes it; the next ones find it in
        # the slot llama-server kept it in and compute only the question.
        assert cached[0] < prompt_tokens // 4, cached
        assert all(c >= prompt_tokens * 3 // 4 for c in cached[1:]), (cached, prompt_tokens)


def test_a_full_preferred_host_sends_the_next_request_to_the_other(
    client: openai.OpenAI, hosts: list[LlamaProcess], gateway: GatewayProcess
) -> None:
    number = 10
    home = expected_host(hosts, {"messages": messages(number, "q")})
    streams: list[Any] = []
    try:
        for sent, question in enumerate(("First?", "Second?", "Third?"), start=1):
            stream = client.chat.completions.create(
                model="gemma",
                messages=messages(number, question),
                # Long enough to still be generating while the test looks.
                max_tokens=1500,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            streams.append(stream)
            next(iter(stream))
            # The stream has sent a chunk, so it was given a host; wait until
            # llama-server counts it on a slot.
            deadline = time.monotonic() + 60
            while sum(busy := processing(hosts)) < sent and time.monotonic() < deadline:
                time.sleep(0.05)
            # The home host takes them while it has a free slot (least busy would
            # have put the second on the other host); then the other one.
            expected = [0, 0]
            expected[home] = min(sent, SLOTS)
            expected[1 - home] = sent - expected[home]
            assert busy == expected, (home, sent, busy)
        assert gateway.metric("mesh_gateway_in_flight_requests") == 3
    finally:
        for stream in streams:
            stream.close()
