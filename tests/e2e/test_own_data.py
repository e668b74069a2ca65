"""Tier 1: a user's own data and mistakes through the CLI (issue 20), model and trainer mocked.

Each case runs `finetune` as a user would and asserts the exit code, the message, what the console says and
that nothing of the user's was changed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from finetune import cli
from tests.fakes import FakeTrainer, fake_deps


def finetune(argv, tokenizer, tmp_path, trainer=None, **deps) -> tuple[int, str]:
    out = io.StringIO()
    return cli.main(
        argv, deps=fake_deps(tokenizer, tmp_path / "models", trainer, **deps), out=out
    ), out.getvalue()


def alpaca(i: int, answer: str = "output") -> dict:
    return {"instruction": f"What colour is item {i}?", answer: f"Item {i} is red."}


def write(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def run_on(source: Path, run_dir: Path, *sets: str) -> list[str]:
    given = [f"data.source={source}", "data.template=chatml", *sets]
    return ["run", "-p", "quick", *[a for s in given for a in ("--set", s)], "--run-dir", str(run_dir)]


def test_rows_with_another_answer_field_stop_the_run_naming_the_fix(tmp_path, toy_tokenizer):
    # 20 of 24 rows said `response`: the run trained on the 4 others, exit 0, console "[data] passed"
    src = write(tmp_path / "mine.jsonl", [alpaca(i, "response" if i % 6 else "output") for i in range(24)])
    before = src.read_bytes()
    code, out = finetune(run_on(src, tmp_path / "r1"), toy_tokenizer, tmp_path)
    assert code == 2, out
    err = out  # the failed data stage and the verdict print the reason
    assert "20 of 24 rows (83%) dropped, more than data.max_rejected 5%" in err
    assert "20 missing field 'output' (lines 2, 3, 4, 5, 6, ...;" in err
    assert (
        "Likely fix: rows have 'response' where 'output' is expected: set data.fields.output: response" in err
    )
    assert src.read_bytes() == before
    code, out = finetune(run_on(src, tmp_path / "r2", "data.fields.output=response"), toy_tokenizer, tmp_path)
    assert code == 0, out
    assert f"[data] 24 rows read from {src}, 24 used (" in out


def test_every_kind_of_dropped_row_is_said_on_the_console(tmp_path, toy_tokenizer):
    rows = [alpaca(i) for i in range(60)]
    rows[7:7] = [b"{broken\n", b'{"instruction": "caf\xe9?", "output": "x"}\n', alpaca(3)]
    src = write(tmp_path / "mine.jsonl", rows)
    code, out = finetune(run_on(src, tmp_path / "r"), toy_tokenizer, tmp_path)
    assert code == 0, out  # 3 of 63 dropped: under the default 5%
    assert f"[data] 63 rows read from {src}, 60 used (" in out
    assert "[data] dropped: 1 invalid JSON (line 8; e.g. invalid JSON (" in out
    assert "[data] dropped: 1 not valid UTF-8 (line 9; e.g. not valid UTF-8 (" in out
    assert "[data] dropped: 1 duplicates removed (line 10; " in out
    code, out = finetune(run_on(src, tmp_path / "r3", "data.max_rejected=0.01"), toy_tokenizer, tmp_path)
    assert code == 2 and "3 of 63 rows (5%) dropped, more than data.max_rejected 1%: 1 invalid JSON" in out


def test_an_edited_dataset_is_trained_on_when_the_run_is_resumed(tmp_path, toy_tokenizer):
    # resuming after editing the data used to train on the old rows (the prepared data was cached by path)
    src, run, trainer = (
        write(tmp_path / "mine.jsonl", [alpaca(i) for i in range(40)]),
        tmp_path / "r",
        FakeTrainer(),
    )
    assert finetune(run_on(src, run), toy_tokenizer, tmp_path, trainer)[0] == 0
    src.write_text(src.read_text().replace("red", "tan"))  # same size, same path
    code, out = finetune(["run", "--run-dir", str(run), "--resume"], toy_tokenizer, tmp_path, trainer)
    assert code == 0, out
    assert f"[data] rerunning: {src} (data.source) changed since it was recorded (sha256 " in out
    assert [c["resume"] for c in trainer.calls] == [False, False], "new data trains afresh, not on old steps"
    trained_on = (trainer.calls[-1]["data_dir"] / "train.jsonl").read_text()
    assert "tan" in trained_on and "red" not in trained_on


def test_validate_judges_a_run_made_by_train(tmp_path, toy_tokenizer):
    # the fake trainer writes the in-memory answers only through the stage's hook, as the real one does
    src, run = write(tmp_path / "mine.jsonl", [alpaca(i) for i in range(40)]), tmp_path / "r"
    argv = run_on(src, run)
    argv[0] = "train"
    code, out = finetune(argv, toy_tokenizer, tmp_path)
    assert code == 0 and "train NOT_JUDGED (exit 0)" in out, out
    code, out = finetune(["validate", str(run)], toy_tokenizer, tmp_path)
    assert code == 0 and "[PASS] artifacts: " in out, out  # it failed: "no probe answers to compare"


def test_a_turn_weighted_0_is_not_trained_and_the_label_mask_gate_checks_it(tmp_path, toy_tokenizer):
    # OpenAI's per-turn "weight": 0 used to be ignored (that turn was trained)
    def row(i):
        return {"messages": [{"role": "user", "content": f"Draft item {i}?"},
                             {"role": "assistant", "content": f"Bad draft {i}.", "weight": 0},
                             {"role": "user", "content": f"What colour is item {i}?"},
                             {"role": "assistant", "content": [{"type": "text", "text": f"Item {i} is red."}]}]}  # fmt: skip

    src, run = write(tmp_path / "chat.jsonl", [row(i) for i in range(40)]), tmp_path / "r"
    code, out = finetune(run_on(src, run), toy_tokenizer, tmp_path)
    assert code == 0, out
    assert "[PASS] label_mask: 32/32 rows train answers only" in out
    for r in map(json.loads, (run / "data" / "train.jsonl").read_text().splitlines()):
        trained = [r["text"][a:b] for a, b in r["train_spans"]]
        assert len(trained) == 1 and trained[0].startswith("Item ") and "Bad draft" not in "".join(trained)


README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def readme_data_commands() -> list[list[str]]:
    section = README.split("### Your own data", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]


def user_file(name: str, root: Path) -> None:
    """The README's file `name`, 40 rows in the format its name stands for."""
    q, a = (f"What colour is item {i}?" for i in range(40)), (f"Item {i} is red." for i in range(40))
    pairs = list(zip(q, a, strict=True))
    alpaca = [{"instruction": x, "output": y} for x, y in pairs]
    rows = {
        "mine.jsonl": alpaca, "mine.json": alpaca,
        "chat.jsonl": [{"messages": [{"role": "user", "content": x}, {"role": "assistant", "content": y, "weight": 1}]} for x, y in pairs],
        "sharegpt.json": [{"conversations": [{"from": "human", "value": x}, {"from": "gpt", "value": y}]} for x, y in pairs],
        "pairs.jsonl": [{"prompt": x, "completion": y} for x, y in pairs],
        "notes.jsonl": [{"text": f"{x} {y}"} for x, y in pairs],
        "qa.jsonl": [{"question": x, "answer": y} for x, y in pairs],
    }  # fmt: skip
    path = root / name
    if name == "mine.json" or name == "sharegpt.json":
        path.write_text(json.dumps(rows[name]))
    elif name.endswith(".jsonl"):
        write(path, rows[name])
    elif name == "mine.csv":
        path.write_text("instruction,input,output\n" + "".join(f'"{x}",,"{y}"\n' for x, y in pairs))
    else:
        import datasets

        if name == "mine.parquet":
            datasets.Dataset.from_list(alpaca).to_parquet(str(path))
        else:
            datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca[:34]),
                                  "test": datasets.Dataset.from_list(alpaca[34:])}).save_to_disk(str(path))  # fmt: skip


