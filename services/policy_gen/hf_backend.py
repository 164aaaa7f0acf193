"""The hf backend's serving logic: vLLM-shaped requests -> engine sequences -> vLLM-shaped replies.

The router (app.py) has already validated the body with protocol.py; this module applies
vLLM's semantics for what validation cannot see (model names, context length, defaults:
temperature 1, top_p 1, top_k off, unset max_tokens -> 16 for completions) and builds the
same response objects vLLM returns, logprobs included.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse, PlainTextResponse

from services.common.chat import format_prompt
from services.common.http import APIError
from services.policy_gen import protocol as P
from services.policy_gen.adapters import AdapterInfo
from services.policy_gen.backend import Served
from services.policy_gen.batcher import GenerationBatcher
from services.policy_gen.hf_engine import HFEngine, SeqResult, SeqSpec
from services.policy_gen.settings import PolicyGenSettings

_FLOOR = -9999.0  # vLLM clamps -inf to this so the JSON stays valid


class HFBackend:
    def __init__(self, settings: PolicyGenSettings):
        self.settings = settings
        self.model_id = settings.model_id
        self.engine: HFEngine | None = None
        self.batcher: GenerationBatcher | None = None
        self._on_batch = None

    def observe_batches(self, fn) -> None:
        """`fn(sequences, seconds)` after every decode batch (the router feeds /metrics)."""
        self._on_batch = fn

    async def start(self) -> None:
        # Loaded here, not at import, so `--help` and settings errors stay instant.
        self.engine = HFEngine(self.settings)
        s = self.settings
        self.batcher = GenerationBatcher(
            self.engine, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue
        )
        self.batcher.on_batch = self._on_batch
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher:
            await self.batcher.stop()

    async def ready(self) -> bool:
        return self.batcher is not None

    # ------------------------------------------------------------------ helpers

    def _adapter_for(self, model: str | None) -> str | None:
        if model is None or model == self.model_id:
            return None
        if model in self.engine.adapters:
            return model
        raise APIError(404, f"The model `{model}` does not exist.", type="NotFoundError", param="model")

    def _tokenize(self, prompt) -> list[list[int]]:
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            prompts = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        out = []
        for p in prompts:
            ids = tok(p)["input_ids"] if isinstance(p, str) else list(p)
            if any(not 0 <= i < len(tok) for i in ids):
                raise APIError(400, f"prompt token ids must be in [0, {len(tok)})", param="prompt")
            out.append(ids)
        return out

    def _specs(
        self,
        req: P.SamplingFields,
        prompts: list[list[int]],
        adapter: str | None,
        max_tokens: int | None,
        logprobs: int | None,
    ) -> list[SeqSpec]:
        if req.n > self.settings.max_n:
            raise APIError(400, f"n={req.n} exceeds the server's max_n {self.settings.max_n}", param="n")
        limit, specs = self.settings.max_model_len, []
        for pi, ids in enumerate(prompts):
            budget = max_tokens if max_tokens is not None else limit - len(ids)
            if len(ids) + max(budget, 1) > limit:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{len(ids) + budget} tokens ({len(ids)} in the prompt, {budget} in the completion). "
                    "Please reduce the length of the prompt or the completion.",
                    param="max_tokens",
                )
            for j in range(req.n):
                specs.append(
                    SeqSpec(
                        prompt_ids=ids, max_tokens=budget,
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        top_k=0 if req.top_k is None or req.top_k < 0 else req.top_k,
                        seed=req.seed, prompt_index=pi, sample_index=j,
                        stop=list(req.stop or []), stop_token_ids=list(req.stop_token_ids or []),
                        ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
                        logprobs=logprobs, adapter=adapter,
                    )
                )
        return specs

    def _piece(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _completion_logprobs(self, r: SeqResult) -> P.CompletionLogProbs:
        tokens = [self._piece(t) for t in r.token_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        top = []
        for t, lp, alts in zip(r.token_ids, r.logprobs, r.top_logprobs or []):
            entry = {self._piece(t): max(lp, _FLOOR)}  # the sampled token first, then the top-N, as vLLM
            entry.update({self._piece(a): max(v, _FLOOR) for a, v in alts if self._piece(a) not in entry})
            top.append(entry)
        token_logprobs = [max(x, _FLOOR) for x in r.logprobs]
        return P.CompletionLogProbs(text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=top)

    def _chat_logprobs(self, r: SeqResult) -> P.ChatChoiceLogProbs:
        content = []
        for t, lp, alts in zip(r.token_ids, r.logprobs, r.top_logprobs or []):
            piece = self._piece(t)
            tops = [
                P.ChatTopLogProb(token=self._piece(a), logprob=max(v, _FLOOR), bytes=list(self._piece(a).encode()))
                for a, v in alts
            ]
            content.append(
                P.ChatLogProb(token=piece, logprob=max(lp, _FLOOR), bytes=list(piece.encode()), top_logprobs=tops)
            )
        return P.ChatChoiceLogProbs(content=content)

    # ------------------------------------------------------------------ endpoints

    async def completions(self, req: P.CompletionRequest) -> Served:
        adapter = self._adapter_for(req.model)
        prompts = self._tokenize(req.prompt)
        results = await self.batcher.submit(self._specs(req, prompts, adapter, req.max_tokens, req.logprobs))
        choices = []
        for i, r in enumerate(results):
            ids = prompts[i // req.n]
            choices.append(
                P.CompletionResponseChoice(
                    index=i, text=r.text, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                    logprobs=self._completion_logprobs(r) if req.logprobs is not None else None,
                    token_ids=r.token_ids if req.return_token_ids else None,
                    prompt_token_ids=ids if req.return_token_ids else None,
                )
            )
        done = sum(len(r.token_ids) for r in results)
        n_prompt = sum(len(p) for p in prompts)
        usage = P.UsageInfo(prompt_tokens=n_prompt, completion_tokens=done, total_tokens=n_prompt + done)
        body = P.CompletionResponse(model=req.model or self.model_id, choices=choices, usage=usage)
        return Served(JSONResponse(body.model_dump(exclude_none=False)), done)

    async def chat(self, req: P.ChatCompletionRequest) -> Served:
        adapter = self._adapter_for(req.model)
        tok = self.engine.tokenizer
        messages = [m.model_dump() for m in req.messages]
        if tok.chat_template:
            text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt, tokenize=False)
        else:  # no template shipped: our ChatML, the format every model of this project is trained on
            text = format_prompt(messages)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        results = await self.batcher.submit(self._specs(req, [ids], adapter, max_tokens, top))
        choices = [
            P.ChatCompletionResponseChoice(
                index=i,
                message=P.ChatResponseMessage(content=r.text),
                finish_reason=r.finish_reason,
                stop_reason=r.stop_reason,
                logprobs=self._chat_logprobs(r) if req.logprobs else None,
                token_ids=r.token_ids if req.return_token_ids else None,
            )
            for i, r in enumerate(results)
        ]
        done = sum(len(r.token_ids) for r in results)
        usage = P.UsageInfo(prompt_tokens=len(ids), completion_tokens=done, total_tokens=len(ids) + done)
        body = P.ChatCompletionResponse(
            model=req.model or self.model_id,
            choices=choices,
            usage=usage,
            prompt_token_ids=ids if req.return_token_ids else None,
        )
        return Served(JSONResponse(body.model_dump()), done)

    async def load_adapter(self, req: P.LoadLoRAAdapterRequest, info: AdapterInfo) -> Served:
        if req.lora_name == self.model_id:
            message = f"The lora adapter '{req.lora_name}' conflicts with a served base model."
            raise APIError(400, message, type="InvalidUserInput", param="lora_name")
        held = self.engine.adapters
        if req.lora_name in held and not req.load_inplace:
            raise APIError(
                400,
                f"The lora adapter '{req.lora_name}' has already been loaded. "
                "If you want to load the adapter in place, set 'load_inplace' to True.",
                type="InvalidUserInput", param="lora_name",
            )
        if req.lora_name not in held and len(held) >= self.settings.max_loras:
            raise APIError(
                400,
                f"{len(held)} adapters are loaded, the server's max_loras; unload one first or raise --max-loras",
                type="InvalidUserInput", param="lora_name",
            )
        try:
            await self.batcher.run_exclusive(self.engine.load_adapter, req.lora_name, info.path)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:  # e.g. shapes that do not fit the base
            message = f"could not load LoRA adapter '{req.lora_name}': {type(exc).__name__}: {exc}"
            raise APIError(400, message, param="lora_path") from None
        return Served(PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully."), 0)

    async def unload_adapter(self, req: P.UnloadLoRAAdapterRequest) -> Served:
        if req.lora_name not in self.engine.adapters:
            message = f"The lora adapter '{req.lora_name}' cannot be found."
            raise APIError(404, message, type="NotFoundError", param="lora_name")
        await self.batcher.run_exclusive(self.engine.unload_adapter, req.lora_name)
        return Served(PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully."), 0)

    async def models(self) -> Served:
        limit = self.settings.max_model_len
        cards = [P.ModelCard(id=self.model_id, root=self.settings.model_path, max_model_len=limit)]
        held = self.engine.adapters.items()
        cards += [P.ModelCard(id=name, root=str(path), parent=self.model_id) for name, path in held]
        return Served(JSONResponse(P.ModelList(data=cards).model_dump()), 0)
