"""`build_app(settings, kind)`: the FastAPI app both reward services run.

Routes stay thin: validate (protocol.py), encode (engine, in a thread), await the batcher,
shape the reply. The model loads in a background thread at startup so /health answers at
once and /ready turns 200 only after the model is loaded and one batch has run (warm-up).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from services.common.chat import ChatFormat
from services.common.http import APIError, OffLoopJSONRoute, add_common_middleware, add_request_context
from services.common.keyless import KeylessRoutesMiddleware
from services.common.metrics import MetricsMiddleware, RewardMetrics, count_run_usage, current_run
from services.common.openapi import BODY_ERRORS, TEXT, error_responses, install_openapi
from services.common.protocol import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    GetRewardRequest,
    GetRewardResponse,
    ModelCard,
    ModelList,
    RewardKind,
    ScoreRequest,
    ScoreResponse,
    SlimeRewardDetail,
    SlimeRewardRequest,
    Usage,
)
from services.common.truncation import Truncated, truncate_left
from services.reward.batcher import DynamicBatcher, QueueFullError
from services.reward.engine import EngineOptions, RewardEngine, load_engine
from services.reward.settings import RewardServiceSettings

log = logging.getLogger(__name__)

PATHS = frozenset({"/v1/score", "/get_reward", "/classify", "/slime", "/slime/object", "/health", "/ready",
                   "/v1/models", "/metrics"})
RETRY_AFTER_S = "1"
# OpenRLHF's and slime's reward clients send no headers, but post to a URL the user writes:
# on these paths the key may be `?api_key=`.
QUERY_KEY_PATHS = ("/get_reward", "/slime", "/slime/object")


def sigmoid(x: float) -> float:
    """Numerically stable logistic function (no overflow for large |x|)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def frame_text_row(row: Truncated, keep: int, prefix: Sequence[int], suffix: Sequence[int],
                   side: str = "left") -> Truncated:
    """A text's ids cut to `keep - len(prefix) - len(suffix)` (its last ones, or with side
    'right' its first ones), between the tokenizer's own special tokens, which always survive
    (as in /v1/score). Pure.

    >>> frame_text_row(Truncated([5, 6, 7], False), 4, [1], [2])
    Truncated(ids=[1, 6, 7, 2], truncated=True)
    >>> frame_text_row(Truncated([5, 6, 7], False), 4, [1], [2], "right")
    Truncated(ids=[1, 5, 6, 2], truncated=True)
    """
    budget = keep - len(prefix) - len(suffix)
    if budget <= 0:
        raise ValueError(f"a cap of {keep} tokens leaves no room next to the {keep - budget} special tokens")
    cut = truncate_left(row.ids, budget) if side == "left" else Truncated(row.ids[:budget], len(row.ids) > budget)
    return Truncated([*prefix, *cut.ids, *suffix], row.truncated or cut.truncated)


def over_context(cap: int, index: int, what: str) -> APIError:
    """vLLM's answer to an input past the context, with the way to ask for the cut instead."""
    return APIError(400, f"This model's maximum context length is {cap} tokens (max_tokens). However, input[{index}] "
                    f"{what}. Please reduce the length of the input, or set truncate_prompt_tokens (-1 keeps the "
                    f"last {cap} tokens, the cut /get_reward makes)", param="input")


