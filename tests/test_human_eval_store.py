"""annotations.jsonl, CSV and Argilla conversions, prompt selection, and `eval rank` end to end."""

from __future__ import annotations

import json

import pytest

from evaluation.human import annotate, rank
from evaluation.human.store import AnnotationRow, AnnotationStore, import_argilla, read_csv, read_jsonl, write_csv
from evaluation.human.tasks import load_prompts, prompt_sequence, response_order


def write_outputs(d, models, ids, prompts_split=None):
    (d / "outputs").mkdir(parents=True, exist_ok=True)
    for m in models:
        rows = [
            {"id": i, "instruction": f"question {i}", "output": f"{m} answers {i}", "generator": m, "dataset": "t"}
            for i in ids
        ]
        (d / "outputs" / f"{m}.json").write_text(json.dumps(rows))
    if prompts_split:
        (d / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "split": s}) + "\n" for i, s in prompts_split))


# ---------------------------------------------------------------- store
def test_store_appends_and_survives_a_reopen(tmp_path):
    path = tmp_path / "annotations.jsonl"
    store = AnnotationStore(path)
    store.append(AnnotationRow(prompt_id=3, group="1", annotator="ann", ranking={"a": 1, "b": 2}, order=["b", "a"]))
    store.append(AnnotationRow(prompt_id="3", group="1", annotator="ann", ranking={"a": 2, "b": 1}))
    again = AnnotationStore(path)
    assert [r.ranking for r in again.rows] == [{"a": 1, "b": 2}, {"a": 2, "b": 1}]
    assert again.latest_for("ann", "1")["3"].ranking == {"a": 2, "b": 1}  # int id 3 and "3" are one prompt
    assert again.latest_for("ann", "2") == {}


def test_torn_last_line_is_dropped_and_the_file_repaired(tmp_path):
    path = tmp_path / "annotations.jsonl"
    good = AnnotationRow(prompt_id="p", group="1", annotator="a", ranking={"x": 1, "y": 2}).model_dump_json()
    path.write_text(good + "\n" + good[:25])  # a crash in the middle of the second write
    assert len(read_jsonl(path)) == 1
    store = AnnotationStore(path)
    store.append(AnnotationRow(prompt_id="q", group="1", annotator="a", ranking={"x": 2, "y": 1}))
    assert [r.prompt_id for r in read_jsonl(path)] == ["p", "q"]


def test_a_bad_line_in_the_middle_is_an_error_with_its_line_number(tmp_path):
    path = tmp_path / "annotations.jsonl"
    good = AnnotationRow(prompt_id="p", group="1", annotator="a", ranking={"x": 1}).model_dump_json()
    path.write_text(good + "\n" + '{"prompt_id": "p"}\n' + good + "\n")
    with pytest.raises(ValueError, match="annotations.jsonl:2"):
        read_jsonl(path)


def test_csv_round_trip(tmp_path):
    rows = [
        AnnotationRow(
            prompt_id="p1",
            group="1",
            annotator="ann",
            ranking={"abs": 1, "crs": 3, "pref": 1},
            order=["crs", "abs", "pref"],
        ),
        AnnotationRow(prompt_id="p2", group="2", annotator="bo, b", ranking={"abs": 2, "crs": 1, "pref": 2}, order=[]),
    ]
    write_csv(rows, tmp_path / "a.csv")
    header = (tmp_path / "a.csv").read_text().splitlines()[0]
    assert header == "prompt_id,group,annotator,time,source,order,rank:abs,rank:crs,rank:pref"
    back = read_csv(tmp_path / "a.csv")
    assert [r.model_dump() for r in back] == [r.model_dump() for r in rows]


def test_csv_without_rank_columns_says_what_it_needs(tmp_path):
    (tmp_path / "x.csv").write_text("prompt_id,group,annotator\np,1,a\n")
    with pytest.raises(ValueError, match="rank:<model>"):
        read_csv(tmp_path / "x.csv")


