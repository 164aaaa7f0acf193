"""Tideman ranked pairs, ranking validation and normalised Borda against hand-worked examples."""

from __future__ import annotations

import pytest

from evaluation.human.ranking import (
    RankingError,
    aggregate,
    borda_points,
    latest_rows,
    pairwise_counts,
    ranked_pairs,
    validate_ranking,
)

ABC = ["A", "B", "C"]


def order(*names: str) -> dict[str, int]:
    """A strict ranking from best to worst: order("B", "A") == {"B": 1, "A": 2}."""
    return {n: i for i, n in enumerate(names, 1)}


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "ranking",
    [
        {"A": 1, "B": 2, "C": 3},
        {"A": 1, "B": 3, "C": 1},  # competition: two tied first, next is third
        {"A": 1, "B": 2, "C": 1},  # dense: two tied first, next is second
        {"A": 1, "B": 1, "C": 1},
        {"A": 2, "B": 1, "C": 2},  # both spellings at once
    ],
)
def test_valid_rankings(ranking):
    assert validate_ranking(ranking, ABC) == ranking


@pytest.mark.parametrize(
    "ranking, words",
    [
        ({"A": 1, "B": 2}, "missing C"),
        ({"A": 1, "B": 2, "C": 3, "D": 4}, "unknown D"),
        ({"A": 2, "B": 2, "C": 3}, "gap"),  # nobody first
        ({"A": 1, "B": 3, "C": 3}, "gap"),  # dense would be 1,2,2; competition 1,2,2
        ({"A": 1, "B": 2, "C": 4}, "from 1 to 3"),
        ({"A": 0, "B": 1, "C": 2}, "from 1 to 3"),
        ({"A": "1", "B": 2, "C": 3}, "whole number"),
        ({"A": True, "B": 2, "C": 3}, "whole number"),
        ({"A": 1.5, "B": 2, "C": 3}, "whole number"),
    ],
)
def test_invalid_rankings_say_what_is_wrong(ranking, words):
    with pytest.raises(RankingError, match=words):
        validate_ranking(ranking, ABC)


# ---------------------------------------------------------------- pairwise counts
def test_pairwise_counts_ties_count_for_neither():
    n = pairwise_counts([{"A": 1, "B": 1, "C": 3}, order("C", "A", "B")], ABC)
    assert n["A"] == {"B": 1, "C": 1}  # ballot 1: A>C, tie with B; ballot 2: A>B
    assert n["B"] == {"A": 0, "C": 1}
    assert n["C"] == {"A": 1, "B": 1}


# ---------------------------------------------------------------- ranked pairs
def test_one_voter_gives_back_their_ranking():
    r = ranked_pairs([{"A": 1, "B": 3, "C": 2}], ABC, rule="tied")
    assert r.order == ["A", "C", "B"] and r.tiers == [["A"], ["C"], ["B"]]
    assert r.skipped == []


def test_one_voter_with_a_tie_keeps_the_tie():
    r = ranked_pairs([{"A": 2, "B": 1, "C": 1}], ABC, rule="tied")
    assert r.tiers == [["B", "C"], ["A"]]
    assert r.order == ["B", "C", "A"]  # inside a tier: tie-break order (names sorted)


def test_two_candidates_majority_and_exact_tie():
    assert ranked_pairs([order("B", "A"), order("B", "A"), order("A", "B")], ["A", "B"], rule="tied").tiers == [["B"], ["A"]]
    tied = ranked_pairs([order("B", "A"), order("A", "B")], ["A", "B"], rule="tied")
    assert tied.tiers == [["A", "B"]] and tied.locked == []
    assert ranked_pairs([order("B", "A"), order("A", "B")], ["A", "B"], tie_break=["B", "A"], rule="tied").order == ["B", "A"]


