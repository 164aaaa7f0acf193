"""`EvalConfig`: one YAML drives every step of `crs-rlhf eval run --config eval.yaml`.

Each section is one command with the same names as its flags; a section left out (or
`null`) is a step skipped. Steps run in order prompts -> generate -> judge -> rm_score ->
rm_bench -> report, all in `out_dir`.
"""

from __future__ import annotations

from pydantic import Field

from trainer.config_base import Section  # unknown keys are errors: a typo in YAML names itself


class PromptsSection(Section):
    sources: dict[str, str] = Field(description="source name -> file (or 'fixture' for the shipped OASST sample)")
    formats: dict[str, str] = Field(default_factory=dict, description="source name -> format, where detection is wrong")
    per_source: int | None = Field(None, ge=1, description="prompts drawn from each source (cap)")
    splits: dict[str, int] = Field(default_factory=dict, description="named disjoint splits, e.g. final: 100")
    split_sources: dict[str, list[str]] = Field(
        default_factory=dict, description="limit a split to some sources, e.g. tuning: [oasst] (the thesis's "
        "tuning_eval was OASST only); splits not named draw from every source")
    use_split: str | None = Field(None, description="which split the later steps evaluate (default: all prompts)")
    seed: int = Field(0, description="seed of the draw and of the splits")


class GenerateSection(Section):
    policy_url: str = Field(description="policy_gen (or any OpenAI-compatible server) base URL")
    policies: list[str] = Field(min_length=1, description="NAME or NAME=ADAPTER_DIR")
    max_tokens: int = Field(512, ge=1, description="longest answer")
    temperature: float = Field(0.7, ge=0, description="sampling temperature")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling")
    seed: int = Field(0, description="sampling seed (per prompt)")
    chat: bool = Field(False, description="use /v1/chat/completions (the server's chat template) instead of ChatML completions")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    api_key_env: str = Field("CRS_API_KEY", description="environment variable holding the API key")


class JudgeSection(Section):
    judge_url: str = Field(description="the judge's OpenAI-compatible base URL")
    judge_model: str = Field(description="the judge model's id at judge_url")
    baseline: str | None = Field(None, description="judge every policy against this one (default: all pairs)")
    both_orders: bool = Field(False, description="judge each pair in both orders (position bias)")
    concurrency: int = Field(8, ge=1, description="requests in flight")
    template: str = Field("alpaca_eval", description="judge prompt: 'alpaca_eval' (the thesis's, Fig. 31: "
                          "AlpacaEval's leaderboard prompt, hard verdicts) or 'crs' (single letter, logprob verdicts, "
                          "'judge the content, not the length')")
    max_tokens: int | None = Field(None, ge=1, description="default: the template's (alpaca_eval 100, crs 4)")
    top_logprobs: int = Field(20, ge=0, le=20, description="verdict logprobs asked for; 0 = text verdicts only")
    invalid_retries: int = Field(2, ge=0, description="ask again this often when a verdict is not valid")
    seed: int = Field(0, description="the judge's sampling seed")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the judge's API key")


class RMScoreSection(Section):
    pref_url: str | None = Field(None, description="the preference reward service (None = not scored by it)")
    abs_url: str | None = Field(None, description="the absolute reward service (None = not scored by it)")
    batch_size: int = Field(16, ge=1, description="items per scoring request")
    tokenizer: str | None = Field(None, description="tokenizer folder, for outputs without n_tokens")
    api_key_env: str = Field("CRS_API_KEY", description="environment variable holding the API key")


class RMBenchSection(Section):
    pairs: str = Field(description="RewardBench-format pairs file")
    urls: dict[str, str] = Field(description="RM name -> URL")
    protocol: str = Field("score", description="'score' (our /v1/score) or 'get_reward' (OpenRLHF's)")


class EvalConfig(Section):
    """`crs-rlhf eval run`: each section is one step, in order; a section left out is skipped."""

    out_dir: str = Field(description="the evaluation folder every step reads and writes")
    prompts: PromptsSection | None = Field(None, description="draw the evaluation prompts (`eval prompts`)")
    prompts_file: str | None = Field(None, description="use this prompts.jsonl instead of a prompts section")
    generate: GenerateSection | None = Field(None, description="each policy answers every prompt (`eval generate`)")
    judge: JudgeSection | None = Field(None, description="pairwise LLM-judge verdicts (`eval judge`)")
    rm_score: RMScoreSection | None = Field(None, description="score the answers with both reward models (`eval rm-score`)")
    rm_bench: RMBenchSection | None = Field(None, description="reward-model accuracy on labelled pairs (`eval rm-bench`)")
    report: bool = Field(True, description="write the win-rate report (`eval report`)")