def test_every_readme_command_for_your_own_data_runs(tmp_path, toy_tokenizer, monkeypatch):
    commands = readme_data_commands()
    assert len(commands) == 10 and all(c[:4] == ["finetune", "run", "-p", "quick"] for c in commands)
    monkeypatch.chdir(tmp_path)
    for i, argv in enumerate(commands):
        name = argv[argv.index("--data") + 1]
        user_file(name, tmp_path)
        code, out = finetune(
            [*argv[1:], "--set", "data.template=chatml", "--run-dir", f"r{i}"], toy_tokenizer, tmp_path
        )
        assert code == 0, (argv, out[-3000:])
        assert f"[data] 40 rows read from {name}, 40 used (" in out, (argv, out)
        assert "[data] dropped" not in out, (argv, out)


def test_bad_input_exits_2_naming_the_problem(tmp_path, toy_tokenizer, capsys):
    src = write(tmp_path / "few.jsonl", [alpaca(i) for i in range(6)])
    cases = {  # each of these used to end exit 1, as if a stage had failed on a healthy input
        "4 training rows, fewer than training.batch_size 8": run_on(src, tmp_path / "r1", "training.batch_size=8"),
        "splits must be three shares above 0": run_on(src, tmp_path / "r2", "data.splits=[0.9,0.1,0]"),
        "6 rows with no trained token left after truncation to 8": run_on(src, tmp_path / "r3", "data.max_seq_length=8"),
    }  # fmt: skip
    for message, argv in cases.items():
        code, out = finetune(argv, toy_tokenizer, tmp_path)
        assert code == 2 and message in out + capsys.readouterr().err, (message, out[-2000:])


