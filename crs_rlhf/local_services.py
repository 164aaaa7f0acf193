"""Start reward_pref, reward_abs and policy_gen as real processes on free loopback ports.

Used by `crs-rlhf demo` (one trainer) and `crs-rlhf sweep --start-services` (many trainers on
the same three services). Every process is registered with the caller's ExitStack, so a
normal end, an error, Ctrl-C or SIGTERM (under `SignalStop`) stops them all.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Self

from services.common.process import ServiceProcess, free_port, python_module
from trainer.ppo.signals import Interrupted

# Three services, Ray and the trainers share a few cores: one thread each keeps them in check.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_local_services(stack: contextlib.ExitStack, models: dict[str, Path], adapter_root: Path, backend: str,
                         need_pref: bool, need_abs: bool, *, logs: Path, max_loras: int | None = None,
                         echo: bool = True) -> dict[str, str]:
    """Start the services concurrently (model loading overlaps), then wait for each /ready.

    models: {'policy', 'reward_pref', 'reward_abs'} folders. adapter_root: policy_gen may load
    adapters only from under it. max_loras: policy_gen's adapter slots (None = its default, 2);
    each trainer sharing it holds one. Returns {'policy_gen' | 'reward_pref' | 'reward_abs': url}.
    """
    specs = {}
    if need_pref:
        specs["reward_pref"] = ("services.reward_pref", ["--model-path", str(models["reward_pref"])])
    if need_abs:
        specs["reward_abs"] = ("services.reward_abs", ["--model-path", str(models["reward_abs"])])
    # fp32 like the learner, which recomputes log π in fp32: vLLM would serve the fp32 tiny model
    # in bf16 (hf: on GPUs), and PPO's ratio would then be off by ~2 % on some tokens.
    policy_args = ["--backend", backend, "--model-path", str(models["policy"]),
                   "--adapter-root", str(Path(adapter_root).resolve()), "--dtype", "float32"]
    if max_loras is not None:
        policy_args += ["--max-loras", str(max_loras)]
    if backend == "vllm":
        # vLLM reserves this share of memory for its KV cache up front (on CPU: of NUMA node 0,
        # refused if not free right now). The tiny policy needs a few MB, and the learner and the
        # reward services share the machine: the default 0.5 fails on a busy box.
        policy_args += ["--gpu-memory-utilization", "0.15"]
    specs["policy_gen"] = ("services.policy_gen", policy_args)
    procs = {}
    for name, (module, args) in specs.items():
        port = free_port()
        proc = ServiceProcess(python_module(module, *args, "--port", str(port)), port, env=QUIET_ENV,
                              log_path=Path(logs) / f"{name}.log", name=name, startup_timeout=600)
        stack.callback(proc.stop)
        procs[name] = proc.start()
    for name, proc in procs.items():
        proc.wait_ready()
        if echo:
            print(f"  {name:12s} {proc.url}   (log: {proc.log_path})", flush=True)
    return {name: proc.url for name, proc in procs.items()}


class SignalStop:
    """SIGTERM and SIGINT stop a command that started services the way Ctrl-C does: raise
    `Interrupted` (a KeyboardInterrupt) in the main thread, so every ExitStack unwinds and the
    services it started are stopped; `exit_code` then gives 143 / 130.

    Without it SIGTERM (`timeout`, a CI runner, Kubernetes, `docker stop`) kills the command at
    once and its services live on as orphans holding their ports and memory. The first signal
    raises; later ones only print, so the stopping itself is not cut short (each service gets
    15 s before SIGKILL). `install()` again after `ray.init`, which sets its own SIGTERM handler.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread (a test calling main() in a thread)
        for s in self.SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            print(f"{signal.Signals(signum).name}: still stopping the services started here", file=sys.stderr, flush=True)
            return
        self.signum = signum
        raise Interrupted(signum)

    def note(self, signum: int) -> None:
        """Record a signal someone else's handler caught (the trainer's, inside train())."""
        self.signum = self.signum or signum

    def exit_code(self, code: int) -> int:
        """128 + the signal for a stopped command (SIGTERM 143, SIGINT 130), else `code`."""
        return 128 + self.signum if self.signum is not None else code

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def run_stoppable(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's `main()` (a benchmark's) under `SignalStop` and exit with its code, or with
    143 / 130 when SIGTERM / Ctrl-C stopped it after its services were stopped."""
    with SignalStop() as stop:
        try:
            code = main()
        except KeyboardInterrupt:
            code = stop.exit_code(130)
    sys.exit(code)
