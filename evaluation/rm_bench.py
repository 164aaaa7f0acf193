"""`crs-rlhf eval rm-bench`: reward-model accuracy on RewardBench-format pairs, over HTTP.

A pair is correct when `chosen` scores strictly higher than `rejected` (RewardBench's rule:
a tie is not a win). The result JSON has RewardBench's keys (`model`, `model_type`,
`chat_template`, one accuracy per subset) plus `overall` (pooled over pairs) and the pair
counts, and RewardBench's scoring: `sections` (Chat, Chat Hard, Safety, Reasoning: each the
mean of its subsets' accuracies weighted by the subset sizes RewardBench publishes, e.g.
math-prm counts 984 to weigh as much as the code subsets) and `score`, the leaderboard
score, the plain mean of the four sections (null unless all four are present; the optional
prior sets are not scored). Subsets outside RewardBench's list count in `overall` only. RewardBench
itself loads models in-process; this scores a *served* model, through our `/v1/score` or
OpenRLHF's `/get_reward` (full ChatML texts, as OpenRLHF sends them).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from pathlib import Path

import httpx

from evaluation.io import EvalInputError, iter_jsonl, read_json, write_json

# RewardBench's published example counts per subset and the four sections (facts of its v1
# leaderboard; tests/test_rm_bench_sections.py checks them against the rewardbench package).
SUBSET_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136, "hep-cpp": 164, "hep-go": 164, "hep-java": 164,
    "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SECTIONS = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


def section_scores(accuracy: dict[str, float]) -> dict[str, float]:
    """{section: sum(acc_s · count_s) / sum(count_s)} over the section's subsets present in
    `accuracy`; sections with none present are left out.
    Example: math-prm 0.5, hep-python 1.0 -> Reasoning (0.5·984 + 1.0·164) / 1148 = 0.5714."""
    out = {}
    for section, subsets in SECTIONS.items():
        have = [s for s in subsets if s in accuracy]
        if have:
            out[section] = sum(accuracy[s] * SUBSET_COUNTS[s] for s in have) / sum(SUBSET_COUNTS[s] for s in have)
    return out


def leaderboard_score(sections: dict[str, float]) -> float | None:
    """The mean of the four section scores; None unless all four are there."""
    return sum(sections[s] for s in SECTIONS) / len(SECTIONS) if set(SECTIONS) <= set(sections) else None


def load_pairs(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = list(enumerate(read_json(path))) if path.suffix == ".json" else list(iter_jsonl(path))
    out = []
    for lineno, row in rows:
        where = f"{path}:{lineno}" if path.suffix != ".json" else f"{path}: item {lineno}"
        if not isinstance(row, dict):
            raise EvalInputError(f"{where}: expected an object with prompt, chosen, rejected, subset")
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(k), str) or not row[k].strip():
                raise EvalInputError(f"{where}: '{k}' must be a non-empty string")
        out.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                    "subset": str(row.get("subset") or "default")})
    if not out:
        raise EvalInputError(f"{path}: no pairs")
    return out


async def _scores(url: str, protocol: str, texts: list[tuple[str, str]], api_key: str | None, batch_size: int) -> list[float]:
    from services.common.chat import format_prompt, format_response

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: list[float] = []
    async with httpx.AsyncClient(timeout=300, headers=headers) as http:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            if protocol == "score":
                body, path = {"items": [{"prompt": p, "response": r} for p, r in chunk]}, "/v1/score"
            else:
                body = {"query": [format_prompt([{"role": "user", "content": p}]) + format_response(r) for p, r in chunk]}
                path = "/get_reward"
            try:
                resp = await http.post(url.rstrip("/") + path, json=body)
            except httpx.HTTPError as e:
                raise EvalInputError(f"cannot reach the reward model at {url} ({type(e).__name__}: {e})") from None
            if resp.status_code != 200:
                raise EvalInputError(f"{url}{path} answered HTTP {resp.status_code}: {resp.text[:300]}"
                                     + (" (try --protocol get_reward)" if resp.status_code == 404 else ""))
            data = resp.json()
            scores = data.get("scores") if protocol == "score" else data.get("rewards")
            if not isinstance(scores, list) or len(scores) != len(chunk):
                raise EvalInputError(f"{url}{path}: expected {len(chunk)} scores, got {str(data)[:200]}")
            out += [float(s) for s in scores]
    return out


def _model_name(url: str, api_key: str | None) -> str:
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        data = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10).json()
        return str(data["data"][0]["id"])
    except Exception:  # noqa: BLE001 - servers speaking only /get_reward have no model list
        return url


def rm_bench(pairs: list[dict], url: str, protocol: str = "score", *, model: str | None = None,
             api_key_env: str = "CRS_API_KEY", batch_size: int = 16) -> dict:
    if protocol not in ("score", "get_reward"):
        raise EvalInputError(f"--protocol must be score or get_reward, got {protocol!r}")
    api_key = os.environ.get(api_key_env) or None
    texts = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    scores = asyncio.run(_scores(url, protocol, texts, api_key, batch_size))
    chosen, rejected = scores[: len(pairs)], scores[len(pairs):]
    right, count, ties = defaultdict(int), defaultdict(int), 0
    for p, c, r in zip(pairs, chosen, rejected):
        count[p["subset"]] += 1
        right[p["subset"]] += int(c > r)
        ties += int(c == r)
    result = {"model": model or _model_name(url, api_key), "model_type": "Seq. Classifier (served)",
              "chat_template": "chatml"}
    result.update({s: right[s] / count[s] for s in sorted(count)})
    result["overall"] = sum(right.values()) / len(pairs)
    result["sections"] = section_scores({s: right[s] / count[s] for s in count})
    result["score"] = leaderboard_score(result["sections"])
    result["num_pairs"] = {**{s: count[s] for s in sorted(count)}, "overall": len(pairs)}
    result["ties"] = ties
    result["protocol"] = protocol
    return result


def run_rm_bench(pairs_path: str | Path, url: str, protocol: str = "score", out: str | Path | None = None,
                 model: str | None = None) -> dict:
    result = rm_bench(load_pairs(pairs_path), url, protocol, model=model)
    if out:
        write_json(out, result)
    return result
