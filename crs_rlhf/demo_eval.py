"""The held-out evaluation that ends `crs-rlhf demo`: the PPO policy against the SFT policy.

    prompts   Open Assistant eval-tree prompts of the shipped fixture (never SFT/RM training data)
    generate  the SFT model (served base) and PPO's last adapter, through the running policy_gen
    judge     each reward model that is running (it prefers the output it scores higher) and,
              with a judge URL, an LLM judge; win rate % ± SE, the Wilson interval and the exact
              sign test for each
    report    report.md + figures in the eval folder; one summary line: did PPO beat SFT?

The reward models are the ones PPO optimised, so their win rate measures how well PPO
optimised them, not that the answers got better; an independent judge is the real test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DemoEval:
    out_dir: Path
    rows: list[dict] = field(default_factory=list)  # the `all` rows: RMs and, if asked, the judge
    verdict: str = ""

    def lines(self) -> list[str]:
        out = [f"{'held-out eval (PPO vs SFT)':30s} {'win %':>6s} {'± SE':>6s} {'Wilson 95%':>13s} {'n':>4s} {'sign p':>7s}"]
        for r in self.rows:
            ci = f"[{r['wilson_low']:.0f}, {r['wilson_high']:.0f}]"
            out.append(f"  judged by {r['judge']:19s} {r['win_rate']:6.1f} {r['standard_error']:6.2f} {ci:>13s} "
                       f"{r['n_total']:4d} {r['sign_test_p']:7.3g}")
        return out + [self.verdict, f"eval folder: {self.out_dir} (report.md)"]


def verdict_line(rows: list[dict]) -> str:
    """One sentence: the judge decides when there is one, else the reward models together.

    Rows are win_rates.csv rows (percent). "Significant" rests on the exact two-sided sign test
    of wins vs losses at 5 %, never on p ± 1.96·SE (zero width at 8 wins of 8), and n is stated."""
    judges = [r for r in rows if not r["judge"].startswith("rm:")] or rows
    if not judges or any(r["n_total"] == 0 or math.isnan(r["win_rate"]) for r in judges):
        return "PPO vs SFT: undecided (no valid verdicts)"
    by = " and ".join(r["judge"] for r in judges)
    counts = "; ".join(f"{r['judge']}: {r['n_wins']} wins, {r['n_wins_base']} losses, {r['n_draws']} draws of "
                       f"n = {r['n_total']}, sign test p = {r['sign_test_p']:.3g}" for r in judges)
    if all(r["win_rate"] > 50 for r in judges):
        sig = ("significant at 5 %" if all(r["sign_test_p"] < 0.05 for r in judges)
               else "not significant at 5 %")
        return f"PPO beat SFT by {by} ({sig}; exact sign test, {counts})"
    if all(r["win_rate"] < 50 for r in judges):
        return f"PPO did NOT beat SFT by {by} (SFT won)"
    return f"PPO did NOT beat SFT by {by} (a tie or a split decision)"


def _served_base(url: str) -> str:
    """The base model's id at policy_gen `url` (its /v1/models card without a parent)."""
    import httpx

    r = httpx.get(url.rstrip("/") + "/v1/models", timeout=30)
    try:
        return next(c["id"] for c in (r.json()["data"] if r.status_code == 200 else []) if not c.get("parent"))
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):  # not JSON, no list, no base card
        raise RuntimeError(f"policy_gen at {url} did not list its base model: /v1/models answered "
                           f"{r.status_code} {r.text[:300]!r} (its log says why)") from None


def _last_adapter(run_dir: Path) -> Path | None:
    steps = sorted((run_dir / "adapters").glob("step-*"))
    return steps[-1] if steps else None


def heldout_eval(urls: dict[str, str], run_dir: Path, out_dir: Path, *, judge_url: str | None = None,
                 judge_model: str | None = None, max_tokens: int = 16, progress: bool = True,
                 judge_template: str = "alpaca_eval") -> DemoEval | None:
    """Run the whole chain on the running services; None when PPO saved no adapter."""
    import httpx

    from evaluation.generate import PolicySpec, Sampling, load_outputs, run_generate
    from evaluation.io import EvalInputError, read_csv
    from evaluation.judge import JudgeSettings, JudgeUnavailable, run_judge
    from evaluation.prompts import load_source
    from evaluation.report import make_report
    from evaluation.rm_score import score_outputs, write_rm_tables
    from evaluation.winrates import win_rate_rows, write_win_rates

    adapter = _last_adapter(run_dir)
    if adapter is None:
        return None
    policy_url = urls["policy_gen"]
    prompts = load_source("oasst", "fixture")
    policies = [PolicySpec("sft", served=_served_base(policy_url)), PolicySpec("ppo", adapter=adapter.resolve())]
    run_generate(prompts, policies, policy_url, out_dir, Sampling(max_tokens=max_tokens), overwrite=True,
                 progress=progress)
    outputs = load_outputs(out_dir)
    rm_urls = {rm: urls[key] for rm, key in (("pref", "reward_pref"), ("abs", "reward_abs")) if key in urls}
    scores = score_outputs(outputs, rm_urls, out_dir, progress=progress)
    judgments, note = None, None
    if judge_url:
        try:  # a judge that is down costs the judge's row, not the demo's other results
            settings = JudgeSettings(url=judge_url, model=judge_model or _served_base(judge_url), template=judge_template)
            judgments, _ = run_judge(outputs, settings, out_dir, baseline="sft", progress=progress)
            write_win_rates(out_dir / "win_rates.csv", win_rate_rows(judgments, outputs, judge=settings.model))
        except (JudgeUnavailable, EvalInputError, httpx.HTTPError, KeyError, ValueError) as e:
            note = f"judge at {judge_url} failed, judged by the reward models only: {e}"
    write_rm_tables(out_dir, outputs, scores, judgments, [("ppo", "sft")])
    make_report(out_dir)
    rows = []
    for name in ("rm_win_rates.csv", "win_rates.csv"):
        if (out_dir / name).is_file():
            for r in read_csv(out_dir / name):
                if r["source"] == "all":
                    rows.append({**r, **{k: float(r[k]) for k in ("win_rate", "standard_error", "wilson_low",
                                                                   "wilson_high", "sign_test_p")},
                                 **{k: int(r[k]) for k in ("n_wins", "n_wins_base", "n_draws", "n_total")}})
    result = DemoEval(out_dir, rows)
    result.verdict = verdict_line(rows) + (f"\n{note}" if note else "")
    return result
