"""Packed scoring equals each item scored alone (fp32, <= 1e-5): Llama- and BERT-shaped RMs.

The reference is independent of the packed code: the reward engine's padded path with one
item per forward for the Llama RM, and the plain `model(input_ids).logits` for BERT.
"""

from __future__ import annotations

import random

import pytest
import torch

from services.reward.packed_forward import PackedScorer, PackingOptions, dense_block_mask, model_kind

TOL = 1e-5


@pytest.fixture(scope="module")
def llama_engine(tiny_models):
    from services.reward.engine import EngineOptions, load_engine

    return load_engine(EngineOptions(str(tiny_models["reward_pref"]), device="cpu", dtype="float32"))


def fresh_llama(engine):
    """A second copy of the engine's model: the scorer switches its attention implementation."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(engine.opts.model_path, dtype=torch.float32).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=256, num_labels=1, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


def mixed_rows(n: int, hi: int, vocab: int, seed: int, lo: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone_bert(model, rows) -> list[float]:
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in rows]


def assert_close(packed, alone):
    diff = max(abs(a - b) for a, b in zip(packed, alone))
    assert diff <= TOL, f"packed vs alone max |diff| = {diff:.2e} > {TOL}"


def test_dense_mask_is_block_diagonal_causal():
    seq = torch.tensor([[0, 0, 1, 1, 1, -6]])  # two items, then one pad with its own id
    m = dense_block_mask(seq, causal=True)[0, 0].int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    b = dense_block_mask(seq, causal=False)[0, 0].int()
    assert b[2].tolist() == [0, 0, 1, 1, 1, 0] and b[0].tolist() == [1, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_llama_packed_equals_alone(llama_engine, attention):
    vocab = llama_engine.model.config.vocab_size
    # Short and long items, one that fills a row by itself, one of a single token.
    rows = mixed_rows(16, 30, vocab, seed=1) + mixed_rows(6, 120, vocab, seed=11, lo=60) + [[5] * 128, [7]]
    alone = [llama_engine.score_ids([r])[0] for r in rows]
    scorer = PackedScorer(fresh_llama(llama_engine), pad_id=llama_engine.pad_id, max_tokens=128,
                          options=PackingOptions(row_tokens=128, buckets=(32, 64, 128), attention=attention))
    result = scorer.score(rows)
    sizes = [len(r.items) for r in result.plan.rows]
    assert 1 in sizes and max(sizes) >= 4, sizes  # rows holding one item and rows holding many
    assert any(r.length > r.used for r in result.plan.rows)  # a padded tail is exercised too
    assert_close(result.scores, alone)


def test_positions_alone_do_not_isolate_items(llama_engine):
    """Why the mask is needed: one causal mask over a packed row (positions restarting at 0)
    changes every item after the first."""
    rows = [[11, 12, 13, 14], [21, 22, 23]]
    alone = [llama_engine.score_ids([r])[0] for r in rows]
    model = fresh_llama(llama_engine)
    with torch.inference_mode():
        ids = torch.tensor([rows[0] + rows[1]])
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
        causal = torch.ones(1, 1, 7, 7, dtype=torch.bool).tril()
        h = model.model(input_ids=ids, position_ids=pos, attention_mask=causal).last_hidden_state[0]
        leaked = model.score(h[[3, 6]]).float()[:, 0].tolist()
    assert abs(leaked[0] - alone[0]) <= TOL  # the first item sees only itself either way
    assert abs(leaked[1] - alone[1]) > 1e-4  # the second one saw the first


def test_bert_packed_equals_alone():
    model = tiny_bert()
    rows = mixed_rows(24, 16, 300, seed=2) + mixed_rows(6, 60, 300, seed=12, lo=30) + [[9] * 64, [4]]
    alone = alone_bert(model, rows)
    scorer = PackedScorer(model, pad_id=0, max_tokens=64,
                          options=PackingOptions(row_tokens=64, buckets=(16, 32, 64), attention="sdpa"))
    assert scorer.kind == "bert"
    result = scorer.score(rows)
    sizes = [len(r.items) for r in result.plan.rows]
    assert 1 in sizes and max(sizes) >= 4, sizes
    assert_close(result.scores, alone)


def test_flex_attention_on_cpu_equals_alone(llama_engine):
    """FlexAttention with a BlockMask, on CPU (transformers compiles flex once: ~30 s here)."""
    rows = mixed_rows(12, 60, llama_engine.model.config.vocab_size, seed=3) + [[6] * 128]
    alone = [llama_engine.score_ids([r])[0] for r in rows]
    scorer = PackedScorer(fresh_llama(llama_engine), pad_id=llama_engine.pad_id, max_tokens=128,
                          options=PackingOptions(row_tokens=128, buckets=(128,), attention="flex"))
    assert scorer.model.config._attn_implementation == "flex_attention"
    assert_close(scorer.score_ids(rows), alone)

    bert = tiny_bert(1)
    rows = mixed_rows(12, 60, 300, seed=4)
    scorer = PackedScorer(bert, pad_id=0, max_tokens=128,
                          options=PackingOptions(row_tokens=128, buckets=(128,), attention="flex"))
    assert_close(scorer.score_ids(rows), alone_bert_fresh(rows))


def alone_bert_fresh(rows):
    # The scorer switched `bert` to flex; score alone on an identical sdpa copy (same seed).
    return alone_bert(tiny_bert(1), rows)


def test_compiled_backbone_never_recompiles_after_warmup(llama_engine):
    """Fixed bucket shapes: warm-up compiles each once; new mixes of lengths add no graph."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    scorer = PackedScorer(fresh_llama(llama_engine), pad_id=llama_engine.pad_id, max_tokens=128,
                          options=PackingOptions(row_tokens=128, buckets=(64, 128), attention="sdpa",
                                                 compile=True, compile_backend=counting_backend))
    scorer.warmup()
    after_warmup = len(compiles)
    assert after_warmup >= 2  # one graph (at least) per bucket
    rows = mixed_rows(12, 100, llama_engine.model.config.vocab_size, seed=5) + [[3] * 20]
    assert_close(scorer.score_ids(rows), [llama_engine.score_ids([r])[0] for r in rows])
    assert len(compiles) == after_warmup, "a new row shape or mask recompiled the backbone under load"


