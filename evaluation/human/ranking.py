"""Human rankings: validation, Tideman's ranked pairs, normalised Borda points. Pure functions.

A *ranking* maps each of the K candidates to a rank in 1..K, smaller is better, ties allowed.
Two spellings of ties are valid, because annotators drop responses into K numbered slots and
both come out naturally: *dense* ranks (the ranks used are exactly 1..m, e.g. A=1, C=1, B=2)
and *competition* ranks (a rank is 1 + the number of strictly better candidates, e.g. A=1,
C=1, B=3). Anything else (A=2, B=2, C=3: nobody is first) is rejected. Only the order a
ranking expresses is used downstream, so the two spellings of the same order are equivalent.

Ranked pairs (Tideman 1987), per prompt over the annotators' rankings:
  1. n[x][y] = number of rankings that put x strictly before y (a tie is no preference).
  2. A majority is an ordered pair with n[x][y] > n[y][x]; its margin is n[x][y] - n[y][x].
  3. Zero-margin pairs (n[x][y] == n[y][x], e.g. a 2-2 split of 4 annotators) depend on `rule`:
     - ``thesis`` (default): the rule of Open Assistant's ranking code, which the thesis used:
       such a pair is a candidate for locking too, in the direction the tie-break order puts
       first; majorities are sorted by margin alone (largest first), equal margins in
       tie-break order (winner, then loser). Every pair ends up decided: the merged order is
       always strict.
     - ``tied``: such a pair is never locked, so the two may stay tied; equal margins are
       sorted by the winner's votes n[x][y] (largest first), then in tie-break order.
     The tie-break order is `tie_break` (default: candidate names sorted).
  4. Each pair is locked in unless it would close a cycle with the pairs already locked.
  5. The locked graph is acyclic; its *tiers* are peeled off source by source: tier 1 is
     every candidate no locked pair beats, tier 2 the sources of what is left, and so on.
     Candidates in one tier are tied in the merged order (only possible with ``tied``).

Normalised Borda: rank r of K gets (K - r + 1) / K, so 1, 0.67, 0.33 for K = 3. Candidates
tied in one tier share the positions the tier covers and each gets the average of their
points (tiers [[A, C], [B]] of K = 3: A and C get (1 + 2/3) / 2 = 0.833, B 0.333), which keeps
the points of a prompt summing to (K + 1) / 2 whatever the ties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Ranking = Mapping[str, int]


class RankingError(ValueError):
    """A ranking that does not rank exactly the expected candidates with valid ranks."""


def validate_ranking(ranking: Mapping[str, object], candidates: Sequence[str]) -> dict[str, int]:
    """Return `ranking` as {candidate: int rank} or raise RankingError saying what is wrong.

    >>> validate_ranking({"A": 1, "B": 3, "C": 1}, ["A", "B", "C"])   # competition ranks
    {'A': 1, 'B': 3, 'C': 1}
    """
    k = len(candidates)
    expected, given = set(candidates), set(ranking)
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        parts = [f"missing {', '.join(missing)}" if missing else "", f"unknown {', '.join(extra)}" if extra else ""]
        raise RankingError(
            f"a ranking must rank exactly the {k} responses ({', '.join(candidates)}): "
            + "; ".join(p for p in parts if p)
        )
    out: dict[str, int] = {}
    for name in candidates:
        rank = ranking[name]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
            raise RankingError(f"rank of {name} must be a whole number from 1 to {k}, got {rank!r}")
        out[name] = rank
    if not (_is_dense(out) or _is_competition(out)):
        shown = ", ".join(f"{n}={r}" for n, r in out.items())
        raise RankingError(
            f"ranks {shown} leave a gap: the best response(s) take rank 1, and the next rank is either the next "
            f"number (dense: 1,1,2) or skips the tied places (competition: 1,1,3)"
        )
    return out


def _is_dense(ranking: Mapping[str, int]) -> bool:
    return sorted(set(ranking.values())) == list(range(1, len(set(ranking.values())) + 1))


def _is_competition(ranking: Mapping[str, int]) -> bool:
    values = list(ranking.values())
    return all(r == 1 + sum(v < r for v in values) for r in values)


def pairwise_counts(rankings: Sequence[Ranking], candidates: Sequence[str]) -> dict[str, dict[str, int]]:
    """n[x][y] = how many rankings put x strictly before y; ties count for neither."""
    n = {x: {y: 0 for y in candidates if y != x} for x in candidates}
    for ranking in rankings:
        for x in candidates:
            for y in candidates:
                if x != y and ranking[x] < ranking[y]:
                    n[x][y] += 1
    return n


@dataclass(frozen=True)
class TidemanResult:
    """The merged order of one prompt.

    tiers:  [[best...], [next...], ...]; candidates in one tier are tied.
    order:  the tiers flattened, ties inside a tier listed in tie-break order.
    locked: the locked pairs (winner, loser) in the order they were locked.
    skipped: majorities dropped because they would have closed a cycle.
    """

    tiers: list[list[str]]
    order: list[str]
    locked: list[tuple[str, str]]
    skipped: list[tuple[str, str]]


RULES = ("thesis", "tied")


def ranked_pairs(
    rankings: Sequence[Ranking], candidates: Sequence[str], tie_break: Sequence[str] | None = None,
    rule: str = "thesis",
) -> TidemanResult:
    """Tideman's ranked pairs over `rankings` (each {candidate: rank}); see the module docstring."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not candidates:
        raise ValueError("ranked_pairs needs at least one candidate")
    tb = list(tie_break) if tie_break is not None else sorted(candidates)
    if sorted(tb) != sorted(candidates):
        raise ValueError(f"tie_break {tb} must list exactly the candidates {sorted(candidates)}")
    pos = {c: i for i, c in enumerate(tb)}
    n = pairwise_counts(rankings, candidates)

    if rule == "thesis":  # zero margins too, the tie-break order's direction first; margin alone sorts
        majorities = [(x, y) for x in candidates for y in candidates if x != y and n[x][y] >= n[y][x]]
        majorities.sort(key=lambda p: (-(n[p[0]][p[1]] - n[p[1]][p[0]]), pos[p[0]], pos[p[1]]))
    else:
        majorities = [(x, y) for x in candidates for y in candidates if x != y and n[x][y] > n[y][x]]
        majorities.sort(key=lambda p: (-(n[p[0]][p[1]] - n[p[1]][p[0]]), -n[p[0]][p[1]], pos[p[0]], pos[p[1]]))

    beats: dict[str, set[str]] = {c: set() for c in candidates}  # locked edges winner -> losers
    locked, skipped = [], []
    for x, y in majorities:
        if _reaches(beats, y, x):  # y already (transitively) beats x: x > y would close a cycle
            skipped.append((x, y))
        else:
            beats[x].add(y)
            locked.append((x, y))

    tiers, left = [], set(candidates)
    while left:
        beaten = {y for x in left for y in beats[x] if y in left}
        tier = sorted(left - beaten, key=pos.__getitem__)
        tiers.append(tier)
        left -= set(tier)
    return TidemanResult(tiers=tiers, order=[c for t in tiers for c in t], locked=locked, skipped=skipped)


