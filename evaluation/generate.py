"""`crs-rlhf eval generate`: every policy answers every prompt through an OpenAI-compatible server.

A policy is `NAME=ADAPTER_DIR` (a LoRA loaded into policy_gen under NAME for the run, then
unloaded) or a bare `NAME` the server already serves (the base model, or any model of a
vLLM / OpenAI-compatible server). Prompts go to /v1/completions formatted with our ChatML,
exactly as the policy saw them in training (or to /v1/chat/completions with `--chat`, for
instruct models with their own template). Outputs are AlpacaEval's format, one file per
policy, so `alpaca_eval` takes them unchanged; sampling settings go next to them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluation.io import EvalInputError, read_json, write_json, write_jsonl
from evaluation.prompts import Prompt, instruction_text


@dataclass(frozen=True)
class Sampling:
    """Evaluation sampling; every field is sent explicitly (servers' defaults differ)."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0  # prompt i uses seed + i
    chat: bool = False


@dataclass(frozen=True)
class PolicySpec:
    name: str  # the outputs' name (outputs/NAME.json); also the served model id unless `served` is set
    adapter: Path | None = None
    served: str | None = None  # generate with this served model id under another name (e.g. "sft")

    @property
    def model(self) -> str:
        return self.served or self.name


def parse_policy(value: str) -> PolicySpec:
    name, sep, path = value.partition("=")
    if not name or (sep and not path):
        raise EvalInputError(f"--policy expects NAME or NAME=ADAPTER_DIR, got {value!r}")
    if sep and not Path(path).is_dir():
        raise EvalInputError(f"--policy {name}={path}: the adapter folder does not exist")
    return PolicySpec(name, Path(path).resolve() if sep else None)


def outputs_path(run_dir: Path, name: str) -> Path:
    return run_dir / "outputs" / f"{name}.json"


def load_outputs(run_dir: Path) -> dict[str, list[dict]]:
    """{policy name: AlpacaEval records} for every outputs/NAME.json in the folder."""
    folder = run_dir / "outputs"
    files = sorted(p for p in folder.glob("*.json") if not p.name.endswith(".meta.json")) if folder.is_dir() else []
    if not files:
        raise EvalInputError(f"{folder}: no outputs (run `crs-rlhf eval generate --out {run_dir}` first)")
    out = {}
    for f in files:
        rows = read_json(f)
        if not isinstance(rows, list) or any(not isinstance(r, dict) or "output" not in r for r in rows):
            raise EvalInputError(f"{f}: expected AlpacaEval outputs, a JSON list of {{instruction, output, ...}}")
        out[f.stem] = rows
    return out


async def _generate_one(api, model: str, prompt: Prompt, index: int, sp: Sampling, sem, retry):
    from services.common.chat import format_prompt

    async with sem:
        common = {"model": model, "max_tokens": sp.max_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                  "seed": sp.seed + index}
        if sp.chat:
            resp = await retry(api.chat.completions.create, messages=prompt.messages, **common)
            text = resp.choices[0].message.content or ""
        else:
            resp = await retry(api.completions.create, prompt=format_prompt(prompt.messages), **common)
            text = resp.choices[0].text
        tokens = resp.usage.completion_tokens if resp.usage is not None else None
        row = {"id": prompt.id, "instruction": instruction_text(prompt.messages), "output": text,
               "generator": None, "dataset": prompt.source, "n_tokens": tokens}
        if prompt.category is not None:  # per-category win rates (thesis Table 22); AlpacaEval ignores it
            row["category"] = str(prompt.category)
        return row


async def generate_policy(url: str, spec: PolicySpec, prompts: Sequence[Prompt], sp: Sampling, *,
                          api_key: str | None = None, concurrency: int = 8, progress: bool = True) -> list[dict]:
    """One output per prompt (in prompt order) from one policy; the adapter, if any, is loaded
    under the policy's name for the duration and unloaded after."""
    import openai
    from tqdm import tqdm

    from services.common.identity import run_headers
    from trainer.clients.policy import PolicyClient

    client = PolicyClient(url, model=spec.model, api_key=api_key)
    api = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "EMPTY", max_retries=0,
                             timeout=600, default_headers=run_headers("eval", 0, None))  # counted as run "eval"
    try:
        if spec.adapter is not None:
            await client.load_adapter(str(spec.adapter), spec.name)
        sem = asyncio.Semaphore(concurrency)
        tasks = [asyncio.ensure_future(_generate_one(api, spec.model, p, i, sp, sem, client._retry))
                 for i, p in enumerate(prompts)]
        with tqdm(total=len(tasks), desc=f"generate {spec.name}", unit="prompt", disable=not progress) as bar:
            for t in asyncio.as_completed(tasks):
                await t
                bar.update(1)
        rows = [t.result() for t in tasks]
    except openai.APIStatusError as e:
        raise EvalInputError(f"{url} refused generation for {spec.name!r} (HTTP {e.status_code}): {e.message}") from None
    except openai.APIConnectionError as e:
        raise EvalInputError(f"cannot reach the policy server at {url} ({e}); is it running?") from None
    finally:
        if spec.adapter is not None:
            try:
                await client.unload_adapter(spec.name)
            except Exception:  # noqa: BLE001, S110 - never hide the real error behind a failed clean-up
                pass
        await api.close()
        await client.aclose()
    for r in rows:
        r["generator"] = spec.name
    return rows


def run_generate(prompts: Sequence[Prompt], policies: Sequence[PolicySpec], url: str, out_dir: Path,
                 sp: Sampling = Sampling(), *, api_key_env: str = "CRS_API_KEY", concurrency: int = 8,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Path]:
    """Write prompts.jsonl, outputs/NAME.json and outputs/NAME.meta.json; a policy whose outputs
    already exist for the same prompts and sampling is skipped (re-runs are cheap)."""
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise EvalInputError(f"policy names must be unique, got {names}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "prompts.jsonl", [p.to_row() for p in prompts])
    api_key = os.environ.get(api_key_env) or None
    ids = [p.id for p in prompts]
    written = {}
    for spec in policies:
        path = outputs_path(out_dir, spec.name)
        meta_path = path.with_name(f"{spec.name}.meta.json")
        meta = {"policy": spec.name, "adapter": str(spec.adapter) if spec.adapter else None, "url": url,
                "sampling": asdict(sp), "endpoint": "chat" if sp.chat else "completions", "n_prompts": len(ids)}
        if not overwrite and path.is_file() and meta_path.is_file():
            old, old_meta = read_json(path), read_json(meta_path)
            if [r.get("id") for r in old] == ids and old_meta.get("sampling") == meta["sampling"]:
                print(f"  {spec.name}: outputs exist for these prompts and settings, skipped ({path})")
                written[spec.name] = path
                continue
        rows = asyncio.run(generate_policy(url, spec, prompts, sp, api_key=api_key, concurrency=concurrency,
                                           progress=progress))
        write_json(path, rows)
        write_json(meta_path, meta)
        written[spec.name] = path
    return written
