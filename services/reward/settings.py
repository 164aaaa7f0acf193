"""Settings shared by both reward services (one pydantic-settings model per process).

`RewardPrefSettings` and `RewardAbsSettings` subclass this and only change the default port,
so a flag (``--max-wait-ms``) and its variable (``CRS_MAX_WAIT_MS``) mean the same in both.
Docker/k8s manifests import these classes: keep field names stable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import CliImplicitFlag

from services.common.keyless import parse_networks
from services.common.settings import ServiceSettings
from services.reward.packing import PackingOptions

# Scoring routes an operator may open to a named network (never /metrics or the docs).
KEYLESS_ROUTES = ("/classify", "/slime", "/slime/object", "/get_reward", "/v1/score")


class RewardServiceSettings(ServiceSettings):
    # --- the model
    model_path: str = Field(
        description="Local folder or hub id of a sequence-classification reward model (num_labels=1), "
        "or a PEFT adapter folder (adapter_config.json) on top of one."
    )
    model_id: str | None = Field(
        None, description="Served model name (checked against a request's 'model'); default: the folder name."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = cuda when available.")
    trust_remote_code: bool = Field(False, description="Run a model repo's own Python code (off unless you trust it).")

    # --- text and truncation (the thesis, docs/method.md: <= 2048 tokens, the prompt keeps >= 256, cut from its beginning)
    max_tokens: int = Field(
        2048, gt=0, description="Token cap per item; lowered to the model's max_position_embeddings if smaller."
    )
    min_prompt_tokens: int = Field(256, ge=0, description="A truncated prompt keeps at least this many tokens.")
    chat_im_start: str = Field("<|im_start|>", description="ChatML start-of-turn marker used to format items.")
    chat_im_end: str = Field("<|im_end|>", description="ChatML end-of-turn marker used to format items.")

    # --- request limits and the dynamic batcher
    max_items: int = Field(4096, gt=0, description="Most items (or queries) in one request; more gets 413.")
    batching: bool = Field(
        True, description="Cross-request dynamic batching; off = one forward pass per request (a baseline)."
    )
    max_batch_tokens: int | None = Field(
        None, gt=0, description="Token budget of one forward pass: rows x longest row (padding included). "
        "Default: 2048 on CPU (bigger padded batches were slower there), 65536 on CUDA.",
    )
    max_padding: float | None = Field(
        None, ge=0, description="Most pad tokens per real token in one forward pass; more starts a new "
        "micro-batch. Default: 0.05 on CPU (padded, masked batches ran slower there than single rows), 1.0 on CUDA.",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="Intra-op threads of the model worker (default: torch's choice, one per core)."
    )
    max_wait_ms: float = Field(
        4.0, ge=0, description="How long the collector waits for more requests before running a batch."
    )
    contended_batch_tokens: int | None = Field(
        None, gt=0, description="Token budget of one padded forward pass while more than one run has sent work "
        "within the last second (fair scheduling): a run that arrives waits for the pass in flight, so a smaller "
        "pass bounds its latency. Default: half of max_batch_tokens. Packed rows keep their lengths.",
    )
    max_queue_items: int = Field(
        16384, gt=0, description="Items waiting to be scored; beyond this requests get 503 + Retry-After."
    )
    max_queue_tokens: int = Field(
        4 * 1024 * 1024, gt=0, description="Tokens waiting to be scored (after truncation); beyond this 503 + Retry-After."
    )

    # --- packed rows (docs/reward_gpu.md): many items per row, block-diagonal mask, no padding between them
    packing: Literal["auto", "on", "off"] = Field(
        "auto", description="Score items packed end to end in rows of --row-tokens (each item masked off from its "
        "neighbours) instead of padded, length-sorted batches. 'auto' = on for CUDA, off on CPU (sorted padded "
        "batches are as fast there); with 'auto' a model the packed path cannot serve falls back to padded "
        "batches (one log line), with 'on' the service refuses to start.",
    )
    compile: CliImplicitFlag[bool] = Field(
        False, description="torch.compile the backbone for packed rows: one compile per row length (bucket) at "
        "start-up, before /ready says 200, none under load. Needs packing (ignored, with a log line, when packing "
        "is off).",
    )
    row_tokens: int | None = Field(
        None, gt=0, description="Packed row length in tokens (>= max_tokens). Default: 32768 with flex attention "
        "on CUDA, 8192 with sdpa on CUDA, 2048 on CPU.",
    )
    packing_attention: Literal["auto", "flex", "sdpa", "eager"] = Field(
        "auto", description="Attention of packed rows: 'flex' (FlexAttention BlockMask, skips masked blocks), "
        "'sdpa' (dense (L, L) mask, works everywhere), 'eager'. 'auto' = flex on CUDA, sdpa elsewhere.",
    )
    packing_buckets: int | None = Field(
        None, gt=0, le=8, description="How many packed row lengths (row_tokens, /2, /4, ...); a short row runs "
        "at the smallest that holds it. Each is one compile at start-up. Default: 2 with --compile, else 4.",
    )

    # --- auth for clients that cannot send a key (verl's reward loop, slime): docs/reward_services.md
    keyless_routes: list[str] = Field(
        default_factory=list, description="With --api-key: these scoring routes (of " + ", ".join(KEYLESS_ROUTES)
        + ") answer WITHOUT the key, but only to clients in --keyless-networks; logged at start-up. "
        "verl's reward loop needs /classify, slime /slime.",
    )
    keyless_networks: list[str] = Field(
        default_factory=list, description="IP networks (10.0.0.0/8, 127.0.0.1, fd00::/8) whose clients may use "
        "--keyless-routes without the key: the TCP peer's address, so name the trainers' network, not a proxy's.",
    )

    @model_validator(mode="after")
    def _check(self) -> RewardServiceSettings:
        if self.keyless_routes or self.keyless_networks:
            if not (self.keyless_routes and self.keyless_networks):
                raise ValueError("--keyless-routes and --keyless-networks go together: which routes, for which clients")
            if self.api_key is None:
                raise ValueError("--keyless-routes needs --api-key (without a key every route is open already)")
            unknown = sorted(set(self.keyless_routes) - set(KEYLESS_ROUTES))
            if unknown:
                raise ValueError(f"--keyless-routes: {', '.join(unknown)} cannot be keyless; choose from "
                                 + ", ".join(KEYLESS_ROUTES))
            parse_networks(self.keyless_networks)
        if self.min_prompt_tokens >= self.max_tokens:
            raise ValueError(
                f"min_prompt_tokens ({self.min_prompt_tokens}) must be below max_tokens ({self.max_tokens})"
            )
        if self.packing == "off" and self.compile:
            raise ValueError("--compile (CRS_COMPILE) compiles the packed rows' fixed shapes; it needs "
                             "--packing on or auto (or drop --compile)")
        if self.row_tokens is not None and self.row_tokens < self.max_tokens:
            raise ValueError(f"row_tokens ({self.row_tokens}) must be at least max_tokens ({self.max_tokens}): "
                             "an item never spans two packed rows; raise --row-tokens or lower --max-tokens")
        return self

    def packing_options(self) -> PackingOptions:
        """What the packed scorer needs; row length and attention defaults are per device (packed_forward)."""
        return PackingOptions(
            row_tokens=self.row_tokens, attention=self.packing_attention, compile=self.compile,
            bucket_count=self.packing_buckets or (2 if self.compile else 4),
        )

    def batch_defaults(self, device_type: str) -> tuple[int, float]:
        """(max_batch_tokens, max_padding) with the per-device defaults filled in."""
        cuda = device_type == "cuda"
        tokens = self.max_batch_tokens or (65536 if cuda else 2048)
        padding = self.max_padding if self.max_padding is not None else (1.0 if cuda else 0.05)
        return tokens, padding

    def served_model_id(self) -> str:
        """Explicit id, else a local folder's name, else the hub id as given (like vLLM)."""
        if self.model_id:
            return self.model_id
        path = Path(self.model_path)
        return path.resolve().name if path.exists() else self.model_path
