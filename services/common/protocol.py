"""Wire contracts shared by the reward services and the trainer's clients.

No torch here: the trainer imports this module to build requests and validate replies,
so client and server can never disagree on a field name.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    field_validator,
    model_validator,
)

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
    Annotated[PromptResponseItem, Tag("pair")] | Annotated[MessagesItem, Tag("messages")],
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
    def _lengths_agree(self) -> ScoreResponse:
        n = len(self.scores)
        if len(self.truncated) != n or (self.probabilities is not None and len(self.probabilities) != n):
            raise ValueError("scores, truncated and probabilities must have one entry per item")
        return self


# --------------------------------------------------------------------------- OpenRLHF


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model protocol. Queries are full templated texts."""

    model_config = ConfigDict(extra="allow")  # OpenRLHF versions add fields; ignore them.

    # May be empty: OpenRLHF 0.9.1-0.10.x splits each rollout's one query over all its URLs, so
    # every URL but the first gets `{"query": []}`; OpenRLHF's own server answers empty lists.
    query: list[Annotated[Text, Field(min_length=1)]] = Field(
        description="Full templated texts (chat markers included): pad/EOS strings at either end are dropped "
        "and a reply without the end marker is closed with it, then scored. An empty list gets empty lists."
    )
    prompts: list[Text] | None = None
    labels: list | None = None


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(default_factory=dict)


# --------------------------------------------------------------------------- /slime (slime's remote_rm)


class SlimeRewardRequest(BaseModel):
    """slime's `remote_rm` body: `{"prompt", "response", "label"}`, no headers.

    `prompt` is what slime generated from: usually the chat-templated text (ending with the
    assistant header), else the plain user turn, or a list of messages; `label` is its
    dataset's answer, which a reward model does not use.
    """

    model_config = ConfigDict(extra="allow")  # slime may add fields; ignore them.

    prompt: Annotated[Text, Strict(), Field(min_length=1)] | Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="Templated prompt text (scored as is), a plain user turn, or the conversation before the reply."
    )
    response: Annotated[Text, Strict()] = Field(description="The generated reply; may be empty.")
    label: object = Field(default=None, description="slime's dataset label: accepted, unused by a reward model.")


class SlimeRewardDetail(BaseModel):
    """`/slime/object`: for slime's `--reward-key reward` (`/slime` answers the bare number)."""

    reward: float = Field(description="The raw logit, as /slime answers it and /v1/score returns in `scores`.")
    probability: float | None = Field(default=None, description="Absolute RM only: sigmoid(reward).")
    truncated: bool
    tokens: int


# --------------------------------------------------------------------------- /classify (vLLM)


def _input_kind(value) -> str | None:
    # Pick the branch by shape so a bad input reports one branch's errors, not four.
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "id_lists"
    return "texts" if isinstance(first, str) else "ids"  # [1.0] or [true] reads "not a valid integer"


# Strict scalars: JSON `1.0`, `"1"` or `true` is not a token id, `"yes"` is not a bool.
TokenId = Annotated[int, Strict(), Field(ge=0)]
ClassifyText = Annotated[str, Strict(), Field(min_length=1), AfterValidator(valid_text)]
ClassifyInput = Annotated[
    Annotated[ClassifyText, Tag("text")]
    | Annotated[list[ClassifyText], Field(min_length=1), Tag("texts")]
    | Annotated[list[TokenId], Field(min_length=1), Tag("ids")]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1), Tag("id_lists")],
    Discriminator(
        _input_kind,
        custom_error_type="invalid_input",
        custom_error_message="must be a string, a list of strings, a list of token ids or a list of token-id lists",
    ),
]


