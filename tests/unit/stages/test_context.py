"""The context: which gates a tier wants, and upstream stages as inputs."""

from __future__ import annotations

from finetune.config.loader import load_config
from finetune.stages.context import Ctx
from tests.fakes import fake_deps


def test_wants_honours_the_tier_and_gates_skip(tmp_path, toy_tokenizer):
    cfg = load_config("quick", overrides=["gates.skip=[memory_efficiency]"])
    c = Ctx(
        cfg,
        tmp_path,
        fake_deps(toy_tokenizer, tmp_path),
        print,
        "run",
        ("loss_convergence", "memory_efficiency"),
    )
    assert c.wants("loss_convergence") and not c.wants("memory_efficiency") and not c.wants("output_parity")


def test_upstream_carries_digests_and_artifact_hashes(tmp_path, toy_tokenizer):
    c = Ctx(load_config("quick"), tmp_path, fake_deps(toy_tokenizer, tmp_path), print, "run", ())
    c.digests["model"], c.artifacts["model"] = "d1", {"base_model": "s1"}
    assert c.upstream("model", "data") == {"model": {"digest": "d1", "artifacts": {"base_model": "s1"}},
                                           "data": {"digest": None, "artifacts": {}}}  # fmt: skip
