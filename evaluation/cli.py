"""`crs-rlhf eval COMMAND`: the evaluation chapter as commands on the running services.

    prompts    sample prompt sets (stratified by source, seeded, disjoint named splits)
    generate   every policy answers every prompt (policy_gen or any OpenAI-compatible server)
    judge      pairwise LLM-judge verdicts -> judgments.jsonl (resumable) -> win_rates.csv
    rm-score   both reward models score the outputs -> rm_scores.jsonl, agreement.csv, length.csv
    rm-bench   reward-model accuracy on RewardBench-format pairs over HTTP
    oasst-pairs  the held-out OASST trees' human-ranked pairs, for rm-bench (thesis Table 14)
    report     report.md plus PNG figures
    run        all of the above from one YAML (`--config eval.yaml`)
    annotate   the human ranking page;  rank: merge human rankings (Tideman, Borda)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from evaluation.io import EvalInputError, write_jsonl


def _prompts(sources: list[tuple[str, str]], formats: dict[str, str], per_source: int | None,
             splits: list[tuple[str, int]], seed: int, out: Path,
             split_sources: dict[str, list[str]] | None = None) -> list:
    from evaluation.prompts import load_source, sample_splits

    if not sources:
        raise EvalInputError("give at least one --source NAME=PATH")
    loaded = {name: load_source(name, path, formats.get(name)) for name, path in sources}
    if not splits:
        if per_source is None:
            splits = [(None, sum(len(v) for v in loaded.values()))]
        else:
            splits = [(None, sum(min(per_source, len(v)) for v in loaded.values()))]
    chosen = sample_splits(loaded, splits, seed, per_source, split_sources)
    write_jsonl(out, [p.to_row() for p in chosen])
    named = sorted({p.split for p in chosen if p.split})
    for split in named:
        write_jsonl(out.with_name(f"{out.stem}.{split}.jsonl"), [p.to_row() for p in chosen if p.split == split])
    counts = {}
    for p in chosen:
        counts[(p.split or "-", p.source)] = counts.get((p.split or "-", p.source), 0) + 1
    print(f"wrote {len(chosen)} prompts to {out}" + (f" (+ one file per split: {', '.join(named)})" if named else ""))
    for (split, source), n in sorted(counts.items()):
        print(f"  {split:>10s} {source:>14s} {n:5d}")
    return chosen


def _generate(prompts_path: Path, policies: list[str], url: str, out: Path, sampling, concurrency: int,
              api_key_env: str, overwrite: bool = False, split: str | None = None) -> None:
    from evaluation.generate import parse_policy, run_generate
    from evaluation.prompts import load_prompt_file

    prompts = load_prompt_file(prompts_path)
    if split is not None:
        prompts = [p for p in prompts if p.split == split]
        if not prompts:
            raise EvalInputError(f"{prompts_path}: no prompts in split {split!r}")
    written = run_generate(prompts, [parse_policy(p) for p in policies], url, out, sampling,
                           api_key_env=api_key_env, concurrency=concurrency, overwrite=overwrite)
    for name, path in written.items():
        print(f"  {name}: {path}")


def _judge(run_dir: Path, settings, baseline, both_orders: bool, retry_invalid: bool = False) -> list[dict]:
    from evaluation.generate import load_outputs
    from evaluation.judge import CONTEXT_OVERFLOW, run_judge
    from evaluation.winrates import format_table, win_rate_rows, write_alpaca_annotations, write_win_rates

    outputs = load_outputs(run_dir)
    records, judge = run_judge(outputs, settings, run_dir, baseline=baseline, both_orders=both_orders,
                               retry_invalid=retry_invalid)
    rows = win_rate_rows(records, outputs, judge=settings.model)
    path = write_win_rates(run_dir / "win_rates.csv", rows)
    write_alpaca_annotations(run_dir, records, outputs)  # alpaca_eval can recompute the board from these
    n_invalid = sum(not r["valid"] for r in records)
    too_long = sum(str(r.get("invalid_reason", "")).startswith(CONTEXT_OVERFLOW) for r in records)
    by = {}
    for r in records:
        if r["valid"]:
            by[r["method"]] = by.get(r["method"], 0) + 1
    calls = judge.calls if judge is not None else 0
    print(format_table(rows))
    print(f"{len(records)} judgments ({', '.join(f'{k}: {v}' for k, v in sorted(by.items())) or 'none valid'}; "
          f"invalid: {n_invalid}); judge calls this run: {calls}; wrote {path}")
    if too_long:
        print(f"{too_long} pairs do not fit {settings.model}'s context (recorded invalid, reason in "
              f"{run_dir / 'judgments.jsonl'}): judge them with a longer-context judge, or generate shorter outputs")
    return rows


def _rm_score(run_dir: Path, urls: dict[str, str], batch_size: int, tokenizer: str | None, api_key_env: str,
              baseline: str | None = None, judge_model: str | None = None) -> None:
    from evaluation.generate import load_outputs
    from evaluation.judge import current_judgments, pairs_for
    from evaluation.rm_score import score_outputs, write_rm_tables

    if not urls:
        raise EvalInputError("give --pref-url and/or --abs-url")
    outputs = load_outputs(run_dir)
    rows = score_outputs(outputs, urls, run_dir, batch_size=batch_size, tokenizer=tokenizer, api_key_env=api_key_env)
    judgments = current_judgments(run_dir, outputs, judge_model)
    pairs = sorted({(r["model"], r["baseline"]) for r in judgments}) or pairs_for(list(outputs), baseline)
    written = write_rm_tables(run_dir, outputs, rows, judgments, pairs)
    if not judgments:
        print("  no judgments in this folder: agreement.csv needs `crs-rlhf eval judge` first")
    print(f"scored {len(rows)} (output, RM) pairs; wrote " + ", ".join(str(p) for p in written.values()))


def _rm_bench(pairs: str, url: str, protocol: str, out: str | None, model: str | None = None) -> dict:
    from evaluation.rm_bench import run_rm_bench

    result = run_rm_bench(pairs, url, protocol, out, model=model)
    print(json.dumps(result, indent=2))
    return result


def _report(run_dir: Path) -> None:
    from evaluation.report import make_report

    path = make_report(run_dir)
    pngs = sorted(p.name for p in run_dir.glob("*.png"))
    print(f"wrote {path} and {len(pngs)} figures: {', '.join(pngs)}")


def _judge_settings(url, model, api_key_env, **kw):
    from evaluation.judge import JudgeSettings

    return JudgeSettings(url=url, model=model, api_key=os.environ.get(api_key_env) or None, **kw)


def _sampling(a):
    from evaluation.generate import Sampling

    return Sampling(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed, chat=a.chat)


def run_config(path: str, overrides: list[str]) -> None:
    from evaluation.config import EvalConfig
    from evaluation.generate import Sampling
    from trainer.config_io import load_config

    cfg = load_config(EvalConfig, path, overrides)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The sampled sets (all splits) stay apart from prompts.jsonl, which `generate` writes as
    # the set actually evaluated (one split of them, with `use_split`).
    prompts_path = Path(cfg.prompts_file) if cfg.prompts_file else out / "prompt_sets.jsonl"
    if cfg.prompts:
        p = cfg.prompts
        print("[eval] prompts")
        _prompts(list(p.sources.items()), p.formats, p.per_source, list(p.splits.items()), p.seed, prompts_path,
                 p.split_sources)
    if cfg.generate:
        g = cfg.generate
        print("[eval] generate")
        use_split = cfg.prompts.use_split if cfg.prompts else None
        _generate(prompts_path, g.policies, g.policy_url, out,
                  Sampling(g.max_tokens, g.temperature, g.top_p, g.seed, g.chat), g.concurrency, g.api_key_env,
                  split=use_split)
    if cfg.judge:
        j = cfg.judge
        print("[eval] judge")
        _judge(out, _judge_settings(j.judge_url, j.judge_model, j.api_key_env, concurrency=j.concurrency,
                                    template=j.template, max_tokens=j.max_tokens, top_logprobs=j.top_logprobs,
                                    invalid_retries=j.invalid_retries, seed=j.seed), j.baseline, j.both_orders)
    if cfg.rm_score:
        r = cfg.rm_score
        print("[eval] rm-score")
        urls = {k: v for k, v in (("pref", r.pref_url), ("abs", r.abs_url)) if v}
        _rm_score(out, urls, r.batch_size, r.tokenizer, r.api_key_env,
                  baseline=cfg.judge.baseline if cfg.judge else None,
                  judge_model=cfg.judge.judge_model if cfg.judge else None)
    if cfg.rm_bench:
        b = cfg.rm_bench
        for name, url in b.urls.items():
            print(f"[eval] rm-bench {name}")
            _rm_bench(b.pairs, url, b.protocol, str(out / f"rm_bench_{name}.json"), model=name)
    if cfg.report:
        print("[eval] report")
        _report(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crs-rlhf eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prompts", help="sample prompt sets")
    s.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="repeatable; PATH 'fixture' = shipped OASST")
    s.add_argument("--format", action="append", default=[], metavar="NAME=FMT", help="fastchat|alpaca|hh|oasst|plain")
    s.add_argument("--per-source", type=int, help="prompts drawn from each source")
    s.add_argument("--split", action="append", default=[], metavar="NAME=N", help="disjoint named split of N prompts")
    s.add_argument("--split-source", action="append", default=[], metavar="SPLIT=SOURCE",
                   help="repeatable: draw SPLIT only from these sources (thesis: tuning=oasst)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="prompts.jsonl")

    s = sub.add_parser("generate", help="responses of each policy")
    s.add_argument("--prompts", required=True)
    s.add_argument("--split", help="only prompts of this split")
    s.add_argument("--policy-url", required=True)
    s.add_argument("--policy", action="append", required=True, metavar="NAME[=ADAPTER_DIR]")
    s.add_argument("--out", required=True, help="evaluation folder")
    s.add_argument("--max-tokens", type=int, default=512)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat", action="store_true", help="/v1/chat/completions (the server's chat template)")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--api-key-env", default="CRS_API_KEY", help="environment variable holding the API key")
    s.add_argument("--overwrite", action="store_true")

    s = sub.add_parser("judge", help="pairwise LLM-judge win rates")
    s.add_argument("--dir", required=True)
    s.add_argument("--judge-url", required=True)
    s.add_argument("--judge-model", required=True)
    s.add_argument("--baseline", help="judge every policy against this one (default: all pairs)")
    s.add_argument("--both-orders", action="store_true", help="judge each pair in both orders (position bias)")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--template", default="alpaca_eval", choices=["alpaca_eval", "crs"],
                   help="judge prompt: alpaca_eval (the thesis's: AlpacaEval's leaderboard prompt, hard verdicts) or "
                        "crs (one letter, logprob verdicts, 'judge the content, not the length')")
    s.add_argument("--max-tokens", type=int, default=None, help="default: the template's (alpaca_eval 100, crs 4)")
    s.add_argument("--top-logprobs", type=int, default=20, help="0: text verdicts only (crs template)")
    s.add_argument("--invalid-retries", type=int, default=2)
    s.add_argument("--retry-invalid", action="store_true", help="ask again for verdicts saved as invalid")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--api-key-env", default="OPENAI_API_KEY")

    s = sub.add_parser("rm-score", help="score outputs with both reward models")
    s.add_argument("--dir", required=True)
    s.add_argument("--pref-url")
    s.add_argument("--abs-url")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--tokenizer", help="for outputs without n_tokens")
    s.add_argument("--baseline")
    s.add_argument("--judge-model", help="whose verdicts agreement.csv compares with")
    s.add_argument("--api-key-env", default="CRS_API_KEY")

    s = sub.add_parser("rm-bench", help="RM accuracy on RewardBench-format pairs")
    s.add_argument("--pairs", required=True)
    s.add_argument("--url", required=True)
    s.add_argument("--protocol", choices=["score", "get_reward"], default="score")
    s.add_argument("--model", help="name in the results (default: the server's /v1/models)")
    s.add_argument("--out")

    s = sub.add_parser("oasst-pairs", help="human-ranked pairs of the held-out OASST trees (RewardBench format)")
    s.add_argument("--data", required=True, help="the OASST export ('fixture' = the shipped sample)")
    s.add_argument("--split-file", help="default: the export's <data>.splits.json")
    s.add_argument("--out", required=True)

    s = sub.add_parser("report", help="report.md and figures")
    s.add_argument("dir")

    s = sub.add_parser("run", help="every step from one YAML")
    s.add_argument("--config", required=True)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("annotate", "rank"):  # the human-evaluation tools keep their own flags
        return int(importlib.import_module(f"evaluation.human.{argv[0]}").main(argv[1:]) or 0)
    a = build_parser().parse_args(argv)
    from evaluation.judge import JudgeUnavailable
    from evaluation.prompts import parse_assignments
    from trainer.config_io import ConfigError

    try:
        if a.command == "prompts":
            splits = [(k, int(v)) for k, v in parse_assignments(a.split, "--split")]
            limits: dict[str, list[str]] = {}
            for split, src in parse_assignments(a.split_source, "--split-source"):
                limits.setdefault(split, []).append(src)
            _prompts(parse_assignments(a.source, "--source"), dict(parse_assignments(a.format, "--format")),
                     a.per_source, splits, a.seed, Path(a.out), limits)
        elif a.command == "generate":
            _generate(Path(a.prompts), a.policy, a.policy_url, Path(a.out), _sampling(a), a.concurrency,
                      a.api_key_env, a.overwrite, a.split)
        elif a.command == "judge":
            settings = _judge_settings(a.judge_url, a.judge_model, a.api_key_env, concurrency=a.concurrency,
                                       template=a.template, max_tokens=a.max_tokens, top_logprobs=a.top_logprobs,
                                       invalid_retries=a.invalid_retries, seed=a.seed)
            _judge(Path(a.dir), settings, a.baseline, a.both_orders, a.retry_invalid)
        elif a.command == "rm-score":
            urls = {k: v for k, v in (("pref", a.pref_url), ("abs", a.abs_url)) if v}
            _rm_score(Path(a.dir), urls, a.batch_size, a.tokenizer, a.api_key_env, a.baseline, a.judge_model)
        elif a.command == "rm-bench":
            _rm_bench(a.pairs, a.url, a.protocol, a.out, a.model)
        elif a.command == "oasst-pairs":
            from evaluation.oasst_pairs import held_out_pairs

            rows = held_out_pairs(a.data, a.split_file)
            write_jsonl(Path(a.out), rows)
            print(f"wrote {len(rows)} human-ranked pairs of the held-out trees to {a.out}")
        elif a.command == "report":
            _report(Path(a.dir))
        elif a.command == "run":
            run_config(a.config, a.overrides)
    except (EvalInputError, ConfigError, ValueError) as e:
        print(f"crs-rlhf eval {a.command}: error: {e}", file=sys.stderr)
        return 2
    except JudgeUnavailable as e:
        print(f"crs-rlhf eval {a.command}: judge failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
