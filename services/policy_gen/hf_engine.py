"""The hf backend's engine: a transformers causal LM (+ peft LoRA adapters) and a decode loop.

Our own loop instead of `model.generate` because it gives, per sequence, its own seeded
torch.Generator (same seed => same tokens whatever the batch-mates), vLLM's processed
logprobs, stop strings, and continuous batching: sequences join and leave a running batch
between decode steps (`iterate`), so a short request never waits for a long one to finish.
Sequences are left-padded so every row's next token sits in the last column; position ids
count real tokens only. All methods run on one worker thread (see batcher.py); nothing here
is async.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.chat import template_mismatch
from services.policy_gen import kv
from services.policy_gen.sampling import GREEDY_EPS, processed_logprobs, request_generator, sample_tokens
from services.policy_gen.settings import PolicyGenSettings
from services.policy_gen.text import find_stop, stop_window

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


class Seq:
    """A sequence being generated: the engine's per-row state (owned by the worker thread but
    for `cancelled`, which the event loop sets when nobody waits for the result any more)."""

    def __init__(self, spec: SeqSpec, gen: torch.Generator, owner: object, index: int, window: int):
        self.spec, self.gen, self.owner, self.index, self.window = spec, gen, owner, index, window
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.finish: Finish | None = None
        self.text: str | None = None  # the final text, set when finished (a stop string cut off)
        self.cancelled = False
        self.admitted = 0  # admission order (the scheduler preempts the newest first)

    def add(self, token: int, logprob: float, alts: list[tuple[int, float]]) -> None:
        self.ids.append(token)
        self.lps.append(logprob)
        if self.spec.logprobs is not None:
            self.tops.append(alts)

    def result(self, decode=None) -> SeqResult:
        text = self.text if self.text is not None else decode(self.ids, self.spec)
        return SeqResult(
            token_ids=self.ids, text=text, finish_reason=self.finish[0], stop_reason=self.finish[1],  # type: ignore[index]
            logprobs=self.lps, top_logprobs=self.tops if self.spec.logprobs is not None else None,
        )


@dataclass
class StepEvent:
    """What one round did to a sequence: a new token (`seq.finish` set if it was the last) or an error."""

    seq: Seq
    token: int | None = None
    error: Exception | None = None
    # A snapshot: the worker thread goes on changing `seq` while the event waits to be streamed.
    logprob: float = 0.0
    alts: list[tuple[int, float]] = field(default_factory=list)
    finish: Finish | None = None


@dataclass
class _Group:
    """One adapter's continuous batch: rows left-padded, newest token in the last column."""

    adapter: str | None
    seqs: list[Seq]
    cache: object  # transformers DynamicCache, (B, H, T, D) per layer
    mask: torch.Tensor  # (B, T)
    pos: torch.Tensor  # (B,) position of each row's newest token
    logits: torch.Tensor  # (B, V) next-token logits


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
        self.groups: dict[str | None, _Group] = {}  # the running batches, one per adapter (None: base)

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

    def new_seq(self, spec: SeqSpec, owner: object = None, index: int = 0) -> Seq:
        """Engine state of one sequence; its generator is fixed here (seeded: by seed, prompt, sample)."""
        fallback = int(torch.randint(2**62, (1,), generator=self._unseeded))
        gen = request_generator(spec.seed, spec.prompt_index, spec.sample_index, fallback)
        return Seq(spec, gen, owner, index, stop_window(spec.stop))

    @property
    def running(self) -> int:
        return sum(len(g.seqs) for g in self.groups.values())

    @torch.inference_mode()
    def iterate(self, admit: list[Seq] = (), preempt: list[Seq] = ()) -> list[StepEvent]:
        """One scheduling round: drop cancelled and `preempt`ed rows, prefill `admit` into their
        adapter's batch, then one decode step of every batch. Returns what happened to each
        sequence (a token, a finish, or an error).

        Each adapter has its own batch (peft applies one adapter per forward pass); batches take
        turns, one step each per round. A preempted sequence keeps its tokens and generator: when
        admitted again, its prompt and tokens so far are prefilled and it continues.
        """
        events: list[StepEvent] = []
        leaving = {id(s) for s in preempt}
        for group in list(self.groups.values()):
            if group.adapter is not None and group.adapter not in self.adapters:
                # Unloaded while its sequences ran: fail them, not their neighbours.
                events += [StepEvent(s, error=LookupError(group.adapter)) for s in group.seqs]
                del self.groups[group.adapter]
                continue
            keep = [i for i, s in enumerate(group.seqs) if not s.cancelled and id(s) not in leaving]
            if len(keep) < len(group.seqs):
                self._keep_rows(group, keep)
        by_adapter: dict[str | None, list[Seq]] = {}
        for seq in admit:
            if seq.cancelled:
                continue
            if seq.spec.adapter is not None and seq.spec.adapter not in self.adapters:
                events.append(StepEvent(seq, error=LookupError(seq.spec.adapter)))
                continue
            by_adapter.setdefault(seq.spec.adapter, []).append(seq)
        for adapter, seqs in by_adapter.items():
            self._prefill(adapter, seqs)
        for group in list(self.groups.values()):
            events += self._step(group)
        return events

    def generate(self, specs: list[SeqSpec]) -> list[SeqResult]:
        """All `specs` to completion, results in order (a LookupError where the adapter is gone).
        For direct use (tests, tools); the server schedules through batcher.py."""
        seqs = [self.new_seq(s, None, i) for i, s in enumerate(specs)]
        results: list[SeqResult | Exception | None] = [None] * len(seqs)
        waiting, size = list(seqs), self.settings.max_batch_size
        while waiting or self.running:
            room = max(size - self.running, 0)
            events = self.iterate(waiting[:room])
            waiting = waiting[room:]
            for e in events:
                if e.error is not None:
                    results[e.seq.index] = e.error
                elif e.seq.finish is not None:
                    results[e.seq.index] = e.seq.result(self._decode_text)
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

    def _keep_rows(self, group: _Group, keep: list[int]) -> None:
        if not keep:
            del self.groups[group.adapter]
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        group.mask = kv.select_rows(group.cache, group.mask, rows)
        group.pos = group.pos.index_select(0, rows)
        group.logits = group.logits.index_select(0, rows)
        group.seqs = [group.seqs[i] for i in keep]

    def _prefill(self, adapter: str | None, seqs: list[Seq]) -> None:
        """Prompt (and, for a preempted sequence, its tokens so far) of `seqs` through the model,
        left-padded; the rows join `adapter`'s batch with their next-token logits."""
        dev = self.device
        inputs = [s.spec.prompt_ids + s.ids for s in seqs]
        lens = [len(x) for x in inputs]
        T = max(lens)
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T) left padded
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
        for i, x in enumerate(inputs):
            input_ids[i, T - lens[i] :] = torch.tensor(x)
            mask[i, T - lens[i] :] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) real-token positions
        model, context = self._forward_model(adapter)
        with context:
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = out.logits[:, -1, :].float()  # (B, V)
        group = self.groups.get(adapter)
        if group is None:
            self.groups[adapter] = _Group(adapter, list(seqs), out.past_key_values, mask, positions[:, -1], logits)
            return
        group.mask = kv.join(group.cache, group.mask, out.past_key_values, mask)
        group.pos = torch.cat([group.pos, positions[:, -1]])
        group.logits = torch.cat([group.logits, logits])
        group.seqs += seqs

    def _step(self, group: _Group) -> list[StepEvent]:
        """Sample one token per row from its logits, retire finished rows, forward the rest."""
        dev, specs = self.device, [s.spec for s in group.seqs]
        temperature = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=dev)  # (B,)
        top_p = torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=dev)  # (B,)
        top_k = torch.tensor([s.top_k for s in specs], dtype=torch.long, device=dev)  # (B,)
        greedy = (temperature < GREEDY_EPS).cpu()
        logprobs = processed_logprobs(group.logits, temperature, top_k, top_p)  # (B, V)
        tokens = sample_tokens(logprobs.cpu(), greedy, [s.gen for s in group.seqs])  # (B,)
        picked = logprobs.gather(1, tokens.to(dev).unsqueeze(1)).squeeze(1).cpu()  # (B,)
        want_top = max((s.logprobs or 0) for s in specs)
        top = logprobs.topk(want_top, dim=-1) if want_top > 0 else None
        events, keep = [], []
        for i, seq in enumerate(group.seqs):
            tok, k = int(tokens[i]), seq.spec.logprobs or 0
            alts = list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist())) if top is not None and k else []
            seq.add(tok, float(picked[i]), alts)
            self._check_stop(seq)
            if seq.finish is None:
                keep.append(i)
            else:
                seq.text = seq.text if seq.text is not None else self._decode_text(seq.ids, seq.spec)
            events.append(StepEvent(seq, token=tok, logprob=float(picked[i]), alts=alts, finish=seq.finish))
        if len(keep) < len(group.seqs):
            self._keep_rows(group, keep)
            if not keep:
                return events
            tokens = tokens.index_select(0, torch.tensor(keep, dtype=torch.long))
        B = len(group.seqs)
        group.mask = torch.cat([group.mask, torch.ones((B, 1), dtype=group.mask.dtype, device=dev)], dim=1)  # (B, T+1)
        group.pos = group.pos + 1
        model, context = self._forward_model(group.adapter)
        with context:
            out = model(
                input_ids=tokens.to(dev).unsqueeze(1),  # (B, 1)
                attention_mask=group.mask,
                position_ids=group.pos.unsqueeze(1),  # (B, 1)
                past_key_values=group.cache,
                use_cache=True,
            )
        group.cache = out.past_key_values
        group.logits = out.logits[:, -1, :].float()  # (B, V)
        return events

    def _decode_text(self, ids: list[int], s: SeqSpec) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=s.skip_special_tokens)

    def _check_stop(self, seq: Seq) -> None:
        """vLLM's stop rules: EOS / stop_token_ids / stop strings -> "stop"; budget -> "length".

        A stop string is cut from the text but the tokens that formed it stay in token_ids.
        Stop strings are looked for in the last few tokens' text only (text.find_stop).
        """
        s, ids = seq.spec, seq.ids
        tok = ids[-1]
        if tok in s.stop_token_ids:
            seq.finish = ("stop", tok)
        elif not s.ignore_eos and tok in self.eos_ids:
            seq.finish = ("stop", None)
        elif s.stop and (hit := find_stop(lambda t: self._decode_text(list(t), s), ids, s.stop, seq.window)):
            stop, cut = hit
            seq.finish, seq.text = ("stop", stop), self._decode_text(ids, s)[:cut]
        elif len(ids) >= s.max_tokens or len(s.prompt_ids) + len(ids) >= self.settings.max_model_len:
            seq.finish = ("length", None)
