"""Settings shared by every service: one pydantic-settings model per process.

Flags and environment variables are two spellings of the same fields (``--model-path`` ==
``CRS_MODEL_PATH``); `parse_settings` reads both, flags winning, so there is one source of
truth and no hand-written argparse to drift from it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRS_", extra="forbid", cli_kebab_case=True)

    host: str = Field("127.0.0.1", description="Bind address; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(
        None, description="When set, every endpoint but /health and /ready needs 'Authorization: Bearer <key>'."
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Larger request bodies get 413.")
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="A request body not fully received this long after its headers gets 408."
    )
    head_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request line and headers have not all arrived this long after "
        "it opened (or after its previous response) is closed: a client sending a header byte at a time cannot "
        "hold connections open.",
    )
    log_level: str = Field("info")
    fair_scheduling: bool = Field(
        True, description="Queue work per run (X-CRS-Run) and share the server between runs; off = one "
        "first-in-first-out queue (the old behaviour, kept as a benchmark baseline).",
    )
    run_weights: str = Field(
        "", description="Shares of a busy server by run (X-CRS-Run), e.g. 'ppo-a=2,eval=0.5'; unlisted runs and "
        "requests without a run weigh 1. Queues are per run and served by deficit round-robin in tokens "
        "(reward services) or by fair shares of the decode batch (policy_gen, hf backend).",
    )
    max_tracked_runs: int = Field(
        32, ge=0, description="Per-run Prometheus counters (crs_run_*) label the first N distinct X-CRS-Run ids "
        "a server sees; later runs and missing/invalid ids are counted as 'other' (bounded label cardinality).",
    )


    @field_validator("run_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        parse_run_weights(value)
        return value

    def run_weight_map(self) -> dict[str, float]:
        return parse_run_weights(self.run_weights)


def parse_run_weights(text: str) -> dict[str, float]:
    """'a=2,b=0.5' -> {'a': 2.0, 'b': 0.5}; a clear ValueError for anything else.

    >>> parse_run_weights("ppo-a=2, eval=0.5")
    {'ppo-a': 2.0, 'eval': 0.5}
    """
    from services.common.identity import RUN_ID_RULE, is_valid_run_id

    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        run, sep, value = part.partition("=")
        run = run.strip()
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not is_valid_run_id(run) or not (0 < weight < float("inf")):
            raise ValueError(f"run weight {part!r}: expected RUN=WEIGHT, RUN {RUN_ID_RULE}, WEIGHT a positive number")
        weights[run] = weight
    return weights


def parse_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Build `cls` from command-line flags (kebab-case) over environment variables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    source = CliSettingsSource(cls, cli_parse_args=argv, cli_prog_name=prog, cli_kebab_case=True)
    return cls(_cli_settings_source=source)


def settings_or_exit(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """`parse_settings` for a process entry point: a bad setting is a usage error (exit 2)
    that names the flag and its env var, not a traceback."""
    try:
        return parse_settings(cls, argv, prog)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            if not field:  # a check across fields: its message names them
                lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
                continue
            flag, env = "--" + field.replace("_", "-"), "CRS_" + field.upper()
            lines.append(f"  {flag} (or {env}): {err['msg']}")
        print(f"{prog or cls.__name__}: invalid settings\n" + "\n".join(lines) + "\n(--help lists them)", file=sys.stderr)
        raise SystemExit(2) from None
