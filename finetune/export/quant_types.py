"""What a quantized GGUF's tensors must be, per type asked for: llama.cpp's file type and the tensor types its
quantizer writes for it, fallbacks included (a K-quant needs rows divisible by 256: SmolLM2's 576-wide rows
fall back from Q4_K to Q5_0 and from Q6_K to Q8_0, logged by llama.cpp and measured here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.export.gguf_inspect import inspect_gguf


@dataclass(frozen=True)
class QuantType:
    file_type: int  # general.file_type (llama_ftype)
    main: frozenset[str]  # the type(s) most weights get, or their row-size fallbacks: one must be there
    allowed: frozenset[str]  # every type llama.cpp's rules give a weight for this file type


def _q(file_type: int, main: str, allowed: str) -> QuantType:
    return QuantType(file_type, frozenset(main.split()), frozenset(allowed.split()) | frozenset(main.split()))


# From llama.cpp's llama_tensor_get_type: attn_v / ffn_down / output get more bits in the _M mixes; rows not
# divisible by 256 fall back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> IQ4_NL).
TYPES: dict[str, QuantType] = {
    "q8_0": _q(7, "Q8_0", ""),
    "q6_K": _q(18, "Q6_K Q8_0", ""),
    "q5_K_M": _q(17, "Q5_K Q5_1", "Q6_K Q8_0"),
    "q5_K_S": _q(16, "Q5_K Q5_1", "Q6_K Q8_0"),
    "q4_K_M": _q(15, "Q4_K Q5_0", "Q5_K Q5_1 Q6_K Q8_0"),  # attn_qkv gets Q5_K (GPT-2: Q5_1)
    "q4_K_S": _q(14, "Q4_K Q5_0", "Q5_K Q6_K Q5_1 Q8_0"),
    "q4_0": _q(2, "Q4_0", "Q6_K Q8_0"),
    "q3_K_M": _q(12, "Q3_K IQ4_NL", "Q4_K Q5_K Q6_K Q5_0 Q5_1 Q8_0"),
    "q2_K": _q(10, "Q2_K Q3_K IQ4_NL", "Q4_K Q5_K Q6_K Q4_0 Q5_0 Q5_1 Q8_0"),
}
UNQUANTIZED = frozenset({"F32", "F16", "BF16"})
KEPT_AS_IS = ("position_embd.weight", "token_types.weight")  # llama.cpp never quantizes these


def check_quant_types(path: Path, qtype: str, reference: Path) -> list[str]:
    """Problems with the quantized GGUF at path: its file type, any tensor of a type qtype does not produce,
    and any tensor missing, added or reshaped against the GGUF it was quantized from."""
    want = TYPES[qtype]
    got, ref = inspect_gguf(path), inspect_gguf(reference)
    problems = []
    if (ft := got.metadata.get("general.file_type")) != want.file_type:
        problems.append(f"general.file_type is {ft}, not {want.file_type} ({qtype})")
    shapes, ref_shapes = {t.name: t.shape for t in got.tensors}, {t.name: t.shape for t in ref.tensors}
    if missing := sorted(set(ref_shapes) - set(shapes)):
        problems.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:4])}")
    if added := sorted(set(shapes) - set(ref_shapes)):
        problems.append(f"{len(added)} tensor(s) not in the source: {', '.join(added[:4])}")
    if reshaped := [n for n in shapes if n in ref_shapes and shapes[n] != ref_shapes[n]]:
        problems.append(f"{len(reshaped)} tensor(s) reshaped: {', '.join(reshaped[:4])}")
    wrong = {}
    for t in got.tensors:
        if sum(d > 1 for d in t.shape) < 2 or t.name.endswith(KEPT_AS_IS):
            ok = t.type in UNQUANTIZED  # norms, biases and embeddings llama.cpp keeps in float
        else:
            ok = t.type in want.allowed
        if not ok:
            wrong.setdefault(t.type, []).append(t.name)
    for kind, names in sorted(wrong.items()):
        problems.append(
            f"{len(names)} tensor(s) are {kind}, which {qtype} never writes: {', '.join(names[:3])}"
        )
    if not any(t.type in want.main for t in got.tensors):
        problems.append(f"no tensor is {' or '.join(sorted(want.main))}: this is not a {qtype} file")
    return problems