def _reaches(beats: Mapping[str, set[str]], start: str, goal: str) -> bool:
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for nxt in beats[node] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return False


def borda_points(tiers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Normalised Borda points of a (possibly tied) order: rank r of K -> (K - r + 1) / K,
    tied candidates averaging the points of the positions their tier covers.

    >>> borda_points([["A"], ["B"], ["C"]])
    {'A': 1.0, 'B': 0.6666666666666666, 'C': 0.3333333333333333}
    """
    k = sum(len(t) for t in tiers)
    points, first = {}, 1
    for tier in tiers:
        positions = range(first, first + len(tier))
        share = sum((k - r + 1) / k for r in positions) / len(tier)
        points.update({c: share for c in tier})
        first += len(tier)
    return points


def latest_rows(rows: Sequence[Mapping]) -> list[Mapping]:
    """The row that counts for each (prompt_id, group, annotator): the last one in file order.

    Changing an answer appends a new row instead of rewriting the file, so the file is a full,
    append-only history and a crash can never lose an earlier answer.
    """
    last: dict[tuple[str, str, str], Mapping] = {}
    for row in rows:
        last[(row["prompt_id"], row["group"], row["annotator"])] = row
    return list(last.values())


@dataclass(frozen=True)
class HumanEvalResult:
    """What `crs-rlhf eval rank` writes.

    tideman: {"<group>/<prompt_id>": merged order}; tiers: the same with ties as nested lists.
    points:  {"<group>/<prompt_id>": {model: Borda points}}.
    borda:   {model: {"mean", "sd", "sd_sample", "per_group": {group: mean over its prompts}, "prompts"}};
             "sd" is the population sd (divisor n) over groups, as the thesis's 0.06 / 0.058 /
             0.029 over its three groups; "sd_sample" the sample sd (n - 1), None with one group.
    """

    tideman: dict[str, list[str]]
    tiers: dict[str, list[list[str]]]
    points: dict[str, dict[str, float]]
    borda: dict[str, dict]
    groups: list[str]
    annotators: dict[str, int]  # "<group>/<prompt_id>" -> number of rankings merged

    def to_json(self) -> dict:
        return {
            "tideman": self.tideman,
            "tiers": self.tiers,
            "borda": self.borda,
            "points": self.points,
            "groups": self.groups,
            "annotators": self.annotators,
        }


def group_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """(population sd, sample sd or None for one value) of the per-group means.
    Example (Table 17, abs_rlhf): 0.73, 0.87, 0.78 -> (0.0579, 0.0709)."""
    mean = sum(values) / len(values)
    ss = sum((v - mean) ** 2 for v in values)
    return (ss / len(values)) ** 0.5, (ss / (len(values) - 1)) ** 0.5 if len(values) > 1 else None


def aggregate(rows: Sequence[Mapping], tie_break: Sequence[str] | None = None, rule: str = "thesis") -> HumanEvalResult:
    """Latest row per annotator -> Tideman per (group, prompt) -> Borda -> mean over prompts per
    group -> mean +- sd over groups. Rows are {"prompt_id", "group", "annotator", "ranking"}."""
    by_item: dict[tuple[str, str], list[Mapping]] = {}
    for row in latest_rows(rows):
        by_item.setdefault((row["group"], row["prompt_id"]), []).append(row)
    if not by_item:
        raise ValueError("no annotations to rank: the file has no rows")

    tideman, tiers, points, counts = {}, {}, {}, {}
    per_group: dict[str, dict[str, list[float]]] = {}
    for (group, prompt_id), item_rows in sorted(by_item.items()):
        key = f"{group}/{prompt_id}"
        candidates = sorted(item_rows[0]["ranking"])
        rankings = []
        for row in item_rows:
            if sorted(row["ranking"]) != candidates:
                raise ValueError(
                    f"{key}: annotators ranked different responses ({candidates} vs {sorted(row['ranking'])}, "
                    f"annotator {row['annotator']!r}); keep one set of models per prompt"
                )
            try:
                rankings.append(validate_ranking(row["ranking"], candidates))
            except RankingError as e:
                raise ValueError(f"{key}, annotator {row['annotator']!r}: {e}") from None
        tb = [c for c in tie_break if c in candidates] if tie_break else None
        result = ranked_pairs(rankings, candidates, tb if tb and len(tb) == len(candidates) else None, rule)
        tideman[key], tiers[key], counts[key] = result.order, result.tiers, len(rankings)
        points[key] = borda_points(result.tiers)
        for model, p in points[key].items():
            per_group.setdefault(group, {}).setdefault(model, []).append(p)

    groups = sorted(per_group)
    models = sorted({m for g in per_group.values() for m in g})
    borda = {}
    for model in models:
        means = {g: sum(v) / len(v) for g in groups if (v := per_group[g].get(model))}
        vals = list(means.values())
        mean = sum(vals) / len(vals)
        sd, sd_sample = group_sd(vals)
        prompts = sum(len(per_group[g].get(model, [])) for g in groups)
        borda[model] = {"mean": mean, "sd": sd if len(vals) > 1 else None, "sd_sample": sd_sample,
                        "per_group": means, "prompts": prompts}
    return HumanEvalResult(tideman, tiers, points, borda, groups, counts)
