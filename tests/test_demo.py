"""The README's main command, run as a user runs it: `crs-rlhf demo` in a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_cleans_up(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "crs_rlhf.cli", "demo", "--out", str(out), "--steps", "3"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Stage 2 really trained: three model folders the services then loaded.
    for name in ("sft", "rm_preference", "rm_absolute"):
        assert (out / "models" / name / "metrics.json").is_file(), name
    pref_metrics = json.loads((out / "models" / "rm_preference" / "metrics.json").read_text())
    assert pref_metrics["eval_pairwise_accuracy"] > 0.5

    run = out / "ppo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward/pref", "reward/abs", "reward/crs", "kl/objective", "time/generate", "time/sync"):
        assert all(isinstance(r[key], float) for r in rows), key
    # w = 0.25, raw logits, score clip 4: each step's mixed reward is what the CRS formula says.
    samples = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    for r, s in zip(rows, samples):
        mixed = [max(-4.0, min(4.0, 0.25 * p + 0.75 * a)) for p, a in zip(s["r_pref"], s["r_abs"])]
        assert r["reward/crs"] == pytest.approx(sum(mixed) / len(mixed), abs=1e-4)
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == [
        "kl.png", "response_length.png", "reward.png", "reward_distribution.png"]
    assert "reward/crs" in proc.stdout and "run folder:" in proc.stdout

    # Every service the demo started is gone.
    urls = re.findall(r"^\s+\w+\s+(http://127\.0\.0\.1:\d+)", proc.stdout, flags=re.M)
    assert len(urls) == 3
    for url in urls:
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
