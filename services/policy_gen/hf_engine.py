"""The hf backend's engine: a transformers causal LM (+ peft LoRA adapters) and a decode loop.

Our own loop instead of `model.generate` because it gives, per sequence, its own seeded
torch.Generator (same seed => same tokens whatever the batch-mates), vLLM's processed
logprobs, stop strings, and one adapter per batch. Sequences are left-padded so every row's
next token sits in the last column; position ids count real tokens only.
All methods run on one worker thread (see batcher.py); nothing here is async.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.chat import template_mismatch
from services.policy_gen.sampling import GREEDY_EPS, processed_logprobs, request_generator, sample_tokens
from services.policy_gen.settings import PolicyGenSettings

log = logging.getLogger(__name__)


@dataclass
class SeqSpec:
    """One sequence to generate (a request with n samples over P prompts makes n*P of these)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    prompt_index: int = 0
    sample_index: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top alternatives to report; None = no logprobs
    adapter: str | None = None  # None = the base model


@dataclass
class SeqResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None
    logprobs: list[float]  # processed logprob of each sampled token
    top_logprobs: list[list[tuple[int, float]]] | None  # per token: (id, logprob), most likely first


Finish = tuple[str, int | str | None]  # (finish_reason, stop_reason)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class HFEngine:
    def __init__(self, settings: PolicyGenSettings):
        from transformers import AutoTokenizer

        self.settings = settings
        self.device = _pick_device(settings.device)
        self.dtype = _pick_dtype(settings.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        if mismatch := template_mismatch(self.tokenizer):  # served as is; the trainer's folders carry ChatML
            log.warning("%s: /v1/chat/completions follows the folder's template: %s", settings.model_path, mismatch)
        self.model = model = self._load_base()
        self.peft = None  # PeftModel once the first adapter is loaded
        self.adapters: dict[str, Path] = {}
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)  # pad rows are masked anyway
        self._unseeded = torch.Generator().manual_seed(settings.seed)

    def _load_base(self):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.settings.model_path, dtype=self.dtype)
        return model.to(self.device).eval()

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA under `name` (replacing a same-named one: load_inplace). On failure the
        engine is rolled back: generation with the base and the other adapters is unchanged."""
        try:
            self._load_adapter(name, path)
        except Exception:
            self._roll_back(name)
            raise

    def _roll_back(self, name: str) -> None:
        if self.peft is None:
            # The first adapter failed: peft may already have injected LoRA layers into the
            # base model in place, so the base is reloaded rather than trusted.
            if any("lora_" in n for n, _ in self.model.named_modules()):
                log.warning("adapter %r failed half-way; reloading the base model", name)
                self.model = self._load_base()
        elif name in getattr(self.peft, "peft_config", {}) and name not in self.adapters:
            self.peft.delete_adapter(name)
            if not self.adapters:
                self.model = self.peft.unload()
                self.peft = None

    def _load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if name in self.adapters:
            self.unload_adapter(name)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
            self.peft.eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name)
        self.peft.delete_adapter(name)
        if not self.adapters:  # back to the plain model: no LoRA layers left in the forward pass
            self.model = self.peft.unload()
            self.peft = None
        elif not isinstance(active := self.peft.active_adapter, str) or active not in self.peft.peft_config:
            # peft moves the active adapter on only when the deleted one's layers name exactly one
            # successor; adapters on disjoint modules (a judge's lm_head-only LoRA beside a policy
            # LoRA) leave it naming the deleted one, and base requests (disable_adapter) then fail.
            self.peft.set_adapter(next(iter(self.adapters)))

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, specs: list[SeqSpec]) -> list[SeqResult]:
        """Generate all `specs`, grouped by adapter and chunked to max_batch_size; results in order.

        A sequence whose adapter was unloaded meanwhile gets a LookupError in its slot.
        """
        results: list[SeqResult | None] = [None] * len(specs)
        groups: dict[str | None, list[int]] = {}
        for i, spec in enumerate(specs):
            groups.setdefault(spec.adapter, []).append(i)
        size = self.settings.max_batch_size
        for adapter, idx in groups.items():
            if adapter is not None and adapter not in self.adapters:
                # Unloaded while the request waited: fail its sequences, not their batch-mates.
                gone = LookupError(adapter)
                for i in idx:
                    results[i] = gone  # type: ignore[call-overload]
                continue
            for start in range(0, len(idx), size):
                chunk = idx[start : start + size]
                for i, res in zip(chunk, self._generate_batch([specs[i] for i in chunk], adapter)):
                    results[i] = res
        return results  # type: ignore[return-value]

    def _forward_model(self, adapter: str | None):
        """(module to call, context to call it in) for `adapter`; None = the base.

        The base must run with the LoRA layers *disabled*: the peft wrapper's base model
        still contains them, and they would apply whichever adapter is active.
        """
        if self.peft is None:
            return self.model, contextlib.nullcontext()
        if adapter is None:
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(adapter)
        return self.peft, contextlib.nullcontext()

    def _generate_batch(self, specs: list[SeqSpec], adapter: str | None) -> list[SeqResult]:
        model, context = self._forward_model(adapter)
        with context:
            return self._decode(model, specs)

    def _decode(self, model, specs: list[SeqSpec]) -> list[SeqResult]:
        B, dev = len(specs), self.device
        lens = [len(s.prompt_ids) for s in specs]
        T = max(lens)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T) left padded
        mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for i, s in enumerate(specs):
            input_ids[i, T - lens[i] :] = torch.tensor(s.prompt_ids)
            mask[i, T - lens[i] :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) real-token positions

        temperature = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=dev)  # (B,)
        top_p = torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=dev)  # (B,)
        top_k = torch.tensor([s.top_k for s in specs], dtype=torch.long, device=dev)  # (B,)
        greedy = (temperature < GREEDY_EPS).cpu()
        fallback = torch.randint(2**62, (B,), generator=self._unseeded).tolist()  # streams of unseeded requests
        gens = [request_generator(s.seed, s.prompt_index, s.sample_index, fallback[i]) for i, s in enumerate(specs)]
        want_top = max((s.logprobs or 0) for s in specs)

        out_ids: list[list[int]] = [[] for _ in specs]
        out_lp: list[list[float]] = [[] for _ in specs]
        out_top: list[list[list[tuple[int, float]]]] = [[] for _ in specs]
        finish: list[Finish | None] = [None] * B
        texts: list[str | None] = [None] * B  # set only when a stop string cut the text

        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past, last_pos = out.past_key_values, positions[:, -1]  # (B,)
        for step in range(max(s.max_tokens for s in specs)):
            logits = out.logits[:, -1, :].float()  # (B, V)
            logprobs = processed_logprobs(logits, temperature, top_k, top_p)  # (B, V)
            tokens = sample_tokens(logprobs.cpu(), greedy, gens)  # (B,)
            picked = logprobs.gather(1, tokens.to(dev).unsqueeze(1)).squeeze(1).cpu()  # (B,)
            top = logprobs.topk(want_top, dim=-1) if want_top > 0 else None
            for i, s in enumerate(specs):
                if finish[i] is not None:
                    continue
                tok = int(tokens[i])
                out_ids[i].append(tok)
                out_lp[i].append(float(picked[i]))
                if s.logprobs is not None:
                    k = s.logprobs if top is not None else 0
                    out_top[i].append(list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist())) if k else [])
                finish[i], texts[i] = self._check_stop(s, out_ids[i], lens[i])
            if all(f is not None for f in finish):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)  # (B, T+step+1)
            last_pos = last_pos + 1
            out = model(
                input_ids=tokens.to(dev).unsqueeze(1),  # (B, 1)
                attention_mask=mask,
                position_ids=last_pos.unsqueeze(1),  # (B, 1)
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
        return [
            SeqResult(
                token_ids=out_ids[i],
                text=texts[i] if texts[i] is not None else self._decode_text(out_ids[i], s),
                finish_reason=finish[i][0],  # type: ignore[index]
                stop_reason=finish[i][1],  # type: ignore[index]
                logprobs=out_lp[i],
                top_logprobs=out_top[i] if s.logprobs is not None else None,
            )
            for i, s in enumerate(specs)
        ]

    def _decode_text(self, ids: list[int], s: SeqSpec) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=s.skip_special_tokens)

    def _check_stop(self, s: SeqSpec, ids: list[int], prompt_len: int) -> tuple[Finish | None, str | None]:
        """vLLM's stop rules: EOS / stop_token_ids / stop strings -> "stop"; budget -> "length".

        A stop string is cut from the text but the tokens that formed it stay in token_ids.
        """
        tok = ids[-1]
        if tok in s.stop_token_ids:
            return ("stop", tok), None
        if not s.ignore_eos and tok in self.eos_ids:
            return ("stop", None), None
        if s.stop:  # decoding every step is only paid by requests that ask for stop strings
            text = self._decode_text(ids, s)
            for stop in s.stop:
                cut = text.find(stop)
                if cut >= 0:
                    return ("stop", stop), text[:cut]
        if len(ids) >= s.max_tokens or prompt_len + len(ids) >= self.settings.max_model_len:
            return ("length", None), None
        return None, None
