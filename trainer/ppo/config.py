"""`PPOConfig`: the one validated config of a PPO run, grouped like the thesis describes it.

Defaults follow the thesis (docs/method.md): Adam (0.9, 0.95, 1e-8), lr 1.41e-5, weight
decay 1e-6, batch 16, 4 PPO epochs, initial β 0.002 (Table 8; the thesis text and code use
0.02, the preset configs/thesis/ppo_*.yaml does), clip 0.4 for policy and value, score clip
4, prompts ≤ 1024 tokens, ≤ 512 new tokens, LoRA r 16 / alpha 32 on all linear layers, CRS
weight 0.25 on the absolute RM's logit; top_k 0 / top_p 1 and GAE γ 1 / λ 0.95 are TRL's
defaults, which the thesis code ran with. The update schedule defaults to 4 minibatches
with clipping (ours); the thesis preset uses TRL 0.7's mini-batch 2 × accumulation 8.
Unknown keys are errors everywhere (`extra="forbid"`), so a typo names itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from services.common.identity import RUN_ID_RULE, is_valid_run_id
from trainer.config_base import Section
from trainer.data.rl import RLPromptOptions


class ModelSection(Section):
    policy_path: str = Field("", description="SFT (or base) causal LM folder; the PPO policy starts here.")
    lora_r: int = Field(16, gt=0, description="LoRA rank of the policy adapter (thesis 16).")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha: the update is scaled by alpha / r (thesis 32).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field("all-linear", description="peft target modules; 'all-linear' as the thesis.")


class OptimSection(Section):
    lr: float = Field(1.41e-5, gt=0, description="AdamW learning rate, constant (thesis 1.41e-5).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (thesis 0.9, 0.95).")
    eps: float = Field(1e-8, description="AdamW epsilon.")
    weight_decay: float = Field(1e-6, description="AdamW weight decay (thesis 1e-6).")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping; null disables it (thesis / TRL 0.7: off).")


class PPOSection(Section):
    batch_size: int = Field(16, gt=0, description="Rollouts (prompt × completion) per PPO step.")
    completions_per_prompt: int = Field(1, gt=0, description="n: samples per prompt; batch_size must divide by it.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each batch of rollouts, each reshuffled (thesis 4).")
    num_minibatches: int = Field(4, gt=0, description="Minibatches per epoch (used when mini_batch_size is unset).")
    # TRL semantics: a forward/backward pass sees mini_batch_size samples, and the optimizer
    # steps once per grad_accum of them, so each epoch takes batch_size / (mini · accum) steps.
    mini_batch_size: int | None = Field(None, gt=0, description="Samples per forward/backward; None = batch_size / num_minibatches.")
    grad_accum: int = Field(1, gt=0, description="Minibatches whose gradients are summed (averaged) into one optimizer step.")
    clip_range: float = Field(0.4, gt=0, description="Policy ratio clip ε.")
    clip_range_value: float = Field(0.4, gt=0, description="Value clip around the old values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (shared backbone: keep it small).")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus (0 = off, as TRL).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount γ (TRL's 1).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (TRL's 0.95).")
    whiten_advantages: bool = Field(True, description="Whiten the advantages over the batch (masked mean 0, std 1).")


class KLSection(Section):
    init_coef: float = Field(0.002, ge=0, description="Initial β of the per-token KL penalty.")
    adaptive: bool = Field(True, description="Ziegler et al.'s adaptive controller; false = fixed β.")
    target: float = Field(6.0, gt=0, description="Target objective KL (nats) of the adaptive controller.")
    horizon: int = Field(10000, gt=0, description="Horizon of the adaptive controller: β moves by at most "
                         "±20 % × batch_size / horizon per step.")


class GenerationSection(Section):
    max_prompt_tokens: int = Field(1024, gt=0, description="Longer prompts are dropped (and counted).")
    max_new_tokens: int = Field(512, gt=0, description="Longest completion (thesis 512). max_prompt_tokens + "
                                "max_new_tokens must fit policy_gen's --max-model-len (checked before step 1).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; keep 1, where the sampled policy is π itself.")
    top_k: int = Field(0, ge=0, description="0 = off (vLLM spells it -1; the client translates).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; 1 = off (TRL's default).")


class CRSSection(Section):
    weight: float = Field(0.25, ge=0, le=1, description="w in r = w·r_pref + (1−w)·r_abs.")
    abs_output: Literal["logit", "probability"] = Field(
        "logit", description="The absolute RM's signal: its logit (thesis) or sigmoid probability.")
    normalise: Literal["none", "running", "batch"] = Field(
        "none", description="Normalise each RM's scores before mixing: running moments, per batch, or not (thesis).")
    score_clip: float | None = Field(4.0, gt=0, description="Clip the mixed score to ±this; null = off.")


class ServicesSection(Section):
    policy_urls: list[str] = Field(default_factory=list, description="policy_gen replicas (vLLM-compatible "
                                   "/v1/completions): generation goes to the least busy healthy one, and each step's "
                                   "adapter is loaded into every one. `policy_url: URL` is the one-replica spelling.")
    policy_model: str | None = Field(None, description="Base model id served by policy_gen; None = ask /v1/models.")
    reward_pref_urls: list[str] = Field(default_factory=list, description="Preference RM replicas, round-robin.")
    reward_abs_urls: list[str] = Field(default_factory=list, description="Absolute RM replicas, round-robin.")
    # From $CRS_API_KEY by default (compose/k8s hand the key to the Ray pods by env only), and
    # excluded from dumps so the key never lands in the run folder's config.yaml.
    api_key: str | None = Field(default_factory=lambda: os.environ.get("CRS_API_KEY") or None, exclude=True, repr=False,
                                description="Bearer key for all three services; default $CRS_API_KEY, never dumped.")
    timeout_s: float = Field(120.0, gt=0, description="Per HTTP request.")
    retry_max_attempts: int = Field(50, gt=0, description="A request gives up after this many attempts (or when the "
                                    "step's deadline, run.step_timeout_s, is spent).")
    unhealthy_cooldown_s: float = Field(5.0, ge=0, description="A failing URL is skipped for this long.")
    max_concurrency: int = Field(16, gt=0, description="Generation requests in flight per rollout worker.")

    @model_validator(mode="before")
    @classmethod
    def _one_policy_url(cls, data):
        # `policy_url` (one replica) predates `policy_urls`; both spellings stay valid, and a
        # config that sets both to different things is refused rather than silently merged.
        if not isinstance(data, dict) or "policy_url" not in data:
            return data
        data = dict(data)
        one, many = data.pop("policy_url"), data.get("policy_urls") or []
        if one and many and list(many) != [one]:
            raise ValueError(f"services.policy_url ({one}) and services.policy_urls ({list(many)}) disagree: set only "
                             "policy_urls (list every replica there) and leave policy_url empty")
        if one and not many:
            data["policy_urls"] = [one]
        return data

    @field_validator("policy_urls")
    @classmethod
    def _distinct_policy_urls(cls, urls: list[str]) -> list[str]:
        urls = [u.rstrip("/") for u in urls]
        if twice := sorted({u for u in urls if urls.count(u) > 1}):
            raise ValueError(f"services.policy_urls lists {twice} more than once: list each replica once")
        return urls

    @model_serializer(mode="wrap")
    def _dump_one_policy_url(self, handler):
        # A one-replica config dumps as before (`policy_url: URL`), so RUN/config.yaml files and
        # scripts that edit a dumped config's policy_url keep working.
        data = handler(self)
        if len(self.policy_urls) <= 1:
            data.pop("policy_urls", None)
            data = {"policy_url": self.policy_url, **data}
        return data

    @property
    def policy_url(self) -> str:
        """The first policy_gen replica ("" when none is set): what one-replica code paths call."""
        return self.policy_urls[0] if self.policy_urls else ""


class RaySection(Section):
    address: str | None = Field(None, description="Join this Ray cluster ('auto' or host:port); None = "
                         "$RAY_ADDRESS when set (as Ray does), else start a local one.")
    num_cpus: int | None = Field(None, description="CPUs for a local cluster; None = Ray's default.")
    num_rollout_workers: int = Field(1, gt=0, description="Rollout actors; each step's prompts are split among them.")
    learner_gpu: Literal["auto", "never", "always"] = Field("auto", description="auto: take a GPU when the cluster has one.")
    placement_wait_s: float = Field(300.0, gt=0, description="Wait this long for the cluster to place the learner "
                                    "workers (logged every 15 s with what is missing), e.g. for a lost node to rejoin.")


class LearnerSection(Section):
    """How the learner runs: data-parallel workers, precision, memory savers (docs/ppo.md, "The learner").

    The GPU switch stays `ray.learner_gpu`: with N workers each takes one GPU when it applies.
    """

    num_workers: int = Field(1, gt=0, description="Data-parallel learner workers (Ray actors in one torch.distributed "
                             "group); each takes an equal share of every minibatch. 1 = the single learner actor.")
    collective_timeout_s: float = Field(600.0, gt=0, description="A collective (gradient all_reduce) waiting longer "
                                        "than this fails the step: a dead peer must not hang the run.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Forward passes under autocast: auto = bf16 on CUDA, fp32 on CPU. Weights, logprob math, "
        "losses and the optimizer stay fp32 either way.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, ~30 % "
                                         "more compute); non-reentrant, so it works with the frozen LoRA base.")
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="Split forwards into micro-batches of at most this many rows × padded length tokens "
        "(gradients accumulated with token weights: the same step); null = one pass per minibatch.")


class RunSection(Section):
    output_dir: str = Field("runs/ppo", description="The run folder (adapters, checkpoints, metrics); it must lie under "
                            "policy_gen's --adapter-root.")
    name: str | None = Field(
        None, description="The run's id on shared servers (X-CRS-Run header: their logs and per-run metrics), "
        f"{RUN_ID_RULE}; null = the run folder's tag, ppo-<8 hex>.")
    steps: int = Field(100, gt=0, description="PPO steps in total (a resumed run continues up to this).")
    checkpoint_every: int = Field(10, gt=0, description="Checkpoint period in steps (the last step is always checkpointed).")
    seed: int = Field(0, description="Prompt order, sampling seeds, minibatch shuffling, initialisation.")
    data_source: str = Field("fixture", description="'fixture' (the shipped OASST sample) or an OASST file path.")
    prompts: RLPromptOptions = Field(
        default_factory=RLPromptOptions, description="Which prompts of data_source: languages, held-out trees, "
        "fraction, incomplete trees (trainer.data.RLPromptOptions).")
    step_timeout_s: float = Field(
        900.0, gt=0, description="One deadline for a step's failures: client retries, redoing the rollout, waiting for "
        "services' /ready and for a free policy_gen adapter slot all draw on it; once spent the step fails (exit 3). "
        "Also bounds the wait for every service's /ready before step 1 (vLLM can take minutes to load).")
    overlap_scoring: bool = Field(True, description="Score each completion as it arrives (false: after all generation).")
    tensorboard: bool = Field(True, description="Write RUN/tensorboard/.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Extra loggers beside metrics.jsonl: 'wandb' needs `pip install crs-rlhf[wandb]`.")
    wandb_project: str = Field("crs-rlhf", description="W&B project (WANDB_MODE=offline works without an account).")
    keep_adapters: int | None = Field(
        3, ge=1, description="Keep the newest N adapters/step-* folders plus those of checkpoints; null = keep all.")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue from the run folder's latest checkpoint when there is one, else start "
        "fresh (cluster jobs: a resubmitted job picks up where it stopped); never: start fresh (`--resume` sets auto).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and not is_valid_run_id(v):
            raise ValueError(f"run.name {v!r} must be {RUN_ID_RULE} (servers label metrics by it), e.g. 'ppo-w025-seed1'")
        return v


def pin_paths(cfg: PPOConfig) -> PPOConfig:
    """A copy of `cfg` with every path a Ray worker opens made absolute, as this process sees it.

    Workers on another node run in another folder (where `ray start` ran), so a relative
    `model.policy_path` would name nothing there, or something else. Pinned: `run.output_dir`
    (the run tag and adapter names derive from it), every `model.*_path` and `run.data_source`
    that exist here. A path that does not exist here is left alone: it may be a hub model id.
    """
    def pinned(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    model = {k: pinned(v) for k, v in cfg.model.model_dump().items() if k.endswith("_path") and isinstance(v, str)}
    run = {"output_dir": str(cfg.run_dir)}
    if cfg.run.data_source != "fixture":
        run["data_source"] = pinned(cfg.run.data_source)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=model), "run": cfg.run.model_copy(update=run)})


def run_tag(run_dir: Path) -> str:
    """Adapter-name prefix unique to a run folder: runs sharing one policy_gen never collide."""
    return "ppo-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]


# Four budgets that one step deadline replaced: a config still setting one gets this error
# (rather than pydantic's bare "extra inputs are not permitted").
REPLACED_BY_STEP_TIMEOUT = {
    "services": ("retry_max_s", "wait_ready_s"),
    "run": ("step_retries", "adapter_slot_wait_s"),
}


class PPOConfig(Section):
    """`crs-rlhf train`: PPO on the Combined Reward Signal, grouped as the thesis describes it."""

    model: ModelSection = Field(default_factory=ModelSection, description="The policy: where it starts, its LoRA adapter.")
    optim: OptimSection = Field(default_factory=OptimSection, description="The optimizer.")
    ppo: PPOSection = Field(default_factory=PPOSection, description="Batch, update schedule and the PPO losses.")
    kl: KLSection = Field(default_factory=KLSection, description="The KL penalty against the reference (the policy "
                          "with its adapter disabled).")
    generation: GenerationSection = Field(default_factory=GenerationSection, description="Sampling the rollouts.")
    crs: CRSSection = Field(default_factory=CRSSection, description="The Combined Reward Signal.")
    services: ServicesSection = Field(default_factory=ServicesSection, description="The services a run calls: "
                                      "policy_gen replicas and both reward models, and the HTTP clients' behaviour.")
    ray: RaySection = Field(default_factory=RaySection, description="The Ray cluster and its actors.")
    learner: LearnerSection = Field(default_factory=LearnerSection, description="How the learner runs.")
    run: RunSection = Field(default_factory=RunSection, description="The run: its folder, length, data, deadline "
                            "and loggers.")

    @model_validator(mode="before")
    @classmethod
    def _no_replaced_budgets(cls, data):
        if not isinstance(data, dict):
            return data
        old = [f"{section}.{key}" for section, keys in REPLACED_BY_STEP_TIMEOUT.items()
               if isinstance(data.get(section), dict) for key in keys if key in data[section]]
        if old:
            raise ValueError(f"{', '.join(old)}: replaced by run.step_timeout_s, one deadline per step that bounds "
                             "client retries, rollout redos, readiness waits and adapter-slot waits together "
                             "(default 900 s); remove the old key and set run.step_timeout_s if you need another deadline")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        p = self.ppo
        if p.batch_size % p.completions_per_prompt:
            raise ValueError(f"ppo.batch_size {p.batch_size} must be a multiple of ppo.completions_per_prompt {p.completions_per_prompt}")
        if p.mini_batch_size is None:
            if p.batch_size % p.num_minibatches:
                raise ValueError(f"ppo.batch_size {p.batch_size} must be a multiple of ppo.num_minibatches {p.num_minibatches}")
        elif "num_minibatches" in p.model_fields_set and p.num_minibatches * p.mini_batch_size != p.batch_size:
            raise ValueError("set either ppo.num_minibatches or ppo.mini_batch_size, not both "
                             f"({p.num_minibatches} × {p.mini_batch_size} != batch_size {p.batch_size})")
        if p.batch_size % (self.mini_batch_size * p.grad_accum):
            raise ValueError(f"ppo.batch_size {p.batch_size} must be a multiple of ppo.mini_batch_size × ppo.grad_accum "
                             f"({self.mini_batch_size} × {p.grad_accum}); e.g. the thesis's 16 = 2 × 8")
        n = self.learner.num_workers
        if self.mini_batch_size % n:
            fits = [d for d in range(1, self.mini_batch_size + 1) if self.mini_batch_size % d == 0]
            raise ValueError(f"learner.num_workers {n} must divide the minibatch size {self.mini_batch_size} "
                             f"(ppo.mini_batch_size, or batch_size / num_minibatches): each worker takes an equal share "
                             f"of every minibatch. Use num_workers in {fits} or a minibatch size that {n} divides")
        if "wandb" in self.run.report_to and importlib.util.find_spec("wandb") is None:
            raise ValueError("run.report_to includes 'wandb' but wandb is not installed: "
                             "pip install 'crs-rlhf[wandb]' (or remove wandb from run.report_to)")
        w = self.crs.weight
        if w > 0 and not self.services.reward_pref_urls and self.services.policy_url:
            raise ValueError(f"crs.weight {w} > 0 needs services.reward_pref_urls (or set crs.weight 0)")
        if w < 1 and not self.services.reward_abs_urls and self.services.policy_url:
            raise ValueError(f"crs.weight {w} < 1 needs services.reward_abs_urls (or set crs.weight 1)")
        return self

    @property
    def mini_batch_size(self) -> int:
        """Samples per forward/backward pass (ppo.mini_batch_size, or batch_size / num_minibatches)."""
        p = self.ppo
        return p.mini_batch_size or p.batch_size // p.num_minibatches

    @property
    def optimizer_steps_per_batch(self) -> int:
        """ppo_epochs × batch_size / (mini_batch_size × grad_accum): thesis 4 × 16 / (2 × 8) = 4."""
        p = self.ppo
        return p.ppo_epochs * p.batch_size // (self.mini_batch_size * p.grad_accum)

    @property
    def run_dir(self) -> Path:
        # Absolute: adapter paths are sent to policy_gen, another process with its own cwd.
        return Path(self.run.output_dir).resolve()

    @property
    def run_id(self) -> str:
        """What this run calls itself on shared servers (X-CRS-Run): run.name or the run folder's tag."""
        return self.run.name or run_tag(self.run_dir)
