"""annotations.jsonl: the one place human rankings live, plus CSV and Argilla conversions.

The file is append-only. A submission is one JSON line, written with flush + fsync before
the server answers, so a reload or a server restart loses nothing; changing an answer appends
a new line and the *latest* line per (prompt_id, group, annotator) counts (`latest_rows`).
A line torn by a crash mid-write (only ever the last one) is skipped with a warning.

Row: {"prompt_id", "group", "annotator", "ranking": {model: rank}, "order": [models as
shown], "time": ISO-8601 UTC, "source": "page" | "csv" | "argilla"}.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


log = logging.getLogger(__name__)

ORDER_SEP = "|"
RANK_PREFIX = "rank:"


class AnnotationRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_id: str
    group: str
    annotator: str
    ranking: dict[str, int]
    order: list[str] = Field(default_factory=list, description="Models in the order the annotator saw them.")
    time: str = Field(default_factory=lambda: now_iso())
    source: str = "page"

    @field_validator("prompt_id", "group", "annotator", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str:
        # AlpacaEval ids are often ints; one spelling (str) keeps the latest-row key stable.
        text = str(v).strip() if v is not None else ""
        if not text:
            raise ValueError("must not be empty")
        return text


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class AnnotationStore:
    """annotations.jsonl, loaded once and appended to under a lock (one server process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.rows: list[AnnotationRow] = []
        if self.path.exists():
            self.rows, torn_at = _read_jsonl(self.path)
            # Cut a torn fragment (or end a hand-edited last line) so the next row starts on a line of its own.
            if torn_at is not None:
                with open(self.path, "r+b") as f:
                    f.truncate(torn_at)
            elif not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size:
                with open(self.path, "ab") as f:
                    f.write(b"\n")

    def append(self, *rows: AnnotationRow) -> None:
        """Write `rows` durably (flush + fsync) before returning, then remember them."""
        text = "".join(r.model_dump_json() + "\n" for r in rows)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            self.rows.extend(rows)

    def latest_for(self, annotator: str, group: str) -> dict[str, AnnotationRow]:
        """{prompt_id: the annotator's counting row} for one annotator in one group."""
        with self._lock:
            mine = [r for r in self.rows if r.annotator == annotator and r.group == group]
        return {r.prompt_id: r for r in mine}  # later rows overwrite earlier ones


def read_jsonl(path: str | Path) -> list[AnnotationRow]:
    return _read_jsonl(Path(path))[0]


def _read_jsonl(path: Path) -> tuple[list[AnnotationRow], int | None]:
    """(rows, byte offset of a torn last line or None). Every complete write ends in a newline,
    so only a last line without one can be a torn write; anything else that fails is an error."""
    data = path.read_bytes()
    unterminated = bool(data) and not data.endswith(b"\n")
    rows = []
    lines = data.decode("utf-8").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(AnnotationRow.model_validate_json(line))
        except ValidationError as e:
            if unterminated and i == len(lines):
                log.warning("%s:%d: skipping a torn last line (an interrupted write)", path, i)
                return rows, data.rfind(b"\n") + 1
            raise ValueError(f"{path}:{i}: not an annotation row: {_first_error(e)}") from None
    return rows, None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}"


