"""The PPO learner: a LoRA policy with a value head on its own backbone.

Value head on the policy backbone (not a separate critic). One forward pass yields both
the token logits and V(s_t), and the whole learner is ONE copy of the base model: the policy
is the LoRA adapter, the reference is the same weights with the adapter disabled, and the
critic is a single Linear on the last hidden state — the thesis's single-GPU setup (TRL's
`AutoModelForCausalLMWithValueHead`). A separate critic would double memory and forward
cost for a small model-quality gain; the price of sharing is that value gradients also move
the LoRA weights, which the small `vf_coef` (0.1, TRL's default) keeps in check.

Plain class: tests use it directly; `trainer.ppo.learner_group.LearnerGroup` runs it in Ray
actors, one per data-parallel rank (a group of one is this learner alone). Inside a process
group each rank takes its share of every minibatch (`trainer.train_device.weighted_pieces`) and
the gradients are averaged over ranks before each optimizer step; outside one (world 1) the same
helpers do nothing extra.

The losses are token-level masked means over a minibatch, so every piece of it (a rank's rows,
a micro-batch of those) is backpropagated with weight world · (its response tokens / the
minibatch's tokens): the pieces' gradients then sum (and average over ranks) to exactly the
gradient of the whole minibatch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.crs import CombinedReward
from trainer.ppo import core
from trainer.ppo.checkpoint import load_learner_state, save_learner_state
from trainer.ppo.config import PPOConfig
from trainer.ppo.experience import Experience, RolloutSample, pad_samples
from trainer.train_device import (
    all_gather_rows,
    average_gradients,
    broadcast_params,
    shard_slice,
    sum_over_ranks,
    weighted_pieces,
)


@dataclass(frozen=True)
class ForwardOut:
    logits: torch.Tensor  # (B, A, V) logits predicting each response token
    values: torch.Tensor | None  # (B, A) V(s_t)


def make_kl_controller(cfg: PPOConfig) -> core.FixedKLController:
    k = cfg.kl
    return core.AdaptiveKLController(k.init_coef, k.target, k.horizon) if k.adaptive else core.FixedKLController(k.init_coef)


def _opt(values: list[float | None]) -> torch.Tensor | None:
    return None if any(v is None for v in values) else torch.tensor(values, dtype=torch.float32)


def micro_batch_rows(padded_len: int, budget: int | None) -> int | None:
    """Rows per micro-batch under a budget of `budget` tokens (rows × padded_len); at least one; None = no limit."""
    return None if budget is None else max(1, budget // max(padded_len, 1))


def micro_batches(n_rows: int, padded_len: int, budget: int | None) -> list[slice]:
    """Row slices of at most `budget` tokens (rows × padded_len) each; at least one row per slice.

    n_rows=5, padded_len=10, budget=20: [0:2, 2:4, 4:5]; budget None: [0:5] (one pass).
    """
    rows = micro_batch_rows(padded_len, budget) or n_rows
    return [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)] or [slice(0, 0)]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forwards (None = plain fp32): auto is bf16 on CUDA only."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Learner:
    def __init__(self, cfg: PPOConfig, device: str | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.run.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.policy_path)
        base = AutoModelForCausalLM.from_pretrained(cfg.model.policy_path, dtype=torch.float32)
        if cfg.learner.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad; the hook makes the
            # reentrant kind work too (the frozen base's embeddings would otherwise cut the graph).
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        lora = LoraConfig(
            r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
            target_modules=cfg.model.target_modules, task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora).to(self.device)
        self.value_head = nn.Linear(base.config.hidden_size, 1).to(self.device)
        nn.init.normal_(self.value_head.weight, std=1.0 / (base.config.hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad] + list(self.value_head.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.kl_ctl = make_kl_controller(cfg)
        c = cfg.crs
        self.crs = CombinedReward(weight=c.weight, abs_output=c.abs_output, normalise=c.normalise, clip=c.score_clip)
        self.generator = torch.Generator().manual_seed(cfg.run.seed)  # minibatch shuffling
        self.pad_id = self.tokenizer.pad_token_id
        self.autocast_dtype = resolve_precision(cfg.learner.precision, self.device)
        # A rank of a data-parallel group when the process joined one (LearnerWorker), else alone.
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if self.world > 1:
            broadcast_params(self.trainable)  # one starting point for every rank, whatever their seeds did

    # ------------------------------------------------------------------ forward

    def forward(self, sequences, attention_mask, prompt_len: int, with_values: bool = True) -> ForwardOut:
        """Logits (and values) at the positions that predict the response tokens."""
        A = sequences.shape[1] - prompt_len
        # Left padding: positions must count real tokens only, or rows with short prompts
        # would see shifted rotary positions and disagree with policy_gen's logprobs.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+A)
        with self._autocast():
            out = self.model(
                input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=with_values, logits_to_keep=A + 1, use_cache=False,
            )
        # Outside autocast: log-softmax, the value head and every loss run in fp32.
        logits = out.logits[:, :-1].float()  # (B, A, V): columns P-1 .. P+A-2
        values = None
        if with_values:
            hidden = out.hidden_states[-1][:, prompt_len - 1 : -1]  # (B, A, H)
            values = self.value_head(hidden.float()).squeeze(-1)  # (B, A)
        return ForwardOut(logits=logits, values=values)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _micro(self, n_rows: int, padded_len: int) -> list[slice]:
        return micro_batches(n_rows, padded_len, self.cfg.learner.micro_batch_tokens)

    # ------------------------------------------------------------------ experience

    @torch.no_grad()
    def make_experience(self, samples: list[RolloutSample]) -> tuple[Experience, dict]:
        pb = pad_samples(samples, self.pad_id)
        seq, attn = pb.sequences.to(self.device), pb.attention_mask.to(self.device)
        resp, mask = pb.response_ids.to(self.device), pb.response_mask.to(self.device)
        self.model.eval()
        logprobs, ref_logprobs, values = self.experience_forwards(seq, attn, resp, pb.prompt_len)  # (B, A) each
        r_pref = _opt([s.r_pref for s in samples])
        r_abs = _opt([s.r_abs for s in samples])
        crs = self.crs(r_pref, r_abs)
        scores = crs.reward.to(self.device)  # (B,)
        beta = self.kl_ctl.value
        tr = core.kl_penalty_rewards(logprobs, ref_logprobs, scores, mask, beta)
        adv = core.gae(tr.rewards, values, mask, self.cfg.ppo.gamma, self.cfg.ppo.lam)
        advantages = core.masked_whiten(adv.advantages, mask) if self.cfg.ppo.whiten_advantages else adv.advantages
        gen_lp = pb.gen_logprobs.to(self.device)
        exp = Experience(
            sequences=seq, attention_mask=attn, response_ids=resp, response_mask=mask, prompt_len=pb.prompt_len,
            logprobs=logprobs, ref_logprobs=ref_logprobs, gen_logprobs=gen_lp, values=values, scores=scores,
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

    def experience_forwards(self, seq, attn, resp, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log π_θ, log π_ref, V), each (B, A). In a group each rank runs the forwards on its share
        of the rows and `all_gather_rows` hands every rank the whole batch (GAE and whitening need it)."""
        B, A = resp.shape
        rows = shard_slice(B, self.rank, self.world)
        if rows.stop > rows.start:
            mine = torch.stack(self._experience_rows(seq[rows], attn[rows], resp[rows], prompt_len))  # (3, b, A)
        else:  # fewer rows than ranks
            mine = torch.zeros(3, 0, A, device=self.device)
        lp, ref_lp, vals = all_gather_rows(mine, B, self.world)  # (3, B, A)
        return lp, ref_lp, vals

    def _experience_rows(self, seq, attn, resp, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The no-grad forwards of these rows in micro-batches (rows are independent: any split gives the same rows)."""
        lp, ref_lp, vals = [], [], []
        for mb in self._micro(seq.shape[0], seq.shape[1]):
            fwd = self.forward(seq[mb], attn[mb], prompt_len)
            lp.append(core.logprobs_from_logits(fwd.logits, resp[mb]))  # (b, A)
            vals.append(fwd.values)
            with self.model.disable_adapter():  # the reference policy: same weights, no LoRA
                ref_logits = self.forward(seq[mb], attn[mb], prompt_len, with_values=False).logits
            ref_lp.append(core.logprobs_from_logits(ref_logits, resp[mb]))
            del fwd, ref_logits  # (b, A, V) logits are the big tensors: free them before the next micro-batch
        return torch.cat(lp), torch.cat(ref_lp), torch.cat(vals)

    # ------------------------------------------------------------------ update

    def update(self, exp: Experience) -> dict:
        """PPO epochs over shuffled minibatches; returns the mean of each minibatch's stats.

        TRL's schedule: each epoch reshuffles the batch and walks it in minibatches of
        mini_batch_size; the optimizer steps once every grad_accum minibatches, on the mean of
        their gradients (grad_accum 1: one step per minibatch). Of each minibatch this rank takes
        its pieces (its rows, cut into micro-batches), each weighted so that the pieces' gradients
        add up to the minibatch's own (`weighted_pieces`; module docstring).
        """
        p = self.cfg.ppo
        self.model.train()
        sums: dict[str, float] = {}
        n_minibatches = steps = 0
        rows_per_piece = micro_batch_rows(exp.sequences.shape[1], self.cfg.learner.micro_batch_tokens)
        for _ in range(p.ppo_epochs):
            perm = torch.randperm(exp.size, generator=self.generator).to(self.device)  # seeded: the same on every rank
            self.optimizer.zero_grad(set_to_none=True)
            for i, idx in enumerate(perm.split(self.cfg.mini_batch_size)):
                tokens = exp.response_mask[idx].sum(1).tolist()  # (mb,) the loss's units, per row
                for piece, weight in weighted_pieces(tokens, self.rank, self.world, rows_per_piece):
                    loss, stats = self.minibatch_loss(exp, idx[piece])
                    (loss * weight / p.grad_accum).backward()
                    for k, v in stats.items():  # weighted by tokens: their sum over pieces and ranks is the minibatch's
                        sums[k] = sums.get(k, 0.0) + v * weight / self.world
                n_minibatches += 1
                if (i + 1) % p.grad_accum == 0:
                    self.optimizer_step()
                    steps += 1
        stats = {k: v / n_minibatches for k, v in sum_over_ranks(sums, self.device, self.world).items()}
        stats["value/explained_variance"] = core.explained_variance(exp.values, exp.returns, exp.response_mask).item()
        stats["ppo/optimizer_steps"] = steps
        stats["learner/num_workers"] = self.world
        return stats

    def minibatch_loss(self, exp: Experience, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO loss on `rows` (indices into the batch) and its stats, CleanRL's order.

        A forward with gradients gives the new log π_θ and V; the ratio is taken against π_old =
        `exp.logprobs`, this learner's own recomputation before the update (not policy_gen's
        sampling logprobs, which differ by kernels and precision); value loss clipped around the
        old values; entropy as a bonus.
        """
        p = self.cfg.ppo
        mask = exp.response_mask[rows]  # (b, A)
        fwd = self.forward(exp.sequences[rows], exp.attention_mask[rows], exp.prompt_len)
        logprobs = core.logprobs_from_logits(fwd.logits, exp.response_ids[rows])  # (b, A)
        pg = core.policy_loss(logprobs, exp.logprobs[rows], exp.advantages[rows], mask, p.clip_range)
        vf = core.value_loss(fwd.values, exp.values[rows], exp.returns[rows], mask, p.clip_range_value)
        entropy = core.masked_mean(core.entropy_from_logits(fwd.logits), mask)
        loss = pg.loss + p.vf_coef * vf.loss - p.entropy_coef * entropy
        stats = {"loss/policy": pg.loss, "loss/value": vf.loss, "policy/clipfrac": pg.clipfrac,
                 "policy/approx_kl": pg.approx_kl, "policy/entropy": entropy, "value/clipfrac": vf.clipfrac}
        return loss, {k: float(v.detach()) for k, v in stats.items()}

    def optimizer_step(self) -> None:
        """Average the ranks' gradients, clip the averaged (global) gradient, step, zero."""
        average_gradients(self.trainable, self.world)
        if self.cfg.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, samples: list[RolloutSample]) -> dict:
        """CRS → KL-penalised rewards → GAE → PPO epochs → KL controller. Returns the step's stats."""
        t0 = time.perf_counter()
        exp, stats = self.make_experience(samples)
        t1 = time.perf_counter()
        stats.update(self.update(exp))
        self.kl_ctl.update(stats["kl/objective"], exp.size)
        t2 = time.perf_counter()
        stats.update({"time/learn": t2 - t0, "time/experience": t1 - t0, "time/update": t2 - t1})
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