def encode_classify(
    engine: RewardEngine, texts: list[str], rows: list[list[int]], truncate_prompt_tokens: int | None,
    add_special_tokens: bool, side: str | None = None,
) -> list[Truncated]:
    """/classify inputs -> model rows (tokenizes: run it in a thread). Bad input raises APIError 400.

    Texts are tokenized as is (templated text, as /get_reward) plus, as vLLM, the tokenizer's own
    BOS/EOS when `add_special_tokens`. Token ids are used as given. As vLLM, an input over the cap
    is a 400 unless the caller asked for truncation (`truncate_prompt_tokens`); the cut keeps the
    last tokens (where the reply is) unless `side` is 'right'.
    """
    cap, k, side = engine.max_tokens, truncate_prompt_tokens, side or "left"
    if k is not None and k > cap:
        raise APIError(400, f"truncate_prompt_tokens={k} is over this service's max_tokens={cap}; "
                       f"send at most {cap}, or -1 for the cap", param="truncate_prompt_tokens")
    keep = cap if k is None or k == -1 else k
    if rows:
        long = next(((i, len(r)) for i, r in enumerate(rows) if len(r) > cap), None)
        if k is None and long is not None:
            raise over_context(cap, long[0], f"has {long[1]} token ids")
        if side == "right":
            rows = [r[:keep] for r in rows]
        try:
            return engine.encode_token_ids(rows, keep)
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from None
    prefix, suffix = (engine.prefix, engine.suffix) if add_special_tokens else ([], [])
    try:
        encoded = [frame_text_row(r, keep, prefix, suffix, side)
                   for r in engine.encode_queries(texts, keep="end" if side == "left" else "start")]
    except ValueError as exc:
        raise APIError(400, f"{exc}; raise truncate_prompt_tokens or send add_special_tokens false",
                       param="truncate_prompt_tokens") from None
    if k is None:
        long_text = next((i for i, e in enumerate(encoded) if e.truncated), None)
        if long_text is not None:
            extra = " with the tokenizer's special tokens" if prefix or suffix else ""
            raise over_context(cap, long_text, f"has more than {cap} tokens{extra}")
    empty = next((i for i, e in enumerate(encoded) if not e.ids), None)
    if empty is not None:
        raise APIError(400, f"input[{empty}] encodes to no tokens; send text the tokenizer keeps", param="input")
    return encoded


def same_model(given: str, model_id: str, model_path: str) -> bool:
    """A request's `model` names this service: its id, its --model-path as given, or another
    spelling of that folder (verl sends its own `reward_model.model_path` verbatim: a trailing
    slash, `~`, `..` or a symlink must not make it a 404)."""
    if given in (model_id, model_path):
        return True
    if not any(c in given for c in "/~.") or "\0" in given:
        return False
    try:
        return os.path.realpath(os.path.expanduser(given)) == os.path.realpath(os.path.expanduser(model_path))
    except (OSError, ValueError):
        return False


def slime_pieces(chat: ChatFormat, request: SlimeRewardRequest) -> tuple[list, list]:
    """slime's (prompt, response) -> (prompt pieces, response pieces), as /v1/score would take them. Pure.

    A prompt holding the chat start marker is slime's templated text (`--apply-chat-template`,
    ending with the assistant header): kept as is, its markers special, as /get_reward does. A
    plain prompt is the user turn and a list the conversation, formatted as /v1/score formats
    them. The reply is always content (its marker strings plain text: a policy cannot forge a
    turn) closed by the end marker, which a generation may already carry (stop token kept).

    >>> slime_pieces(ChatFormat(), SlimeRewardRequest(prompt="<|im_start|>user\\nhi<|im_end|>\\n", response="yo<|im_end|>"))
    ([('<|im_start|>user\\nhi<|im_end|>\\n', False)], [('yo', True), ('<|im_end|>', False)])
    """
    response = request.response.removesuffix(chat.im_end)
    if isinstance(request.prompt, list):
        messages = [m.model_dump() for m in request.prompt] + [{"role": "assistant", "content": response}]
        return chat.conversation_pieces(messages)
    if chat.im_start in request.prompt:
        return [(request.prompt, False)], chat.response_pieces(response)
    return chat.prompt_pieces([{"role": "user", "content": request.prompt}]), chat.response_pieces(response)