def read_rows(path: str | Path) -> list[AnnotationRow]:
    """annotations from .jsonl (our file) or .csv (our export format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such annotations file (crs-rlhf eval annotate writes DIR/annotations.jsonl)"
        )
    return read_csv(path) if path.suffix.lower() == ".csv" else read_jsonl(path)


# ---------------------------------------------------------------- CSV
def write_csv(rows: Sequence[AnnotationRow], path: str | Path) -> None:
    """One row per annotation; `rank:<model>` columns (blank where a row lacks the model)."""
    models = sorted({m for r in rows for m in r.ranking})
    header = ["prompt_id", "group", "annotator", "time", "source", "order"] + [RANK_PREFIX + m for m in models]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            ranks = [r.ranking.get(m, "") for m in models]
            w.writerow([r.prompt_id, r.group, r.annotator, r.time, r.source, ORDER_SEP.join(r.order), *ranks])


def read_csv(path: str | Path) -> list[AnnotationRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        need = {"prompt_id", "group", "annotator"}
        if not need <= set(fields) or not any(c.startswith(RANK_PREFIX) for c in fields):
            raise ValueError(
                f"{path}: a CSV of annotations needs columns prompt_id, group, annotator and one "
                f"'{RANK_PREFIX}<model>' column per model (as 'crs-rlhf eval annotate export' writes); got {fields}"
            )
        rows = []
        for i, rec in enumerate(reader, 2):
            ranking = {}
            for col, cell in rec.items():
                if col and col.startswith(RANK_PREFIX) and (cell or "").strip():
                    try:
                        ranking[col[len(RANK_PREFIX) :]] = int(cell)
                    except ValueError:
                        raise ValueError(f"{path}:{i}: {col} must be a whole number, got {cell!r}") from None
            order = [m for m in (rec.get("order") or "").split(ORDER_SEP) if m]
            data = {k: rec.get(k) for k in ("prompt_id", "group", "annotator")}
            data.update(ranking=ranking, order=order, source=rec.get("source") or "csv")
            if rec.get("time"):
                data["time"] = rec["time"]
            try:
                rows.append(AnnotationRow.model_validate(data))
            except ValidationError as e:
                raise ValueError(f"{path}:{i}: {_first_error(e)}") from None
    return rows


# ---------------------------------------------------------------- Argilla
def import_argilla(
    path: str | Path,
    *,
    question: str,
    prompt_id_field: str = "id",
    group: str = "argilla",
    group_field: str | None = None,
    option_map: Mapping[str, str] | None = None,
) -> list[AnnotationRow]:
    """Rows from an Argilla export of a RankingQuestion (JSON list or JSONL of records).

    Accepted record shapes (Argilla 1.x FeedbackDataset and 2.x `records.to_list()`/`to_json`):
      responses: [{"user_id", "status", "values": {question: {"value": V}}}]        (1.x)
      responses: {question: [{"user_id", "status", "value": V}]}                    (2.x)
      question:  [{"user_id", "status", "value": {"value": [...], "rank": [...]}}]   (HF datasets)
    V is [{"value": option, "rank": r}, ...] (ties allowed) or [option, ...] best first.
    Only "submitted" responses count. The prompt id is looked up in metadata, then fields,
    then the record itself; options are model names unless `option_map` maps them.
    """
    records = _load_json_records(Path(path))
    option_map = dict(option_map or {})
    rows = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        prompt_id = _lookup(rec, prompt_id_field)
        if prompt_id is None:
            raise ValueError(
                f"{where}: no {prompt_id_field!r} in metadata, fields or the record (set --prompt-id-field)"
            )
        grp = str(_lookup(rec, group_field)) if group_field and _lookup(rec, group_field) is not None else group
        for user, status, value in _responses(rec, question):
            if status not in (None, "submitted"):
                continue
            ranking = {option_map.get(opt, opt): rank for opt, rank in _ranks(value, where)}
            rows.append(
                AnnotationRow(
                    prompt_id=prompt_id,
                    group=grp,
                    annotator=user,
                    ranking=ranking,
                    source="argilla",
                    time=str(rec.get("updated_at") or rec.get("inserted_at") or now_iso()),
                )
            )
    if not rows:
        raise ValueError(f"{path}: no submitted responses to ranking question {question!r} (check --question)")
    return rows


def _load_json_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("["):
        return json.loads(text)
    if text.startswith("{") and "\n" not in text:
        obj = json.loads(text)
        return obj.get("records", [obj]) if isinstance(obj, dict) else obj
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _lookup(rec: Mapping, key: str | None) -> Any:
    if key is None:
        return None
    for scope in (rec.get("metadata") or {}, rec.get("fields") or {}, rec):
        if isinstance(scope, Mapping) and scope.get(key) is not None:
            return scope[key]
    return None


def _responses(rec: Mapping, question: str) -> Iterable[tuple[str, str | None, Any]]:
    responses = rec.get("responses")
    if isinstance(responses, list):  # 1.x: one entry per user with all questions' values
        for r in responses:
            values = r.get("values") or {}
            if question in values:
                yield str(r.get("user_id")), r.get("status"), values[question].get("value")
    elif isinstance(responses, Mapping) and question in responses:  # 2.x: per question
        for r in responses[question]:
            yield str(r.get("user_id")), r.get("status"), r.get("value")
    elif isinstance(rec.get(question), list):  # HF datasets export: a column per question
        for r in rec[question]:
            yield str(r.get("user_id")), r.get("status"), r.get("value")


def _ranks(value: Any, where: str) -> list[tuple[str, int]]:
    if isinstance(value, Mapping) and "value" in value and "rank" in value:
        return [(str(v), int(r)) for v, r in zip(value["value"], value["rank"])]
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        return [(str(v["value"]), int(v["rank"])) for v in value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [(v, i) for i, v in enumerate(value, 1)]
    raise ValueError(f"{where}: unrecognised ranking value {value!r}")
