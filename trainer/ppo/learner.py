"""The PPO learner: a LoRA policy with a value head on its own backbone.

Value head on the policy backbone (not a separate critic). One forward pass yields both
the token logits and V(s_t), and the whole learner is ONE copy of the base model: the policy
is the LoRA adapter, the reference is the same weights with the adapter disabled, and the
critic is a single Linear on the last hidden state — the thesis's single-GPU setup (TRL's
`AutoModelForCausalLMWithValueHead`). A separate critic would double memory and forward
cost for a small model-quality gain; the price of sharing is that value gradients also move
the LoRA weights, which the small `vf_coef` (0.1, TRL's default) keeps in check.

Plain class: tests use it directly; `trainer.ppo.actors` wraps it in a Ray actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.crs import CombinedReward
from trainer.ppo import core
from trainer.ppo.checkpoint import load_learner_state, save_learner_state
from trainer.ppo.config import PPOConfig
from trainer.ppo.experience import Experience, RolloutSample, pad_samples


@dataclass(frozen=True)
class ForwardOut:
    logits: torch.Tensor  # (B, A, V) logits predicting each response token
    values: torch.Tensor | None  # (B, A) V(s_t)


def make_kl_controller(cfg: PPOConfig) -> core.FixedKLController:
    k = cfg.kl
    return core.AdaptiveKLController(k.init_coef, k.target, k.horizon) if k.adaptive else core.FixedKLController(k.init_coef)


def _opt(values: list[float | None]) -> torch.Tensor | None:
    return None if any(v is None for v in values) else torch.tensor(values, dtype=torch.float32)


class Learner:
    def __init__(self, cfg: PPOConfig, device: str | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy_path)
        base = AutoModelForCausalLM.from_pretrained(cfg.model.policy_path, dtype=torch.float32)
        lora = LoraConfig(
            r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
            target_modules=cfg.model.target_modules, task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora).to(self.device)
        self.value_head = nn.Linear(base.config.hidden_size, 1).to(self.device)
        nn.init.normal_(self.value_head.weight, std=1.0 / (base.config.hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.kl_ctl = make_kl_controller(cfg)
        c = cfg.crs
        self.crs = CombinedReward(weight=c.weight, abs_output=c.abs_output, normalise=c.normalise, clip=c.score_clip)
        self.generator = torch.Generator().manual_seed(cfg.run.seed)  # minibatch shuffling
        self.pad_id = self.tokenizer.pad_token_id

    # ------------------------------------------------------------------ forward

    def forward(self, sequences, attention_mask, prompt_len: int, with_values: bool = True) -> ForwardOut:
        """Logits (and values) at the positions that predict the response tokens."""
        A = sequences.shape[1] - prompt_len
        # Left padding: positions must count real tokens only, or rows with short prompts
        # would see shifted rotary positions and disagree with policy_gen's logprobs.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+A)
        out = self.model(
            input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
            output_hidden_states=with_values, logits_to_keep=A + 1, use_cache=False,
        )
        logits = out.logits[:, :-1].float()  # (B, A, V): columns P-1 .. P+A-2
        values = None
        if with_values:
            hidden = out.hidden_states[-1][:, prompt_len - 1 : -1]  # (B, A, H)
            values = self.value_head(hidden.float()).squeeze(-1)  # (B, A)
        return ForwardOut(logits=logits, values=values)

    # ------------------------------------------------------------------ experience

    @torch.no_grad()
    def make_experience(self, samples: list[RolloutSample]) -> tuple[Experience, dict]:
        pb = pad_samples(samples, self.pad_id)
        seq, attn = pb.sequences.to(self.device), pb.attention_mask.to(self.device)
        resp, mask = pb.response_ids.to(self.device), pb.response_mask.to(self.device)
        self.model.eval()
        fwd = self.forward(seq, attn, pb.prompt_len)
        logprobs = core.logprobs_from_logits(fwd.logits, resp)  # (B, A)
        with self.model.disable_adapter():  # the reference policy: same weights, no LoRA
            ref_logprobs = core.logprobs_from_logits(self.forward(seq, attn, pb.prompt_len, with_values=False).logits, resp)
        r_pref = _opt([s.r_pref for s in samples])
        r_abs = _opt([s.r_abs for s in samples])
        crs = self.crs(r_pref, r_abs)
        scores = crs.reward.to(self.device)  # (B,)
        beta = self.kl_ctl.value
        tr = core.kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, beta)
        adv = core.gae(tr.rewards, fwd.values, mask, self.cfg.ppo.gamma, self.cfg.ppo.lam)
        advantages = core.masked_whiten(adv.advantages, mask) if self.cfg.ppo.whiten_advantages else adv.advantages
        gen_lp = pb.gen_logprobs.to(self.device)
        exp = Experience(
            sequences=seq, attention_mask=attn, response_ids=resp, response_mask=mask, prompt_len=pb.prompt_len,
            logprobs=logprobs, ref_logprobs=ref_logprobs, gen_logprobs=gen_lp, values=fwd.values, scores=scores,
            rewards=tr.rewards, advantages=advantages, returns=adv.returns,
        )
        gap = (gen_lp - logprobs).abs() * mask  # (B, A)
        stats = {
            "reward/crs": scores.mean().item(),
            "kl/objective": core.objective_kl(logprobs, ref_logprobs, mask).mean().item(),
            "kl/coef": beta,
            "response_length/mean": mask.sum(1).mean().item(),
            "logprob_gap/mean": (gap.sum() / mask.sum().clamp(min=1)).item(),
            "logprob_gap/max": gap.max().item(),
        }
        if r_pref is not None:
            stats["reward/pref"] = r_pref.mean().item()
        if r_abs is not None:
            stats["reward/abs"] = r_abs.mean().item()
        return exp, stats

    # ------------------------------------------------------------------ update

    def update(self, exp: Experience) -> dict:
        """PPO epochs over shuffled minibatches; returns means of the per-minibatch stats.

        TRL's schedule: each epoch reshuffles the batch and walks it in backward batches of
        mini_batch_size × grad_accum samples; every minibatch's loss is divided by grad_accum
        and backpropagated, and the optimizer steps once per backward batch (so the step sees
        the mean of its minibatches' losses). grad_accum 1 is the plain one-step-per-minibatch.
        """
        p, o = self.cfg.ppo, self.cfg.optim
        self.model.train()
        mb_size, accum = self.cfg.mini_batch_size, p.grad_accum
        acc: dict[str, list[float]] = {}
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        steps = 0
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(exp.size, generator=self.generator).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            for i, idx in enumerate(perm.split(mb_size)):
                fwd = self.forward(exp.sequences[idx], exp.attention_mask[idx], exp.prompt_len)
                mask = exp.response_mask[idx]
                logprobs = core.logprobs_from_logits(fwd.logits, exp.response_ids[idx])  # (b, A)
                pg = core.policy_loss(logprobs, exp.logprobs[idx], exp.advantages[idx], mask, p.clip_range)
                vf = core.value_loss(fwd.values, exp.values[idx], exp.returns[idx], mask, p.clip_range_value)
                entropy = core.masked_mean(core.entropy_from_logits(fwd.logits), mask)
                loss = pg.loss + p.vf_coef * vf.loss - p.entropy_coef * entropy
                (loss / accum).backward()
                if (i + 1) % accum == 0:
                    if o.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    steps += 1
                for k, v in (("loss/policy", pg.loss), ("loss/value", vf.loss), ("policy/clipfrac", pg.clipfrac),
                             ("policy/approx_kl", pg.approx_kl), ("policy/entropy", entropy), ("value/clipfrac", vf.clipfrac)):
                    acc.setdefault(k, []).append(float(v.detach()))
        stats = {k: sum(v) / len(v) for k, v in acc.items()}
        stats["value/explained_variance"] = core.explained_variance(exp.values, exp.returns, exp.response_mask).item()
        stats["ppo/optimizer_steps"] = steps
        return stats

    def train_step(self, samples: list[RolloutSample]) -> dict:
        """CRS → KL-penalised rewards → GAE → PPO epochs → KL controller. Returns the step's stats."""
        t0 = time.perf_counter()
        exp, stats = self.make_experience(samples)
        stats.update(self.update(exp))
        self.kl_ctl.update(stats["kl/objective"], exp.size)
        stats["time/learn"] = time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------ persistence

    def save_adapter(self, path: str | Path) -> str:
        """The LoRA adapter as safetensors (adapter_model.safetensors + adapter_config.json)."""
        # The LoRA on lm_head (if targeted) never changes the base head: don't copy it into every adapter.
        self.model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
        return str(path)

    def save_checkpoint(self, path: str | Path, trainer_state: dict) -> str:
        return save_learner_state(self, Path(path), trainer_state)

    def load_checkpoint(self, path: str | Path) -> dict:
        return load_learner_state(self, Path(path))

    def device_name(self) -> str:
        return str(self.device)
