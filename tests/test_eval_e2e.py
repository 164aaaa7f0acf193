"""`crs-rlhf eval` end to end over real processes: policy_gen (hf) as generator and judge, both
reward services, two policies (the tiny base and a LoRA adapter). Verdicts of tiny models
are noise: these tests check the bookkeeping, the caching and the failure handling."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from _support import EVAL_TARGETS, make_adapter, running, service

from evaluation import cli
from services.common.process import free_port

pytestmark = pytest.mark.slow
FIX = Path(__file__).resolve().parents[1] / "evaluation" / "fixtures"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def services(tiny_models, reward_pref_url, reward_abs_url, tmp_path_factory):
    """This module's policy_gen (its adapters: the trained policy and the judge) and the
    session's shared reward services (conftest.py), which it only scores with."""
    from crs_rlhf.tiny_judge import make_tiny_judge_adapter

    root = tmp_path_factory.mktemp("eval-adapters")
    trained = make_adapter(tiny_models["policy"], root / "trained", seed=1, targets=EVAL_TARGETS)
    make_tiny_judge_adapter(tiny_models["policy"], root / "judge")
    policy_gen = service("services.policy_gen", "--backend", "hf", "--model-path", str(tiny_models["policy"]),
                         "--adapter-root", str(root), "--max-loras", "3", "--max-model-len", "1024",
                         log_dir=tmp_path_factory.mktemp("eval-logs"), env=ENV, startup_timeout=600)
    with running({"policy_gen": policy_gen}):
        pg = policy_gen.url
        r = httpx.post(pg + "/v1/load_lora_adapter", json={"lora_name": "judge", "lora_path": str(root / "judge")}, timeout=60)
        assert r.status_code == 200, r.text
        yield {"policy_gen": pg, "pref": reward_pref_url, "abs": reward_abs_url, "trained": trained,
               "root": root}


@pytest.fixture(scope="module")
def generated(services, tmp_path_factory) -> Path:
    """8 prompts (2 per source) answered by the base policy and the adapter."""
    d = tmp_path_factory.mktemp("eval-run")
    assert cli.main(["prompts", "--source", f"vicuna={FIX / 'vicuna_question.jsonl'}", "--source",
                     f"koala={FIX / 'koala_test.jsonl'}", "--source", f"hh={FIX / 'hh_helpful.jsonl'}",
                     "--source", "oasst=fixture", "--per-source", "2", "--out", str(d / "prompts.jsonl")]) == 0
    assert cli.main(["generate", "--prompts", str(d / "prompts.jsonl"), "--policy-url", services["policy_gen"],
                     "--policy", "policy", "--policy", f"trained={services['trained']}", "--out", str(d),
                     "--max-tokens", "12"]) == 0
    return d


def chat_calls(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r'policy_gen_requests_total\{endpoint="/v1/chat/completions",status="200"\} ([0-9.e+]+)', text)
    return int(float(m.group(1))) if m else 0


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def unjudged_copy(generated: Path, d: Path) -> Path:
    """`generated`'s prompts and outputs in folder d, without the judgments other tests wrote there."""
    shutil.copytree(generated / "outputs", d / "outputs")
    shutil.copy(generated / "prompts.jsonl", d)
    return d


def judge_argv(d: Path, url: str, model: str = "judge", *extra: str) -> list[str]:
    # The tiny judge answers one letter: the crs template (the default, the thesis's, wants a ranking).
    return ["judge", "--dir", str(d), "--judge-url", url, "--judge-model", model, "--baseline", "policy",
            "--template", "crs", *extra]


def test_generate_writes_alpaca_eval_outputs(generated):
    for name in ("policy", "trained"):
        out = json.loads((generated / "outputs" / f"{name}.json").read_text())
        assert len(out) == 8 and {r["generator"] for r in out} == {name}
        assert all(set(r) >= {"id", "instruction", "output", "generator", "dataset"} for r in out)
        assert all(isinstance(r["n_tokens"], int) and 0 <= r["n_tokens"] <= 12 for r in out)
        meta = json.loads((generated / "outputs" / f"{name}.meta.json").read_text())
        assert meta["sampling"]["max_tokens"] == 12 and meta["sampling"]["temperature"] == 0.7
    base = json.loads((generated / "outputs" / "policy.json").read_text())
    trained = json.loads((generated / "outputs" / "trained.json").read_text())
    assert [r["output"] for r in base] != [r["output"] for r in trained]  # the adapter really was used


