"""Measurements behind the training gates, made from what a run saved on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune.evaluate import decode, run_measurements
from finetune.system.hashing import file_sha256

# ---------------------------------------------------------------- probe questions and base digests


def test_probe_questions_are_the_first_conversation_rows(tmp_path):
    rows = [{"text": "raw text, no question"},
            *({"prompt": f"<q{i}>", "reference": f"a{i}", "text": "..."} for i in range(5))]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = run_measurements.probe_questions(tmp_path, 3)
    assert got == [run_measurements.Probe(f"<q{i}>", f"a{i}") for i in range(3)]
    assert len(run_measurements.probe_questions(tmp_path, 50)) == 6, "the text row fills in as a continuation"


def test_plain_text_rows_are_probed_as_continuations_of_their_first_half(tmp_path):
    rows = [{"text": "The heron waits in the shallow water until a fish comes by."}, {"text": "short"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_measurements.probe_questions(tmp_path, 5) == [
        run_measurements.Probe("The heron waits in the", " shallow water until a fish comes by.")
    ], "a text without a space in its first half is no probe"


def test_base_file_digests_cover_weights_config_and_tokenizer_only(tmp_path):
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "README.md", "generation_config.json"):  # fmt: skip
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.safetensors").write_text("nested")
    digests = run_measurements.base_file_digests(tmp_path)
    assert sorted(digests) == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                               "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    assert digests["config.json"] == file_sha256(tmp_path / "config.json")
    (tmp_path / "tokenizer.json").write_text("changed")
    assert run_measurements.base_file_digests(tmp_path)["tokenizer.json"] != digests["tokenizer.json"]


# ---------------------------------------------------------------- in-memory answers


def test_record_in_memory_writes_what_the_trained_model_answers(tmp_path, tiny_model):
    model, tok = tiny_model
    qs = [run_measurements.Probe("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n", "5"),
          run_measurements.Probe("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello")]  # fmt: skip
    hook = run_measurements.record_in_memory(tmp_path, qs, ["<|im_end|>"], 5)
    assert run_measurements.in_memory_answers(tmp_path) is None  # nothing recorded yet
    hook(model, tok)
    expected = decode.greedy(model, tok, [q.prompt for q in qs], max_tokens=5, stops=["<|im_end|>"])
    assert run_measurements.in_memory_answers(tmp_path) == [a.text for a in expected]


def test_in_memory_answers_of_a_damaged_file_are_none(tmp_path):
    path = tmp_path / run_measurements.PROBES / run_measurements.IN_MEMORY
    path.parent.mkdir()
    path.write_text('{"answers": ["8", ')
    assert run_measurements.in_memory_answers(tmp_path) is None
    path.write_text('{"other": []}')
    assert run_measurements.in_memory_answers(tmp_path) is None


# ---------------------------------------------------------------- run files


def _save_adapter(folder: Path, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"model.layers.0.self_attn.q_proj.lora_a": rng.normal(size=(8, 4)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.lora_b": np.zeros((4, 8), np.float32)},
              str(folder / "adapters.safetensors"))  # fmt: skip
    (folder / "adapter_config.json").write_text('{"fine_tune_type": "lora", "num_layers": 1}')


@pytest.fixture
def complete_run(tmp_path) -> Path:
    run = tmp_path / "run"
    _save_adapter(run / "adapter", 1)
    _save_adapter(run / "adapter_init", 0)
    (run / "checkpoints" / "step-0000010").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    rows = [{"kind": "train", "step": i, "train_loss": 3 - i / 10} for i in range(1, 11)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_a_complete_run_has_no_artifact_problems(complete_run):
    assert run_measurements.artifact_problems(complete_run) == []


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("config.yaml", "missing config.yaml"),
        ("metrics.jsonl", "missing metrics.jsonl"),
        ("adapter/adapters.safetensors", "missing adapter/adapters.safetensors"),
        ("adapter/adapter_config.json", "missing adapter/adapter_config.json"),
        ("adapter_init/adapters.safetensors", "missing adapter_init/adapters.safetensors"),
        ("checkpoints", "no checkpoint under checkpoints/"),
    ],
)
def test_each_missing_run_file_is_named(complete_run, remove, message):
    path = complete_run / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert run_measurements.artifact_problems(complete_run) == [message]


def test_unparseable_run_files_are_named(complete_run):
    (complete_run / "adapter" / "adapter_config.json").write_text('{"fine_tune_type": ')
    data = (complete_run / "adapter" / "adapters.safetensors").read_bytes()
    (complete_run / "adapter" / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    (complete_run / "metrics.jsonl").write_text("")
    problems = "\n".join(run_measurements.artifact_problems(complete_run))
    assert "adapter/adapter_config.json is not valid JSON" in problems
    assert "adapter/adapters.safetensors" in problems and "truncated" in problems
    assert "metrics.jsonl has no rows" in problems


def test_a_torn_last_metrics_line_is_tolerated(complete_run):
    from finetune.train.metrics import read_metrics, train_losses

    with open(complete_run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')
    assert run_measurements.artifact_problems(complete_run) == []
    assert len(train_losses(read_metrics(complete_run / "metrics.jsonl"))) == 10


def test_adapter_tensors_reads_the_saved_adapter(complete_run):
    init, final = (
        run_measurements.adapter_tensors(complete_run / "adapter_init"),
        run_measurements.adapter_tensors(complete_run / "adapter"),
    )
    assert (
        sorted(init)
        == sorted(final)
        == ["model.layers.0.self_attn.q_proj.lora_a", "model.layers.0.self_attn.q_proj.lora_b"]
    )
    assert init["model.layers.0.self_attn.q_proj.lora_a"].shape == (8, 4)
    assert not np.array_equal(
        init["model.layers.0.self_attn.q_proj.lora_a"], final["model.layers.0.self_attn.q_proj.lora_a"]
    )


# ---------------------------------------------------------------- masked rows


def _write_tokens(run: Path, rows: list[dict]) -> None:
    from finetune.train.engine import TOKENS

    (run / TOKENS).write_text(json.dumps({"source": "train.jsonl", "rows": rows}))


def test_masked_rows_decode_the_loss_carrying_runs_of_a_recorded_row(tmp_path, toy_tokenizer):
    run = tmp_path
    (run / "data").mkdir()
    messages = [{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "19"},
                {"role": "user", "content": "Zorbania?"}, {"role": "assistant", "content": "Velmora"}]  # fmt: skip
    (run / "data" / "train.jsonl").write_text(
        json.dumps({"text": "raw"}) + "\n" + json.dumps({"conversation": messages}) + "\n"
    )
    prompt_a, answer_a = toy_tokenizer.encode("user What is 12 + 7?"), toy_tokenizer.encode("19")
    prompt_b, answer_b = toy_tokenizer.encode(" user Zorbania?"), toy_tokenizer.encode("Velmora")
    ids = prompt_a + answer_a + prompt_b + answer_b
    mask = [1] + [0] * (len(prompt_a) - 1) + [1] * len(answer_a) + [0] * len(prompt_b) + [1] * len(answer_b)
    _write_tokens(run, [{"row": 1, "ids": ids, "mask": mask}, {"row": 0, "ids": ids[:3], "mask": [1, 1, 1]}])

    first, raw = run_measurements.masked_rows(run, toy_tokenizer, max_seq_length=64)
    assert first.row == 1 and first.runs == ["19", "Velmora"] and first.answers == ["19", "Velmora"]
    assert (first.n_tokens, first.n_masked, first.truncated) == (
        len(ids),
        len(answer_a) + len(answer_b),
        False,
    )
    # position 0 is never a target: its mask bit is not counted and starts no run
    assert raw.answers == [] and raw.n_masked == 2 and raw.runs == [toy_tokenizer.decode(ids[1:3])]


def test_masked_rows_flag_rows_cut_at_the_length_limit(tmp_path, toy_tokenizer):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"conversation": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "Velmora"}]}) + "\n")  # fmt: skip
    ids = toy_tokenizer.encode("user q Velmora")
    _write_tokens(tmp_path, [{"row": 0, "ids": ids, "mask": [0] * (len(ids) - 1) + [1]}])
    assert run_measurements.masked_rows(tmp_path, toy_tokenizer, max_seq_length=len(ids))[0].truncated
    assert not run_measurements.masked_rows(tmp_path, toy_tokenizer, max_seq_length=len(ids) + 1)[0].truncated


def test_masked_rows_without_a_recording_is_an_error(tmp_path, toy_tokenizer):
    with pytest.raises(OSError):
        run_measurements.masked_rows(tmp_path, toy_tokenizer, 64)


# ---------------------------------------------------------------- learning


@pytest.fixture
def learning_run(tmp_path, tiny_sums_dir, tiny_lora) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_sums_dir, run / "data")
    shutil.copytree(tiny_lora, run / "adapter")
    return run


def test_measure_learning_asks_base_and_base_plus_saved_adapter(learning_run, tiny_hf, tiny_model, tmp_path):
    from finetune.config.loader import load_config
    from finetune.train.splits import load_split

    cfg = load_config(
        overrides=["gates.learning_probes=4", "data.max_seq_length=64", "training.batch_size=2"]
    )
    stops = ["<|im_end|>"]
    m = run_measurements.measure_learning(
        learning_run, tiny_hf, cfg, stops, max_tokens=6, cache_dir=tmp_path / "cache"
    )
    qs = run_measurements.probe_questions(learning_run / "data", 4)
    assert m.references == [q.reference for q in qs]

    model, tok = tiny_model
    base = decode.greedy(model, tok, [q.prompt for q in qs], max_tokens=6, stops=stops)
    assert m.before == [a.text for a in base]
    data = load_split(learning_run / "data" / "train.jsonl", tok, 64, True)
    data.items, data.rows = data.items[:4], data.rows[:4]
    assert m.loss_before == pytest.approx(decode.teacher_forced_loss(model, data, 2, 64), rel=1e-5)
    tuned, _ = decode.load(tiny_hf, learning_run / "adapter")
    try:
        assert m.after == [
            a.text for a in decode.greedy(tuned, tok, [q.prompt for q in qs], max_tokens=6, stops=stops)
        ]
        assert m.loss_after == pytest.approx(decode.teacher_forced_loss(tuned, data, 2, 64), rel=1e-5)
    finally:
        decode.release(tuned)
    assert m.loss_after != pytest.approx(m.loss_before)
    # perplexity on general text, base and base + adapter, each as text_nll measures it
    from finetune.evaluate.general_text import GENERAL_TEXTS

    assert m.general_before == pytest.approx(decode.text_nll(model, tok, GENERAL_TEXTS), rel=1e-5)
    tuned, _ = decode.load(tiny_hf, learning_run / "adapter")
    try:
        assert m.general_after == pytest.approx(decode.text_nll(tuned, tok, GENERAL_TEXTS), rel=1e-5)
    finally:
        decode.release(tuned)
    assert m.general_after != pytest.approx(m.general_before)

    # the base's answers are cached: a second measurement reads them instead of decoding again
    (cached,) = (tmp_path / "cache").glob("*.json")
    assert json.loads(cached.read_text()) == {
        "answers": m.before,
        "loss": m.loss_before,
        "general": m.general_before,
    }
    cached.write_text(json.dumps({"answers": ["from the cache"] * 4, "loss": 9.0, "general": 7.0}))
    again = run_measurements.measure_learning(
        learning_run, tiny_hf, cfg, stops, max_tokens=6, cache_dir=tmp_path / "cache"
    )
    assert again.before == ["from the cache"] * 4 and again.loss_before == 9.0 and again.after == m.after
    assert again.general_before == 7.0

    # the saved adapter's are kept in the run by its files' content: the same bytes are not decoded again...
    assert not (learning_run / "probes").exists()  # training's folder: the judge writes its own
    (kept,) = (learning_run / "judge").glob("saved-adapter-*.json")
    kept.write_text(json.dumps({"answers": ["kept"] * 4, "loss": 1.0, "general": 2.0}))
    measure = lambda: run_measurements.measure_learning(  # noqa: E731
        learning_run, tiny_hf, cfg, stops, max_tokens=6, cache_dir=tmp_path / "cache"
    )
    assert measure().after == ["kept"] * 4
    # ...other bytes are
    config = learning_run / "adapter" / "adapter_config.json"
    config.write_text(config.read_text() + "\n")
    assert measure().after == m.after


def test_measure_learning_fails_loudly_on_an_adapter_that_does_not_load(learning_run, tiny_hf, tmp_path):
    from finetune.config.loader import load_config

    data = (learning_run / "adapter" / "adapters.safetensors").read_bytes()
    (learning_run / "adapter" / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    cfg = load_config(overrides=["gates.learning_probes=2", "data.max_seq_length=64"])
    with pytest.raises(Exception, match="(?i)safetensors|offset|truncat"):
        run_measurements.measure_learning(
            learning_run, tiny_hf, cfg, ["<|im_end|>"], max_tokens=4, cache_dir=tmp_path / "c"
        )