def openrlhf_query(text: str, end_marker: str, fillers: Sequence[str | None]) -> str:
    """An OpenRLHF query as OpenRLHF's own reward server reads it, closed as /v1/score closes a reply. Pure.

    OpenRLHF <= 0.9.0 decodes right-padded batches, so a query may end in pad tokens; from 0.9.1
    a reply cut at max tokens comes without its end marker. OpenRLHF's server strips pad and EOS
    strings (`fillers`: the tokenizer's) from both ends and appends EOS; here the text is closed
    with the chat end marker unless it already ends with it (trailing whitespace aside).

    >>> openrlhf_query("<pad><|im_start|>assistant\\nyo<|im_end|><pad><pad>", "<|im_end|>", ["<pad>", "<|im_end|>"])
    '<|im_start|>assistant\\nyo<|im_end|>'
    >>> openrlhf_query("<|im_start|>assistant\\ny", "<|im_end|>", ["<pad>", None])
    '<|im_start|>assistant\\ny<|im_end|>'
    >>> openrlhf_query("<|im_start|>assistant\\nyo<|im_end|>\\n", "<|im_end|>", ["<|endoftext|>"])
    '<|im_start|>assistant\\nyo<|im_end|>\\n'
    """
    fillers = [f for f in fillers if f]
    start, stop, moved = 0, len(text), True
    while moved:  # indices, not slices: a body of a million pad strings stays linear
        moved = False
        for f in fillers:
            while text.startswith(f, start, stop):
                start, moved = start + len(f), True
            while text.endswith(f, start, stop):
                stop, moved = stop - len(f), True
    text = text[start:stop]
    return text if text.rstrip().endswith(end_marker) else text + end_marker


class RewardService:
    """Everything a running service holds: settings, engine (once loaded), batcher, metrics."""

    def __init__(self, settings: RewardServiceSettings, kind: RewardKind):
        self.settings = settings
        self.kind = kind
        self.model_id = settings.served_model_id()
        self.metrics = RewardMetrics(PATHS, max_tracked_runs=settings.max_tracked_runs)
        self.engine: RewardEngine | None = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None

    def engine_options(self) -> EngineOptions:
        s = self.settings
        return EngineOptions(
            model_path=s.model_path, dtype=s.dtype, device=s.device, max_tokens=s.max_tokens,
            min_prompt_tokens=s.min_prompt_tokens, trust_remote_code=s.trust_remote_code,
            chat=ChatFormat(s.chat_im_start, s.chat_im_end), torch_threads=s.torch_threads,
            packing=s.packing, packing_options=s.packing_options(),
        )

    async def load(self) -> None:
        try:
            engine = await asyncio.to_thread(load_engine, self.engine_options())
            await asyncio.to_thread(engine.warmup)
        except Exception as exc:  # keep serving /health so the failure is visible, not a crash loop
            log.exception("loading %s failed", self.settings.model_path)
            self.load_error = f"{type(exc).__name__} (the details are in the server log)"
            return
        self.attach_engine(engine)

    def attach_engine(self, engine: RewardEngine) -> None:
        """Serve with a loaded, warmed engine: a batcher over it, then /ready says 200.

        Separate from `load` so the shared-base mode (services/reward_shared) can hand in
        engines that share one model."""
        s = self.settings
        max_batch_tokens, max_padding = s.batch_defaults(engine.device.type)
        batcher = DynamicBatcher(
            engine.score_ids, max_batch_tokens=max_batch_tokens, max_wait_ms=s.max_wait_ms,
            max_queue_items=s.max_queue_items, max_queue_tokens=s.max_queue_tokens, max_padding=max_padding,
            cross_request=s.batching,
            on_batch=self.metrics.observe_batch, worker_init=engine.init_thread,
            packed=engine.packed,  # set when --packing is on (engine.enable_packing): packed rows
            fair=s.fair_scheduling, run_weights=s.run_weight_map(), on_wait=self.metrics.runs.observe_wait,
            contended_batch_tokens=s.contended_batch_tokens,
        )
        batcher.start()
        self.metrics.queue_depth.set_function(lambda: batcher.queued_items)
        self.metrics.runs.watch_queues(batcher.queued_by_run)
        self.engine, self.batcher = engine, batcher
        log.info("%s ready: %s (%s, %s, max_tokens %d, batch tokens %d, padding %.2f)", self.kind, self.model_id,
                 engine.device, engine.dtype, engine.max_tokens, max_batch_tokens, max_padding)

    def require_ready(self) -> tuple[RewardEngine, DynamicBatcher]:
        if self.engine is None or self.batcher is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, headers={"Retry-After": RETRY_AFTER_S})
        return self.engine, self.batcher

    def check_request(self, model: str | None, n_items: int, param: str) -> None:
        if model is not None and not same_model(model, self.model_id, self.settings.model_path):
            raise APIError(404, f"The model `{model}` does not exist; this service serves `{self.model_id}` (its "
                           "--model-id; the --model-path folder it loaded is accepted too, in any spelling)",
                           param="model")
        if n_items > self.settings.max_items:
            raise APIError(413, f"too many items: {n_items} > max_items={self.settings.max_items}; split the request", param=param)

    async def score(self, encoded: list[Truncated]) -> list[float]:
        _, batcher = self.require_ready()
        try:
            return await batcher.submit([e.ids for e in encoded], run=current_run())  # a queue per run
        except QueueFullError as exc:
            raise APIError(503, f"overloaded, retry later: {exc}", headers={"Retry-After": RETRY_AFTER_S}) from None