def test_compiled_flex_keeps_one_graph_across_rows(llama_engine):
    """FlexAttention under compile: the BlockMask's mask_mod is one function per bucket
    (a fresh closure per row made dynamo compile again), and scores still equal alone."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    scorer = PackedScorer(fresh_llama(llama_engine), pad_id=llama_engine.pad_id, max_tokens=128,
                          options=PackingOptions(row_tokens=128, buckets=(128,), attention="flex",
                                                 compile=True, compile_backend=counting_backend))
    scorer.warmup()
    after_warmup = len(compiles)
    rows = mixed_rows(14, 70, llama_engine.model.config.vocab_size, seed=7)
    got = scorer.score_ids(rows)
    assert len(compiles) == after_warmup, "a packed row's BlockMask recompiled the backbone"
    assert_close(got, [llama_engine.score_ids([r])[0] for r in rows])


def test_unsupported_models_and_budgets_are_refused_clearly(llama_engine):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, num_labels=1))
    with pytest.raises(ValueError, match="--packing off"):
        model_kind(roberta)
    with pytest.raises(ValueError, match="raise the row budget"):
        PackedScorer(fresh_llama(llama_engine), pad_id=0, max_tokens=256, options=PackingOptions(row_tokens=128))
    with pytest.raises(ValueError, match="attention must be one of"):
        PackedScorer(fresh_llama(llama_engine), pad_id=0, max_tokens=128,
                     options=PackingOptions(row_tokens=128, attention="flash"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs these)")


@cuda
@pytest.mark.parametrize(("dtype", "compiled", "tol"), [
    (torch.float32, False, TOL),
    (torch.bfloat16, False, 5e-2),  # the bf16 bound: scores of this tiny RM spread over ~0.2
    (torch.float32, True, TOL),  # inductor-compiled backbone + BlockMask
])
def test_cuda_flex_packed_equals_alone(llama_engine, dtype, compiled, tol):
    """On CUDA: FlexAttention BlockMask packed rows against the fp32 CPU engine, item by item."""
    vocab = llama_engine.model.config.vocab_size
    rows = mixed_rows(40, 200, vocab, seed=6) + [[8] * 512, [2]]
    alone = [llama_engine.score_ids([r])[0] for r in rows]
    torch._dynamo.reset()
    model = fresh_llama(llama_engine).to("cuda", dtype)
    scorer = PackedScorer(model, pad_id=llama_engine.pad_id, max_tokens=512,
                          options=PackingOptions(row_tokens=512, buckets=(512,), attention="flex", compile=compiled))
    scorer.warmup()
    got = scorer.score_ids(rows)
    diff = max(abs(a - b) for a, b in zip(got, alone))
    assert diff <= tol, f"{dtype} compiled={compiled}: max |diff| {diff:.2e} > {tol}"


class _IgnoresBlockMask(PackedScorer):
    """What an architecture whose attention ignores our 4-D mask computes: one causal mask
    over the whole row, so an item sees the items before it."""

    def _mask(self, seq_ids):
        L = seq_ids.shape[1]
        return torch.ones(1, 1, L, L, dtype=torch.bool, device=seq_ids.device).tril()


def test_self_check_catches_a_model_that_ignores_the_block_mask(llama_engine):
    item, neighbour = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26, 27, 28]
    opts = PackingOptions(row_tokens=128, buckets=(32, 128), attention="sdpa")
    honest = PackedScorer(fresh_llama(llama_engine), pad_id=llama_engine.pad_id, max_tokens=128, options=opts)
    leaky = _IgnoresBlockMask(fresh_llama(llama_engine), pad_id=llama_engine.pad_id, max_tokens=128, options=opts)
    assert honest.self_check(item, neighbour) <= 1e-5
    assert leaky.self_check(item, neighbour) > 1e-2  # the engine refuses anything above 1e-4 in fp32


def test_engine_packing_on_refuses_an_unsupported_model_and_off_keeps_it_padded(tmp_path):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from services.reward.engine import EngineOptions, PackingUnavailable, RewardEngine
    from crs_rlhf.tiny_models import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=300, num_labels=1, pad_token_id=tok.pad_token_id))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    on = RewardEngine(roberta, tok, EngineOptions("roberta", max_tokens=128, packing="on"), torch.device("cpu"))
    with pytest.raises(PackingUnavailable, match="start it with --packing off"):
        on.enable_packing()
    off = RewardEngine(roberta, tok, EngineOptions("roberta", max_tokens=128, packing="auto"), torch.device("cpu"))
    off.enable_packing()  # auto on CPU: padded batches, no attempt
    assert off.packed is None and len(off.score_ids([[5, 6, 7], [8]])) == 2


@cuda
def test_cuda_auto_falls_back_to_padded_for_an_unsupported_model(tmp_path, caplog):
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from services.reward.engine import EngineOptions, RewardEngine
    from crs_rlhf.tiny_models import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=300, num_labels=1, pad_token_id=tok.pad_token_id))
    engine = RewardEngine(roberta, AutoTokenizer.from_pretrained(tmp_path),
                          EngineOptions("roberta", max_tokens=128, packing="auto"), torch.device("cuda"))
    with caplog.at_level("WARNING"):
        engine.enable_packing()
        engine.warmup()
    assert engine.packed is None
    assert sum("packing unavailable" in r.getMessage() for r in caplog.records) == 1
