"""The CLI's own behaviour: commands, exit codes, and refusing incomplete requests."""

from __future__ import annotations

import io

from finetune import cli


def run(argv, **kw):
    out = io.StringIO()
    return cli.main(argv, out=out, **kw), out.getvalue()


def test_profiles_are_listed_from_the_package():
    code, out = run(["config", "profiles"])
    assert code == 0 and out.split() == ["default", "low-memory", "quality", "quick", "release", "ship"]


def test_resume_needs_a_run_dir(capsys):
    assert run(["run", "--resume"])[0] == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err


def test_resume_of_a_missing_or_empty_run_dir_is_refused_not_started_afresh(tmp_path, capsys):
    # it used to start a new run from the base defaults (SmolLM2, built-in data: 6 minutes) and exit 0
    for run_dir in (tmp_path / "nowhere", tmp_path):
        assert run(["run", "--run-dir", str(run_dir), "--resume"])[0] == 2
        assert f"--resume: {run_dir} holds no run to continue" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [] and not (tmp_path / "nowhere").exists()  # nothing written


def test_validate_of_a_folder_that_is_no_run_is_bad_input(tmp_path, capsys):
    assert run(["validate", str(tmp_path)])[0] == 2
    assert "not a FineTune run directory" in capsys.readouterr().err


def test_every_command_has_help():
    parser = cli.build_parser()
    for command in ("config", "prepare", "estimate", "doctor", "train", "run", "pipeline", "validate"):
        assert command in parser.format_help()
