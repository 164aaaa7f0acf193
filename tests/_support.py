"""Helpers shared by the test modules (import as `from _support import ...`).

Starting services, tiny LoRA adapters, and the PPO tests' reward model, prompts and metrics
reader live here once instead of being copied between modules. Session fixtures that share
running services are in conftest.py; this module only builds things.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from services.common.chat import format_prompt, format_response
from services.common.process import ServiceProcess, free_port, python_module

REPO = Path(__file__).resolve().parents[1]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_WITH_HEAD = [*ALL_LINEAR, "lm_head"]
EVAL_TARGETS = ["q_proj", "v_proj", "down_proj"]  # a 'trained' policy for the evaluation tests


def vllm_missing() -> str | None:
    """Why vLLM cannot be imported here (None: it can)."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import means: no vLLM on this machine
        return f"{type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- services


def service(module: str, *args: str, log_dir: Path, name: str | None = None, port: int | None = None,
            env: Mapping[str, str] | None = None, startup_timeout: float = 180) -> ServiceProcess:
    """`python -m module ... --port P` as a ServiceProcess (not started), logging to log_dir/name.log."""
    port = port or free_port()
    name = name or module.rsplit(".", 1)[-1]
    return ServiceProcess(python_module(module, *args, "--port", str(port)), port, env=env,
                          log_path=Path(log_dir) / f"{name}.log", startup_timeout=startup_timeout, name=name)


