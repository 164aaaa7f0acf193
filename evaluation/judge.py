"""`crs-rlhf eval judge`: pairwise verdicts from any OpenAI-compatible judge, cached and resumable.

    for each (model, baseline, prompt): put the two outputs in slots A/B (seeded coin per pair,
        recorded; --both-orders: both ways) -> ask the judge "A or B?" -> verdict:
        from the first token's top_logprobs when both labels are there (P(A) = softmax over
        the two), else parsed from the text -> appended to judgments.jsonl at once

A reply that yields no verdict is asked again (new seed) up to `invalid_retries` times, then
recorded as invalid with the raw reply: counted in n_invalid, never a draw. A pair the judge
refuses as longer than its context is recorded invalid with that reason, and the run goes on. Transport
failures and 429/5xx are retried with backoff; when the judge stays down the run stops with
a clear error and every judgment made so far is already on disk, so a re-run resumes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation.io import EvalInputError

TEMPLATE_VERSION = "crs-pairwise-v1"
SYSTEM = ("You are a careful, impartial evaluator of AI assistants. You compare two responses to the "
          "same instruction and decide which one follows it better.")
USER = """Which response follows the instruction better: more helpful, correct, relevant and clear? \
Judge the content, not the length; the order of the responses says nothing about their quality.

## Instruction
{instruction}

## Response A
{output_a}

## Response B
{output_b}

Answer with a single letter, A or B, and nothing else."""

# The thesis's judge prompt, as its Fig. 31 prints it: AlpacaEval's leaderboard prompt (Li et al.
# 2023). The judge ranks model_1 (slot A) and model_2 (slot B): a hard verdict. AlpacaEval hands
# 'make_leaderboard' to the judge as a function; here the ranking is read from the reply's text
# (`ranking_verdict`), which works with any OpenAI-compatible judge.
ALPACA_SYSTEM = "You are a helpful assistant, that makes a leaderboard of models based on the quality of their answers."
ALPACA_USER = """I want you to create a leaderboard of different large-language models. To do so, I will give you \
the instructions (prompts) given to the models, and the responses of two models. To make a leaderboard, first make \
a list ranking the models based on which responses would be preferred by humans, then give the resulting list of \
JSON to 'make_leaderboard'.

Here is the prompt:
{{
    "instruction": \"\"\"{instruction}\"\"\",
}}

Here are the outputs of the models:
[
    {{
        "model": "model_1",
        "answer": \"\"\"{output_a}\"\"\"
    }},
    {{
        "model": "model_2",
        "answer": \"\"\"{output_b}\"\"\"
    }}
]

