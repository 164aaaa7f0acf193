"""Run identity: the headers a trainer sends with every request to a shared service.

Shared reward servers and policy_gen replicas serve many trainers at once; these headers let an
operator see which run is loading a server (logs, and per-run Prometheus counters with bounded
label cardinality). A contract module: no torch, imported by the services and the trainer alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

RUN_HEADER = "X-CRS-Run"  # the run's id: run.name, or the run folder's tag (ppo-<8 hex>)
STEP_HEADER = "X-CRS-Step"  # the PPO step the request belongs to (0 before the first step)
ADAPTER_HEADER = "X-CRS-Adapter"  # the adapter version generating/being scored ("base" = none)

RUN_ID_RULE = "1-64 characters of [A-Za-z0-9._-]"
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_STEP = re.compile(r"[0-9]{1,12}")
_ADAPTER = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_UNSET = "-"  # what logs show for a header that is missing or not plain enough to print


def run_headers(run: str, step: int, adapter: str | None) -> dict[str, str]:
    """The three identity headers for one request of run `run` at `step` with `adapter`."""
    return {RUN_HEADER: run, STEP_HEADER: str(int(step)), ADAPTER_HEADER: adapter or "base"}


def is_valid_run_id(run: str | None) -> bool:
    """True for a run id servers label by: RUN_ID_RULE (anything else is counted as 'other')."""
    return run is not None and _RUN_ID.fullmatch(run) is not None


@dataclass(frozen=True)
class RunIdentity:
    """What a request says about its sender; `run` is None when missing or invalid.

    Header values are printed into log lines, so only plain ones are kept (no log injection).
    """

    run: str | None
    step: str = _UNSET
    adapter: str = _UNSET

    def log_fields(self) -> str:
        return f"run={self.run or _UNSET} step={self.step} adapter={self.adapter}"


def _plain(value: bytes | None, pattern: re.Pattern) -> str | None:
    text = value.decode("latin-1") if value else ""
    return text if pattern.fullmatch(text) else None


def request_identity(scope: dict[str, Any]) -> RunIdentity:
    """The identity of an ASGI request, parsed once and kept in `scope["state"]` for the
    other middlewares (metrics counts by it, the request log prints it)."""
    state = scope.setdefault("state", {})
    found = state.get("run_identity")
    if found is None:
        headers = dict(scope.get("headers") or ())
        found = RunIdentity(
            run=_plain(headers.get(RUN_HEADER.lower().encode()), _RUN_ID),
            step=_plain(headers.get(STEP_HEADER.lower().encode()), _STEP) or _UNSET,
            adapter=_plain(headers.get(ADAPTER_HEADER.lower().encode()), _ADAPTER) or _UNSET,
        )
        state["run_identity"] = found
    return found