def test_judge_interrupted_resumes_without_repeating_a_call(services, generated, capsys):
    pg, d = services["policy_gen"], generated
    total = 16  # 8 prompts x both orders
    proc = subprocess.Popen([sys.executable, "-m", "crs_rlhf.cli", "eval", *judge_argv(d, pg, "judge", "--both-orders",
                             "--concurrency", "1")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = d / "judgments.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    saved = len([line for line in path.read_text().splitlines() if line.strip()])
    assert 3 <= saved < total, "the judge run ended before it could be interrupted"

    before = chat_calls(pg)
    assert cli.main(judge_argv(d, pg, "judge", "--both-orders")) == 0
    out = capsys.readouterr().out
    assert f"judge calls this run: {total - saved}" in out
    assert chat_calls(pg) - before == total - saved  # the server agrees: only the missing ones were asked

    before = chat_calls(pg)
    assert cli.main(judge_argv(d, pg, "judge", "--both-orders")) == 0
    assert "judge calls this run: 0" in capsys.readouterr().out
    assert chat_calls(pg) == before

    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["key"] for r in records}) == total
    assert all(r["valid"] and r["method"] == "logprobs" and 0 <= r["preference"] <= 1 for r in records)
    assert {r["model_slot"] for r in records} == {"A", "B"}
    wr = rows(d / "win_rates.csv")
    assert {r["source"] for r in wr} == {"vicuna", "koala", "hh", "oasst", "all"}
    for r in wr:
        assert int(r["n_wins"]) + int(r["n_wins_base"]) + int(r["n_draws"]) == int(r["n_total"])
        assert float(r["wilson_low"]) <= float(r["win_rate"]) <= float(r["wilson_high"])
        if int(r["n_total"]) >= 2:  # a sample SE (AlpacaEval's) needs two prompts; one gives nan, as pandas' sem
            assert float(r["ci95_low"]) <= float(r["win_rate"]) <= float(r["ci95_high"])
        assert r["position_bias"] != "" and (r["model"], r["baseline"]) == ("trained", "policy")
    everything = next(r for r in wr if r["source"] == "all")
    assert int(everything["n_total"]) == 8 and int(everything["n_invalid"]) == 0


