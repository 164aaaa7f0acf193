"""Human-ranked pairs from the held-out Open Assistant trees, in RewardBench's format.

The thesis's Table 14 is each reward model's agreement with the OASST annotators' rankings on
the evaluation trees. `held_out_pairs` turns every ranked set at the root of a held-out tree
(ready, en/es/fr/de: the evaluation prompts' trees; single-turn, as the eval prompts) into
its C(K, 2) pairs, `chosen` the better-ranked reply; `crs-rlhf eval rm-bench` on the file
then gives the agreement (its accuracy) per language subset and overall.

    crs-rlhf eval oasst-pairs --data EXPORT --out oasst_pairs.jsonl
    crs-rlhf eval rm-bench --pairs oasst_pairs.jsonl --url http://127.0.0.1:8002
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

from evaluation.io import EvalInputError
from evaluation.prompts import held_out_eval_trees


def held_out_pairs(data: str | Path, split_file: str | None = None) -> list[dict]:
    """RewardBench-format rows {id, subset: 'oasst-<lang>', prompt, chosen, rejected}."""
    rows = []
    for tree in held_out_eval_trees(data, split_file):
        ranked = sorted((m for m in tree.root.replies if m.role == "assistant" and m.rank is not None),
                        key=lambda m: m.rank)
        for better, worse in combinations(ranked, 2):
            if better.rank == worse.rank:
                continue  # no human preference between them
            rows.append({"id": f"{tree.tree_id}/{better.message_id}>{worse.message_id}", "subset": f"oasst-{tree.lang}",
                         "prompt": tree.root.text, "chosen": better.text, "rejected": worse.text})
    if not rows:
        raise EvalInputError(f"{data}: no ranked replies in the held-out trees")
    return rows
