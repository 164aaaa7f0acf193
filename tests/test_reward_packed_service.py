"""`--packing on` through a real reward service process: packed rows over HTTP, tiny Llama RM, fp32, CPU.

The reference is the same service with `--packing off` (padded, length-sorted batches) and
every item sent alone; packed scores must equal both to 1e-5, for one mixed request and for
many concurrent clients whose items share rows. Start-up: /ready is 503 until the packed
warm-up is done, and `--packing on` on a model the packed path cannot serve stops the process
with a message that says what to do. (FlexAttention on CPU compiles for ~30 s per row length,
so the service tests use the SDPA dense mask; tests/test_packing_forward.py covers flex.)
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from services.common.process import ServiceProcess, free_port, python_module
from services.common.protocol import ScoreResponse

pytestmark = pytest.mark.slow

TOL = 1e-5
ROW = 512  # small rows: the dense (L, L) mask stays cheap, and a truncated item fills a row alone
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "bakes", "bread", "in", "a", "hot", "oven"]
COMMON = ("--dtype", "float32", "--device", "cpu", "--max-tokens", str(ROW), "--min-prompt-tokens", "64",
          "--log-level", "warning")


def text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_words))


def metric_lines(url: str, prefix: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def services(tiny_models, tmp_path_factory):
    """{'packed': ..., 'padded': ...} reward_pref processes on the same model, started together;
    also what the packed one's /ready answered while its /health was already 200."""
    logs = tmp_path_factory.mktemp("logs")
    procs = {}
    for name, packing in (("packed", "on"), ("padded", "off")):
        port = free_port()
        argv = python_module("services.reward_pref", "--model-path", str(tiny_models["reward_pref"]),
                             "--port", str(port), "--packing", packing, "--row-tokens", str(ROW), *COMMON)
        procs[name] = ServiceProcess(argv, port, log_path=logs / f"{name}.log", startup_timeout=180).start()
    try:
        early = watch_startup(procs["packed"])
        for p in procs.values():
            p.wait_ready()
        yield procs, early
    finally:
        for p in procs.values():
            p.stop()


