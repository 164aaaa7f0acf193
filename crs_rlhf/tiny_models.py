"""`crs-rlhf make-tiny-models OUT_DIR`: small Hugging Face model folders built locally.

Nothing is downloaded. A byte-level BPE tokenizer is trained on a built-in corpus (so any
UTF-8 text round-trips: decode(encode(x)) == x) and knows the ChatML markers and a pad
token distinct from EOS. Three models share it:

    OUT_DIR/policy       LlamaForCausalLM            (head dim 64: vLLM's CPU kernels need >= 64)
    OUT_DIR/reward_pref  LlamaForSequenceClassification, num_labels=1
    OUT_DIR/reward_abs   LlamaForSequenceClassification, num_labels=1

Every folder loads with the same `from_pretrained` call a user's real model takes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.chat import CHATML_JINJA, IM_END, IM_START

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, UNK, IM_START, IM_END]

# Enough varied text for a few hundred useful merges; languages match the OASST fixture's.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A good answer is clear, concise and correct.
How do I bake bread at home? Mix flour, water, salt and yeast, knead the dough, let it rise,
then bake it in a hot oven until the crust is golden. What is the capital of France? Paris.
Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.
Write a short poem about the sea. The waves are blue, the wind is cold, the sailors sing.
Can you help me with my homework? Of course! Tell me the question and what you tried so far.
Python is a programming language. def add(a, b): return a + b. print("hello world")
Thank you very much for your help. You are welcome; I am glad I could help you today.
I am sorry, but I cannot help with that request. Is there anything else I can do for you?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42. Dates: 2023-04-12, 12 April 2023.
¿Cómo estás? Muy bien, gracias. ¿Qué hora es? Son las tres de la tarde. La casa es grande.
Bonjour, comment allez-vous ? Très bien, merci. Quelle est la capitale de l'Allemagne ? Berlin.
Guten Tag! Wie geht es Ihnen? Danke, gut. Wo ist der Bahnhof? Das Wetter ist heute schön.
Olá, tudo bem? Sim, obrigado. Привет, как дела? Хорошо, спасибо. 你好，谢谢。こんにちは。
""".strip()


@dataclass(frozen=True)
class TinyModelConfig:
    """Shapes of the tiny models: small enough for CPU tests, shaped like a real Llama."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer with ChatML markers; deterministic for a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=IM_END,  # generation ends at the end of the assistant turn
        pad_token=PAD,  # distinct from EOS: pad-vs-EOS confusion is how scores drift (HF #27502)
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_JINJA
    return tok


def make_tiny_models(out_dir: str | Path, seed: int = 0, cfg: TinyModelConfig = TinyModelConfig()) -> dict[str, Path]:
    """Write policy/, reward_pref/ and reward_abs/ under `out_dir`; returns their paths."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    tok = build_tokenizer(cfg.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    base = dict(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    paths = {}
    for name, kind in (("policy", "causal"), ("reward_pref", "reward"), ("reward_abs", "reward")):
        # A distinct, fixed seed per model: same --seed gives byte-identical folders.
        torch.manual_seed(seed * 1000 + len(paths))
        if kind == "causal":
            model = LlamaForCausalLM(LlamaConfig(**base))
            model.generation_config = GenerationConfig(
                bos_token_id=ids[BOS], eos_token_id=ids[IM_END], pad_token_id=ids[PAD], do_sample=True
            )
        else:
            model = LlamaForSequenceClassification(LlamaConfig(**base, num_labels=1))
        path = out / name
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        paths[name] = path
    (out / "tiny_models.json").write_text(json.dumps({"seed": seed, **asdict(cfg)}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crs-rlhf make-tiny-models", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write policy/, reward_pref/ and reward_abs/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in make_tiny_models(args.out_dir, seed=args.seed).items():
        print(f"{name:12s} {path}")
    return 0
