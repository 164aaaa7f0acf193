"""Open Assistant (OASST) data: loading, filters, builders and the shipped fixture.

Public API (everything returns plain dataclasses or OpenAI-style message lists
``[{"role": "user"|"assistant", "content": str}]``; text formatting is left to
`services.common.chat`):

- ``load_oasst(path_or_name) -> list[MessageTree]`` — trees JSONL export (``.jsonl[.gz]``),
  flat message table (``.parquet`` / ``.jsonl[.gz]``, trees rebuilt from ``parent_id``), or a
  Hugging Face `datasets` name / ``save_to_disk`` folder (network users only).
- ``filter_trees(trees, tree_states=("ready_for_export",), drop_deleted=True, drop_synthetic=True,
  drop_rejected=True, langs=None) -> Filtered(trees, report)``; ``report.describe()`` says what each
  filter removed (``drop_rejected``: messages whose ``review_result`` is false).
- ``top_languages(trees, n)``, ``split_by_tree(trees, eval_fraction, seed) -> TreeSplit(train, eval)``.
- ``build_sft_threads(trees, mode="best_ranked"|"greedy") -> list[conversation]`` — every thread
  along best-ranked (or unranked) replies, Open Assistant's definition; ``greedy``: one per tree.
- ``build_preference_sets(trees, min_replies=2, max_replies=4) -> list[PreferenceSet]`` —
  ``prompt`` (ends with a user turn) and ``replies`` best first.
- ``build_absolute_rows(trees, source="ranked"|"labelled", required=SIX_LABELS) -> list[AbsoluteRow]``
  — ``(prompt, reply, labels)``: the ranked sets' replies with all six labels (the thesis);
  ``with_targets(rows, weighting="quality"|"w2"|"w3"|{label: weight}) -> LabelledRows`` sets
  ``target`` and counts rows dropped for a missing label.
- ``build_rl_prompts(trees, tokenizer=None, max_prompt_tokens=1024) -> list[conversation]``
  (each ends with a user message; over-long prompts are dropped when a tokenizer is given);
  ``build_rl_prompt_split(raw_trees, RLPromptOptions(langs, held_out_fraction, fraction,
  incomplete_trees, ...), tokenizer) -> RLPromptSplit(train, held_out, ...)`` — the thesis's RL prompts.
- ``fixture_path(fmt="trees"|"messages") -> Path`` — the shipped fixture (both files hold the
  same trees; regenerate with ``python -m trainer.data.fixtures.make_fixture``).
"""

from __future__ import annotations

from pathlib import Path

from trainer.data.builders import (
    AbsoluteRow,
    LabelledRows,
    PreferenceSet,
    build_absolute_rows,
    build_preference_sets,
    build_rl_prompts,
    build_sft_threads,
    with_targets,
)
from trainer.data.filters import Filtered, FilterReport, TreeSplit, filter_trees, split_by_tree, top_languages
from trainer.data.labels import KNOWN_LABELS, SIX_LABELS, WEIGHTINGS, UnknownLabelError, resolve_weighting
from trainer.data.oasst import Label, Message, MessageTree, OasstFormatError, load_oasst
from trainer.data.rl import RM_LANGS, RLPromptOptions, RLPromptSplit, build_rl_prompt_split

_FIXTURES = Path(__file__).resolve().parent / "fixtures"
_FIXTURE_FILES = {"trees": "oasst_trees.jsonl.gz", "messages": "oasst_messages.parquet"}


def fixture_path(fmt: str = "trees") -> Path:
    """Path of the shipped fixture: ``trees`` (JSONL.gz export) or ``messages`` (flat parquet)."""
    if fmt not in _FIXTURE_FILES:
        raise ValueError(f"fixture format must be one of {sorted(_FIXTURE_FILES)}, got {fmt!r}")
    return _FIXTURES / _FIXTURE_FILES[fmt]


__all__ = [
    "KNOWN_LABELS",
    "RM_LANGS",
    "SIX_LABELS",
    "WEIGHTINGS",
    "AbsoluteRow",
    "FilterReport",
    "Filtered",
    "Label",
    "LabelledRows",
    "Message",
    "MessageTree",
    "OasstFormatError",
    "PreferenceSet",
    "RLPromptOptions",
    "RLPromptSplit",
    "TreeSplit",
    "UnknownLabelError",
    "build_absolute_rows",
    "build_preference_sets",
    "build_rl_prompt_split",
    "build_rl_prompts",
    "build_sft_threads",
    "filter_trees",
    "fixture_path",
    "load_oasst",
    "resolve_weighting",
    "split_by_tree",
    "top_languages",
    "with_targets",
]
