"""finetune.gates.provenance: a verdict gets its gate's why and the identity of the bytes it judged."""

from finetune.gates.provenance import explain
from finetune.gates.registry import GATES
from finetune.gates.verdict import skipped


def test_explain_attaches_the_why_and_the_judged_bytes(tmp_path):
    (tmp_path / "m.jsonl").write_text("{}\n")
    v = explain(skipped("label_mask", "not judged"), tmp_path / "m.jsonl")
    assert v.why == GATES["label_mask"].why and v.artifact["path"] == str(tmp_path / "m.jsonl")
    assert len(v.artifact["sha256"]) == 64 and explain(skipped("x", "-")).why != GATES["label_mask"].why
