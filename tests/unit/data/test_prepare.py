"""finetune.data.prepare: render, dedupe, shuffle, split into train/valid/test.jsonl and report what happened."""

import json
from pathlib import Path

import pytest

from finetune.config.schema import DataConfig
from finetune.data import synthetic
from finetune.data.prepare import materialize_source, prepare, prepare_for_run, split_counts
from finetune.data.sources import DatasetError
from finetune.data.templates import get_template
from finetune.system.jsonl import read_jsonl


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def qa(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }


def test_prepare_writes_splits_with_spans_and_report(tmp_path):
    rows = [qa(i) for i in range(20)] + [qa(3), qa(5), {"instruction": "x"}]
    src = write_lines(tmp_path / "src.jsonl", rows)
    report = prepare(src, tmp_path / "out", template="chatml", seed=1)

    assert report.rows_read == 23 and report.rows_used == 20
    assert report.duplicates_removed == 2 and report.duplicate_lines == [21, 22]
    assert [str(r) for r in report.rejected] == ["line 23: missing field 'output' (the row has: instruction)"]
    assert report.split_counts == {"train": 16, "valid": 2, "test": 2}
    assert report.length_unit == "chars" and report.truncated_share is None
    assert any("need a tokenizer" in n for n in report.notes)

    seen = []
    for split, count in report.split_counts.items():
        lines = read_jsonl(tmp_path / "out" / f"{split}.jsonl")
        assert len(lines) == count and report.files[split] == f"{split}.jsonl"
        for row in lines:
            assert list(row) == ["text", "train_spans", "prompt", "reference", "conversation"]
            ((s, e),) = row["train_spans"]
            assert row["text"][s:e] == row["reference"] + "<|im_end|>"
            assert row["text"].startswith(row["prompt"]) and row["prompt"].endswith("<|im_start|>assistant\n")
            assert row["conversation"] == qa(int(row["reference"].split()[1][:-1]))["messages"]
            seen.append(row["reference"])
    assert sorted(seen) == sorted(f"Answer {i}." for i in range(20))

    on_disk = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report.to_dict()))
    assert on_disk["rejected"] == [
        {"line": 23, "unit": "line", "reason": "missing field 'output' (the row has: instruction)"}
    ]
    assert (
        on_disk["files"]["report"] == "prepare_report.json"
    )  # relative: the folder may move (atomic_dir does)


def test_prepare_is_deterministic_per_seed(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(30)])
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(src, tmp_path / name, template="llama3", seed=seed)
    a, b, c = ((tmp_path / n / "train.jsonl").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_prepare_multiturn_spans_and_mask_prompt_off(tmp_path):
    conv = {
        "messages": [
            {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "B?"},
            {"role": "assistant", "content": "b"},
        ]
    }
    variants = [
        {"messages": [dict(m, content=m["content"] + str(i)) for m in conv["messages"]]} for i in range(3)
    ]
    src = write_lines(tmp_path / "src.jsonl", variants)
    prepare(src, tmp_path / "m", template="chatml")
    row = read_jsonl(tmp_path / "m" / "train.jsonl")[0]
    i = row["reference"][1:]
    assert [row["text"][s:e] for s, e in row["train_spans"]] == [f"a{i}<|im_end|>", f"b{i}<|im_end|>"]
    prepare(src, tmp_path / "u", template="chatml", mask_prompt=False)
    row = read_jsonl(tmp_path / "u" / "train.jsonl")[0]
    assert row["train_spans"] == [[0, len(row["text"])]]


def test_prepare_text_rows_are_trained_whole(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [{"text": f"line {i}"} for i in range(3)])
    report = prepare(src, tmp_path / "o", template="chatml")
    row = read_jsonl(tmp_path / "o" / "train.jsonl")[0]
    assert row == {"text": row["text"], "train_spans": [[0, 6]], "prompt": "", "reference": ""}
    assert report.shapes == {"text": 3}
    assert any("text-shape rows are trained whole" in n for n in report.notes)


def test_prepare_keeps_kind_for_evaluation(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [{**qa(i), "reference": str(i), "kind": "k"} for i in range(3)])
    prepare(src, tmp_path / "o", template="chatml")
    row = read_jsonl(tmp_path / "o" / "test.jsonl")[0]
    assert (
        list(row) == ["text", "train_spans", "prompt", "reference", "conversation", "kind"]
        and row["kind"] == "k"
    )


def test_prepare_too_small_dataset_says_so(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [qa(1), qa(2)])
    with pytest.raises(DatasetError, match="only 2 usable rows: too few for splits"):
        prepare(src, tmp_path / "o", template="chatml")
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_split_counts():
    assert split_counts(3, (0.8, 0.1, 0.1)) == {"train": 1, "valid": 1, "test": 1}
    assert split_counts(100, (0.8, 0.1, 0.1)) == {"train": 80, "valid": 10, "test": 10}
    assert split_counts(10, (0.5, 0.25, 0.25)) == {"train": 6, "valid": 2, "test": 2}
    with pytest.raises(ValueError, match="summing to 1"):
        split_counts(10, (0.8, 0.2, 0.1))
    with pytest.raises(ValueError, match="three fractions"):
        split_counts(10, (0.9, 0.1))
    with pytest.raises(ValueError):
        split_counts(10, (1.0, 0.0, 0.0))


def test_prepared_files_are_a_text_dataset_for_mlx_lm(tmp_path):
    """`mlx_lm lora --data OUT` must train on our rendered text and spans, not re-render a chat itself."""
    mlx_datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(5)])
    prepare(src, tmp_path / "o", template="chatml")
    rows = read_jsonl(tmp_path / "o" / "train.jsonl")

    class Config:
        mask_prompt = False

    assert type(mlx_datasets.create_dataset(rows, None, Config())).__name__ == "TextDataset"