Now make the leaderboard by ranking the models by the quality of their answers, so that the model with rank 1 \
has the best output."""

LABELS = ("A", "B")
_TEXT_VERDICT = re.compile(r"^\W*(?:(?:response|output|answer)[\s:]*)?\(?\s*([AB])\b", re.IGNORECASE)
_TIE = re.compile(r"^\W*(tie|draw|equal|both)\b", re.IGNORECASE)
_RANK_MODEL = re.compile(r"""['"]model['"]\s*:\s*['"]model_([12])['"]\s*,\s*['"]rank['"]\s*:\s*([12])""")
_MODEL_RANK = re.compile(r"""['"]rank['"]\s*:\s*([12])\s*,\s*['"]model['"]\s*:\s*['"]model_([12])['"]""")


def ranking_verdict(text: str | None) -> float | None:
    """P(slot A better) from an AlpacaEval leaderboard reply: model_1 ranked 1 -> 1.0, model_2
    ranked 1 -> 0.0; anything else (no ranking, both or neither first) -> None."""
    if not text:
        return None
    ranks = {m: int(r) for m, r in _RANK_MODEL.findall(text)}
    ranks.update({m: int(r) for r, m in _MODEL_RANK.findall(text)})
    firsts = [m for m, r in ranks.items() if r == 1]
    return (1.0 if firsts[0] == "1" else 0.0) if len(firsts) == 1 else None


@dataclass(frozen=True)
class Template:
    """A judge prompt: its messages, how its reply becomes P(A better), what it needs asked."""

    version: str  # part of every cache key
    system: str
    user: str
    parse: object  # text -> P(A) or None
    max_tokens: int
    logprobs: bool  # first-token logprobs carry the verdict (single-letter answers only)


TEMPLATES = {
    "alpaca_eval": Template("alpaca_eval_gpt4-v1", ALPACA_SYSTEM, ALPACA_USER, ranking_verdict, 100, False),
    "crs": Template(TEMPLATE_VERSION, SYSTEM, USER, None, 4, True),
}
DEFAULT_TEMPLATE = "alpaca_eval"  # the thesis's; "crs" adds "judge the content, not the length"


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise EvalInputError(f"unknown judge template {name!r}; use one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# How servers refuse a prompt longer than the judge's context, before generating anything:
# vLLM and policy_gen "This model's maximum context length is N tokens ...", OpenAI the
# error code `context_length_exceeded`. Their own length check is the check: it uses the
# judge's tokenizer and costs no generation.
CONTEXT_OVERFLOW = "context_length"
_CONTEXT_WORDS = re.compile(r"maximum context length|context[ _]length|max_model_len|too many tokens", re.IGNORECASE)


def context_overflow(status: int, message: str | None, code: str | None = None) -> str | None:
    """The invalid reason to record when a judge refused a pair for its length, else None. Pure.

    >>> context_overflow(400, "This model's maximum context length is 1024 tokens. However, you requested 1788")
    "context_length: This model's maximum context length is 1024 tokens. However, you requested 1788"
    >>> context_overflow(400, "bad temperature") is None, context_overflow(503, "maximum context length") is None
    (True, True)
    """
    if status not in (400, 413, 422):
        return None
    if code == "context_length_exceeded" or _CONTEXT_WORDS.search(message or ""):
        return f"{CONTEXT_OVERFLOW}: {(message or code or '').strip()[:300]}"
    return None


class JudgeUnavailable(RuntimeError):
    """The judge failed for good (down, or refusing the requests); judgments so far are saved."""


def judge_messages(instruction: str, output_a: str, output_b: str, template: str = DEFAULT_TEMPLATE) -> list[dict[str, str]]:
    t = get_template(template)
    return [{"role": "system", "content": t.system},
            {"role": "user", "content": t.user.format(instruction=instruction, output_a=output_a, output_b=output_b)}]


def text_verdict(text: str | None) -> float | None:
    """P(slot A better) from the reply's text: 'A' -> 1, 'B' -> 0, 'tie' -> 0.5, else None.
    Accepts 'A', ' b.', 'Response A', 'Output (B)'; rejects 'I think both are fine'."""
    if not text:
        return None
    m = _TEXT_VERDICT.match(text.strip())
    if m:
        return 1.0 if m.group(1).upper() == "A" else 0.0
    return 0.5 if _TIE.match(text.strip()) else None


def logprob_verdict(top: Sequence[tuple[str, float]]) -> float | None:
    """P(A) / (P(A) + P(B)) from the first generated token's alternatives (token, logprob).

    Tokens are compared stripped and upper-cased ('A', ' a'); several spellings of one label
    add up. If only one label is listed, the other's logprob is bounded by the smallest one
    listed (it ranked lower), which gives a conservative preference; neither -> None."""
    if not top:
        return None
    mass = {lab: 0.0 for lab in LABELS}
    seen = set()
    for token, lp in top:
        lab = token.strip().upper()
        if lab in mass and lp is not None and lp > -1e4:
            mass[lab] += math.exp(lp)
            seen.add(lab)
    if not seen:
        return None
    floor = math.exp(min(lp for _, lp in top if lp is not None))
    a = mass["A"] if "A" in seen else floor
    b = mass["B"] if "B" in seen else floor
    return a / (a + b)


@dataclass(frozen=True)
class JudgeTask:
    key: str
    id: str
    source: str
    model: str
    baseline: str
    model_slot: str  # "A" or "B": where the model's output is shown
    instruction: str
    output_model: str
    output_base: str
    template: str = DEFAULT_TEMPLATE

    def messages(self) -> list[dict[str, str]]:
        a, b = ((self.output_model, self.output_base) if self.model_slot == "A"
                else (self.output_base, self.output_model))
        return judge_messages(self.instruction, a, b, self.template)


def task_key(judge_model: str, pid: str, model: str, baseline: str, slot: str, out_m: str, out_b: str,
             template: str = DEFAULT_TEMPLATE) -> str:
    """Changes when anything the verdict depends on changes (outputs, order, judge, template)."""
    raw = json.dumps([get_template(template).version, judge_model, pid, model, baseline, slot, out_m, out_b])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def build_tasks(outputs: dict[str, list[dict]], pairs: Sequence[tuple[str, str]], judge_model: str, *,
                seed: int = 0, both_orders: bool = False, template: str = DEFAULT_TEMPLATE) -> list[JudgeTask]:
    """Tasks for each (model, baseline) pair over the prompts both answered; the slot of the
    model's output is a seeded coin per (prompt, pair), or both slots with `both_orders`."""
    tasks = []
    for model, base in pairs:
        by_id = {r["id"]: r for r in outputs[base]}
        for r in outputs[model]:
            b = by_id.get(r["id"])
            if b is None:
                continue
            slots = ["A", "B"] if both_orders else \
                ["A" if random.Random(f"{seed}:{r['id']}:{model}:{base}").random() < 0.5 else "B"]
            for slot in slots:
                key = task_key(judge_model, r["id"], model, base, slot, r["output"], b["output"], template)
                tasks.append(JudgeTask(key, r["id"], r.get("dataset") or "default", model, base, slot,
                                       r["instruction"], r["output"], b["output"], template))
    return tasks