def score_messages(url: str, messages: list[dict], headers: Mapping[str, str] | None = None) -> float:
    """`/v1/score` of one conversation (the reference the interop tests compare a client's score with)."""
    import httpx

    r = httpx.post(url + "/v1/score", json={"items": [{"messages": messages}]}, headers=dict(headers or {}), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["scores"][0]


@contextmanager
def running(procs: Mapping[str, ServiceProcess]) -> Iterator[dict[str, ServiceProcess]]:
    """Start every process first, then wait for each (their start-ups overlap); stop all on the way out."""
    procs = dict(procs)
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


# --------------------------------------------------------------------------- adapters


def make_adapter(policy: Path, out: Path, seed: int, r: int = 8, targets: Sequence[str] = ALL_LINEAR) -> Path:
    """A causal-LM LoRA whose B is NOT zero (init_lora_weights=False), so it really changes the outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def make_score_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with non-zero B (so it changes the model) and its own score head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    head = peft_model.base_model.model.score.modules_to_save["default"]  # SEQ_CLS saves the head too
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight) * 0.5)
    peft_model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- PPO runs

SHORT_PROMPTS = ["Hi!", "Say a word.", "Go on.", "Hola, amigo."]


def build_letter_reward_model(src: Path, dst: Path, letter: str = "e", K: float = 10.0) -> Path:
    """score ≈ standardised share of the conversation's tokens whose text contains `letter`.

    A real Llama sequence-classification model a tiny random policy can chase within a dozen
    steps: uniform attention over the conversation, a feature dimension in the embeddings, a
    calibrated score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(src, dtype=torch.float32)
    V, H = model.config.vocab_size, model.config.hidden_size
    has_letter = torch.tensor([1.0 if letter in tok.decode([i]) else 0.0 for i in range(V)])
    with torch.no_grad():
        emb = torch.zeros(V, H)  # dim 0: the feature; dim 1: a constant that keeps RMSNorm ~linear
        emb[:, 0], emb[:, 1] = has_letter, K
        model.model.embed_tokens.weight.copy_(emb)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.q_proj.weight.zero_()  # q = 0: uniform attention = the mean over the prefix
            attn.k_proj.weight.zero_()
            if i == 0:
                attn.v_proj.weight.copy_(torch.eye(*attn.v_proj.weight.shape))
                attn.o_proj.weight.copy_(torch.eye(*attn.o_proj.weight.shape))
            else:
                attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # Calibrate the head: mean 0, std 1 over uniformly random 12-token replies.
        g = torch.Generator().manual_seed(0)
        feats = []
        for _ in range(48):
            text = tok.decode(torch.randint(5, V, (12,), generator=g).tolist())
            enc = tok(format_prompt([{"role": "user", "content": "Hello?"}]) + format_response(text),
                      add_special_tokens=False, return_tensors="pt")
            feats.append(model.model(**enc).last_hidden_state[0, -1, :2])
        x = torch.stack(feats)  # (48, 2)
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0 / x[:, 0].std()
        model.score.weight[0, 1] = -model.score.weight[0, 0] * x[:, 0].mean() / x[:, 1].mean()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def write_prompt_trees(path: Path, texts=SHORT_PROMPTS) -> Path:
    """A few one-message trees in the OASST trees-export format: short prompts keep the
    reward's prompt share small and constant, so the response decides the score."""
    rows = []
    for i, text in enumerate(texts):
        mid = f"00000000-0000-4000-8000-{i:012d}"
        root = {"message_id": mid, "user_id": "u", "created_date": "2023-02-02T10:00:00+00:00", "text": text,
                "role": "prompter", "lang": "en", "review_count": 3, "review_result": True, "deleted": False,
                "synthetic": False, "model_name": None, "rank": None, "labels": {}, "replies": []}
        rows.append({"message_tree_id": mid, "tree_state": "ready_for_export", "prompt": root})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics_rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


class Stack:
    """policy_gen (hf) + reward_pref + reward_abs (the letter reward) as real processes.

    For the PPO end-to-end tests that stop and restart services mid-run, so each module
    holds its own."""

    def __init__(self, tiny_models: dict, root: Path):
        self.root = root
        self.policy_path = tiny_models["policy"]
        rm = build_letter_reward_model(tiny_models["reward_pref"], root / "letter_rm")
        self.runs = root / "runs"
        self.runs.mkdir()
        self.prompts = write_prompt_trees(root / "prompts.jsonl")
        self.argv = {
            "policy": python_module("services.policy_gen", "--backend", "hf", "--model-path", str(self.policy_path),
                                    "--adapter-root", str(self.runs), "--max-loras", "8"),
            "pref": python_module("services.reward_pref", "--model-path", str(rm)),
            "abs": python_module("services.reward_abs", "--model-path", str(rm)),
        }
        self.ports = {name: free_port() for name in self.argv}
        self.services = {name: self._process(name) for name in self.argv}
        try:
            for svc in self.services.values():
                svc.start()
            for svc in self.services.values():
                svc.wait_ready()
        except BaseException:
            self.close()
            raise

    def _process(self, name: str) -> ServiceProcess:
        port = self.ports[name]
        return ServiceProcess([*self.argv[name], "--port", str(port)], port, log_path=self.root / f"{name}.log",
                              startup_timeout=180, name=name)

    def restart_later(self, name: str, delay: float) -> threading.Thread:
        """Stop `name` now and start it again on the same port after `delay` seconds."""
        self.services[name].stop()

        def again():
            svc = self._process(name)
            self.services[name] = svc
            svc.start().wait_ready()

        t = threading.Timer(delay, again)
        t.start()
        return t

    def cfg(self, run: str, steps: int, **run_over):
        from trainer.ppo.config import PPOConfig

        url = lambda n: self.services[n].url
        return PPOConfig.model_validate({
            "model": {"policy_path": str(self.policy_path), "target_modules": LORA_WITH_HEAD},
            "optim": {"lr": 1e-2},
            "ppo": {"batch_size": 8, "completions_per_prompt": 2, "num_minibatches": 2, "ppo_epochs": 2},
            "generation": {"max_new_tokens": 12, "max_prompt_tokens": 256},
            "crs": {"weight": 0.25},
            "services": {"policy_url": url("policy"), "reward_pref_urls": [url("pref")], "reward_abs_urls": [url("abs")],
                         "timeout_s": 30, "unhealthy_cooldown_s": 0.5},
            "ray": {"num_cpus": 2},
            "run": {"output_dir": str(self.runs / run), "steps": steps, "checkpoint_every": 2, "keep_adapters": None,
                    "data_source": str(self.prompts), "step_timeout_s": 150, **run_over},
        })  # fmt: skip

    def close(self):
        for svc in self.services.values():
            svc.stop()