def watch_startup(svc: ServiceProcess) -> list[tuple[int, str]]:
    """/ready replies (status, message) seen after /health first answered 200, until ready."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and svc.alive():
        try:
            health = httpx.get(svc.url + "/health", timeout=2)
            r = httpx.get(svc.url + "/ready", timeout=2) if health.status_code == 200 else None
        except httpx.HTTPError:
            r = None
        if r is None:
            time.sleep(0.05)
            continue
        seen.append((r.status_code, r.json().get("error", {}).get("message", "") if r.status_code != 200 else ""))
        if r.status_code == 200:
            break
        time.sleep(0.05)
    return seen


def score(svc: ServiceProcess, items: list[dict]) -> list[float]:
    r = httpx.post(svc.url + "/v1/score", json={"items": items}, timeout=120)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate(r.json()).scores


def close(got: list[float], want: list[float]) -> None:
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert diff <= TOL, f"max |packed - reference| = {diff:.2e} > {TOL}"


def test_ready_is_503_until_the_packed_warmup_is_done(services):
    _, early = services
    assert early and early[-1][0] == 200, early
    # The model loads and the packed rows warm up after the server is up: /ready said so first.
    assert any(status == 503 and "still loading" in msg for status, msg in early), early


def test_mixed_request_equals_padded_service_and_items_alone(services):
    procs, _ = services
    packed, padded = procs["packed"], procs["padded"]
    before = metric_lines(packed.url, "crs_batch_items")
    # One item truncated to a full row (a row of its own), a few medium, many short ones
    # (rows holding several items), an empty response.
    items = ([{"prompt": text(900), "response": text(30, 3)}]
             + [{"prompt": text(40 + 30 * k, k), "response": text(60, k)} for k in range(4)]
             + [{"prompt": text(1 + k, k), "response": text(2 + k % 5, k)} for k in range(14)]
             + [{"prompt": "hi", "response": ""}])
    together = score(packed, items)
    close(together, score(padded, items))
    close(together, [score(padded, [it])[0] for it in items])
    close([score(packed, [it])[0] for it in items], together)

    after = metric_lines(packed.url, "crs_batch_items")
    passes = after["crs_batch_items_count"] - before.get("crs_batch_items_count", 0)
    alone_rows = after['crs_batch_items_bucket{le="1.0"}'] - before.get('crs_batch_items_bucket{le="1.0"}', 0)
    shared_rows = passes - (after['crs_batch_items_bucket{le="2.0"}'] - before.get('crs_batch_items_bucket{le="2.0"}', 0))
    assert alone_rows >= 1 and shared_rows >= 1, (alone_rows, shared_rows)  # rows of 1 item and of 3+


def test_concurrent_clients_get_the_scores_of_their_items_alone(services):
    procs, _ = services
    packed, padded = procs["packed"], procs["padded"]
    items = [{"prompt": text(2 + (i * 13) % 90, i), "response": text(1 + (i * 37) % 160, i)} for i in range(36)]
    reference = [score(padded, [it])[0] for it in items]
    requests = [[i] for i in range(24)] + [list(range(24, 30)), list(range(30, 36))[::-1], [5, 17, 29, 0]]
    passes_before = metric_lines(packed.url, "crs_batch_items_count").get("crs_batch_items_count", 0)
    items_before = metric_lines(packed.url, "crs_items_scored_total").get("crs_items_scored_total", 0)

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(idx):
                r = await client.post(packed.url + "/v1/score", json={"items": [items[i] for i in idx]})
                assert r.status_code == 200, r.text
                return idx, ScoreResponse.model_validate(r.json()).scores
            return await asyncio.gather(*(one(idx) for idx in requests * 2))

    for idx, scores in asyncio.run(run()):
        close(scores, [reference[i] for i in idx])
    m = metric_lines(packed.url, "crs_")
    passes = m["crs_batch_items_count"] - passes_before
    scored = m["crs_items_scored_total"] - items_before
    assert passes < scored, (passes, scored)  # items from different requests shared rows
    # Every packed pass computes its row's bucket length: computed >= real, fill in (0, 1].
    assert m["crs_batch_tokens_sum"] >= m["crs_tokens_scored_total"] > 0
    assert m["crs_batch_fill_count"] == m["crs_batch_items_count"]
    assert 0 < m["crs_batch_fill_sum"] <= m["crs_batch_fill_count"]


def tiny_roberta(tiny_models, out):
    """A RoBERTa-shaped RM: positions count from padding_idx + 1, so packing refuses it."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_models["reward_pref"])
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=600, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    RobertaForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_packing_on_for_an_unsupported_model_stops_at_start_with_a_clear_message(tiny_models, tmp_path):
    model = tiny_roberta(tiny_models, tmp_path / "roberta")
    port = free_port()
    log = tmp_path / "roberta.log"
    argv = python_module("services.reward_abs", "--model-path", str(model), "--port", str(port),
                         "--packing", "on", *COMMON)
    svc = ServiceProcess(argv, port, log_path=log, startup_timeout=120).start()
    try:
        assert svc.proc.wait(timeout=120) == 1  # exits: a restart policy shows a crash, not a hang
    finally:
        svc.stop()
    out = log.read_text()
    assert "PackingUnavailable" in out and "--packing on" in out and "start it with --packing off" in out, out[-3000:]


@pytest.mark.parametrize(("cls", "flags", "message"), [
    ("pref", ["--model-path", "m", "--packing", "off", "--compile"], "needs --packing on or auto"),
    ("pref", ["--model-path", "m", "--row-tokens", "1024", "--max-tokens", "2048"],
     "raise --row-tokens or lower --max-tokens"),
    ("shared", ["--base-path", "b", "--pref-adapter", "p", "--abs-adapter", "a", "--packing", "on"],
     "not available in shared-base mode"),
    ("shared", ["--base-path", "b", "--pref-adapter", "p", "--abs-adapter", "a", "--compile"],
     "not available in shared-base mode"),
])
def test_packing_settings_that_cannot_work_are_usage_errors(cls, flags, message, capsys):
    """What the entry points run first (settings_or_exit): exit 2 and a line saying what to change."""
    from services.common.settings import settings_or_exit
    from services.reward_pref.settings import RewardPrefSettings
    from services.reward_shared.settings import RewardSharedSettings

    with pytest.raises(SystemExit) as exit_:
        settings_or_exit({"pref": RewardPrefSettings, "shared": RewardSharedSettings}[cls], flags, prog="svc")
    assert exit_.value.code == 2 and message in capsys.readouterr().err
