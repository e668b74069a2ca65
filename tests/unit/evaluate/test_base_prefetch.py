"""The base model's learning measurement made in a child beside training lands where the judge reads it."""

from __future__ import annotations

import json

from finetune.config.loader import load_config, save_config
from finetune.data.templates import get_template
from finetune.evaluate import base_prefetch, run_measurements
from finetune.evaluate.budget import answer_budget
from finetune.models.tokenizer import load_tokenizer
from tests.unit.evaluate.test_run_measurements import learning_run  # noqa: F401 (fixture)

OVERRIDES = ["gates.learning_probes=4", "data.max_seq_length=64", "training.batch_size=2"]


def _judge(run, base):
    """What the judge measures, as the judge derives stops and budget."""
    cfg = load_config(overrides=OVERRIDES)
    tok = load_tokenizer(base)
    stops = get_template(cfg.data.template, tokenizer=tok).stop_strings
    budget = answer_budget(run / "data", tok).tokens
    return run_measurements.measure_learning(run, base, cfg, stops, max_tokens=budget)


def test_the_judge_reads_what_the_child_measured(learning_run, tiny_hf, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    save_config(load_config(overrides=OVERRIDES), learning_run / "config.yaml")
    finish = base_prefetch.prefetch(learning_run, tiny_hf, after=lambda cancel: "full probe prefetched")
    assert finish(False) == "full probe prefetched; base answers measured beside training"
    (kept,) = (tmp_path / "cache" / "base-answers").glob("*.json")
    measured = json.loads(kept.read_text())
    stamp = kept.stat().st_mtime_ns
    m = _judge(learning_run, tiny_hf)
    assert (m.before, m.loss_before, m.general_before) == (
        measured["answers"], measured["loss"], measured["general"])  # fmt: skip
    assert kept.stat().st_mtime_ns == stamp and len(list(kept.parent.glob("*.json"))) == 1  # read, not redone


def test_a_failing_child_leaves_it_to_the_judge_and_says_why(learning_run, tiny_hf, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))  # no config.yaml in the run: the child fails
    msg = base_prefetch.prefetch(learning_run, tiny_hf)(False)
    assert msg.startswith("base answers not prefetched (exit 1:") and "config.yaml" in msg
    assert msg.endswith("the judge measures them") and not (tmp_path / "cache" / "base-answers").exists()


def test_cancelled_with_training_it_stops_first(learning_run, tiny_hf, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    save_config(load_config(overrides=OVERRIDES), learning_run / "config.yaml")
    cancelled = []
    msg = base_prefetch.prefetch(learning_run, tiny_hf, after=lambda cancel: cancelled.append(cancel) or "")(
        True
    )
    assert True in cancelled and "base answers not prefetched" in msg
    assert not (tmp_path / "cache" / "base-answers").exists()


def test_for_a_pipeline_it_also_answers_the_evaluation_prompts(learning_run, tiny_hf, tmp_path, monkeypatch):  # noqa: F811
    from finetune.evaluate import decode
    from finetune.evaluate.base_answers import FOLDER, base_answers
    from finetune.evaluate.evaluation import EvalSettings
    from finetune.evaluate.prompts import build_prompts

    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "cache"))
    save_config(load_config(overrides=OVERRIDES), learning_run / "config.yaml")
    assert base_prefetch.prefetch(learning_run, tiny_hf, evaluation=True)(False).endswith("beside training")
    # what stage_evaluate asks for, derived as it derives it
    cfg, tok, s = load_config(overrides=OVERRIDES), load_tokenizer(tiny_hf), EvalSettings()
    template = get_template(cfg.data.template, tokenizer=tok)
    texts = [
        p.prompt
        for p in build_prompts(learning_run / "data", template, n_train=s.n_train, n_heldout=s.n_heldout)
    ]
    budget = answer_budget(learning_run / "data", tok).tokens

    def decoded_again():
        raise AssertionError("the evaluation decoded the base again")

    got = base_answers(tmp_path / "cache" / FOLDER, tiny_hf, texts, budget, decoded_again)
    assert got == decode.answers_from_disk(tiny_hf, None, texts, budget)  # what mlx_base would have decoded
