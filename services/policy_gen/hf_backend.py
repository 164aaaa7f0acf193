"""The hf backend's serving logic: vLLM-shaped requests -> engine sequences -> vLLM-shaped replies.

The router (app.py) has already validated the body with protocol.py; this module applies
vLLM's semantics for what validation cannot see (model names, context length, defaults:
temperature 1, top_p 1, top_k off, unset max_tokens -> 16 for completions) and builds the
same response objects vLLM returns, logprobs included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi.responses import JSONResponse, PlainTextResponse

from services.common.chat import CHATML
from services.common.http import APIError, error_body, scrub_paths
from services.common.metrics import RunMetrics, count_run_usage, current_run
from services.common.tokenize import Piece, ThreadTokenizer
from services.policy_gen import protocol as P
from services.policy_gen.adapters import AdapterInfo
from services.policy_gen.backend import Served
from services.policy_gen.batcher import GenerationBatcher
from services.policy_gen.hf_engine import HFEngine, SeqResult, SeqSpec, StepEvent
from services.policy_gen.text import Detokenizer
from services.policy_gen.limits import too_long_for_context
from services.policy_gen.settings import PolicyGenSettings
from services.policy_gen.streaming import ClosingStreamingResponse

_FLOOR = -9999.0  # vLLM clamps -inf to this so the JSON stays valid
log = logging.getLogger(__name__)


def chat_pieces(tok, messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
    """The chat template's text as pieces: each message's content marked as content.

    The template is rendered as usual; contents are located in its output in order (a
    template that rewrites a content, e.g. strips it, leaves that content as template text,
    which is only a problem when it holds special-token strings: refused by the caller)."""
    if not tok.chat_template:  # no template shipped: our ChatML, what this project's models are trained on
        pieces = CHATML.prompt_pieces(messages)
        return pieces if add_generation_prompt else pieces[:-1]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    pieces, at = [], 0
    for m in messages:
        found = text.find(m["content"], at) if m["content"] else -1
        if found < 0:
            continue
        pieces += [(text[at:found], False), (m["content"], True)]
        at = found + len(m["content"])
    pieces.append((text[at:], False))
    return [p for p in pieces if p[0]]


class HFBackend:
    def __init__(self, settings: PolicyGenSettings):
        self.settings = settings
        self.model_id = settings.model_id
        self.engine: HFEngine | None = None
        self.batcher: GenerationBatcher | None = None
        self.tok: ThreadTokenizer | None = None
        self._on_batch = None
        self._runs: RunMetrics | None = None
        self.on_generated = lambda tokens: None  # completion tokens of a streamed reply, when it ends
        self._adapter_lock = asyncio.Lock()  # adapter loads/unloads: checked and applied one at a time

    def observe_batches(self, fn) -> None:
        """`fn(sequences, seconds)` after every decode batch (the router feeds /metrics)."""
        self._on_batch = fn

    def observe_queues(self, runs: RunMetrics) -> None:
        """Per-run queue depth and wait in /metrics (crs_run_queue_items, crs_run_queue_wait_seconds)."""
        self._runs = runs

    async def start(self) -> None:
        # Loaded here, not at import, so `--help` and settings errors stay instant.
        self.engine = HFEngine(self.settings)
        self.tok = ThreadTokenizer(self.engine.tokenizer)
        s = self.settings
        self.batcher = GenerationBatcher(
            self.engine, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms, max_queue=s.max_queue,
            max_queue_sequences=s.max_queue_sequences, max_queue_tokens=s.max_queue_tokens,
            run_weights=s.run_weight_map(), fair=s.fair_scheduling,
        )
        self.batcher.on_batch = self._on_batch
        if self._runs is not None:
            self.batcher.on_wait = self._runs.observe_wait
            self._runs.watch_queues(self.batcher.queued_by_run)
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
        """Runs in a worker thread (tokenizing must never block the event loop)."""
        vocab = len(self.engine.tokenizer)
        if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        texts = [p for p in prompts if isinstance(p, str)]
        for i, text in enumerate(texts):
            too_long_for_context(self.settings, self.tok, text, "prompt")
        encoded = iter(self.tok.ids(texts) if texts else [])
        out = []
        for p in prompts:
            ids = next(encoded) if isinstance(p, str) else list(p)
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def _chat_ids(self, req: P.ChatCompletionRequest) -> list[int]:
        """Runs in a worker thread. Message contents are text: their special-token strings are not special."""
        messages = [m.model_dump() for m in req.messages]
        for i, m in enumerate(messages):
            too_long_for_context(self.settings, self.tok, m["content"], f"messages.{i}.content")
        pieces = chat_pieces(self.engine.tokenizer, messages, req.add_generation_prompt)
        placed = {p[0] for p in pieces if p[1]}
        for i, m in enumerate(messages):
            if m["content"] not in placed and self.tok.has_special(m["content"]):
                raise APIError(400, f"messages.{i}.content holds special-token text that this model's chat "
                               "template rewrites, so it cannot be kept as plain text; remove it",
                               param=f"messages.{i}.content")
        return self.tok.encode_pieces(pieces)

    def _specs(
        self,
        req: P.SamplingFields,
        prompts: list[list[int]],
        adapter: str | None,
        max_tokens: int | None,
        logprobs: int | None,
    ) -> list[SeqSpec]:
        limit, specs = self.settings.max_model_len, []
        for pi, ids in enumerate(prompts):
            budget = max_tokens if max_tokens is not None else min(limit - len(ids), self.settings.default_max_tokens)
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
        prompts = await asyncio.to_thread(self._tokenize, req.prompt)
        specs = self._specs(req, prompts, adapter, req.max_tokens, req.logprobs)
        if req.stream:
            return self._stream(req, specs, sum(len(p) for p in prompts), chat=False)
        results = await self.batcher.submit(specs, run=current_run())
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
        return Served(JSONResponse(body.model_dump(exclude_none=False)), done, n_prompt)

    async def chat(self, req: P.ChatCompletionRequest) -> Served:
        adapter = self._adapter_for(req.model)
        ids = await asyncio.to_thread(self._chat_ids, req)
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens
        specs = self._specs(req, [ids], adapter, max_tokens, top)
        if req.stream:
            return self._stream(req, specs, len(ids), chat=True)
        results = await self.batcher.submit(specs, run=current_run())
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
        return Served(JSONResponse(body.model_dump()), done, len(ids))

    # ------------------------------------------------------------------ streaming

    def _stream(self, req: P.SamplingFields, specs: list[SeqSpec], prompt_tokens: int, chat: bool) -> Served:
        """Server-sent events as vLLM streams them: one chunk per new token of each choice (its
        text delta and, when asked, its logprobs), the finish reason on a choice's last chunk,
        a usage chunk with no choices when stream_options.include_usage, then `[DONE]`."""
        model = req.model or self.model_id
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion.chunk" if chat else "text_completion"
        events: asyncio.Queue = asyncio.Queue()
        job = asyncio.ensure_future(self.batcher.submit(specs, run=current_run(), on_event=events.put_nowait))
        holdback = max((len(s) for s in specs[0].stop), default=1) - 1 if specs else 0
        decode = [Detokenizer(lambda ids, s=s: self.engine._decode_text(list(ids), s), holdback) for s in specs]
        usage_wanted = bool(req.stream_options and req.stream_options.include_usage)
        want_logprobs = (req.logprobs is not None) if not chat else bool(req.logprobs)

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": ident, "object": obj, "created": created, "model": model, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(event: StepEvent) -> dict:
            i, finish = event.seq.index, event.finish
            if finish is None:
                text = decode[i].push(event.token)
            else:
                text = decode[i].finish(event.seq.text or "", event.token)
            lp = None
            if want_logprobs:
                lp = self._chat_token_logprobs(event) if chat else self._completion_token_logprobs(event, decode[i])
            out = {"index": i, "logprobs": lp, "finish_reason": finish[0] if finish else None}
            if finish is not None:
                out["stop_reason"] = finish[1]
            if chat:
                out["delta"] = {"content": text}
            else:
                out["text"] = text
            return out

        async def body():
            done = 0
            try:
                if chat:  # the role comes first, once per choice, as vLLM/OpenAI send it
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(len(specs))])
                while True:
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    batch = [getter.result()]
                    while not events.empty():
                        batch.append(events.get_nowait())
                    for event in batch:
                        done += 1
                        yield chunk([choice(event)])
                while not events.empty():  # the job ended: what it delivered last
                    done += 1
                    yield chunk([choice(events.get_nowait())])
                try:
                    job.result()
                except APIError as exc:  # e.g. the adapter was unloaded mid-stream: an error event, as vLLM
                    yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.type, exc.param))}\n\n"
                total = {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
                if usage_wanted:
                    yield chunk([], total)
                yield "data: [DONE]\n\n"
            finally:
                if not job.done():  # the client went away mid-stream: its sequences stop here
                    job.cancel()
                self.on_generated(done)
                count_run_usage(len(specs), prompt_tokens + done)

        # The job runs from now: a client gone before body() starts must cancel it too.
        return Served(ClosingStreamingResponse(body(), on_close=job.cancel, media_type="text/event-stream",
                                               headers={"Cache-Control": "no-cache"}), 0, prompt_tokens)

    def _completion_token_logprobs(self, event: StepEvent, detok: Detokenizer) -> dict:
        tok, lp, alts = event.token, event.logprob, event.alts
        piece = self._piece(tok)
        top = {piece: max(lp, _FLOOR)}
        top.update({self._piece(a): max(v, _FLOOR) for a, v in alts if self._piece(a) not in top})
        offset = max(len(detok.text) - len(piece), 0)
        return {"text_offset": [offset], "token_logprobs": [max(lp, _FLOOR)], "tokens": [piece], "top_logprobs": [top]}

    def _chat_token_logprobs(self, event: StepEvent) -> dict:
        tok, lp, alts = event.token, event.logprob, event.alts
        piece = self._piece(tok)
        tops = [{"token": self._piece(a), "logprob": max(v, _FLOOR), "bytes": list(self._piece(a).encode())}
                for a, v in alts]
        return {"content": [{"token": piece, "logprob": max(lp, _FLOOR), "bytes": list(piece.encode()),
                             "top_logprobs": tops}]}

    async def load_adapter(self, req: P.LoadLoRAAdapterRequest, info: AdapterInfo) -> Served:
        if req.lora_name == self.model_id:
            message = f"The lora adapter '{req.lora_name}' conflicts with a served base model."
            raise APIError(400, message, type="InvalidUserInput", param="lora_name")
        async with self._adapter_lock:  # check and load as one step: concurrent loads see each other
            return await self._load_adapter(req, info)

    async def _load_adapter(self, req: P.LoadLoRAAdapterRequest, info: AdapterInfo) -> Served:
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
        except Exception as exc:  # e.g. shapes that do not fit the base; the engine rolled back
            log.warning("loading adapter %r from %s failed", req.lora_name, info.path, exc_info=True)
            detail = scrub_paths(f"{type(exc).__name__}: {exc}", {
                str(info.root): "<adapter-root>", self.settings.model_path: "<model>",
            })[:500]
            message = scrub_paths(f"could not load LoRA adapter '{req.lora_name}' ({req.lora_path}): {detail}",
                                  {str(info.root): "<adapter-root>"})
            raise APIError(400, message, param="lora_path") from None
        return Served(PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully."), 0)

    async def unload_adapter(self, req: P.UnloadLoRAAdapterRequest) -> Served:
        async with self._adapter_lock:  # a second unload of the same name sees the first one's result: 404
            if req.lora_name not in self.engine.adapters:
                message = f"The lora adapter '{req.lora_name}' cannot be found."
                raise APIError(404, message, type="NotFoundError", param="lora_name")
            await self.batcher.run_exclusive(self.engine.unload_adapter, req.lora_name)
        return Served(PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully."), 0)

    async def models(self) -> Served:
        limit = self.settings.max_model_len
        # Names only: server paths tell a client nothing it can use and an attacker the layout.
        cards = [P.ModelCard(id=self.model_id, root=self.model_id, max_model_len=limit)]
        cards += [P.ModelCard(id=name, root=name, parent=self.model_id) for name in self.engine.adapters]
        return Served(JSONResponse(P.ModelList(data=cards).model_dump()), 0)