def test_argilla_import_v1_v2_and_hf_shapes(tmp_path):
    v1 = [
        {
            "fields": {"prompt": "q"},
            "metadata": {"prompt_id": "p1", "team": "g2"},
            "responses": [
                {
                    "user_id": "u1",
                    "status": "submitted",
                    "values": {
                        "rank": {
                            "value": [
                                {"value": "r-1", "rank": 1},
                                {"value": "r-2", "rank": 1},
                                {"value": "r-3", "rank": 2},
                            ]
                        }
                    },
                },
                {"user_id": "u2", "status": "discarded", "values": {"rank": {"value": [{"value": "r-1", "rank": 1}]}}},
            ],
        }
    ]
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    rows = import_argilla(
        tmp_path / "v1.json",
        question="rank",
        prompt_id_field="prompt_id",
        group_field="team",
        option_map={"r-1": "abs", "r-2": "crs", "r-3": "pref"},
    )
    assert [(r.prompt_id, r.group, r.annotator, r.ranking, r.source) for r in rows] == [
        ("p1", "g2", "u1", {"abs": 1, "crs": 1, "pref": 2}, "argilla")
    ]

    v2 = {
        "id": "p2",
        "responses": {"rank": [{"user_id": "u3", "status": "submitted", "value": ["pref", "abs", "crs"]}]},
    }
    hf = {
        "id": "p3",
        "rank": [
            {"user_id": "u4", "status": "submitted", "value": {"value": ["abs", "crs", "pref"], "rank": [2, 1, 3]}}
        ],
    }
    (tmp_path / "v2.jsonl").write_text(json.dumps(v2) + "\n" + json.dumps(hf) + "\n")
    rows = import_argilla(tmp_path / "v2.jsonl", question="rank")
    assert [(r.prompt_id, r.group, r.ranking) for r in rows] == [
        ("p2", "argilla", {"pref": 1, "abs": 2, "crs": 3}),
        ("p3", "argilla", {"abs": 2, "crs": 1, "pref": 3}),
    ]
    with pytest.raises(ValueError, match="no submitted responses"):
        import_argilla(tmp_path / "v2.jsonl", question="other")


def test_annotate_export_and_import_commands(tmp_path, capsys):
    store = AnnotationStore(tmp_path / "annotations.jsonl")
    store.append(AnnotationRow(prompt_id="p", group="1", annotator="a", ranking={"x": 1, "y": 2}))
    assert annotate.main(["export", "--dir", str(tmp_path), "--out", str(tmp_path / "a.csv")]) == 0
    other = tmp_path / "other"
    assert annotate.main(["import", "--dir", str(other), str(tmp_path / "a.csv"), "--models", "x,y"]) == 0
    assert [r.ranking for r in read_jsonl(other / "annotations.jsonl")] == [{"x": 1, "y": 2}]
    (tmp_path / "bad.csv").write_text("prompt_id,group,annotator,rank:x,rank:y\np,1,a,2,2\n")
    assert annotate.main(["import", "--dir", str(other), str(tmp_path / "bad.csv")]) == 2
    assert "gap" in capsys.readouterr().err
    assert len(read_jsonl(other / "annotations.jsonl")) == 1  # nothing appended from a bad file


# ---------------------------------------------------------------- prompts and orders
def test_prompts_from_the_human_split(tmp_path):
    write_outputs(tmp_path, ["a", "b"], [1, 2, 3, 4], prompts_split=[(1, "judge"), (3, "human"), (2, "human")])
    prompts = load_prompts(tmp_path, ["a", "b"], "human")
    assert [p.id for p in prompts] == ["3", "2"]
    assert prompts[0].instruction == "question 3" and prompts[0].outputs == {"a": "a answers 3", "b": "b answers 3"}
    with pytest.raises(ValueError, match="splits in the file: human, judge"):
        load_prompts(tmp_path, ["a", "b"], "test")
    assert len(load_prompts(tmp_path, ["a", "b"], "all")) == 4


def test_prompts_without_prompts_jsonl_are_the_shared_ids(tmp_path):
    write_outputs(tmp_path, ["a"], [1, 2, 3])
    write_outputs(tmp_path, ["b"], [2, 3, 4])
    assert [p.id for p in load_prompts(tmp_path, ["a", "b"])] == ["2", "3"]
    with pytest.raises(FileNotFoundError, match="outputs/c.json"):
        load_prompts(tmp_path, ["a", "c"])
    with pytest.raises(ValueError, match="two distinct"):
        load_prompts(tmp_path, ["a"])


