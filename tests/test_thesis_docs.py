"""The package stands on its own: no file points at the project's internal notes, and
docs/method.md gives each thesis number a source."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "runs", "node_modules", "__pycache__", ".pytest_cache"}
# Spelled in pieces so this file does not match itself.
INTERNAL = re.compile("|".join(re.escape(s) for s in ("MISSION" + ".md", "DESIGN" + ".md", "../" + "shared/",
                                                       "DESIGN" + " §", "MISSION" + " §")))


def _files():
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and not SKIP & set(rel.parts) and not rel.parts[0].endswith(".egg-info") \
                and path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ""}:
            yield path, rel


def test_no_reference_to_internal_notes():
    hits = []
    for path, rel in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1) if INTERNAL.search(line)]
    assert not hits, f"point these at docs/ (docs/method.md for the thesis): {hits}"


def test_method_doc_cites_its_sources():
    text = (ROOT / "docs" / "method.md").read_text()
    for ref in ("Table 3", "Table 5", "Tables 6–7", "Table 8", "Fig. 17", "Fig. 18", "Fig. 19", "Fig. 20", "Fig. 22"):
        assert ref in text, ref
    # gamma, lambda, top_k, top_p are the thesis code's (TRL) values, not the thesis text's.
    line = next(l for l in text.splitlines() if "γ = 1" in l)
    assert "Not stated in the thesis text" in line and "TRL" in text
    assert "38,852" in text and "4,104" in text and "0.02" in text
