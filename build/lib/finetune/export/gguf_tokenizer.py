"""The llama.cpp tokenizer of an HF folder, derived the way convert_hf_to_gguf.py does, and its GGUF fields.

llama.cpp wants "gpt2" + merges + pre-tokenizer name for ByteLevel BPE and "llama" + scores for SentencePiece,
with int32 token types, special ids, add_bos/add_eos and the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from finetune.export.gguf_params import GGUFExportError, llama_params

# llama.cpp names its BPE pre-tokenizers by the sha256 of str(tokenizer.encode(CHKTXT)); the text and hashes
# are copied from convert_hf_to_gguf.py's get_vocab_base_pre (a subset: extend as models are added).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
}
TT = gguf.TokenType


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything llama.cpp needs to tokenize like the HF tokenizer."""

    model: str  # "gpt2" (ByteLevel BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or tok in ("<pad>", "<mask>")


def build_tokenizer_spec(
    hf_dir: str | Path, *, vocab_size: int | None = None, pre: str | None = None, tokenizer: Any = None
) -> TokenizerSpec:
    """Derive the llama.cpp tokenizer of an HF folder (convert_hf_to_gguf's _set_vocab_gpt2 / _sentencepiece)."""
    hf_dir = Path(hf_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab_size = vocab_size or llama_params(hf_dir).vocab_size
    tj_path = hf_dir / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
    tj_model = tj.get("model", {})
    is_spm = (hf_dir / "tokenizer.model").is_file() or bool(tj_model.get("byte_fallback"))
    if is_spm:
        model, tokens, types, scores = "llama", *_spm_vocab(hf_dir, vocab_size)
        pre = pre or "default"
    elif tj_model.get("type") == "BPE":
        model, scores = "gpt2", None
        tokens, types = _bpe_vocab(tokenizer, vocab_size)
        if pre is None:
            digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
            if digest not in KNOWN_PRE_HASHES:
                raise GGUFExportError(
                    f"{hf_dir}: BPE pre-tokenizer not recognised (hash {digest}); pass pre= with llama.cpp's "
                    "name for it (see convert_hf_to_gguf.py get_vocab_base_pre)"
                )
            pre = KNOWN_PRE_HASHES[digest]
    else:
        raise GGUFExportError(
            f"{hf_dir}: unsupported tokenizer (need tokenizer.model or a BPE tokenizer.json)"
        )
    special = gguf.SpecialVocab(hf_dir, load_merges=model == "gpt2", n_vocab=vocab_size)
    if model == "gpt2" and not special.merges:
        raise GGUFExportError(f"{tj_path}: a BPE tokenizer without merges cannot be exported")
    template = special.chat_template
    if isinstance(template, list):  # several named templates: llama.cpp's default is the one named "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return TokenizerSpec(
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=list(special.merges),
        special_ids=dict(special.special_token_ids),
        add_bos=bos is not None and len(full) > len(plain) and full[0] == bos,
        add_eos=eos is not None and len(full) > len(plain) and full[-1] == eos,
        chat_template=template,
        scores=scores,
    )


def _bpe_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise GGUFExportError(f"tokenizer has id {max(reverse)} but config vocab_size is {vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        if tok in added:
            # llama.cpp treats added tokens as pre-normalised text, so store them as the tokenizer decodes them.
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            special = decoder[i].special or _looks_special(tok)
            types.append(int(TT.CONTROL if special else TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(tok)
    return tokens, types


def _spm_vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    rows: list[tuple[str, float, int]] = []
    if not (hf_dir / "tokenizer.model").is_file():
        # tokenizer.json with byte_fallback (a Llama-2 style HF export): gguf's own reader handles it.
        rows = [(t.decode("utf-8"), s, int(k)) for t, s, k in gguf.LlamaHfVocab(hf_dir).all_tokens()]
    else:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        for i in range(sp.vocab_size()):
            kind = TT.NORMAL
            if sp.IsUnknown(i):
                kind = TT.UNKNOWN
            elif sp.IsControl(i):
                kind = TT.CONTROL
            elif sp.IsUnused(i):
                kind = TT.UNUSED
            elif sp.IsByte(i):
                kind = TT.BYTE
            rows.append((sp.IdToPiece(i), sp.GetScore(i), int(kind)))
        cfg_path = hf_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text("utf-8")) if cfg_path.is_file() else {}
        for sid, data in cfg.get("added_tokens_decoder", {}).items():
            i, text = int(sid), data["content"]
            rows += [(f"[PAD{j}]", -1000.0, int(TT.UNUSED)) for j in range(len(rows), i + 1)]
            if data.get("special") or _looks_special(text):
                rows[i] = (text, -1000.0, int(TT.CONTROL))
            else:  # llama.cpp expects user-defined tokens pre-normalised: real spaces, not U+2581
                rows[i] = (text.replace("\u2581", " "), -1000.0, int(TT.USER_DEFINED))
    rows += [(f"[PAD{j}]", -1000.0, int(TT.UNUSED)) for j in range(len(rows), vocab_size)]
    rows = rows[:vocab_size]
    return [r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows]


def add_tokenizer(w: gguf.GGUFWriter, spec: TokenizerSpec) -> None:
    w.add_tokenizer_model(spec.model)
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(spec.tokens)
    if spec.scores is not None:
        w.add_token_scores([float(s) for s in spec.scores])
    w.add_token_types([int(t) for t in spec.token_types])  # python ints -> GGUF INT32 arrays
    if spec.merges:
        w.add_token_merges(spec.merges)
    for kind, tid in spec.special_ids.items():
        if (adder := getattr(w, f"add_{kind}_token_id", None)) is not None:
            adder(int(tid))
    w.add_add_bos_token(spec.add_bos)
    w.add_add_eos_token(spec.add_eos)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)