def test_split_prompt_missing_an_output_is_an_error(tmp_path):
    write_outputs(tmp_path, ["a", "b"], [1], prompts_split=[(1, "human"), (9, "human")])
    with pytest.raises(ValueError, match="no output for 1 prompt"):
        load_prompts(tmp_path, ["a", "b"])


def test_orders_are_seeded_per_annotator():
    ids = [str(i) for i in range(20)]
    assert prompt_sequence(0, "1", "ann", ids) == prompt_sequence(0, "1", "ann", ids)
    assert prompt_sequence(0, "1", "ann", ids) != prompt_sequence(0, "1", "bob", ids)
    assert prompt_sequence(0, "1", "ann", ids) != prompt_sequence(1, "1", "ann", ids)
    assert sorted(prompt_sequence(0, "1", "ann", ids)) == sorted(ids)
    orders = {tuple(response_order(0, "1", "ann", p, ["a", "b", "c"])) for p in ids}
    assert len(orders) > 1  # the response order changes from prompt to prompt


# ---------------------------------------------------------------- eval rank
def test_rank_command_writes_rankings_report_and_chart(tmp_path, capsys):
    store = AnnotationStore(tmp_path / "annotations.jsonl")
    for group, who, ranking in [
        ("1", "x", {"abs": 1, "crs": 2, "pref": 3}),
        ("1", "y", {"abs": 1, "crs": 1, "pref": 3}),
        ("2", "z", {"abs": 2, "crs": 1, "pref": 3}),
    ]:
        store.append(AnnotationRow(prompt_id="p1", group=group, annotator=who, ranking=ranking))
    out = tmp_path / "report"
    assert rank.main(["--annotations", str(tmp_path / "annotations.jsonl"), "--out", str(out)]) == 0
    got = json.loads((out / "rankings.json").read_text())
    assert got["tideman"] == {"1/p1": ["abs", "crs", "pref"], "2/p1": ["crs", "abs", "pref"]}
    assert got["borda"]["abs"]["per_group"] == pytest.approx({"1": 1.0, "2": 2 / 3})
    assert got["borda"]["pref"]["mean"] == pytest.approx(1 / 3) and got["borda"]["pref"]["sd"] == pytest.approx(0.0)
    report = (out / "report.md").read_text()
    assert "| model | Borda mean | sd over groups | group 1 | group 2 | prompts |" in report
    assert "| abs | 0.833 | 0.167 | 1.000 | 0.667 | 2 |" in report  # population sd over groups (the thesis's)
    assert got["borda"]["abs"]["sd_sample"] == pytest.approx(0.2357, abs=1e-4)
    assert (out / "human_borda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "abs" in capsys.readouterr().out


def test_rank_reads_an_exported_csv_the_same_way(tmp_path):
    store = AnnotationStore(tmp_path / "annotations.jsonl")
    store.append(
        AnnotationRow(prompt_id="p", group="1", annotator="x", ranking={"a": 1, "b": 2}),
        AnnotationRow(prompt_id="p", group="1", annotator="x", ranking={"a": 2, "b": 1}),  # changed: this one counts
        AnnotationRow(prompt_id="q", group="1", annotator="x", ranking={"a": 1, "b": 1}),
    )
    write_csv(store.rows, tmp_path / "a.csv")
    tied = ["--tie-rule", "tied"]  # q's tie stays a tie; the thesis's rule would order it a, b
    assert rank.main(["--annotations", str(tmp_path / "annotations.jsonl"), "--out", str(tmp_path / "j"), *tied]) == 0
    assert rank.main(["--annotations", str(tmp_path / "a.csv"), "--out", str(tmp_path / "c"), *tied]) == 0
    from_jsonl = json.loads((tmp_path / "j" / "rankings.json").read_text())
    assert from_jsonl == json.loads((tmp_path / "c" / "rankings.json").read_text())
    assert from_jsonl["tiers"] == {"1/p": [["b"], ["a"]], "1/q": [["a", "b"]]}
    assert from_jsonl["borda"]["b"]["mean"] == pytest.approx((1.0 + 0.75) / 2)


def test_rank_command_reports_a_missing_file(tmp_path, capsys):
    assert rank.main(["--annotations", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such annotations file" in capsys.readouterr().err
