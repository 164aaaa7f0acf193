"""Each convention of docs/evaluation.md against a hand-worked example from the thesis's printed
numbers, and the reference implementations users compare against: AlpacaEval 0.6.6's own
metric code (`alpaca_eval.metrics.get_winrate`) on our annotations export, RewardBench's
subset mapping, Open Assistant's Tideman rule for tied majorities."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math

import pytest

from evaluation import stats
from evaluation.human.ranking import aggregate, borda_points, group_sd, ranked_pairs
from evaluation.judge import judge_messages, ranking_verdict
from evaluation.rm_bench import SECTIONS, SUBSET_COUNTS, leaderboard_score, section_scores
from evaluation.winrates import COLUMNS, alpaca_annotations, win_rate_rows, write_alpaca_annotations


def _verdicts(wins, losses, draws=0):
    return [1.0] * wins + [0.0] * losses + [0.5] * draws


# --------------------------------------------------------------------------- Table 23: SE and CI


@pytest.mark.parametrize(("wins", "se_pct", "ci_pct"), [
    (66, 4.76, 9.33),  # abs_rlhf vs preference_rlhf: "66 % ± 9.33 %"
    (63, 4.85, 9.5),  # abs vs crs, Table 23's 4.85 (the text rounds its CI to 9.33)
    (61, 4.90, 9.6),  # crs vs preference: "61 % ± 9.6 %"
    (71, 4.56, 8.93),  # sft vs preference: "71 % ± 8.93 %"
    (55, 5.0, 9.8),  # sft vs abs: "55 % ± 9.8 %"
])
def test_table_23_standard_errors_are_alpacaevals_sample_se(wins, se_pct, ci_pct):
    r = stats.win_rate(_verdicts(wins, 100 - wins))
    assert 100 * r.win_rate == pytest.approx(wins)
    assert 100 * r.standard_error == pytest.approx(se_pct, abs=0.005)  # sqrt(p(1-p) n/(n-1) / n)
    assert 100 * 1.96 * r.standard_error == pytest.approx(ci_pct, abs=0.05)
    # Eq. 7.1's binomial SE is the named extra column: 66 of 100 -> 4.737, not Table 23's 4.76
    assert 100 * r.se_binomial == pytest.approx(100 * math.sqrt(wins / 100 * (1 - wins / 100) / 100))


def test_hard_win_rate_is_the_headline_soft_the_extra():
    r = stats.win_rate([0.7] * 66 + [0.3] * 34)  # 66 confident-ish wins, 34 losses
    assert r.win_rate == pytest.approx(0.66) and r.soft_win_rate == pytest.approx(0.564)


def test_small_n_intervals_do_not_collapse_and_significance_is_exact():
    r = stats.win_rate(_verdicts(8, 0))  # the demo's 8 of 8
    assert (r.ci95_low, r.ci95_high) == (1.0, 1.0)  # p ± 1.96·SE: zero width
    # Wilson: centre (1 + z²/16) / (1 + z²/8), half-width z·sqrt(z²/256) / (1 + z²/8)
    z2 = stats.Z95**2
    assert r.wilson_low == pytest.approx((1 + z2 / 16 - stats.Z95 * math.sqrt(z2 / 256)) / (1 + z2 / 8))
    assert r.wilson_low == pytest.approx(0.6756, abs=1e-4) and r.wilson_high == 1.0
    assert r.sign_test_p == pytest.approx(2 / 2**8)  # 0.0078: significant at 5 %
    assert stats.sign_test(6, 2) == pytest.approx(2 * (1 + 8 + 28) / 256)  # 0.289: not significant
    assert stats.sign_test(3, 3) == 1.0 and stats.sign_test(0, 0) == 1.0
    lo, hi = stats.wilson_interval(0.66, 100)
    assert lo < 0.66 < hi and (lo, hi) == (pytest.approx(0.5628, abs=1e-4), pytest.approx(0.7454, abs=1e-4))


# --------------------------------------------------------------------------- AlpacaEval round trip


def _records_and_outputs():
    # 10 prompts: 6 model wins (soft 0.9 / 0.6), 3 losses, 1 judged both ways with orders disagreeing
    outputs = {m: [{"id": f"p{i}", "instruction": f"q{i}", "output": f"{m} answer {i}", "dataset": "s"}
                   for i in range(10)] for m in ("ppo", "sft")}
    prefs = [0.9, 0.6, 0.9, 0.6, 0.9, 0.6, 0.2, 0.1, 0.4]
    recs = [{"id": f"p{i}", "source": "s", "model": "ppo", "baseline": "sft", "valid": True,
             "preference": p, "p_first": p} for i, p in enumerate(prefs)]
    recs += [{"id": "p9", "source": "s", "model": "ppo", "baseline": "sft", "valid": True, "preference": x,
              "p_first": 0.8} for x in (0.8, 0.2)]  # slot A won both times: a draw
    return recs, outputs


def test_alpaca_eval_recomputes_our_board(tmp_path):
    get_winrate = pytest.importorskip("alpaca_eval.metrics").get_winrate
    assert importlib.metadata.version("alpaca_eval") == "0.6.6"
    records, outputs = _records_and_outputs()
    ours = next(r for r in win_rate_rows(records, outputs, judge="j") if r["source"] == "all")
    assert (ours["n_wins"], ours["n_wins_base"], ours["n_draws"], ours["win_rate"]) == (6, 3, 1, 65.0)
    path = write_alpaca_annotations(tmp_path, records, outputs)[0]
    assert path == tmp_path / "alpaca_eval" / "ppo_vs_sft" / "annotations.json"
    annotations = json.loads(path.read_text())
    assert all(1.0 <= a["preference"] <= 2.0 for a in annotations)
    theirs = get_winrate(annotations)  # AlpacaEval's own code, on the file as written
    assert theirs["win_rate"] == pytest.approx(ours["win_rate"])
    assert theirs["standard_error"] == pytest.approx(ours["standard_error"])
    assert theirs["discrete_win_rate"] == pytest.approx(ours["win_rate"])
    assert (theirs["n_wins"], theirs["n_wins_base"], theirs["n_draws"], theirs["n_total"]) == (6, 3, 1, 10)
    soft = get_winrate([{"preference": a["preference_soft"]} for a in annotations])
    assert soft["win_rate"] == pytest.approx(ours["soft_win_rate"])
    assert soft["standard_error"] == pytest.approx(ours["soft_standard_error"])
    # Our raw P(model better) read as AlpacaEval preferences would be nonsense: the reason for the export.
    raw = get_winrate([{"preference": r["preference"]} for r in records])
    assert raw["win_rate"] != pytest.approx(ours["soft_win_rate"])
    assert {"win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"} <= set(COLUMNS)


def test_alpaca_annotations_put_the_baseline_first():
    records, outputs = _records_and_outputs()
    a = alpaca_annotations(records, outputs)[("ppo", "sft")][0]
    assert (a["generator_1"], a["generator_2"], a["output_2"], a["preference"]) == ("sft", "ppo", "ppo answer 0", 2.0)


def test_the_default_judge_prompt_is_the_thesiss():
    text = judge_messages("Say hi", "hi", "hello")[1]["content"]
    assert "make_leaderboard" in text and '"model": "model_1"' in text and "not the length" not in text
    assert "not the length" in judge_messages("Say hi", "hi", "hello", template="crs")[1]["content"]
    assert ranking_verdict("[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]") == 0.0
    assert ranking_verdict('[{"model": "model_1", "rank": 1}, {"model": "model_2", "rank": 2}]') == 1.0
    assert ranking_verdict("model_1 is better") is None


# --------------------------------------------------------------------------- human rankings


def test_table_17_borda_sd_is_the_population_sd():
    # Table 17's per-group points and the text's sd 0.06, 0.058, 0.029 (pref, abs, crs)
    for groups, sd in (((0.63, 0.48, 0.52), 0.06), ((0.73, 0.87, 0.78), 0.058), ((0.63, 0.65, 0.7), 0.029)):
        population, sample = group_sd(groups)
        assert round(population, 3 if sd != 0.06 else 2) == sd
        assert round(sample, 3) != sd  # n - 1 gives 0.078, 0.071, 0.036


def test_tied_majorities_follow_open_assistants_rule():
    # 4 annotators split 2-2 on A vs B; all put C last.
    ballots = [{"A": 1, "B": 2, "C": 3}] * 2 + [{"B": 1, "A": 2, "C": 3}] * 2
    thesis = ranked_pairs(ballots, ["A", "B", "C"])  # zero margin locked in name order: strict
    assert thesis.tiers == [["A"], ["B"], ["C"]]
    assert ranked_pairs(ballots, ["A", "B", "C"], tie_break=["B", "A", "C"]).order == ["B", "A", "C"]
    tied = ranked_pairs(ballots, ["A", "B", "C"], rule="tied")
    assert tied.tiers == [["A", "B"], ["C"]]
    assert borda_points(thesis.tiers)["A"] - borda_points(tied.tiers)["A"] == pytest.approx(1 / 6)
    rows = [{"prompt_id": "p", "group": "1", "annotator": str(i), "ranking": b} for i, b in enumerate(ballots)]
    assert aggregate(rows).tideman == {"1/p": ["A", "B", "C"]}


# --------------------------------------------------------------------------- RewardBench


def _rewardbench_constants():
    try:
        files = importlib.metadata.files("rewardbench") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rewardbench is not installed (pip install --no-deps rewardbench==0.1.4)")
    path = next(f.locate() for f in files if str(f) == "rewardbench/constants.py")
    # The package's __init__ pulls in trl/fastchat; its constants module is plain data: load it alone.
    spec = importlib.util.spec_from_file_location("rewardbench_constants", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rewardbench_sections_match_the_package():
    rb = _rewardbench_constants()
    assert SECTIONS == rb.SUBSET_MAPPING
    assert SUBSET_COUNTS == rb.EXAMPLE_COUNTS
    # hand-worked: Reasoning from math-prm 0.5 (weight 984) and hep-python 1.0 (164)
    assert section_scores({"math-prm": 0.5, "hep-python": 1.0})["Reasoning"] == pytest.approx(656 / 1148)
    acc = {s: 1.0 for s in SUBSET_COUNTS}
    acc["alpacaeval-easy"] = 0.0  # Chat: 1 - 100 / 358
    sections = section_scores(acc)
    assert sections["Chat"] == pytest.approx(258 / 358)
    assert leaderboard_score(sections) == pytest.approx((258 / 358 + 3) / 4)
    assert leaderboard_score({"Chat": 1.0}) is None