def build_app(settings: RewardServiceSettings, kind: RewardKind) -> FastAPI:
    service = RewardService(settings, kind)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loader = asyncio.create_task(service.load())
        yield
        loader.cancel()  # a load still running in its thread is abandoned with the process
        if service.batcher is not None:
            await service.batcher.stop()

    title = {"preference": "reward_pref", "absolute": "reward_abs"}[kind]
    app = FastAPI(title=f"crs-rlhf {title}", description=f"{kind} reward model scoring", lifespan=lifespan)
    app.state.service = service
    app.router.route_class = OffLoopJSONRoute  # large bodies parsed and validated off the event loop

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True,
              responses=error_responses(*BODY_ERRORS, 404, 503))
    async def score(request: ScoreRequest) -> ScoreResponse:
        service.check_request(request.model, len(request.items), "items")
        engine, _ = service.require_ready()
        encoded = await asyncio.to_thread(engine.encode_items, request.items)
        scores = await service.score(encoded)
        usage = Usage(tokens=sum(len(e.ids) for e in encoded))
        count_run_usage(len(scores), usage.tokens)  # per-run counters (X-CRS-Run)
        return ScoreResponse(
            model=service.model_id,
            kind=kind,
            scores=scores,
            probabilities=[sigmoid(s) for s in scores] if kind == "absolute" else None,
            truncated=[e.truncated for e in encoded],
            usage=usage,
        )

    @app.post("/get_reward", response_model=GetRewardResponse, responses=error_responses(*BODY_ERRORS, 503))
    async def get_reward(request: GetRewardRequest) -> GetRewardResponse:
        """OpenRLHF's remote reward protocol: queries are full templated texts, read as OpenRLHF's
        own server reads them (openrlhf_query), then scored as they are."""
        service.check_request(None, len(request.query), "query")
        engine, _ = service.require_ready()
        if not request.query:  # OpenRLHF 0.9.1-0.10.x with several URLs (protocol.py)
            return GetRewardResponse(rewards=[], scores=[], extra_logs={})
        end, tok = engine.opts.chat.im_end, engine.tokenizer
        queries = [openrlhf_query(q, end, (tok.pad_token, tok.eos_token)) for q in request.query]
        encoded = await asyncio.to_thread(engine.encode_queries, queries)
        scores = await service.score(encoded)
        count_run_usage(len(scores), sum(len(e.ids) for e in encoded))
        # Absolute: rewards are logits (docs/method.md: the logit is the stronger RL signal), scores are probabilities.
        probs = [sigmoid(s) for s in scores] if kind == "absolute" else scores
        return GetRewardResponse(rewards=scores, scores=probs, extra_logs={})

    @app.post("/classify", response_model=ClassifyResponse, responses=error_responses(*BODY_ERRORS, 404, 503))
    async def classify(request: ClassifyRequest, raw: Request) -> ClassifyResponse:
        """vLLM's classification API for a 1-label reward model. verl's reward loop sends
        `use_activation: false` and reads `data[-1].probs[-1]`, the raw logit /v1/score returns."""
        if request.ignored_fields:  # as vLLM: accepted and ignored, said in the log
            log.debug("/classify: ignored fields %s", ", ".join(request.ignored_fields))
        texts, rows = request.texts_or_ids()
        service.check_request(request.model, len(texts) + len(rows), "input")
        engine, _ = service.require_ready()
        encoded = await asyncio.to_thread(
            encode_classify, engine, texts, rows, request.truncate_prompt_tokens, request.add_special_tokens,
            request.truncation_side,
        )
        scores = await service.score(encoded)
        tokens = sum(len(e.ids) for e in encoded)
        count_run_usage(len(scores), tokens)
        activate = request.activation_on()
        label = (getattr(engine.model.config, "id2label", None) or {}).get(0)
        data = [ClassifyData(index=i, label=label, probs=[sigmoid(s) if activate else s], num_classes=1)
                for i, s in enumerate(scores)]
        usage = ClassifyUsage(prompt_tokens=tokens, total_tokens=tokens)
        # vLLM: 'classify-' + the body's request_id, else the X-Request-Id header, else a random id.
        rid = request.request_id or getattr(raw.state, "request_id", None) or uuid.uuid4().hex
        return ClassifyResponse(id=f"classify-{rid}", created=int(time.time()), model=service.model_id,
                                data=data, usage=usage)

    async def slime_score(request: SlimeRewardRequest) -> tuple[float, Truncated]:
        engine, _ = service.require_ready()
        try:
            pieces = slime_pieces(engine.opts.chat, request)
        except ValueError as exc:  # a conversation ending with the assistant's turn, plus the reply
            raise APIError(400, str(exc), param="prompt") from None
        (encoded,) = await asyncio.to_thread(engine.encode_pieces, [pieces])
        (score,) = await service.score([encoded])
        count_run_usage(1, len(encoded.ids))
        return score, encoded

    @app.post("/slime", response_model=float, responses=error_responses(*BODY_ERRORS, 503))
    async def slime(request: SlimeRewardRequest) -> float:
        """slime's `--rm-type remote_rm --rm-url http://host:port/slime`: slime takes the whole
        JSON reply as the reward, so the reply is the bare number (the raw logit)."""
        score, _ = await slime_score(request)
        return score

    @app.post("/slime/object", response_model=SlimeRewardDetail, response_model_exclude_none=True,
              responses=error_responses(*BODY_ERRORS, 503))
    async def slime_object(request: SlimeRewardRequest) -> SlimeRewardDetail:
        """The same score as an object, for slime runs that set `--reward-key reward`."""
        score, encoded = await slime_score(request)
        return SlimeRewardDetail(reward=score, probability=sigmoid(score) if kind == "absolute" else None,
                                 truncated=encoded.truncated, tokens=len(encoded.ids))

    @app.get("/health", responses=error_responses(503))
    async def health() -> dict:
        if service.load_error:
            raise APIError(503, f"the model failed to load: {service.load_error}")
        return {"status": "ok"}

    @app.get("/ready", responses=error_responses(503))
    async def ready() -> dict:
        service.require_ready()
        return {"status": "ready", "model": service.model_id}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        engine = service.engine
        max_tokens = engine.max_tokens if engine else settings.max_tokens
        dtype = str(engine.dtype).removeprefix("torch.") if engine else settings.dtype
        return ModelList(data=[ModelCard(id=service.model_id, kind=kind, max_tokens=max_tokens, dtype=dtype)])

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: TEXT})
    async def metrics():
        return service.metrics.response()

    add_common_middleware(
        app, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s, query_key_paths=QUERY_KEY_PATHS,
    )
    if settings.keyless_routes:
        app.add_middleware(KeylessRoutesMiddleware, routes=settings.keyless_routes, networks=settings.keyless_networks)
        log.warning("auth: %s answer WITHOUT the API key to clients in %s (--keyless-routes, --keyless-networks); "
                    "every other route, and these from any other address, need it",
                    ", ".join(settings.keyless_routes), ", ".join(settings.keyless_networks))
    add_request_context(app)  # request ids; unexpected errors -> JSON 500, connection kept
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)  # outermost: counts 401/413/500 too
    install_openapi(app, secured=settings.api_key is not None, query_key_paths=QUERY_KEY_PATHS)
    return app
