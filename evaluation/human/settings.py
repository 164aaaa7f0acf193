"""`crs-rlhf eval annotate` settings: flags or CRS_* environment variables, one model."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import ServiceSettings


class AnnotateSettings(ServiceSettings):
    dir: str = Field(description="Evaluation folder: reads DIR/outputs/NAME.json, appends DIR/annotations.jsonl.")
    models: str = Field(description="Comma-separated model names, one DIR/outputs/NAME.json each (e.g. abs,crs,pref).")
    prompts_split: str = Field(
        "human",
        description="Split of DIR/prompts.jsonl to annotate; 'all' (or no prompts.jsonl) = ids all outputs share.",
    )
    groups: str = Field("1", description="Annotator groups: a count N (groups 1..N) or comma-separated names.")
    seed: int = Field(0, description="Seeds every annotator's prompt and response order; recorded in each row's order.")
    title: str = Field("Rank the responses", description="Heading shown on the page.")
    api_key: str | None = Field(
        None, description="When set, the page asks for this key and every /api route but /api/config needs it."
    )
    port: int = Field(8090, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, gt=0, description="Larger request bodies get 413.")

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def group_list(self) -> list[str]:
        text = self.groups.strip()
        if text.isdigit():
            if int(text) < 1:
                raise ValueError("--groups must be at least 1")
            return [str(i) for i in range(1, int(text) + 1)]
        names = [g.strip() for g in text.split(",") if g.strip()]
        if not names:
            raise ValueError("--groups needs a count or comma-separated group names")
        return names
