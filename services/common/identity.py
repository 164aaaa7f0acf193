"""Run identity: the headers a trainer sends with every request to a shared service.

Shared reward servers and policy_gen replicas serve many trainers at once; these headers let an
operator see which run is loading a server (logs, and per-run Prometheus counters with bounded
label cardinality). A contract module: no torch, imported by the services and the trainer alike.
"""

from __future__ import annotations

RUN_HEADER = "X-CRS-Run"  # the run's id: run.name, or the run folder's tag (ppo-<8 hex>)
STEP_HEADER = "X-CRS-Step"  # the PPO step the request belongs to (0 before the first step)
ADAPTER_HEADER = "X-CRS-Adapter"  # the adapter version generating/being scored ("base" = none)


def run_headers(run: str, step: int, adapter: str | None) -> dict[str, str]:
    """The three identity headers for one request of run `run` at `step` with `adapter`."""
    return {RUN_HEADER: run, STEP_HEADER: str(int(step)), ADAPTER_HEADER: adapter or "base"}
