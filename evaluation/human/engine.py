"""The annotation server's logic, without HTTP: who sees what, in which order, and what is stored.

The server keeps no state of its own beyond annotations.jsonl (loaded at start, appended on
every submit), so a restart resumes every annotator exactly where the file says they were.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.common.http import APIError
from evaluation.human.protocol import ItemResponse, SessionResponse, ShownResponse, SubmitRequest, SubmitResponse
from evaluation.human.ranking import RankingError, validate_ranking
from evaluation.human.store import AnnotationRow, AnnotationStore
from evaluation.human.tasks import Prompt, prompt_sequence, response_order

MAX_NAME = 100


class AnnotationEngine:
    def __init__(
        self,
        prompts: Sequence[Prompt],
        models: Sequence[str],
        groups: Sequence[str],
        store: AnnotationStore,
        seed: int = 0,
    ):
        self.prompts = {p.id: p for p in prompts}
        self.prompt_ids = [p.id for p in prompts]
        self.models = list(models)
        self.groups = list(groups)
        self.store = store
        self.seed = seed

    @property
    def k(self) -> int:
        return len(self.models)

    def _who(self, annotator: str, group: str) -> tuple[str, str]:
        name = (annotator or "").strip()
        if not name:
            raise APIError(400, "enter your name before you start", param="annotator")
        if len(name) > MAX_NAME:
            raise APIError(400, f"a name has at most {MAX_NAME} characters", param="annotator")
        if group not in self.groups:
            raise APIError(400, f"unknown group {group!r}: choose one of {', '.join(self.groups)}", param="group")
        return name, group

    def _sequence(self, annotator: str, group: str) -> list[str]:
        return prompt_sequence(self.seed, group, annotator, self.prompt_ids)

    def _order(self, annotator: str, group: str, prompt_id: str) -> list[str]:
        return response_order(self.seed, group, annotator, prompt_id, self.models)

    def _done(self, annotator: str, group: str) -> dict[str, AnnotationRow]:
        answered = self.store.latest_for(annotator, group)
        return {pid: row for pid, row in answered.items() if pid in self.prompts}

    def session(self, annotator: str, group: str) -> SessionResponse:
        annotator, group = self._who(annotator, group)
        done = self._done(annotator, group)
        seq = self._sequence(annotator, group)
        nxt = next((i for i, pid in enumerate(seq) if pid not in done), len(seq))
        return SessionResponse(annotator=annotator, group=group, total=len(seq), done=len(done), next_index=nxt)

    def item(self, annotator: str, group: str, index: int) -> ItemResponse:
        annotator, group = self._who(annotator, group)
        seq = self._sequence(annotator, group)
        if not 0 <= index < len(seq):
            raise APIError(404, f"no prompt at position {index}: positions run from 0 to {len(seq) - 1}", param="index")
        prompt = self.prompts[seq[index]]
        order = self._order(annotator, group, prompt.id)
        done = self._done(annotator, group)
        ranking = None
        if prompt.id in done:
            # Mapped through model names, so an answer made under another seed still shows right.
            saved = done[prompt.id].ranking
            ranking = {str(i): saved[m] for i, m in enumerate(order, 1) if m in saved}
        return ItemResponse(
            index=index,
            total=len(seq),
            done=len(done),
            prompt_id=prompt.id,
            instruction=prompt.instruction,
            responses=[ShownResponse(key=str(i), text=prompt.outputs[m]) for i, m in enumerate(order, 1)],
            ranking=ranking,
        )

    def submit(self, req: SubmitRequest) -> SubmitResponse:
        annotator, group = self._who(req.annotator, req.group)
        if req.prompt_id not in self.prompts:
            raise APIError(404, f"unknown prompt {req.prompt_id!r}", param="prompt_id")
        order = self._order(annotator, group, req.prompt_id)
        # Validated under the page's labels so a message reads "missing Response 2".
        labels = [f"Response {i}" for i in range(1, self.k + 1)]
        try:
            by_label = validate_ranking({f"Response {k}": v for k, v in _as_ints(req.ranking).items()}, labels)
        except RankingError as e:
            raise APIError(400, str(e), param="ranking") from None
        row = AnnotationRow(
            prompt_id=req.prompt_id,
            group=group,
            annotator=annotator,
            ranking={order[i]: by_label[label] for i, label in enumerate(labels)},
            order=order,
        )
        self.store.append(row)
        return SubmitResponse(saved=True, done=len(self._done(annotator, group)), total=len(self.prompt_ids))


def _as_ints(ranking: Mapping[str, object]) -> dict[str, object]:
    # JSON numbers like 2.0 are fine; strings, bools and fractions go to the validator as they are.
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ranking.items()}