def test_prepare_with_tokenizer_reports_token_stats(tmp_path, smollm2_tokenizer):
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(10)] + [qa(10**40)])
    report = prepare(src, tmp_path / "o", template="chatml", tokenizer=smollm2_tokenizer, max_seq_length=25)
    stats = report.length_stats
    assert report.length_unit == "tokens"
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]
    long_text = get_template("chatml").render(qa(10**40)["messages"]).text
    longest = len(smollm2_tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert stats["max"] == longest > 25
    assert report.truncated_share == pytest.approx(1 / 11, abs=1e-4)
    # the most tokens a batch trimmed after its last trained token feeds: within max_seq_length, and up to the
    # answer's end marker (only the newline after it is untrained)
    kept = max(n for n in (len(smollm2_tokenizer(get_template("chatml").render(qa(i)["messages"]).text,
                                                 add_special_tokens=False)["input_ids"]) for i in range(10)))  # fmt: skip
    assert kept - 2 <= report.trained_tokens["last"] <= min(kept, 25) - 1


def test_rows_left_without_trained_tokens_are_counted(tmp_path, toy_tokenizer):
    long_question = {"messages": [{"role": "user", "content": "What is 12 + 7? " * 8},
                                  {"role": "assistant", "content": "19"}]}  # fmt: skip
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(5)] + [long_question])
    report = prepare(src, tmp_path / "o", template="chatml", tokenizer=toy_tokenizer, max_seq_length=12)
    assert report.rows_without_trained_tokens >= 1
    assert f"{report.rows_without_trained_tokens} rows have no trained tokens left" in " ".join(report.notes)


class HistoryDroppingTokenizer:
    """A chat template that shows only the last two messages: fine for one turn, not prefix-stable beyond."""

    eos_token, chat_template = "<eos>", "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}<end>" for m in messages[-2:])
        return text + ("[assistant]" if add_generation_prompt else "")


def test_prepare_rejects_rows_the_template_cannot_render(tmp_path):
    two_turns = {"messages": [*qa(9)["messages"], *qa(8)["messages"]]}
    template = get_template("tokenizer", HistoryDroppingTokenizer())
    src = write_lines(tmp_path / "src.jsonl", [qa(1), two_turns, qa(2), qa(3)])
    report = prepare(src, tmp_path / "o", template=template)
    assert report.rows_used == 3
    assert [r.line for r in report.rejected] == [2]
    assert (
        "template 'tokenizer'" in report.rejected[0].reason and "prefix-stable" in report.rejected[0].reason
    )

    only_bad = write_lines(tmp_path / "bad.jsonl", [two_turns])
    with pytest.raises(DatasetError, match=r"no usable rows after rendering \(1 rejected: line 1: template"):
        prepare(only_bad, tmp_path / "o2", template=template)


def test_prepare_takes_an_injected_loader(tmp_path):
    from finetune.data.records import Example, LoadResult

    calls = []

    def load(source, format):
        calls.append((source, format))
        examples = [Example(i + 1, "text", text=f"t{i}") for i in range(4)]
        return LoadResult("memory://rows", examples, [], 4)

    report = prepare("anything", tmp_path / "o", template="chatml", format="text", load=load)
    assert calls == [("anything", "text")] and report.source == "memory://rows" and report.rows_used == 4


def test_materialize_builtin_source(tmp_path):
    assert materialize_source("my/data.jsonl", tmp_path, num_examples=8, seed=0) == "my/data.jsonl"
    path = materialize_source("builtin:arithmetic", tmp_path / "d", num_examples=8, seed=2)
    assert path == str(tmp_path / "d" / "source.jsonl")
    assert len(read_jsonl(path)) == 8 and len(read_jsonl(tmp_path / "d" / "heldout.jsonl")) == 2
    with pytest.raises(ValueError, match="unknown synthetic dataset 'weather'"):
        materialize_source("builtin:weather", tmp_path / "w", num_examples=8, seed=0)