def test_condorcet_cycle_drops_the_weakest_majority():
    # 4 x A>B>C, 3 x B>C>A, 2 x C>A>B: A>B 6:3 (margin 3), B>C 7:2 (5), C>A 5:4 (1) - a cycle.
    ballots = [order("A", "B", "C")] * 4 + [order("B", "C", "A")] * 3 + [order("C", "A", "B")] * 2
    r = ranked_pairs(ballots, ABC, rule="tied")
    assert r.locked == [("B", "C"), ("A", "B")]
    assert r.skipped == [("C", "A")]
    assert r.order == ["A", "B", "C"]


def test_symmetric_cycle_is_decided_by_the_documented_tie_break():
    # Every majority is 2:1, so margins and winning votes tie; the tie-break order decides.
    ballots = [order("A", "B", "C"), order("B", "C", "A"), order("C", "A", "B")]
    default = ranked_pairs(ballots, ABC, rule="tied")  # pairs by winner's place in A, B, C: A>B, B>C, then C>A closes the cycle
    assert default.locked == [("A", "B"), ("B", "C")] and default.skipped == [("C", "A")]
    assert default.order == ["A", "B", "C"]
    flipped = ranked_pairs(ballots, ABC, tie_break=["C", "B", "A"], rule="tied")  # C>A, B>C locked; A>B closes the cycle
    assert flipped.locked == [("C", "A"), ("B", "C")] and flipped.order == ["B", "C", "A"]


def test_four_candidates_tennessee():
    # The textbook capital-of-Tennessee election (Memphis 42, Nashville 26, Chattanooga 15,
    # Knoxville 17, each voting by distance): ranked pairs elects Nashville, then C, K, M.
    ballots = (
        [order("M", "N", "C", "K")] * 42
        + [order("N", "C", "K", "M")] * 26
        + [order("C", "K", "N", "M")] * 15
        + [order("K", "C", "N", "M")] * 17
    )
    r = ranked_pairs(ballots, ["M", "N", "C", "K"], rule="tied")
    assert r.order == ["N", "C", "K", "M"]
    assert r.locked[0] == ("C", "K")  # largest margin, 83:17
    assert r.skipped == []


def test_four_candidates_with_ties_and_an_undecided_pair():
    # A beats everyone; B and C are tied in both ballots; D is last in both.
    ballots = [{"A": 1, "B": 2, "C": 2, "D": 4}, {"A": 1, "B": 2, "C": 2, "D": 4}]
    r = ranked_pairs(ballots, ["A", "B", "C", "D"], rule="tied")
    assert r.tiers == [["A"], ["B", "C"], ["D"]]


def test_no_ballots_ties_everyone():
    assert ranked_pairs([], ABC, rule="tied").tiers == [["A", "B", "C"]]


def test_tie_break_must_list_the_candidates():
    with pytest.raises(ValueError, match="tie_break"):
        ranked_pairs([order("A", "B")], ["A", "B"], tie_break=["A"])


# ---------------------------------------------------------------- Borda
def test_borda_k3_is_the_thesis_scale():
    p = borda_points([["C"], ["A"], ["B"]])
    assert p == pytest.approx({"C": 1.0, "A": 2 / 3, "B": 1 / 3})


def test_borda_ties_average_their_places_and_keep_the_total():
    p = borda_points([["A"], ["B", "C"], ["D"]])  # K=4: 1, (0.75+0.5)/2, same, 0.25
    assert p == pytest.approx({"A": 1.0, "B": 0.625, "C": 0.625, "D": 0.25})
    assert sum(p.values()) == pytest.approx((4 + 1) / 2)
    assert borda_points([["A", "B", "C"]]) == pytest.approx({"A": 2 / 3, "B": 2 / 3, "C": 2 / 3})


# ---------------------------------------------------------------- aggregation
def row(prompt, group, who, ranking):
    return {"prompt_id": prompt, "group": group, "annotator": who, "ranking": ranking}


def test_latest_row_per_prompt_group_annotator_counts():
    rows = [
        row("p", "g", "x", order("A", "B")),
        row("p", "g", "y", order("A", "B")),
        row("p", "g", "x", order("B", "A")),
    ]
    kept = latest_rows(rows)
    assert len(kept) == 2 and kept[0]["ranking"] == order("B", "A")


