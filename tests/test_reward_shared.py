"""Shared-base mode: one process, one base model, two LoRA adapters, two HTTP contracts.

Checked against the single-model services serving each adapter alone (they merge it), over
real HTTP, including both ports hammered at once (the adapters must not leak into each other).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _support import make_score_adapter, running, service

from services.common.process import ServiceProcess, free_port, python_module
from services.common.protocol import ModelList, ScoreResponse

ITEMS = [
    {"prompt": "hi", "response": "hello there"},
    {"prompt": "what is the capital of france", "response": "paris, of course"},
    {"messages": [{"role": "user", "content": "bake bread"}, {"role": "assistant", "content": "use a hot oven"}]},
    {"prompt": "count", "response": "one two three four five six seven eight nine ten"},
]


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models["reward_pref"]
    return {"preference": make_score_adapter(base, root / "pref-lora", 1),
            "absolute": make_score_adapter(base, root / "abs-lora", 2)}


def rss_kib(svc: ServiceProcess) -> int:
    for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def shared(tiny_models, adapters, tmp_path_factory):
    pref_port, abs_port = free_port(), free_port()
    argv = python_module(
        "services.reward_shared", "--base-path", str(tiny_models["reward_pref"]),
        "--pref-adapter", str(adapters["preference"]), "--abs-adapter", str(adapters["absolute"]),
        "--pref-port", str(pref_port), "--abs-port", str(abs_port), "--dtype", "float32", "--log-level", "warning",
    )
    log = tmp_path_factory.mktemp("logs") / "reward_shared.log"
    with ServiceProcess(argv, pref_port, log_path=log, startup_timeout=180) as svc:
        abs_url = f"http://127.0.0.1:{abs_port}"
        svc.wait_ready(abs_url)
        yield svc, {"preference": svc.url, "absolute": abs_url}


@pytest.fixture(scope="module")
def singles(adapters, tmp_path_factory):
    """Each adapter served alone by its own single-model service (merged into the base)."""
    log_dir = tmp_path_factory.mktemp("logs")
    procs = {kind: service(module, "--model-path", str(adapters[kind]), "--dtype", "float32", "--log-level", "warning",
                           log_dir=log_dir)
             for kind, module in (("preference", "services.reward_pref"), ("absolute", "services.reward_abs"))}
    with running(procs) as started:
        yield started


def score(url: str, items=ITEMS) -> ScoreResponse:
    r = httpx.post(url + "/v1/score", json={"items": items}, timeout=60)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate(r.json())


def test_each_port_serves_its_kind(shared, adapters):
    _, urls = shared
    for kind, url in urls.items():
        (card,) = ModelList.model_validate(httpx.get(url + "/v1/models").json()).data
        assert card.kind == kind and card.id == adapters[kind].name and card.dtype == "float32"
    res = score(urls["absolute"])
    assert res.kind == "absolute" and res.probabilities is not None
    assert score(urls["preference"]).probabilities is None
    r = httpx.post(urls["preference"] + "/get_reward", json={"query": ["<|im_start|>user\nhi<|im_end|>\n"]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1


def test_scores_match_each_adapter_served_alone(shared, singles):
    svc, urls = shared
    results = {}
    for kind in urls:
        alone, together = score(singles[kind].url).scores, score(urls[kind]).scores
        assert together == pytest.approx(alone, abs=1e-5), kind
        results[kind] = together
    # The adapters really differ, so a swapped adapter would be caught above.
    assert max(abs(a - b) for a, b in zip(results["preference"], results["absolute"])) > 1e-2
    single_rss = sum(rss_kib(p) for p in singles.values())
    print(f"\nRSS: shared process {rss_kib(svc) / 1024:.0f} MiB vs two single processes {single_rss / 1024:.0f} MiB")


def test_interleaved_requests_do_not_cross_talk(shared, singles):
    _, urls = shared
    expected = {kind: score(singles[kind].url).scores for kind in urls}
    jobs = [kind for _ in range(20) for kind in ("preference", "absolute")]  # interleaved: pref, abs, pref, ...

    def call(job: tuple[int, str]):
        i, kind = job
        items = ITEMS[i % len(ITEMS):] + ITEMS[: i % len(ITEMS)]  # rotated, so batches mix lengths
        return kind, i, score(urls[kind], items).scores

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, enumerate(jobs)))
    assert len(results) == 40
    for kind, i, scores in results:
        k = i % len(ITEMS)
        want = expected[kind][k:] + expected[kind][:k]
        assert scores == pytest.approx(want, abs=1e-5), (kind, i)


def test_help_offers_only_what_shared_mode_uses():
    import subprocess

    out = subprocess.run(python_module("services.reward_shared", "--help"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--pref-port" in out.stdout and "--base-path" in out.stdout
    assert "--port " not in out.stdout and "--model-path" not in out.stdout and "--model-id" not in out.stdout
    bad = subprocess.run(python_module("services.reward_shared", "--base-path", "b", "--pref-adapter", "p",
                                       "--abs-adapter", "a", "--port", "9"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--pref-port" in bad.stderr