class ClassifyRequest(BaseModel):
    """vLLM's classification request (`POST /classify`) for a 1-label reward model.

    Texts are full templated texts (chat markers included) scored as they are, as `/get_reward`
    does; token-id lists are scored as given. verl's reward loop sends `use_activation: false`
    and reads `data[-1].probs[-1]`: the raw logit. As vLLM (its OpenAIBaseModel allows extra
    fields), fields this API does not define are ignored, not refused; `ignored_fields` names them.
    """

    model_config = ConfigDict(extra="allow")

    model: Text | None = Field(default=None, description="Optional; checked against the served model id.")
    input: ClassifyInput = Field(
        description="One text, a list of texts, one token-id list, or a list of token-id lists."
    )
    use_activation: Annotated[bool, Strict()] | None = Field(
        default=None, description="true (the default, as vLLM): probs = sigmoid(logit); false: the raw logit."
    )
    activation: Annotated[bool, Strict()] | None = Field(
        default=None, description="Deprecated vLLM name of use_activation (older verl sends it)."
    )
    softmax: Annotated[bool, Strict()] | None = Field(
        default=None, description="Deprecated vLLM name of use_activation."
    )
    truncate_prompt_tokens: Annotated[int, Strict(), Field(ge=-1, json_schema_extra={"not": {"const": 0}})] | None = Field(
        default=None,
        description="Cut each input to N tokens (-1: the service's max_tokens), from the side `truncation_side` "
        "names. Unset: an input over max_tokens is a 400, as in vLLM.",
    )
    truncation_side: Literal["left", "right"] | None = Field(
        default=None, description="With truncate_prompt_tokens: 'left' (the default here) keeps the last N "
        "tokens, where the reply is; 'right' keeps the first N.",
    )
    add_special_tokens: Annotated[bool, Strict()] = Field(
        default=True,
        description="As vLLM: add the tokenizer's own special tokens (BOS; BERT's CLS/SEP) around each "
        "text. Token-id inputs never get any. /get_reward adds none: send false to match it.",
    )
    user: Text | None = Field(default=None, description="Accepted for OpenAI/vLLM compatibility; unused.")
    # vLLM's other pooling fields: accepted with vLLM's types, nothing to do for a 1-label RM.
    request_id: Annotated[str, Strict(), Field(min_length=1, max_length=128)] | None = Field(
        default=None, description="As vLLM: the reply's id is 'classify-<request_id>' (else the X-Request-ID).")
    priority: Annotated[int, Strict()] = Field(
        default=0, description="As vLLM without priority scheduling: only 0 is served.")
    padding: Literal["max_length", "do_not_pad"] | None = Field(
        default=None, description="Accepted, no effect: rows are masked, so padding never changes a score.")
    cache_salt: Annotated[str, Strict(), Field(min_length=1, max_length=1024)] | None = Field(
        default=None, description="Accepted, no effect: there is no prefix cache to salt.")
    mm_processor_kwargs: dict | None = Field(default=None, description="Accepted, no effect: text-only models.")

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    @field_validator("priority")
    @classmethod
    def _no_priority(cls, value: int) -> int:
        if value != 0:
            raise ValueError("priority scheduling is not enabled on this service (as vLLM without "
                             "--scheduling-policy priority): send 0 or leave it out")
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_would_change_the_answer(cls, data):
        # Ignoring these would score something other than what was asked: say so instead.
        if isinstance(data, dict):
            if "messages" in data and "input" not in data:
                raise ValueError("chat `messages` are not served on /classify: send the templated text as "
                                 "`input`, or the conversation as a /v1/score item")
            if "normalize" in data:  # vLLM refuses it too
                raise ValueError("parameter `normalize` was removed; use `use_activation` instead")
        return data

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("0 would keep no tokens: use -1 (the service's max_tokens) or a positive count")
        return value

    @model_validator(mode="after")
    def _one_activation(self) -> ClassifyRequest:
        given = {v for v in (self.use_activation, self.activation, self.softmax) if v is not None}
        if len(given) > 1:
            raise ValueError("use_activation, activation and softmax disagree; send only use_activation")
        return self

    def activation_on(self) -> bool:
        """vLLM's rule: whichever of the three names is set, else True."""
        for value in (self.use_activation, self.activation, self.softmax):
            if value is not None:
                return value
        return True

    def texts_or_ids(self) -> tuple[list[str], list[list[int]]]:
        """(texts, token-id rows): exactly one of the two is non-empty."""
        value = self.input
        if isinstance(value, str):
            return [value], []
        if isinstance(value[0], str):
            return list(value), []
        if isinstance(value[0], int):
            return [], [list(value)]
        return [], [list(row) for row in value]


class ClassifyData(BaseModel):
    index: int
    label: str | None = Field(description="The model's id2label name of its one class (vLLM: the argmax label).")
    probs: list[float] = Field(description="One number: sigmoid(logit) with use_activation, else the raw logit.")
    num_classes: int = 1


class ClassifyUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model after truncation, summed over inputs.")
    total_tokens: int
    completion_tokens: int = 0


class ClassifyResponse(BaseModel):
    id: str = Field(description="'classify-' and a random hex id.")
    object: Literal["list"] = "list"
    created: int = Field(description="Unix time (seconds) of the reply.")
    model: str
    data: list[ClassifyData]
    usage: ClassifyUsage


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
