"""Wire contracts shared by the reward services and the trainer's clients.

No torch here: the trainer imports this module to build requests and validate replies,
so client and server can never disagree on a field name.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

RewardKind = Literal["preference", "absolute"]
Role = Literal["system", "user", "assistant"]


def valid_text(value: str) -> str:
    """Reject strings a tokenizer cannot encode: JSON may carry lone UTF-16 surrogates
    (``"\\ud83d"``), which are not characters and made the tokenizer raise (a 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(value[exc.start])
        raise ValueError(
            f"contains an unpaired UTF-16 surrogate (U+{bad:04X}) at character {exc.start}; "
            "send valid Unicode text (a surrogate pair encodes one character)"
        ) from None
    return value


# Every free-text field of every service uses this type, so both get the same 400.
Text = Annotated[str, AfterValidator(valid_text)]


class _Strict(BaseModel):
    # Unknown fields are rejected so a typo ("respnse") is a 400, not a silent default.
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: int
    param: str | None = None


class ErrorResponse(BaseModel):
    """One error shape for every failure, as vLLM / OpenAI: ``{"error": {...}}``."""

    error: ErrorInfo


# --------------------------------------------------------------------------- /v1/score


class ChatMessage(_Strict):
    role: Role
    content: Text = Field(description="Plain text: special-token strings in it are not special tokens.")


class PromptResponseItem(_Strict):
    prompt: Text = Field(min_length=1, description="The user turn (plain text, not templated).")
    response: Text = Field(description="The assistant reply to score; may be empty (a turn ended at once).")


class MessagesItem(_Strict):
    messages: list[ChatMessage] = Field(
        min_length=2, description="A conversation whose last message is the assistant reply."
    )

    @field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "assistant":
            raise ValueError("the last message must be the assistant reply to score (role 'assistant')")
        if not any(m.role == "user" for m in messages[:-1]):
            raise ValueError("the conversation needs at least one 'user' message before the reply")
        return messages


def _item_kind(value) -> str:
    # Pick the branch by shape so a bad item reports one branch's errors, not both.
    if isinstance(value, MessagesItem) or (isinstance(value, dict) and "messages" in value):
        return "messages"
    return "pair"


ScoreItem = Annotated[
    Union[Annotated[PromptResponseItem, Tag("pair")], Annotated[MessagesItem, Tag("messages")]],
    Discriminator(_item_kind),
]


class ScoreRequest(_Strict):
    model: Text | None = Field(default=None, description="Optional; checked against the served model id.")
    items: list[ScoreItem] = Field(min_length=1)


class Usage(BaseModel):
    tokens: int = Field(description="Tokens fed to the model after truncation, summed over items.")


class ScoreResponse(BaseModel):
    model: str
    kind: RewardKind
    scores: list[float] = Field(description="Raw logit per item, in request order.")
    probabilities: list[float] | None = Field(
        default=None, description="sigmoid(score); only for kind 'absolute'."
    )
    truncated: list[bool]
    usage: Usage

    @model_validator(mode="after")
    def _lengths_agree(self) -> "ScoreResponse":
        n = len(self.scores)
        if len(self.truncated) != n or (self.probabilities is not None and len(self.probabilities) != n):
            raise ValueError("scores, truncated and probabilities must have one entry per item")
        return self


# --------------------------------------------------------------------------- OpenRLHF


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model protocol. Queries are full templated texts."""

    model_config = ConfigDict(extra="allow")  # OpenRLHF versions add fields; ignore them.

    query: list[Annotated[Text, Field(min_length=1)]] = Field(
        min_length=1, description="Full templated texts (chat markers included), scored as they are."
    )
    prompts: list[Text] | None = None
    labels: list | None = None


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(default_factory=dict)


# --------------------------------------------------------------------------- /v1/models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "crs-rlhf"
    kind: RewardKind
    max_tokens: int
    dtype: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
