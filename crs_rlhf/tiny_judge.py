"""A tiny judge for offline runs: a LoRA on the tiny policy's lm_head that answers "A" or "B"
(the ``crs`` judge template: a single-letter answer; judge it with ``--template crs``).

An untrained tiny policy never puts the label tokens among its top logprobs, so its verdicts
are all invalid (the tests use exactly that to check invalid bookkeeping). This rank-2
adapter makes it a well-formed judge without any training: one direction (the mean final
hidden state over judge prompts) lifts both labels far above every other token, a second,
random one moves B against A, so verdicts vary from prompt to prompt. They are noise —
what it checks is the plumbing (logprob verdicts, orders, caching), never quality.
"""

from __future__ import annotations

import random
from pathlib import Path


def make_tiny_judge_adapter(policy: str | Path, out: str | Path, seed: int = 0, lift: float = 12.0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.judge import judge_messages

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    words = ["bread", "water", "city", "music", "garden", "python", "river", "light", "tea", "book"]
    states = []
    with torch.no_grad():
        for _ in range(6):
            msgs = judge_messages(" ".join(rng.choices(words, k=6)), " ".join(rng.choices(words, k=rng.randint(1, 30))),
                                  " ".join(rng.choices(words, k=rng.randint(1, 30))), template="crs")
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # (1, T)
            states.append(model(ids, output_hidden_states=True).hidden_states[-1][0, -1])  # (d,) normed, last pos
    h = torch.stack(states)  # (N, d)
    u = h.mean(0) / h.mean(0).norm()  # (d,) judge prompts share this direction (tiny policy: projections within 1 %)
    w = torch.randn(h.shape[1], generator=gen)
    w = w - (w @ u) * u
    w = w / w.norm()  # (d,) orthogonal to u: the prompt-dependent part of the verdict
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"], init_lora_weights=False))
    head = peft_model.base_model.model.lm_head
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    with torch.no_grad():
        head.lora_A["default"].weight.copy_(torch.stack([u, w]))  # (r, d)
        b = torch.zeros_like(head.lora_B["default"].weight)  # (V, r)
        b[a_id, 0] = b[b_id, 0] = lift / (h @ u).min().clamp(min=1e-3)
        b[b_id, 1] = 4.0 / (h @ w).abs().mean().clamp(min=1e-6)
        head.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return Path(out)
