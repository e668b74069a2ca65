"""The real collaborators are all wired (imports resolve, nothing is left unset)."""

from __future__ import annotations

import dataclasses

from finetune.stages.real import llamacpp_reason, real_deps


def test_every_collaborator_is_callable():
    deps = real_deps()
    for f in dataclasses.fields(deps):
        if f.name not in ("environ", "ship_form"):
            assert callable(getattr(deps, f.name)), f.name


def test_the_cli_wires_in_the_exporter_the_pipeline_ships_its_forms_with():
    from finetune import cli
    from finetune.recipes.export_adapter import ship_in_run

    assert real_deps().ship_form is None  # a layer above stages: only the CLI (or a caller) can wire it
    assert cli._deps(None).ship_form is ship_in_run


def test_llamacpp_is_available_after_setup():
    assert llamacpp_reason() is None  # `make setup` installs xllamacpp on Linux x86_64
