"""The quantized export's held-out text (the rest runs for real: tier 3 and the fault suite quantize SmolLM2 and
the tiny GPT-2 through Ollama and judge them in llama.cpp)."""

from __future__ import annotations

import json

from tests.unit.recipes.test_export_adapter import a_run


def test_heldout_text_is_general_text_and_the_runs_test_split_never_its_training_rows(tmp_path, tiny_hf):
    from transformers import AutoTokenizer

    from finetune.evaluate.general_text import GENERAL_TEXTS
    from finetune.recipes.export_quantized import heldout_ids

    run = a_run(tmp_path, tiny_hf)
    (run / "data" / "test.jsonl").write_text(json.dumps({"text": "A held-out row about the sea."}) + "\n")
    tok = AutoTokenizer.from_pretrained(str(tiny_hf))
    ids = heldout_ids(run, tok)
    assert len(ids) == len(GENERAL_TEXTS) + 1 and ids[-1] == tok.encode("A held-out row about the sea.")
    assert all(2 <= len(x) <= 128 for x in ids)


def test_a_run_of_raw_text_has_no_questions_to_score_and_says_so(tmp_path, tiny_hf):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from finetune.recipes.export_quantized import answer_scores
    from finetune.stages.rundir import own_config

    run = a_run(tmp_path, tiny_hf)
    job = SimpleNamespace(
        cfg=own_config(run, None), run_dir=run, tokenizer=AutoTokenizer.from_pretrained(str(tiny_hf))
    )
    assert "row 1 is raw text: there is no question to ask" in answer_scores(job, {})["skipped"]


def test_answers_are_scored_per_kind_against_their_references():
    from types import SimpleNamespace as P

    from finetune.recipes.export_quantized import _right

    prompts = [
        P(kind="train", reference="Paris"),
        P(kind="train", reference="4"),
        P(kind="heldout", reference="Rome"),
    ]
    assert _right(["Paris.", "5", "It is Rome"], prompts) == {"train": 0.5, "heldout": 1.0}
    assert _right(["x"], prompts[:1]) == {"train": 0.0, "heldout": None}


def test_planted_quant_of_base_hands_the_quantizer_the_base_instead_of_the_fused_model(plant_fault):
    """Its effect here; that quant_answers catches it on a real model: tests/faults and tier 3 (export_cases)."""
    from finetune import faults

    base_built = []
    assert faults.point("quant_of_base", "fused-f16.gguf", lambda: base_built.append(1)) == "fused-f16.gguf"
    assert base_built == [], "healthy: the base is not even converted"
    plant_fault("quant_of_base")
    assert faults.point("quant_of_base", "fused-f16.gguf", lambda: "base-f16.gguf") == "base-f16.gguf"
