"""Wire models of policy_gen: the subset of vLLM's OpenAI-compatible API the trainer uses.

Field names mirror vLLM's own protocol (`vllm/entrypoints/openai/completion/protocol.py`,
`serve/lora/protocol.py`) so one client works against either backend, and the tests
validate vLLM's real replies and the hf backend's with the same classes. No torch here.
Requests forbid unknown fields we do not implement (a typo is a 400, not a silent
default); responses allow extras because vLLM adds fields release by release.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.protocol import ErrorInfo, ErrorResponse, Text  # noqa: F401  (re-exported: one error shape)

_INT64 = 2**63 - 1
# Stop conditions are checked at every decode step of every sequence: bounded so one small
# body cannot make each step scan megabytes (OpenAI's API allows 4 stop strings).
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    # strict: JSON's `false` is not the token id 0 and `0` is not `false` (lax pydantic
    # coerces both). Integers are still accepted for float fields (1 == 1.0).
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(_Request):
    """Sampling knobs shared by both endpoints; unset values use vLLM's defaults."""

    max_tokens: int | None = Field(16, ge=1, description="New tokens at most; vLLM's default is 16.")
    temperature: float | None = Field(None, ge=0.0, le=100.0, description="Unset: 1.0 (--generation-config vllm).")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="0 or -1: off.")
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-_INT64 - 1, le=_INT64)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters."
    )
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool | None = None
    user: Text | None = None
    stream: bool | None = Field(False, description="Server-sent events: 'data: {chunk}' lines, then 'data: [DONE]'.")
    stream_options: StreamOptions | None = Field(None, description="With stream: include_usage adds a last chunk "
                                                 "with the usage (and no choices).")

    @field_validator("echo", check_fields=False)
    @classmethod
    def _not_offered(cls, v, info):
        # A bool field, not Literal[False]: a Literal accepts 0 because 0 == False in Python.
        if v:
            raise ValueError(f"{info.field_name}=true is not offered by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class CompletionRequest(SamplingFields):
    model: Text | None = None
    prompt: Union[
        Annotated[Text, Field(min_length=1)],
        Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)],
        Annotated[list[int], Field(min_length=1)],
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)],
    ] = Field(
        description="A non-empty string, a list of strings, a token-id list or a list of token-id lists. Strings "
        "are templated text: special-token strings in them ARE special tokens (use /v1/chat/completions for "
        "user text)."
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token (0: just the sampled one).")
    echo: bool | None = Field(False, description="Not offered: only false.")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, str) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(p, (str, list)) and len(p) == 0 for p in v):
            raise ValueError("prompt entries must not be empty")
        return v


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(description="Plain text: special-token strings in it are not special tokens.")


class ChatCompletionRequest(SamplingFields):
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Unset: fill the context, as vLLM's chat endpoint.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True


# --------------------------------------------------------------------------- responses


class UsageInfo(_Response):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0


class CompletionLogProbs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "abort"] | None


class CompletionResponseChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # the completion's tokens (return_token_ids)
    prompt_token_ids: list[int] | None = None


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class ChatTopLogProb(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProb(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogProb] = Field(default_factory=list)


class ChatChoiceLogProbs(_Response):
    content: list[ChatLogProb] | None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionResponseChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_token_ids: list[int] | None = None


# --------------------------------------------------------------------------- adapters, models


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    lora_path: Text = Field(min_length=1, max_length=4096, description="Folder under the server's --adapter-root.")
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(_Request):
    lora_name: Text = Field(min_length=1)
    lora_int_id: int | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
