"""ChatML formatting: the one place where conversations become text.

SFT, both reward models, the services and the trainer all call these functions, so a
(prompt, response) pair is scored with exactly the text the reward model was trained on:

    <|im_start|>user
    {prompt}<|im_end|>
    <|im_start|>assistant
    {answer}<|im_end|>

The prompt part ends with the generation header ``<|im_start|>assistant\\n``; the response
part is the answer followed by ``<|im_end|>``. Keeping the two apart lets the scoring engine
truncate the prompt from its beginning without touching the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Jinja template equivalent to `format_prompt` / `format_conversation`, stored in the tokenizers
# we build so `apply_chat_template` (vLLM's chat endpoint, HF pipelines) agrees with us.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Open Assistant calls the user "prompter"; everything else already uses OpenAI role names.
_ROLE_ALIASES = {"prompter": "user", "human": "user", "bot": "assistant"}


@dataclass(frozen=True)
class ChatFormat:
    """The ChatML markers; configurable for models trained with other special tokens."""

    im_start: str = IM_START
    im_end: str = IM_END

    def block(self, role: str, content: str) -> str:
        return f"{self.im_start}{normalise_role(role)}\n{content}{self.im_end}"

    def format_prompt(self, messages: Iterable[Mapping[str, str]]) -> str:
        """Templated history plus the assistant header: what the policy continues."""
        blocks = [self.block(m["role"], m["content"]) for m in messages]
        return "".join(b + "\n" for b in blocks) + f"{self.im_start}assistant\n"

    def format_response(self, response: str) -> str:
        """The reply as it follows `format_prompt`: ends with the end-of-turn marker."""
        return f"{response}{self.im_end}"

    # Pieces: the same text as (text, is_content) parts, so tokenization can treat what the
    # user or the policy wrote as text and only the markers written here as special tokens.

    def prompt_pieces(self, messages: Iterable[Mapping[str, str]]) -> list[tuple[str, bool]]:
        """`format_prompt` as pieces: "".join(text for text, _ in pieces) == format_prompt(...)."""
        pieces: list[tuple[str, bool]] = []
        for m in messages:
            pieces += [(f"{self.im_start}{normalise_role(m['role'])}\n", False), (m["content"], True)]
            pieces.append((f"{self.im_end}\n", False))
        pieces.append((f"{self.im_start}assistant\n", False))
        return pieces

    def response_pieces(self, response: str) -> list[tuple[str, bool]]:
        return [(response, True), (self.im_end, False)]

    def conversation_pieces(self, messages: Sequence[Mapping[str, str]]) -> tuple[list, list]:
        """`split_conversation` as (prompt pieces, response pieces)."""
        if not messages or normalise_role(messages[-1]["role"]) != "assistant":
            raise ValueError("the last message must be the assistant reply")
        return self.prompt_pieces(messages[:-1]), self.response_pieces(messages[-1]["content"])

    def format_pair(self, prompt: str, response: str) -> tuple[str, str]:
        return self.format_prompt([{"role": "user", "content": prompt}]), self.format_response(response)

    def format_conversation(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Whole conversation; the last message must be the assistant's."""
        prompt_part, response_part = self.split_conversation(messages)
        return prompt_part + response_part

    def split_conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
        if not messages or normalise_role(messages[-1]["role"]) != "assistant":
            raise ValueError("the last message must be the assistant reply")
        return self.format_prompt(messages[:-1]), self.format_response(messages[-1]["content"])


# Conversations a chat template must render exactly as `format_prompt` does: no system turn (a
# template that adds a default one shows here), a system turn, and several turns.
TEMPLATE_PROBES = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
)


def template_mismatch(tokenizer) -> str | None:
    """None when the tokenizer's chat template renders every probe exactly as `format_prompt`
    (or it has no template: then our ChatML is used); else the first difference, for a log line.

    A template that differs (SmolLM2's inserts a default system prompt) would make a chat
    endpoint serve a text the trainer and the reward models never rendered."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    for messages in TEMPLATE_PROBES:
        got = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want = CHATML.format_prompt(messages)
        if got != want:
            return f"the chat template renders {got!r} where the trainer renders {want!r}"
    return None


def normalise_role(role: str) -> str:
    return _ROLE_ALIASES.get(role, role)


CHATML = ChatFormat()
format_prompt = CHATML.format_prompt
format_response = CHATML.format_response
format_pair = CHATML.format_pair
format_conversation = CHATML.format_conversation
split_conversation = CHATML.split_conversation
