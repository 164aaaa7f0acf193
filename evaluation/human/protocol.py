"""The annotation page's HTTP contract (pydantic only).

Responses are blind: the page sees them as "1".."K" in the annotator's order and never learns
which model wrote which; the server maps positions back to models when it stores a row.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from services.common.protocol import Text


class ConfigResponse(BaseModel):
    title: str
    auth_required: bool
    groups: list[str]
    k: int = Field(description="responses per prompt")
    total: int = Field(description="prompts per annotator")


class SessionResponse(BaseModel):
    annotator: str
    group: str
    total: int
    done: int
    next_index: int = Field(description="0-based position of the first unanswered prompt (total when all are done)")


class ShownResponse(BaseModel):
    key: str = Field(description="'1'..'K', the position on the page")
    text: str


class ItemResponse(BaseModel):
    index: int
    total: int
    done: int
    prompt_id: str
    instruction: str
    responses: list[ShownResponse]
    ranking: dict[str, int] | None = Field(None, description="the counting answer so far, by position key")


class SubmitRequest(BaseModel):
    # Text: a lone UTF-16 surrogate (valid JSON, not a character) is a 400, not a 500 on write.
    annotator: Text
    group: Text
    prompt_id: Text
    # Any, not int: a wrong type is reported by the ranking validator in the page's words.
    ranking: dict[Text, Any]


class SubmitResponse(BaseModel):
    saved: bool
    done: int
    total: int
