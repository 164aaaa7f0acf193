"""`crs-rlhf eval rm-bench`: reward-model accuracy on RewardBench-format pairs, over HTTP.

A pair is correct when `chosen` scores strictly higher than `rejected` (RewardBench's rule:
a tie is not a win). The result JSON has RewardBench's keys (`model`, `model_type`,
`chat_template`, one accuracy per subset) plus `overall` and the pair counts. RewardBench
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
