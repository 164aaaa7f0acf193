"""Prompt loaders on the shipped fixtures, stratified disjoint splits, and clear bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation import cli
from evaluation.io import EvalInputError
from evaluation.prompts import (
    Prompt,
    detect_format,
    load_prompt_file,
    load_source,
    parse_hh_dialogue,
    sample_splits,
)

FIX = Path(__file__).resolve().parents[1] / "evaluation" / "fixtures"


@pytest.mark.parametrize("name, fmt, n", [
    ("vicuna_question.jsonl", "fastchat", 6), ("alpaca_eval.json", "alpaca", 6), ("koala_test.jsonl", "plain", 6),
    ("hh_helpful.jsonl", "hh", 6), ("plain.jsonl", "plain", 4),
])
def test_each_loader_on_its_fixture(name, fmt, n):
    assert detect_format(FIX / name) == fmt
    prompts = load_source("src", FIX / name)
    assert len(prompts) == n and len({p.id for p in prompts}) == n
    for p in prompts:
        assert p.source == "src" and p.id.startswith("src/")
        assert p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip()


def test_fastchat_keeps_category_and_first_turn():
    p = {x.id: x for x in load_source("vicuna", FIX / "vicuna_question.jsonl")}
    assert p["vicuna/5"].category == "coding"
    assert p["vicuna/5"].messages == [{"role": "user", "content": "Write a Python function that reverses the words in a sentence."}]


def test_alpaca_dataset_becomes_category():
    p = load_source("alpaca", FIX / "alpaca_eval.json")
    assert p[0].category == "helpful_base" and p[0].messages[0]["content"].startswith("List three ways")


def test_hh_dialogue_up_to_the_last_human_turn():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    assert parse_hh_dialogue(text) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}]
    multi = load_source("hh", FIX / "hh_helpful.jsonl")[1]
    assert [m["role"] for m in multi.messages] == ["user", "assistant", "user"]
    assert multi.messages[-1]["content"] == "Mostly maps and music. What can I do?"


def test_plain_messages_and_system_turns():
    p = {x.id: x for x in load_source("plain", FIX / "plain.jsonl")}
    assert p["plain/plain_2"].messages[0] == {"role": "system", "content": "You answer briefly."}
    assert p["plain/plain_3"].category == "health"


def test_oasst_prompts_come_from_eval_trees_only():
    from trainer.data import fixture_path, load_oasst
    from trainer.data.splits import held_out_split

    trees = load_oasst(fixture_path())
    held = held_out_split(fixture_path(), trees)  # the shipped split file: what every trainer leaves out
    prompts = load_source("oasst", "fixture")
    assert prompts and all(p.id.split("/")[1] in held.tree_ids for p in prompts)
    roots = {t.tree_id: t for t in held.held_out(trees)}
    for p in prompts:  # single-turn: the held-out tree's root message, in the thesis's languages
        tree = roots[p.id.split("/")[1]]
        assert p.messages == [{"role": "user", "content": tree.root.text}] and tree.lang in ("en", "es", "fr", "de")
    assert len({json.dumps(p.messages) for p in prompts}) == len(prompts)


def _fake(source, n):
    return [Prompt(f"{source}/{i}", source, [{"role": "user", "content": f"{source} {i}"}]) for i in range(n)]


def test_splits_are_stratified_disjoint_and_seeded():
    sources = {"a": _fake("a", 10), "b": _fake("b", 10), "c": _fake("c", 10), "d": _fake("d", 10)}
    got = sample_splits(sources, [("final", 8), ("tuning", 4), ("human", 4)], seed=3)
    assert len(got) == 16 and len({p.id for p in got}) == 16
    final = [p for p in got if p.split == "final"]
    assert sorted(p.source for p in final) == ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert [p.id for p in sample_splits(sources, [("final", 8), ("tuning", 4), ("human", 4)], seed=3)] == \
        [p.id for p in got]
    assert [p.id for p in sample_splits(sources, [("final", 8)], seed=4)] != [p.id for p in final]


def test_splits_fall_back_when_a_source_runs_out_and_respect_the_cap():
    got = sample_splits({"a": _fake("a", 3), "b": _fake("b", 1)}, [("x", 2), ("y", 2)], seed=0)
    assert [(p.split, p.source) for p in got] == [("x", "a"), ("x", "b"), ("y", "a"), ("y", "a")]
    with pytest.raises(EvalInputError, match="ask for 3 prompts but the sources hold 2"):
        sample_splits({"a": _fake("a", 5), "b": _fake("b", 5)}, [("x", 3)], seed=0, per_source=1)


def test_malformed_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"id": "1", "messages": [{"role": "user", "content": "hi"}]}\n{"id": "2", "messages": [\n')
    with pytest.raises(EvalInputError, match=r"prompts\.jsonl:2: not valid JSON"):
        load_prompt_file(bad)
    bad.write_text('{"id": "1", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(EvalInputError, match=r"prompts\.jsonl:1: the last message must be a non-empty user turn"):
        load_prompt_file(bad)
    q = tmp_path / "question.jsonl"
    q.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(EvalInputError, match=r"question\.jsonl:2: FastChat questions need 'turns'"):
        load_source("v", q, "fastchat")


def test_prompts_command_writes_splits_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    rc = cli.main(["prompts", "--source", f"vicuna={FIX / 'vicuna_question.jsonl'}", "--source", "oasst=fixture",
                   "--source", f"hh={FIX / 'hh_helpful.jsonl'}", "--split", "final=6", "--split", "tuning=3",
                   "--seed", "1", "--out", str(out)])
    assert rc == 0
    rows = load_prompt_file(out)
    assert len(rows) == 9 and {p.split for p in rows} == {"final", "tuning"}
    assert len(load_prompt_file(tmp_path / "p.final.jsonl")) == 6
    assert cli.main(["prompts", "--source", f"x={tmp_path / 'missing.jsonl'}", "--out", str(out)]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
