"""`EvalConfig`: one YAML drives every step of `crs-rlhf eval run --config eval.yaml`.

Each section is one command with the same names as its flags; a section left out (or
`null`) is a step skipped. Steps run in order prompts -> generate -> judge -> rm_score ->
rm_bench -> report, all in `out_dir`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in YAML is an error naming the key


class PromptsSection(_Section):
    sources: dict[str, str] = Field(description="source name -> file (or 'fixture' for the shipped OASST sample)")
    formats: dict[str, str] = Field(default_factory=dict, description="source name -> format, where detection is wrong")
    per_source: int | None = Field(None, ge=1, description="prompts drawn from each source (cap)")
    splits: dict[str, int] = Field(default_factory=dict, description="named disjoint splits, e.g. final: 100")
    split_sources: dict[str, list[str]] = Field(
        default_factory=dict, description="limit a split to some sources, e.g. tuning: [oasst] (the thesis's "
        "tuning_eval was OASST only); splits not named draw from every source")
    use_split: str | None = Field(None, description="which split the later steps evaluate (default: all prompts)")
    seed: int = 0


class GenerateSection(_Section):
    policy_url: str
    policies: list[str] = Field(min_length=1, description="NAME or NAME=ADAPTER_DIR")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    chat: bool = False
    concurrency: int = Field(8, ge=1)
    api_key_env: str = "CRS_API_KEY"


class JudgeSection(_Section):
    judge_url: str
    judge_model: str
    baseline: str | None = None
    both_orders: bool = False
    concurrency: int = Field(8, ge=1)
    template: str = Field("alpaca_eval", description="judge prompt: 'alpaca_eval' (the thesis's, Fig. 31: "
                          "AlpacaEval's leaderboard prompt, hard verdicts) or 'crs' (single letter, logprob verdicts, "
                          "'judge the content, not the length')")
    max_tokens: int | None = Field(None, ge=1, description="default: the template's (alpaca_eval 100, crs 4)")
    top_logprobs: int = Field(20, ge=0, le=20)
    invalid_retries: int = Field(2, ge=0)
    seed: int = 0
    api_key_env: str = "OPENAI_API_KEY"


class RMScoreSection(_Section):
    pref_url: str | None = None
    abs_url: str | None = None
    batch_size: int = Field(16, ge=1)
    tokenizer: str | None = None
    api_key_env: str = "CRS_API_KEY"


class RMBenchSection(_Section):
    pairs: str
    urls: dict[str, str] = Field(description="RM name -> URL")
    protocol: str = "score"


class EvalConfig(_Section):
    out_dir: str
    prompts: PromptsSection | None = None
    prompts_file: str | None = Field(None, description="use this prompts.jsonl instead of a prompts section")
    generate: GenerateSection | None = None
    judge: JudgeSection | None = None
    rm_score: RMScoreSection | None = None
    rm_bench: RMBenchSection | None = None
    report: bool = True