def test_aggregate_hand_worked():
    rows = [
        # group 1, p1: x and y agree A is best and disagree on B vs C -> [[A], [B, C]]: A 1, B = C 0.5
        row("p1", "1", "x", order("A", "B", "C")),
        row("p1", "1", "y", order("A", "C", "B")),
        # group 1, p2: one annotator, B > C > A: B 1, C 2/3, A 1/3
        row("p2", "1", "x", order("B", "C", "A")),
        # group 2, p1: z changed their mind; only the later row counts: C 1, A 2/3, B 1/3
        row("p1", "2", "z", order("A", "B", "C")),
        row("p1", "2", "z", order("C", "A", "B")),
    ]
    res = aggregate(rows, rule="tied")
    assert res.tideman == {"1/p1": ["A", "B", "C"], "1/p2": ["B", "C", "A"], "2/p1": ["C", "A", "B"]}
    assert res.tiers["1/p1"] == [["A"], ["B", "C"]]
    assert res.annotators == {"1/p1": 2, "1/p2": 1, "2/p1": 1}
    b = res.borda
    assert b["A"]["per_group"] == pytest.approx({"1": 2 / 3, "2": 2 / 3})
    assert b["B"]["per_group"] == pytest.approx({"1": 0.75, "2": 1 / 3})
    assert b["C"]["per_group"] == pytest.approx({"1": 7 / 12, "2": 1.0})
    assert b["A"]["mean"] == pytest.approx(2 / 3) and b["A"]["sd"] == pytest.approx(0.0)
    assert b["B"]["mean"] == pytest.approx(13 / 24)
    assert b["B"]["sd_sample"] == pytest.approx((0.75 - 1 / 3) / 2**0.5)  # sample sd of two values = |a - b| / sqrt 2
    assert b["B"]["sd"] == pytest.approx((0.75 - 1 / 3) / 2)  # population sd of two values = |a - b| / 2
    assert b["C"]["mean"] == pytest.approx(19 / 24) and b["C"]["sd_sample"] == pytest.approx((1 - 7 / 12) / 2**0.5)
    assert b["A"]["prompts"] == 3


def test_aggregate_single_group_has_no_sd_and_rejects_mixed_model_sets():
    assert aggregate([row("p", "g", "x", order("A", "B"))], rule="tied").borda["A"]["sd"] is None
    with pytest.raises(ValueError, match="different responses"):
        aggregate([row("p", "g", "x", order("A", "B")), row("p", "g", "y", order("A", "C"))], rule="tied")
    with pytest.raises(ValueError, match="annotator 'x'"):
        aggregate([row("p", "g", "x", {"A": 2, "B": 2})], rule="tied")
    with pytest.raises(ValueError, match="no rows"):
        aggregate([], rule="tied")


def test_simulated_annotators_recover_the_true_order():
    # 3 groups x 4 annotators x 15 prompts, each ranking by a noisy utility (ties when close):
    # the merged Borda means must come out in the utilities' order, every prompt's points sum
    # to (K + 1) / 2, and a perfectly undecided panel gives everyone the middle, (K + 1) / (2K).
    import random

    rng, util = random.Random(0), {"abs": 0.8, "crs": 0.5, "pref": 0.2}
    rows = []
    for g in "123":
        for a in range(4):
            for p in range(15):
                q = {m: round((u + rng.gauss(0, 0.35)) / 0.3) for m, u in util.items()}
                rows.append(row(str(p), g, f"a{a}", {m: 1 + sum(v > q[m] for v in q.values()) for m in q}))
    res = aggregate(rows, rule="tied")
    means = {m: b["mean"] for m, b in res.borda.items()}
    assert sorted(means, key=means.get, reverse=True) == ["abs", "crs", "pref"]
    assert all(sum(p.values()) == pytest.approx(2.0) for p in res.points.values())
    undecided = aggregate([row("p", "1", w, {"abs": 1, "crs": 1, "pref": 1}) for w in "xyz"], rule="tied")
    assert {m: b["mean"] for m, b in undecided.borda.items()} == pytest.approx(dict.fromkeys(util, 2 / 3))
