"""`crs-rlhf eval rm-score`: both reward models score every output; agreement and length bias.

    rm_scores.jsonl   one row per (policy, prompt, rm): score (raw logit), probability (absolute
                      RM), n_tokens of the response
    rm_win_rates.csv  win rates with each RM as the judge (it prefers the output it scores
                      higher), same columns as win_rates.csv
    agreement.csv     per RM and source: judged pairs, agreements with the judge, rate
    length.csv        per policy and RM (and `all`): Pearson / Spearman of score vs length

Requests go through `RewardClient` (batched, retried); conversations are the prompt's own
messages from prompts.jsonl plus the output, so a multi-turn prompt is scored in context.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from evaluation import stats
from evaluation.io import EvalInputError, iter_jsonl, write_csv, write_jsonl
from evaluation.winrates import per_prompt, rm_win_rate_rows, write_win_rates


def prompt_messages(run_dir: Path) -> dict[str, list[dict]]:
    path = run_dir / "prompts.jsonl"
    if not path.is_file():
        return {}
    return {str(row["id"]): row["messages"] for _, row in iter_jsonl(path)}


def _lengths(outputs: dict[str, list[dict]], tokenizer: str | None) -> dict[tuple[str, str], int]:
    """Response length in tokens: the generator's count, else the given tokenizer's."""
    tok = None
    out = {}
    for name, rows in outputs.items():
        for r in rows:
            n = r.get("n_tokens")
            if n is None:
                if tok is None:
                    if tokenizer is None:
                        raise EvalInputError(f"outputs/{name}.json has no n_tokens (not written by `eval generate`); "
                                             "pass --tokenizer PATH to count response tokens")
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(tokenizer)
                n = len(tok(r["output"], add_special_tokens=False)["input_ids"])
            out[(name, r["id"])] = int(n)
    return out


async def _score_all(url: str, rm: str, items: list, batch_size: int, api_key: str | None, concurrency: int,
                     progress: bool) -> list[tuple[float, float | None]]:
    from tqdm import tqdm

    from services.common.identity import run_headers
    from trainer.clients.reward import RewardClient

    sem = asyncio.Semaphore(concurrency)
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    # "eval": shared reward servers count this load apart from the training runs'.
    async with RewardClient([url], api_key=api_key, name=rm, retry_max_s=120,
                            headers=run_headers("eval", 0, None)) as client:
        async def one(batch):
            async with sem:
                return await client.score(batch)

        with tqdm(total=len(items), desc=f"score {rm}", unit="output", disable=not progress) as bar:
            tasks = [asyncio.ensure_future(one(b)) for b in batches]
            for t in asyncio.as_completed(tasks):
                await t
                bar.update(batch_size)
        out = []
        for t in tasks:
            res = t.result()
            probs = res.probabilities or [None] * len(res.scores)
            out += list(zip(res.scores, probs))
    return out


def score_outputs(outputs: dict[str, list[dict]], urls: dict[str, str], run_dir: Path, *, batch_size: int = 16,
                  api_key_env: str = "CRS_API_KEY", concurrency: int = 4, tokenizer: str | None = None,
                  progress: bool = True) -> list[dict]:
    """Score every output with every RM in `urls` ({rm name: URL}); writes rm_scores.jsonl."""
    from trainer.clients.reward import RewardServiceError, messages_item

    msgs = prompt_messages(run_dir)
    lengths = _lengths(outputs, tokenizer)
    keys, items = [], []
    for name, rows in sorted(outputs.items()):
        for r in rows:
            conv = msgs.get(str(r["id"])) or [{"role": "user", "content": r["instruction"]}]
            keys.append((name, r))
            items.append(messages_item(conv, r["output"]))
    api_key = os.environ.get(api_key_env) or None
    rows_out = []
    for rm, url in urls.items():
        try:
            scored = asyncio.run(_score_all(url, rm, items, batch_size, api_key, concurrency, progress))
        except RewardServiceError as e:
            raise EvalInputError(f"scoring with {rm} at {url} failed: {e}") from None
        for (name, r), (score, prob) in zip(keys, scored):
            rows_out.append({"model": name, "id": r["id"], "source": r.get("dataset") or "default", "rm": rm,
                             "score": score, "probability": prob, "n_tokens": lengths[(name, r["id"])]})
    write_jsonl(run_dir / "rm_scores.jsonl", rows_out)
    return rows_out


def agreement_rows(score_rows: Sequence[dict], judgments: Sequence[dict]) -> list[dict]:
    """Per RM, policy pair and source (+ `all`): does the RM score the judge's winner higher?

    One set of rows per judged (model, baseline) pair — the thesis's Tables 12, 13, 18 and 19
    are each one pair — and the pooled rows (model and baseline `all`) last."""
    scores = {(r["rm"], r["model"], r["id"]): r["score"] for r in score_rows}
    rms = sorted({r["rm"] for r in score_rows})
    cells: dict[tuple[str, str, str, str], list[tuple[int, float, float]]] = defaultdict(list)
    for (model, base), prompts in per_prompt(judgments).items():
        for pid, p in prompts.items():
            if p["preference"] is None:
                continue
            verdict = stats.hard_verdict(p["discrete"])  # orders that disagree: a draw, left out
            for rm in rms:
                a, b = scores.get((rm, model, pid)), scores.get((rm, base, pid))
                if a is None or b is None:
                    continue
                for pair in ((model, base), ("all", "all")):
                    for source in (p["source"], "all"):
                        cells[(rm, *pair, source)].append((verdict, a, b))
    rows = []
    order = lambda kv: (kv[0][0], kv[0][1] == "all", kv[0][1], kv[0][2], kv[0][3] == "all", kv[0][3])
    for (rm, model, base, source), vals in sorted(cells.items(), key=order):
        ag = stats.agreement([v for v, _, _ in vals], [a for _, a, _ in vals], [b for _, _, b in vals])
        rows.append({"rm": rm, "model": model, "baseline": base, "source": source, "pairs": ag.pairs,
                     "agreements": ag.agreements, "rate": ag.rate})
    return rows


def length_rows(score_rows: Sequence[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for r in score_rows:
        groups[(r["model"], r["rm"])].append((r["score"], r["n_tokens"]))
        groups[("all", r["rm"])].append((r["score"], r["n_tokens"]))
    rows = []
    for (model, rm), vals in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        c = stats.correlation([s for s, _ in vals], [n for _, n in vals])
        mean = sum(s for s, _ in vals) / len(vals)
        rows.append({"model": model, "rm": rm, "n": c.n, "pearson": c.pearson, "spearman": c.spearman,
                     "mean_score": mean, "mean_tokens": sum(n for _, n in vals) / len(vals)})
    return rows


def write_rm_tables(run_dir: Path, outputs: dict[str, list[dict]], score_rows: Sequence[dict],
                    judgments: Sequence[dict] | None, pairs: Sequence[tuple[str, str]]) -> dict[str, Path]:
    written = {}
    wr_rows = []
    for rm in sorted({r["rm"] for r in score_rows}):
        scores = {(r["model"], r["id"]): r["score"] for r in score_rows if r["rm"] == rm}
        wr_rows += rm_win_rate_rows(scores, outputs, pairs, rm)
    written["rm_win_rates"] = write_win_rates(run_dir / "rm_win_rates.csv", wr_rows)
    written["length"] = write_csv(run_dir / "length.csv", length_rows(score_rows),
                                  ["model", "rm", "n", "pearson", "spearman", "mean_score", "mean_tokens"])
    if judgments:
        written["agreement"] = write_csv(run_dir / "agreement.csv", agreement_rows(score_rows, judgments),
                                         ["rm", "model", "baseline", "source", "pairs", "agreements", "rate"])
    return written
