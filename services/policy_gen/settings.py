"""`PolicyGenSettings`: the one config of a policy_gen process (flags == CRS_* env vars).

Both backends read the same fields; the vLLM-only ones are passed on to the vLLM server
that policy_gen starts behind itself (see `vllm_launcher.build_vllm_command`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.common.settings import ServiceSettings


class PolicyGenSettings(ServiceSettings):
    # --- what to serve
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="'vllm' fronts vLLM's server; 'hf' runs transformers+peft here."
    )
    model_path: str = Field(description="Hugging Face model folder of the base policy (no hub download).")
    served_model_name: str | None = Field(None, description="Model id clients send; default: the folder name.")
    adapter_root: str | None = Field(
        None,
        description="LoRA adapters may only be loaded from under this folder (symlinks resolved). "
        "Unset: adapter loading is refused.",
    )
    max_lora_rank: int = Field(16, ge=1, description="Adapters with a larger rank r are refused with 400.")
    max_loras: int = Field(2, ge=1, description="Adapters held at once (vLLM --max-loras; hf: loaded-adapter cap).")
    max_model_len: int = Field(1024, ge=16, description="Prompt + completion tokens per sequence.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': hf uses fp32 on CPU, bf16 on GPU; vLLM picks its own (bf16 for fp32 models)."
    )
    device: str = Field("auto", description="hf backend: 'cpu', 'cuda', 'cuda:1', or 'auto'.")
    seed: int = Field(0, description="Engine seed (vLLM --seed; hf: base of unseeded requests' generators).")

    # --- vllm backend
    gpu_memory_utilization: float = Field(
        0.5,
        gt=0,
        le=1,
        description="vLLM's KV-cache share. On CPU vLLM sizes it from NUMA node 0's memory and refuses its "
        "0.92 default on small machines; 0.5 starts here. Raise it on GPUs.",
    )
    vllm_port: int = Field(0, ge=0, le=65535, description="Private loopback port of the vLLM server; 0 = a free one.")
    vllm_extra_args: str = Field("", description="Extra flags appended to vLLM's command line (shell-split).")
    vllm_startup_timeout_s: float = Field(600.0, gt=0, description="How long to wait for vLLM's /health.")
    vllm_request_timeout_s: float = Field(600.0, gt=0, description="Upstream timeout for one forwarded request.")
    max_num_seqs: int | None = Field(
        None, ge=1, description="vllm backend: sequences vLLM runs at once (passed as its --max-num-seqs); the front "
        "door admits at most this many into vLLM, fairly across runs. Default: vLLM 0.32's own default for the machine "
        "(128 on CPU, 1024 on GPUs of 70 GB or more other than A100, else 256). A --max-num-seqs in "
        "--vllm-extra-args wins.",
    )
    max_run_sequences: int | None = Field(
        None, ge=1, description="vllm backend: most sequences one run may have in vLLM at once, so that another run "
        "finds free slots (vLLM cannot preempt a run's requests for it). Default: max_num_seqs less an eighth.",
    )

    # --- hf backend batching
    max_batch_size: int = Field(32, ge=1, description="Sequences decoded together in one batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long the collector waits for batch-mates.")
    max_queue: int = Field(1024, ge=1, description="Queued requests beyond this get 503.")
    max_queue_sequences: int = Field(2048, ge=1, description="Queued sequences (prompts x n) beyond this get 503.")
    max_queue_tokens: int = Field(
        2_000_000, ge=1, description="Queued prompt + requested completion tokens beyond this get 503."
    )

    # --- per-request limits (both backends): one small body must not hold the engine for long
    default_max_tokens: int = Field(
        512, ge=1, description="Completion tokens of a chat request that sets no max_tokens (vLLM fills the context; "
        "a 100-byte request with n=64 once generated 37.6k tokens that way). Completions keep vLLM's 16.",
    )
    max_n: int = Field(64, ge=1, description="Largest n (samples per prompt) accepted.")
    max_request_sequences: int = Field(256, ge=1, description="Most sequences (prompts x n) in one request; more: 413.")
    max_request_tokens: int = Field(
        262_144, ge=1, description="Most completion tokens one request may ask for (sequences x max_tokens); more: 413."
    )

    @model_validator(mode="after")
    def _check(self) -> "PolicyGenSettings":
        if not Path(self.model_path).is_dir():
            raise ValueError(f"--model-path {self.model_path!r} is not a folder (a local Hugging Face model is needed)")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ValueError(f"--adapter-root {self.adapter_root!r} is not a folder")
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or Path(self.model_path).resolve().name
