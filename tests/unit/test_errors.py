"""One base class for bad input: every user-facing error type derives from it, and the CLI maps it to exit 2."""

from __future__ import annotations

import io

from finetune import cli
from finetune.config.loader import ConfigError
from finetune.data.sources import DatasetError
from finetune.data.templates import TemplateError
from finetune.errors import UserError
from finetune.export.fuse import FuseError
from finetune.models.cache import ModelUnavailable
from finetune.serve.modelfile import ModelfileError
from finetune.system.lock import RunDirBusy
from finetune.train.checkpoints import CheckpointError


def test_every_bad_input_error_is_a_user_error():
    for kind in (ConfigError, DatasetError, TemplateError, ModelfileError, FuseError, ModelUnavailable, RunDirBusy,
                 CheckpointError):  # fmt: skip
        assert issubclass(kind, UserError), kind


def test_the_cli_reports_a_user_error_in_one_line_with_exit_2(capsys):
    assert cli.main(["config", "validate", "/nonexistent/x.yaml"], out=io.StringIO()) == 2
    assert capsys.readouterr().err == "config error: /nonexistent/x.yaml: config file not found\n"