def test_rm_score_agreement_length_and_report(services, generated, tmp_path, capsys):
    # Its own copy, judged in one order, whatever the other tests left in `generated`: judged in
    # both orders (as the resume test does), the tiny judge's orders disagree and every pair is a
    # draw, which leaves agreement with no pair to count.
    d = unjudged_copy(generated, tmp_path / "copy")
    assert cli.main(judge_argv(d, services["policy_gen"])) == 0
    assert cli.main(["rm-score", "--dir", str(d), "--pref-url", services["pref"], "--abs-url", services["abs"],
                     "--batch-size", "5"]) == 0
    scores = [json.loads(line) for line in (d / "rm_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 2 * 8 * 2 and {s["rm"] for s in scores} == {"pref", "abs"}
    assert all(s["probability"] is not None for s in scores if s["rm"] == "abs")
    agreement = rows(d / "agreement.csv")
    for rm in ("pref", "abs"):
        # the one judged pair (trained vs policy), then the pooled rows (all vs all): the same counts
        cells = {}
        for model in ("trained", "all"):
            per_source = [r for r in agreement if r["rm"] == rm and r["model"] == model and r["source"] != "all"]
            (total,) = [r for r in agreement if r["rm"] == rm and r["model"] == model and r["source"] == "all"]
            assert sum(int(r["pairs"]) for r in per_source) == int(total["pairs"])
            assert 0 <= int(total["agreements"]) <= int(total["pairs"])
            cells[model] = [(r["source"], r["pairs"], r["agreements"]) for r in per_source + [total]]
        assert cells["trained"] == cells["all"]
        assert 0 < int(total["pairs"]) <= 8  # one order: verdicts, not draws
    length = rows(d / "length.csv")
    assert {(r["model"], r["rm"]) for r in length} == {(m, rm) for m in ("policy", "trained", "all") for rm in ("pref", "abs")}
    assert all(int(r["n"]) == (16 if r["model"] == "all" else 8) for r in length)
    for r in rows(d / "rm_win_rates.csv"):
        assert int(r["n_wins"]) + int(r["n_wins_base"]) + int(r["n_draws"]) == int(r["n_total"])

    assert cli.main(["report", str(d)]) == 0
    report = (d / "report.md").read_text()
    for png in ("winrate_matrix.png", "win_rates_ci.png", "agreement.png", "score_distribution.png",
                "score_vs_length.png"):
        assert (d / png).stat().st_size > 1000 and png in report


def test_garbage_and_dead_judges_are_counted_or_reported(services, generated, tmp_path, capsys):
    d = unjudged_copy(generated, tmp_path / "copy")
    # The untrained tiny policy never answers A or B: every verdict invalid, counted, none a draw.
    assert cli.main(judge_argv(d, services["policy_gen"], "policy", "--invalid-retries", "1")) == 0
    records = [json.loads(line) for line in (d / "judgments.jsonl").read_text().splitlines()]
    assert len(records) == 8 and not any(r["valid"] for r in records)
    assert all(r["attempts"] == 2 and len(r["raw_replies"]) == 2 and r["raw"] is not None for r in records)
    everything = next(r for r in rows(d / "win_rates.csv") if r["source"] == "all")
    assert (everything["n_total"], everything["n_invalid"], everything["n_draws"]) == ("0", "8", "0")

    # A judge that is down: a clear error, exit 1, and the saved judgments are untouched.
    saved = (d / "judgments.jsonl").read_text()
    dead = f"http://127.0.0.1:{free_port()}"
    capsys.readouterr()
    assert cli.main(judge_argv(d, dead, "other-judge", "--concurrency", "2")) == 1
    err = capsys.readouterr().err
    assert "cannot reach the judge" in err and "run the same command again to resume" in err
    assert (d / "judgments.jsonl").read_text() == saved


def test_rm_bench_over_both_protocols(services, tmp_path, capsys):
    results = {}
    for protocol in ("score", "get_reward"):
        out = tmp_path / f"{protocol}.json"
        assert cli.main(["rm-bench", "--pairs", str(FIX / "rewardbench_pairs.jsonl"), "--url", services["pref"],
                         "--protocol", protocol, "--out", str(out)]) == 0
        results[protocol] = json.loads(out.read_text())
    for r in results.values():
        assert {"model", "model_type", "chat_template", "easy", "refusals", "length", "overall"} <= set(r)
        assert r["num_pairs"] == {"easy": 4, "refusals": 3, "length": 2, "overall": 9}
        assert all(0 <= r[k] <= 1 for k in ("easy", "refusals", "length", "overall"))
        assert r["overall"] == pytest.approx((4 * r["easy"] + 3 * r["refusals"] + 2 * r["length"]) / 9)
    assert results["score"]["model"] == "reward_pref"
    # A malformed pairs file names its line.
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": ""}\n')
    capsys.readouterr()
    assert cli.main(["rm-bench", "--pairs", str(bad), "--url", services["pref"]]) == 2
    assert "pairs.jsonl:2: 'chosen' must be a non-empty string" in capsys.readouterr().err


def test_run_config_drives_every_step(services, tmp_path, capsys):
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "prompts": {"sources": {"koala": str(FIX / "koala_test.jsonl"), "oasst": "fixture"},
                    "splits": {"final": 4, "tuning": 2}, "use_split": "final", "seed": 1},
        "generate": {"policy_url": services["policy_gen"], "policies": ["policy", f"trained={services['trained']}"],
                     "max_tokens": 8},
        "judge": {"judge_url": services["policy_gen"], "judge_model": "judge", "baseline": "policy", "template": "crs"},
        "rm_score": {"pref_url": services["pref"], "abs_url": services["abs"]},
        "rm_bench": {"pairs": str(FIX / "rewardbench_pairs.jsonl"), "urls": {"abs": services["abs"]}},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", "--config", str(path)]) == 0
    run = tmp_path / "run"
    assert len(json.loads((run / "outputs" / "trained.json").read_text())) == 4  # only the 'final' split
    for name in ("win_rates.csv", "rm_win_rates.csv", "agreement.csv", "length.csv", "report.md",
                 "rm_bench_abs.json", "prompt_sets.final.jsonl", "prompt_sets.tuning.jsonl"):
        assert (run / name).is_file(), name
    path.write_text(yaml.safe_dump({**cfg, "judge": {**cfg["judge"], "bogus": 1}}))
    assert cli.main(["run", "--config", str(path)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_demo_heldout_eval_ppo_vs_sft(services, tmp_path):
    from crs_rlhf.demo_eval import heldout_eval
    from evaluation.prompts import load_source

    run_dir = services["root"] / "demo-run"  # what PPO leaves: RUN/adapters/step-*
    shutil.copytree(services["trained"], run_dir / "adapters" / "step-000002")
    urls = {"policy_gen": services["policy_gen"], "reward_pref": services["pref"], "reward_abs": services["abs"]}
    res = heldout_eval(urls, run_dir, tmp_path / "eval", judge_url=services["policy_gen"], judge_model="judge", judge_template="crs",
                       progress=False)
    n = len(load_source("oasst", "fixture"))
    assert [r["judge"] for r in res.rows] == ["rm:abs", "rm:pref", "judge"]
    assert all(r["n_total"] == n and (r["model"], r["baseline"]) == ("ppo", "sft") for r in res.rows)
    assert res.verdict.startswith("PPO ") and "by judge" in res.verdict
    assert (tmp_path / "eval" / "report.md").is_file() and len(res.lines()) == 6
    # A judge that is down costs only its own row.
    dead = f"http://127.0.0.1:{free_port()}"
    res = heldout_eval(urls, run_dir, tmp_path / "eval2", judge_url=dead, judge_model="j", progress=False)
    assert [r["judge"] for r in res.rows] == ["rm:abs", "rm:pref"] and "failed" in res.verdict


def test_learning_measure_samples_scores_and_mixes_as_ppo(services, tiny_models):
    """crs_rlhf/learning.py on real services: k samples per held-out prompt from the base and an
    adapter, each one's CRS reward the PPO mix of what the reward services say of its text."""
    import asyncio

    from crs_rlhf.demo_eval import _served_base
    from crs_rlhf.learning import held_out_prompts, measure_learning, reward_gain
    from trainer.clients.reward import RewardClient, messages_item
    from trainer.ppo.config import PPOConfig

    cfg = PPOConfig.model_validate({
        "model": {"policy_path": str(tiny_models["policy"])},
        "generation": {"max_new_tokens": 8},
        "crs": {"weight": 0.25, "abs_output": "logit"},
        "services": {"policy_url": services["policy_gen"], "reward_pref_urls": [services["pref"]],
                     "reward_abs_urls": [services["abs"]]},
        "run": {"output_dir": str(services["root"] / "learning-run")}})
    prompts = held_out_prompts(cfg)
    m = measure_learning(cfg, services["trained"], _served_base(services["policy_gen"]), k=2)
    assert m["prompts"] == len(prompts) > 0 and m["samples_per_prompt"] == 2
    assert set(m["after"]) == set(m["before"]) == set(prompts)
    crs = {side: {p: [x["crs"] for x in xs] for p, xs in m[side].items()} for side in ("after", "before")}
    assert m["crs_gain"] == pytest.approx(reward_gain(crs["after"], crs["before"])["crs_gain"])
    # Re-score one prompt's samples: the stored rewards are w·pref + (1−w)·abs of these texts.
    pid = min(prompts)
    items = [messages_item(prompts[pid], x["text"]) for x in m["after"][pid]]

    async def score(url):
        async with RewardClient([url]) as c:
            return (await c.score(items)).scores

    pref, abs_ = asyncio.run(score(services["pref"])), asyncio.run(score(services["abs"]))
    expected = [0.25 * p + 0.75 * a for p, a in zip(pref, abs_)]
    assert [x["crs"] for x in m["after"][pid]] == pytest.approx(expected, abs=1e-4)
    # The pairs: sample j of a prompt has the same seed under both policies, so one policy
    # measured against itself draws the same texts pair by pair, and the paired SE is 0.
    from crs_rlhf.learning import _crs_samples

    base = _served_base(services["policy_gen"])
    one, two = (asyncio.run(_crs_samples(cfg, prompts, base, 2)) for _ in range(2))
    assert all([x["sample"] for x in one[p]] == [0, 1] for p in prompts)
    assert {p: [x["text"] for x in xs] for p, xs in one.items()} == {p: [x["text"] for x in xs] for p, xs in two.items()}
    same = reward_gain(*({p: [x["crs"] for x in xs] for p, xs in side.items()} for side in (one, two)))
    assert same["crs_gain"] == pytest.approx(0.0, abs=1e-5) and same["se"] == pytest.approx(0.0, abs=1e-5)
    assert same["se_unpaired"] > 0.0  # the samples do differ from one another