def test_prepare_for_run_follows_the_data_section(tmp_path, toy_tokenizer):
    data = DataConfig(source="builtin:geography", template="chatml", num_examples=20, seed=3, max_seq_length=48,
                      splits=(0.6, 0.2, 0.2))  # fmt: skip
    report = prepare_for_run(data, tmp_path, toy_tokenizer)
    assert report.template == "chatml" and report.seed == 3 and report.max_seq_length == 48
    assert report.split_counts == {"train": 12, "valid": 4, "test": 4} and report.length_unit == "tokens"
    assert (
        report.source == "source.jsonl"
        and (tmp_path / "source.jsonl").is_file()
        and (tmp_path / "heldout.jsonl").is_file()
    )
    again = prepare_for_run(data, tmp_path / "again", toy_tokenizer)
    assert again.split_counts == report.split_counts
    assert (tmp_path / "train.jsonl").read_bytes() == (tmp_path / "again" / "train.jsonl").read_bytes()


def test_held_out_paraphrases_only_ask_about_facts_that_were_trained(tmp_path, toy_tokenizer):
    """A paraphrase of a fact that landed in valid/test asks about something never trained: it is left out, and
    the console-bound notes say how many."""
    data = DataConfig(source="builtin:geography", template="chatml", num_examples=40, seed=0, max_seq_length=64,
                      splits=(0.5, 0.25, 0.25))  # fmt: skip
    report = prepare_for_run(data, tmp_path, toy_tokenizer)
    generated = synthetic.build("geography", n=40, seed=0).heldout
    kept = read_jsonl(tmp_path / "heldout.jsonl")
    trained = {row["conversation"][-2]["content"] for row in read_jsonl(tmp_path / "train.jsonl")}
    assert kept and all(row["paraphrase_of"] in trained for row in kept)
    dropped = len(generated) - len(kept)
    assert dropped > 0 and [row for row in generated if row["paraphrase_of"] in trained] == kept
    assert (
        f"held-out: {dropped} of {len(generated)} paraphrases ask about facts that landed in valid/test"
        in " ".join(report.notes)
    )
    assert json.loads((tmp_path / "prepare_report.json").read_text())["notes"] == report.notes


def test_the_split_leak_fault_writes_a_validation_row_into_train(tmp_path, plant_fault):
    from finetune.gates.split_overlap import split_overlap

    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(20)])
    plant_fault("split_leak")
    prepare(src, tmp_path / "leaky", template="chatml", seed=1)
    plant_fault()
    prepare(src, tmp_path / "out", template="chatml", seed=1)
    splits = {n: read_jsonl(tmp_path / "out" / f"{n}.jsonl") for n in ("train", "valid", "test")}
    leaky = {n: read_jsonl(tmp_path / "leaky" / f"{n}.jsonl") for n in ("train", "valid", "test")}
    assert [len(v) for v in leaky.values()] == [len(v) for v in splits.values()] == [16, 2, 2]
    assert split_overlap(splits).passed
    v = split_overlap(leaky)
    assert not v.passed and v.measured == 1 and "valid.jsonl row 1" in v.detail


def test_the_questions_as_ids_fault_trains_answers_on_opaque_ids(tmp_path, plant_fault):

    plant_fault("questions_as_ids")
    faulty = read_jsonl(Path(materialize_source("builtin:mixed", tmp_path / "f", num_examples=20, seed=0)))
    plant_fault()
    healthy = read_jsonl(Path(materialize_source("builtin:mixed", tmp_path / "h", num_examples=20, seed=0)))
    assert [r["messages"][1:] for r in faulty] == [r["messages"][1:] for r in healthy]  # answers unchanged
    assert [r["messages"][0]["content"] for r in faulty][:2] == ["Recall entry 000.", "Recall entry 001."]
    # the held-out paraphrases still ask about the facts those rows trained, and say which row
    held_f, held_h = (read_jsonl(tmp_path / d / "heldout.jsonl") for d in ("f", "h"))
    assert [r["messages"] for r in held_f] == [r["messages"] for r in held_h]
    ids = {r["messages"][0]["content"] for r in faulty}
    assert all(r["paraphrase_of"] in ids for r in held_f if r.get("paraphrase_of"))


def test_a_saved_dataset_dicts_own_splits_are_used_as_given(tmp_path):
    datasets = pytest.importorskip("datasets")
    train, test = (
        [qa(i) for i in range(30)],
        [qa(i) for i in range(100, 108)] + [qa(3)],
    )  # qa(3) leaks from train
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
                         ).save_to_disk(str(tmp_path / "dd"))  # fmt: skip
    report = prepare(tmp_path / "dd", tmp_path / "out", template="chatml", splits=(0.8, 0.1, 0.1))
    tested = [r["reference"] for r in read_jsonl(tmp_path / "out" / "test.jsonl")]
    assert sorted(tested) == sorted(r["messages"][-1]["content"] for r in test[:8]), (
        "test is the dataset's test split, minus the leak"
    )
    assert report.split_counts == {"train": 27, "valid": 3, "test": 8} and report.rows_read == 39
    assert report.duplicates_removed == 1 and report.duplicate_lines == [9]
    trained = {r["reference"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert trained.isdisjoint(tested) and len(trained) == 27  # valid was cut from train, as data.splits says
