"""Start reward_pref, reward_abs and policy_gen as real processes on free loopback ports.

Used by `crs-rlhf demo` (one trainer) and `crs-rlhf sweep --start-services` (many trainers on
the same three services). Every process is registered with the caller's ExitStack, so a
normal end, an error or Ctrl-C stops them all.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from services.common.process import ServiceProcess, free_port, python_module

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
