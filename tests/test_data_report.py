"""`crs-rlhf data-report` on the shipped fixture: counts checked against a walk of the raw file."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from trainer.data import fixture_path, load_oasst
from trainer.data.report import correlation_matrix
from trainer.data.rl import held_out_tree_ids

SIX = ("violence", "creativity", "helpfulness", "humor", "toxicity", "quality")


def _kept_trees() -> list[dict]:
    """The raw export lines, filtered by hand: ready trees; no deleted/synthetic/rejected subtrees."""
    def prune(m):
        if m["deleted"] or m["synthetic"] or m["review_result"] is False:
            return None
        return {**m, "replies": [k for k in (prune(c) for c in m["replies"]) if k]}

    with gzip.open(fixture_path("trees"), "rt") as f:
        lines = [json.loads(x) for x in f]
    out = []
    for t in lines:
        root = prune(t["prompt"]) if t["tree_state"] == "ready_for_export" else None
        if root:
            out.append({**t, "prompt": root})
    return out


def _walk(m):
    yield m
    for c in m["replies"]:
        yield from _walk(c)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from crs_rlhf.cli import main

    out = tmp_path_factory.mktemp("report")
    assert main(["data-report", "--data", "fixture", "--out", str(out)]) == 0
    return out, json.loads((out / "counts.json").read_text())


def test_counts_match_a_hand_walk_of_the_file(report):
    _, c = report
    # Every stage's counts leave out the held-out evaluation trees of the shipped split file.
    split = json.loads(fixture_path("trees").with_name("oasst_trees.jsonl.gz.splits.json").read_text())
    held = set(split["held_out_tree_ids"])
    kept = [t for t in _kept_trees() if t["message_tree_id"] not in held]
    rm = [t for t in kept if t["prompt"]["lang"] in ("en", "es", "fr", "de")]
    assert (c["trees_read"], c["held_out_trees"], c["trees_kept"]) == (43, len(held), len(kept)) == (43, 5, 34)
    assert c["messages_kept"] == sum(1 for t in kept for _ in _walk(t["prompt"])) == 221
    sets = rows = 0
    quality = []
    for t in rm:
        for m in _walk(t["prompt"]):
            ranked = [r for r in m["replies"] if r["role"] == "assistant" and r["rank"] is not None]
            if m["role"] == "prompter" and len(ranked) >= 2:
                sets += 1
                full = [r for r in ranked if all(r["labels"].get(k, {}).get("count", 0) > 0 for k in SIX)]
                rows += len(full)
                quality += [r["labels"]["quality"]["value"] for r in full]
    assert sum(c["ranked_sets"]) == sets == 43
    assert sum(c["absolute_rows"]) == rows == 89
    train_eval = Counter(c["absolute_ranges_train"]) + Counter(c["absolute_eval_ranges"])
    assert dict(train_eval) == dict(Counter("low" if q <= 0.4 else "high" if q >= 0.9 else "mid" for q in quality))
    assert sum(c["under_s_bins_train"].values()) == c["absolute_ranges_train"]["mid"]
    assert sum(c["sft_threads"]) == 36  # 34 trees, the unranked and the branching tree give two each
    assert held_out_tree_ids(load_oasst(fixture_path()), 0.1) == held
    prompts = Counter(t["prompt"]["lang"] for t in rm if t["message_tree_id"] not in held
                      for m in _walk(t["prompt"]) if m["role"] == "prompter")
    assert c["rl_prompts_per_language"] == dict(sorted(prompts.items()))
    assert c["rl_prompts_train"] + c["rl_prompts_held_out"] == 67  # every en/es/fr/de prompt, one side or other


def test_report_files_and_printed_table(report, capsys):
    out, c = report
    for name in ("label_correlation.png", "label_distributions.png", "absolute_labels.png", "weighted_scores.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    md = (out / "counts.md").read_text()
    assert "| ranked sets train / eval (en, es, fr, de) | {} / {} | 14,080 / 1,488 |".format(*c["ranked_sets"]) in md
    assert "low 0-0.40" in md and "under_s bin 0.41-0.50" in md


def test_correlation_by_hand_and_clear_errors(tmp_path, capsys):
    from crs_rlhf.cli import main

    m = correlation_matrix({"a": [0.0, 0.5, 1.0], "b": [1.0, 0.5, 0.0], "c": [0.2, 0.2, 0.2]})
    assert m[0][0] == pytest.approx(1.0) and m[0][1] == pytest.approx(-1.0)
    assert m[0][2] != m[0][2]  # a constant label has no correlation: NaN, drawn as n/a
    assert main(["data-report", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no OASST data" in capsys.readouterr().err
