"""What the router needs from a backend: the same six calls for hf and for the vLLM proxy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from starlette.responses import Response

from services.policy_gen import protocol as P
from services.policy_gen.adapters import AdapterInfo


@dataclass
class Served:
    """A backend's reply, plus the token counts the router feeds to /metrics."""

    response: Response
    completion_tokens: int = 0
    prompt_tokens: int = 0  # once per prompt, not per sample (usage.prompt_tokens, as vLLM counts)


class Backend(Protocol):
    model_id: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def ready(self) -> bool: ...
    async def completions(self, req: P.CompletionRequest) -> Served: ...
    async def chat(self, req: P.ChatCompletionRequest) -> Served: ...
    async def load_adapter(self, req: P.LoadLoRAAdapterRequest, info: AdapterInfo) -> Served: ...
    async def unload_adapter(self, req: P.UnloadLoRAAdapterRequest) -> Served: ...
    async def models(self) -> Served: ...
