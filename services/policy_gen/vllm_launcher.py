"""Start vLLM's own OpenAI-compatible server behind policy_gen, on a private loopback port.

`build_vllm_command` is the one place our settings become vLLM flags (pure, unit-tested):
- `--enable-lora` + VLLM_ALLOW_RUNTIME_LORA_UPDATING=1: the trainer pushes an adapter per step;
- `--generation-config vllm`: sampling defaults are vLLM's, not the model folder's, so an
  unset field means the same on both backends;
- `--logprobs-mode processed_logprobs`: logprobs after temperature/top-k/top-p, what the hf
  backend returns too (vLLM's default is raw logprobs);
- host 127.0.0.1: vLLM accepts any lora_path, so only policy_gen may reach it.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys

from services.policy_gen.settings import PolicyGenSettings

log = logging.getLogger(__name__)

VLLM_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}


def build_vllm_command(settings: PolicyGenSettings, port: int, python: str = sys.executable) -> list[str]:
    """vLLM's argv for `settings`, serving on 127.0.0.1:`port`."""
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.model_path,
        "--served-model-name", settings.model_id,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(settings.max_model_len),
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--seed", str(settings.seed),
        "--enable-lora",
        "--max-lora-rank", str(settings.max_lora_rank),
        "--max-loras", str(settings.max_loras),
        "--generation-config", "vllm",
        "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    if settings.dtype != "auto":
        argv += ["--dtype", settings.dtype]
    if settings.api_key:
        # vLLM would otherwise trust anything on loopback; give it the same key we check.
        argv += ["--api-key", settings.api_key]
    argv += shlex.split(settings.vllm_extra_args)
    return argv


def _die_with_parent() -> None:
    """Linux: SIGTERM vLLM if policy_gen dies, even by SIGKILL, so no orphan holds the memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class VLLMServer:
    """The vLLM child process: its own process group so signals reach all of its workers."""

    def __init__(self, settings: PolicyGenSettings, port: int):
        self.settings = settings
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.argv = build_vllm_command(settings, port)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        log.info("starting vLLM: %s", shlex.join(self.argv))
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **VLLM_ENV},
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        return self

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, then SIGKILL after `timeout`; returns vLLM's exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        return self.proc.returncode
