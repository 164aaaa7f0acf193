"""`crs-rlhf eval judge` with a judge whose context cannot hold some pairs: those pairs are
recorded invalid with the reason, the run finishes (rc 0) and reports how many; the judge's
own length check (policy_gen hf here, a real process) is what finds them."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from evaluation.judge import CONTEXT_OVERFLOW, context_overflow
from services.common.process import ServiceProcess, free_port, python_module

MAX_MODEL_LEN = 512  # a short pair is ~300 tiny-tokenizer tokens with the crs template, a long one ~1000
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_context_overflow_reads_each_servers_refusal():
    vllm = "This model's maximum context length is 1024 tokens. However, you requested 1788 tokens (1784 in the messages)."
    assert context_overflow(400, vllm) == f"{CONTEXT_OVERFLOW}: {vllm}"
    assert context_overflow(400, "Please reduce the length", "context_length_exceeded").startswith(CONTEXT_OVERFLOW)
    assert context_overflow(400, "messages has 9000 characters: more than fit this model's maximum context length")
    assert context_overflow(400, "temperature must be at most 2") is None
    assert context_overflow(401, "maximum context length") is None and context_overflow(503, vllm) is None


@pytest.fixture(scope="module")
def judge_url(tiny_models, tmp_path_factory):
    from crs_rlhf.tiny_judge import make_tiny_judge_adapter

    root = tmp_path_factory.mktemp("overflow-judge")
    make_tiny_judge_adapter(tiny_models["policy"], root / "judge")
    port = free_port()
    argv = python_module("services.policy_gen", "--backend", "hf", "--model-path", str(tiny_models["policy"]),
                         "--adapter-root", str(root), "--max-model-len", str(MAX_MODEL_LEN), "--port", str(port))
    log = tmp_path_factory.mktemp("logs") / "policy_gen_judge.log"
    with ServiceProcess(argv, port, env=ENV, log_path=log, startup_timeout=300) as svc:
        r = httpx.post(svc.url + "/v1/load_lora_adapter", json={"lora_name": "judge", "lora_path": str(root / "judge")},
                       timeout=60)
        assert r.status_code == 200, r.text
        yield svc.url


def write_outputs(d, long_ids: set[int]) -> None:
    (d / "outputs").mkdir(parents=True)
    for name, word in (("policy", "bread"), ("ppo", "water")):
        rows = [{"id": f"p{i}", "dataset": "oasst", "instruction": f"Tell me about {word} number {i}.",
                 "output": (f"{word} is fine. " * (60 if i in long_ids else 2)).strip(), "generator": name}
                for i in range(6)]
        (d / "outputs" / f"{name}.json").write_text(json.dumps(rows))


def test_pairs_too_long_for_the_judge_are_recorded_invalid_and_the_run_finishes(judge_url, tmp_path, capsys):
    from evaluation import cli

    d = tmp_path / "eval"
    write_outputs(d, long_ids={1, 4})
    argv = ["judge", "--dir", str(d), "--judge-url", judge_url, "--judge-model", "judge", "--baseline", "policy",
            "--template", "crs", "--concurrency", "2"]
    os.environ.setdefault("OPENAI_API_KEY", "unused")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 pairs do not fit judge's context" in out, out
    records = [json.loads(line) for line in (d / "judgments.jsonl").read_text().splitlines()]
    assert len(records) == 6
    too_long = {r["id"] for r in records if str(r.get("invalid_reason", "")).startswith(CONTEXT_OVERFLOW)}
    assert too_long == {"p1", "p4"}
    for r in records:
        if r["id"] in too_long:
            assert r["valid"] is False and r["preference"] is None and "maximum context length" in r["invalid_reason"]
        else:  # the short pairs were judged (the tiny judge answers A or B)
            assert r["valid"] is True and "invalid_reason" not in r
    assert "invalid: 2" in out
    # Resuming asks nothing again: the too-long pairs are settled, not failures to retry.
    assert cli.main(argv) == 0
    assert "judge calls this run: 0" in capsys.readouterr().out
