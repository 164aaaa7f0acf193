"""OASST loading, filters, builders on the shipped fixture (exact counts), both formats."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from trainer.data import (
    UnknownLabelError,
    build_absolute_rows,
    build_preference_sets,
    build_rl_prompts,
    build_sft_threads,
    filter_trees,
    fixture_path,
    load_oasst,
    split_by_tree,
    top_languages,
    with_targets,
)
from trainer.data.fixtures import make_fixture
from trainer.data.oasst import parse_labels

RM_LANGS = ["en", "es", "fr", "de"]


@pytest.fixture(scope="module")
def raw():
    return load_oasst(fixture_path("trees"))


@pytest.fixture(scope="module")
def trees(raw):
    return filter_trees(raw).trees


def test_both_formats_give_identical_trees(raw, tmp_path):
    assert load_oasst(fixture_path("messages")) == raw
    # The flat table as JSONL (labels as a list of {name, value, count}) is the same data too.
    import pyarrow.parquet as pq

    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in pq.read_table(fixture_path("messages")).to_pylist()))
    assert load_oasst(path) == raw


def test_a_datasets_folder_gives_the_same_trees(raw, tmp_path):
    # Users with network pass "OpenAssistant/oasst1"; offline, the same code path reads a
    # `save_to_disk` folder of the flat table (HF's own layout: labels as a struct of lists).
    import datasets

    ds = datasets.Dataset.from_parquet(str(fixture_path("messages")))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "oasst1"))
    assert load_oasst(tmp_path / "oasst1") == raw


def test_fixture_generator_is_deterministic_and_matches_shipped_files(tmp_path):
    make_fixture.write(tmp_path / "t.jsonl.gz", tmp_path / "m.parquet")
    assert (tmp_path / "t.jsonl.gz").read_bytes() == fixture_path("trees").read_bytes()
    assert load_oasst(tmp_path / "m.parquet") == load_oasst(fixture_path("messages"))


def test_label_encodings():
    as_dict = parse_labels({"quality": {"value": 0.5, "count": 3}})
    as_list = parse_labels([{"name": "quality", "value": 0.5, "count": 3}])
    as_struct = parse_labels({"name": ["quality"], "value": [0.5], "count": [3]})  # HF parquet
    assert as_dict == as_list == as_struct


def test_filters_report_what_they_removed(raw):
    assert len(raw) == 43
    f = filter_trees(raw)
    assert len(f.trees) == 39
    assert f.report.trees_removed == {"tree_state": 3, "deleted/synthetic/rejected root": 1}
    assert f.report.messages_removed["synthetic"] == 1
    assert f.report.messages_removed["review_result false"] == 3  # a reply; a follow-up with its reply
    assert "3 trees removed by tree_state" in f.report.describe()
    assert Counter(t.lang for t in f.trees) == {"en": 16, "es": 6, "fr": 6, "de": 6, "pt": 2, "ru": 2, "it": 1}
    assert len(filter_trees(raw, langs=RM_LANGS).trees) == 34
    assert "review_result false" not in filter_trees(raw, drop_rejected=False).report.messages_removed
    kept = {m.message_id for t in f.trees for m in t.root.walk()}
    assert not any(m.deleted or m.synthetic for t in f.trees for m in t.root.walk())
    assert any(m.deleted for t in raw for m in t.root.walk() if m.message_id not in kept)
    assert top_languages(f.trees, 3) == ["en", "de", "es"]  # de, es, fr tie at 6: by name


def test_sft_threads(trees):
    threads = build_sft_threads(trees, "greedy")  # one per tree; best_ranked: tests/test_thesis_data.py
    assert len(threads) == 39
    for t in threads:
        assert t[-1]["role"] == "assistant" and t[0]["role"] == "user"
        assert [m["role"] for m in t] == ["user", "assistant"] * (len(t) // 2)
    # Best-ranked path only: every assistant turn is a rank-0 ("Sure! ...") reply.
    assert all(m["content"].endswith(("helps!", "ayude!", "aide !", "hilft!", "ajude!", "поможет!", "utile!"))
               for t in threads for m in t if m["role"] == "assistant")
    # Trees whose follow-up has no reply (or was deleted) end after the first answer.
    assert Counter(len(t) for t in threads) == {4: 30, 2: 9}  # i % 5 == 4 (7 trees) + i == 10 + unranked tree


def test_preference_sets(trees):
    sets = build_preference_sets(trees)
    assert len(sets) == 57
    assert Counter(len(s.replies) for s in sets) == {3: 23, 2: 22, 4: 12}
    assert all(s.prompt[-1]["role"] == "user" for s in sets)
    assert all("lol" in s.replies[-1] and "lol" not in s.replies[0] for s in sets)
    assert len(build_preference_sets(filter_trees(load_oasst(fixture_path()), langs=RM_LANGS).trees)) == 50
    assert len(build_preference_sets(trees, max_replies=2)) == 57
    assert Counter(len(s.replies) for s in build_preference_sets(trees, min_replies=3)) == {3: 23, 4: 12}


def test_absolute_rows_and_weightings(trees):
    rows = build_absolute_rows(trees, "labelled", required=None)  # every labelled reply (the thesis's rows: test_thesis_data)
    assert len(rows) == 165
    q = with_targets(rows)  # quality (default)
    assert (len(q.rows), q.dropped) == (165, 0)
    assert Counter("low" if r.target <= 0.4 else "high" if r.target >= 0.9 else "mid" for r in q.rows) == {
        "low": 65, "high": 64, "mid": 36}
    w2 = with_targets(rows, "w2")
    assert (len(w2.rows), w2.dropped) == (129, 36)
    assert w2.missing == {"violence": 23, "humor": 23, "helpfulness": 15}
    w3 = with_targets(rows, "w3")  # humor/violence have weight 0 in w3: not needed
    assert (len(w3.rows), w3.dropped) == (150, 15)
    r = next(r for r in w2.rows)
    expected = sum(w * r.labels[k] for k, w in {"violence": -0.05, "creativity": 0.15, "helpfulness": 0.25,
                                                 "humor": 0.05, "toxicity": -0.1, "quality": 0.4}.items())
    assert r.target == pytest.approx(expected)
    custom = with_targets(rows, {"quality": 0.5, "helpfulness": 0.5})
    assert (len(custom.rows), custom.dropped) == (150, 15)
    with pytest.raises(UnknownLabelError, match="qualty"):
        with_targets(rows, {"qualty": 1.0})
    with pytest.raises(UnknownLabelError, match="w9"):
        with_targets(rows, "w9")


def test_rl_prompts(trees, tiny_models):
    prompts = build_rl_prompts(trees)
    assert len(prompts) == 77
    assert all(p[-1]["role"] == "user" for p in prompts)
    assert len({json.dumps(p) for p in prompts}) == 77  # varied: no duplicate prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert len(build_rl_prompts(trees, tok, max_prompt_tokens=1024)) == 77
    short = build_rl_prompts(trees, tok, max_prompt_tokens=40)
    assert 0 < len(short) < 77


def test_split_by_tree(trees):
    a = split_by_tree(trees, 0.2, seed=1)
    ids_train, ids_eval = {t.tree_id for t in a.train}, {t.tree_id for t in a.eval}
    assert not ids_train & ids_eval and len(ids_train | ids_eval) == 39
    assert len(a.eval) == round(0.2 * 39)
    assert [t.tree_id for t in split_by_tree(trees, 0.2, seed=1).eval] == [t.tree_id for t in a.eval]
    assert {t.tree_id for t in split_by_tree(trees, 0.2, seed=2).eval} != ids_eval
    # A tree's prompts never straddle the split.
    assert not {s.tree_id for s in build_preference_sets(a.train)} & {s.tree_id for s in build_preference_sets(a.eval)}
    assert split_by_tree(trees, 0.0).eval == []
