"""The real collaborators are all wired (imports resolve, nothing is left unset)."""

from __future__ import annotations

import dataclasses

from finetune.stages.real import llamacpp_reason, real_deps


def test_every_collaborator_is_callable():
    deps = real_deps()
    for f in dataclasses.fields(deps):
        if f.name != "environ":
            assert callable(getattr(deps, f.name)), f.name


def test_llamacpp_is_available_after_setup():
    assert llamacpp_reason() is None  # `make setup` installs xllamacpp on Linux x86_64
