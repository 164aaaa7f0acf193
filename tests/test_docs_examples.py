"""The README's and docs' CPU-runnable examples, run as a user would type them.

A fenced ```bash block right after a `<!-- run-example -->` line is executed with `bash -e`
in a fresh folder that sees the repo's `configs/` (so relative paths in the docs resolve as
from a checkout), with this environment's `crs-rlhf` first on PATH. Background jobs an
example starts are killed with its process group. A wrong path, flag or port in the docs
fails here instead of on a newcomer's machine.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- run-example -->"
BLOCK = re.compile(r"^" + re.escape(MARK) + r"[ \t]*\n```(?:bash|sh|console)\n(.*?)\n```", re.S | re.M)
MARK_LINE = re.compile(r"^" + re.escape(MARK) + r"[ \t]*$", re.M)  # a mark on its own line (prose may mention it)


def collect() -> list[tuple[str, str]]:
    found = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = md.read_text()
        for i, m in enumerate(BLOCK.finditer(text)):
            line = text[: m.start()].count("\n") + 1
            found.append((f"{md.relative_to(ROOT)}:{line}", m.group(1)))
        if len(MARK_LINE.findall(text)) != len(BLOCK.findall(text)):
            found.append((f"{md.relative_to(ROOT)}:malformed", ""))  # a mark not followed by a bash block
    return found


EXAMPLES = collect()


def test_the_readme_has_runnable_examples():
    assert any(name.startswith("README.md:") for name, _ in EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name,script", EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_example_runs(name, script, tmp_path):
    assert script, f"{name}: {MARK} must be followed directly by a ```bash block"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the example left running in the background
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{name} failed (rc {proc.returncode}):\n{script}\n--- output ---\n{out[-4000:]}"