def test_truncated_model_weights_are_bad_input(tmp_path, toy_tokenizer):
    from finetune.models.resolve import resolve_model
    from tests.fakes import fake_model_folder

    folder = fake_model_folder(tmp_path / "m", toy_tokenizer, "mine").path
    save_file({"w": np.zeros((4, 4), np.float32)}, str(folder / "model.safetensors"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-9])  # an interrupted copy
    src = write(tmp_path / "mine.jsonl", [alpaca(i) for i in range(40)])
    argv = run_on(src, tmp_path / "r", f"model.name={folder}")
    code, out = finetune(argv, toy_tokenizer, tmp_path, resolve_model=lambda spec: resolve_model(spec))
    assert code == 2 and f"{weights}: " in out and "truncated; download or copy it again" in out, out


def test_ctrl_c_while_report_html_is_drawn_exits_130_with_a_report_and_a_history_line(
    tmp_path, toy_tokenizer, monkeypatch
):
    # it used to print a 119-line traceback and exit 1, with no report.html and no history line
    from finetune.report import history, html

    draw = html.write_html

    def ctrl_c_while_drawing(report, run_dir):
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, to the real handler, mid-drawing
        return draw(report, run_dir)

    monkeypatch.setattr(html, "write_html", ctrl_c_while_drawing)
    monkeypatch.setenv("FT_HISTORY", str(tmp_path / "history.jsonl"))
    src, run = write(tmp_path / "mine.jsonl", [alpaca(i) for i in range(40)]), tmp_path / "r"
    code, out = finetune(run_on(src, run), toy_tokenizer, tmp_path)
    assert code == 130, out
    assert (
        f"report.html not drawn: interrupted by SIGINT; `finetune run --run-dir {run.absolute()} --resume`"
        in out
    )
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "interrupted" and report["resume_command"].endswith("--resume")
    assert [r["status"] for r in history.load(tmp_path / "history.jsonl")] == ["interrupted"]
    monkeypatch.setattr(html, "write_html", draw)
    code, out = finetune(["run", "--run-dir", str(run), "--resume"], toy_tokenizer, tmp_path)
    assert code == 0 and (run / "report.html").is_file(), out


def test_a_template_whose_control_tokens_the_model_lacks_is_bad_input(tmp_path, toy_tokenizer):
    # llama3 on SmolLM2 split <|eot_id|> into characters and truncated 16.7% of rows, with no warning
    src = write(tmp_path / "mine.jsonl", [alpaca(i) for i in range(40)])
    code, out = finetune(run_on(src, tmp_path / "r", "data.template=llama3"), toy_tokenizer, tmp_path)
    assert code == 2, out
    assert (
        "data.template 'llama3' writes control tokens this model's vocabulary does not have as one token"
        in out
    )
    assert "<|eot_id|> -> " in out and "use data.template=auto, the model's own format ('chatml')" in out


def test_misleading_messages_now_name_the_real_problem(tmp_path, toy_tokenizer, capsys, monkeypatch):
    from finetune.models.resolve import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    rows = [alpaca(i) for i in range(40)]
    lines = write(tmp_path / "lines.json", rows)  # JSON Lines saved as .json
    latin = tmp_path / "latin.csv"
    latin.write_bytes(
        b"instruction,output\n"
        + "".join(f"q{i},a{i}\n" for i in range(900)).encode()
        + "café,x\n".encode("latin-1")
    )
    good = write(tmp_path / "good.jsonl", rows)
    cases = [
        (run_on(lines, tmp_path / "r1"), "this looks like JSON Lines (one object per line: rename it to .jsonl)"),
        (run_on(latin, tmp_path / "r2"), "latin.csv: line 902: not valid UTF-8 (byte 0xe9"),
        (run_on(good, tmp_path / "r3", "model.name=models/smolm2"), "does not exist (models/ is a local folder, so this is read as a path, not a Hub id): did you mean models/smollm2"),
        (run_on(good, tmp_path / "r4", "data.path=x"), "did you mean source? (a file, a saved dataset folder"),
        (run_on(good, tmp_path / "r5", "training.num_train_epochs=3"), "did you mean iters? (optimizer steps, not epochs"),
        (["prepare", "-p", "quick", "--no-tokenizer", "--data", str(good), "--out", "o"], "name one (--set data.template=chatml"),
    ]  # fmt: skip
    before = {p: p.read_bytes() for p in (lines, latin, good)}
    for argv, message in cases:
        real = (
            {"resolve_model": resolve_model} if "model.name=models/smolm2" in argv else {}
        )  # the rest: fake
        code, out = finetune(argv, toy_tokenizer, tmp_path, **real)
        assert code == 2 and message in out + capsys.readouterr().err, (argv, message, out[-1500:])
    assert {p: p.read_bytes() for p in before} == before