def pairs_for(names: Sequence[str], baseline: str | None) -> list[tuple[str, str]]:
    if baseline is not None:
        if baseline not in names:
            raise EvalInputError(f"--baseline {baseline!r} has no outputs; have {sorted(names)}")
        return [(m, baseline) for m in sorted(names) if m != baseline]
    names = sorted(names)
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def read_judgments(path: Path) -> dict[str, dict]:
    """Saved judgments by key. A line cut short by a kill mid-write is skipped (and re-judged)."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[rec["key"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"warning: {path}:{lineno} is not a complete judgment; it will be judged again", file=sys.stderr)
    return out


@dataclass
class JudgeSettings:
    url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    template: str = DEFAULT_TEMPLATE  # "alpaca_eval" (the thesis's) or "crs"
    max_tokens: int | None = None  # None: the template's (crs 4, a label and a little; alpaca_eval 100)
    temperature: float = 0.0
    top_logprobs: int = 20  # OpenAI's maximum
    invalid_retries: int = 2
    max_attempts: int = 6  # per request, transport errors / 429 / 5xx
    max_backoff_s: float = 20.0
    timeout_s: float = 120.0
    seed: int = 0


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500)


class Judge:
    """Async judge client; `calls` counts requests sent (retries included)."""

    def __init__(self, s: JudgeSettings):
        import openai

        self.s = s
        self.t = get_template(s.template)
        self.calls = 0
        self._api = openai.AsyncOpenAI(base_url=s.url.rstrip("/") + "/v1", api_key=s.api_key or "EMPTY",
                                       timeout=s.timeout_s, max_retries=0)

    async def aclose(self) -> None:
        await self._api.close()

    async def _ask(self, messages, seed: int):
        from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

        async for attempt in AsyncRetrying(retry=retry_if_exception(_retryable), reraise=True,
                                           wait=wait_exponential_jitter(initial=0.5, max=self.s.max_backoff_s),
                                           stop=stop_after_attempt(self.s.max_attempts)):
            with attempt:
                self.calls += 1
                logprobs = self.t.logprobs and self.s.top_logprobs > 0
                return await self._api.chat.completions.create(
                    model=self.s.model, messages=messages, max_tokens=self.s.max_tokens or self.t.max_tokens,
                    temperature=self.s.temperature, seed=seed, logprobs=logprobs,
                    top_logprobs=self.s.top_logprobs if logprobs else None)

    async def judge(self, task: JudgeTask) -> dict:
        """One judgment record (valid or not); raises JudgeUnavailable when the judge fails for good."""
        import openai

        raws = []
        for attempt in range(self.s.invalid_retries + 1):
            try:
                resp = await self._ask(task.messages(), self.s.seed + attempt)
            except openai.APIConnectionError as e:
                raise JudgeUnavailable(f"cannot reach the judge at {self.s.url} ({e})") from None
            except openai.APIStatusError as e:
                reason = context_overflow(e.status_code, e.message, getattr(e, "code", None))
                if reason is not None:  # this pair can never fit this judge: record it, go on with the rest
                    return {**self._record(task, None, None, None, attempt + 1), "invalid_reason": reason}
                raise JudgeUnavailable(f"the judge at {self.s.url} answered HTTP {e.status_code}: {e.message}") from None
            choice = resp.choices[0] if resp.choices else None
            text = choice.message.content if choice is not None else None
            raws.append(text)
            p_first, method = None, None
            content = choice.logprobs.content if choice is not None and choice.logprobs is not None else None
            if content and self.t.logprobs:
                p_first = logprob_verdict([(t.token, t.logprob) for t in content[0].top_logprobs]
                                          or [(content[0].token, content[0].logprob)])
                method = "logprobs" if p_first is not None else None
            if p_first is None:
                p_first, method = (self.t.parse or text_verdict)(text), "text"
            if p_first is not None:
                return self._record(task, p_first, method, text, attempt + 1)
        return self._record(task, None, None, raws[-1], len(raws), raws)

    def _record(self, t: JudgeTask, p_first, method, raw, attempts, raws=None) -> dict:
        pref = None if p_first is None else (p_first if t.model_slot == "A" else 1.0 - p_first)
        rec = {"key": t.key, "id": t.id, "source": t.source, "model": t.model, "baseline": t.baseline,
               "model_slot": t.model_slot, "judge_model": self.s.model, "template": self.t.version,
               "valid": p_first is not None, "method": method, "p_first": p_first, "preference": pref,
               "raw": raw, "attempts": attempts}
        if raws is not None:
            rec["raw_replies"] = raws
        return rec


async def judge_all(tasks: Sequence[JudgeTask], s: JudgeSettings, path: Path, *, progress: bool = True) -> Judge:
    """Judge the tasks not yet in `path`, appending each record as it arrives (flushed)."""
    from tqdm import tqdm

    judge = Judge(s)
    sem = asyncio.Semaphore(s.concurrency)

    async def one(t):
        async with sem:
            return await judge.judge(t)

    pending = [asyncio.ensure_future(one(t)) for t in tasks]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Plain blocking appends on purpose: one short line per verdict, flushed before the next.
        with open(path, "a", encoding="utf-8") as f, \
                tqdm(total=len(pending), desc="judge", unit="pair", disable=not progress) as bar:  # noqa: ASYNC230
            for fut in asyncio.as_completed(pending):
                rec = await fut
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(1)
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await judge.aclose()
    return judge


def run_judge(outputs: dict[str, list[dict]], s: JudgeSettings, run_dir: Path, *, baseline: str | None = None,
              both_orders: bool = False, retry_invalid: bool = False, progress: bool = True) -> tuple[list[dict], Judge | None]:
    """Judge what is missing from run_dir/judgments.jsonl; returns the records for this run's tasks."""
    pairs = pairs_for(list(outputs), baseline)
    if not pairs:
        raise EvalInputError("need outputs of at least two policies to judge")
    tasks = build_tasks(outputs, pairs, s.model, seed=s.seed, both_orders=both_orders, template=s.template)
    path = run_dir / "judgments.jsonl"
    done = read_judgments(path)
    todo = [t for t in tasks if t.key not in done or (retry_invalid and not done[t.key]["valid"])]
    judge = None
    if todo:
        print(f"  judging {len(todo)} of {len(tasks)} (the rest are saved in {path})" if len(todo) < len(tasks)
              else f"  judging {len(todo)} pairs with {s.model} at {s.url}")
        try:
            judge = asyncio.run(judge_all(todo, s, path, progress=progress))
        except JudgeUnavailable as e:
            n = len(read_judgments(path))
            raise JudgeUnavailable(f"{e}\n{n} judgments are saved in {path}; run the same command again to "
                                   "resume (nothing judged is asked twice)") from None
        done = read_judgments(path)
    return [done[t.key] for t in tasks if t.key in done], judge


def current_judgments(run_dir: Path, outputs: dict[str, list[dict]], judge_model: str | None = None) -> list[dict]:
    """Saved judgments that still match today's outputs (either order), from one judge model:
    `judge_model`, or the only one in the file. Empty if nothing was judged yet."""
    saved = list(read_judgments(run_dir / "judgments.jsonl").values())
    judges = sorted({r["judge_model"] for r in saved})
    if not judges:
        return []
    if judge_model is None:
        if len(judges) > 1:
            raise EvalInputError(f"{run_dir / 'judgments.jsonl'} holds verdicts of several judges {judges}; "
                                 "pick one with --judge-model")
        judge_model = judges[0]
    pairs = sorted({(r["model"], r["baseline"]) for r in saved if r["model"] in outputs and r["baseline"] in outputs})
    keys = {t.key for name in TEMPLATES for t in build_tasks(outputs, pairs, judge_model, both_orders=True,
                                                              template=name)}
    return [r for r in saved if r["key"] in keys]
