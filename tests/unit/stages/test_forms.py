"""The pipeline's shipping forms (export.adapters, export.gguf_types): each shipped by deps.ship_form, its gates
required, one verdict per gate over every form, a failed or unjudged form never green (the real forms' own
judging is in tests/unit/recipes/test_export_*.py, tier 3 and the fault suite)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from finetune.config.loader import load_config
from finetune.evaluate.evaluation import EvalSettings
from finetune.gates.verdict import Verdict, skipped, verdict
from finetune.recipes.commands import RECIPES
from finetune.recipes.export_adapter import Shipped
from finetune.stages.forms import combined, form_gates
from finetune.stages.rundir import own_config
from tests.unit.recipes.test_pipeline import World

FORMS = ["export.adapters=[peft, gguf-lora]", "export.gguf_types=[q8_0, q4_K_M]"]


class FakeShipper:
    """Writes a small file per form into RUN/export/<form>/ and judges it as told."""

    def __init__(self):
        self.calls, self.status = [], {}  # form -> {gate: "failed" | "skipped"}
        self.done, self.later = [], []  # forms shipped; (form, the forms shipped when its later() ran)

    def __call__(self, cfg, run_dir, base, form, locate_ollama, ollama_server, *, speed=True):
        self.calls.append(form)
        out = Path(run_dir) / "export" / form.replace(":", "-")
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.bin").write_bytes(form.encode())
        family = form.split(":")[0]
        names = {"peft": ["peft_parity"], "gguf-lora": ["gguf_lora_parity", "served_adapter"]}.get(
            family, ["quant_types", "quant_quality", "quant_answers"]
        )
        verdicts = [self._verdict(n, self.status.get(form, {}).get(n, "passed")) for n in names]
        extra = {"quantized": {"kl_mean": 0.01, "top1": 0.97, "scores": {}}} if family == "gguf" else {}
        later = None
        if family == "gguf" and not speed:  # as export_adapter.ship leaves it: measured when called

            def later():
                self.later.append((form, list(self.done)))
                speeds = {"llamacpp_tokens_per_second": 90.0, "ollama_tokens_per_second": 80.0}
                extra["quantized"].update(speeds)
                return speeds

        self.done.append(form)
        return Shipped(form, out, verdicts, {"model.bin": len(form)}, extra, later)

    @staticmethod
    def _verdict(name: str, status: str) -> Verdict:
        if status == "skipped":
            return skipped(name, "no Ollama to serve it with")
        return verdict(name, status == "passed", 0.01 if status == "passed" else 0.3, 0.1, f"{name} {status}")


@pytest.fixture
def world(tmp_path, toy_tokenizer):
    return World(tmp_path, toy_tokenizer)


def _run(world, shipper, *sets):
    cfg = own_config(world.root / "run", load_config("release", overrides=["data.num_examples=40", *sets]))
    deps = replace(world.deps(), ship_form=shipper)
    return RECIPES["pipeline"](cfg, world.root / "run", deps, log=lambda _: None, settings=EvalSettings())


def test_every_configured_form_is_shipped_and_its_gates_are_required(world):
    shipper = FakeShipper()
    result = _run(world, shipper, *FORMS)
    rep = result.report
    assert result.exit_code == 0 and rep.status == "passed", rep.reasons
    assert [s.name for s in rep.stages][-1] == "ship"
    ship = next(s for s in rep.stages if s.name == "ship")
    assert sorted(shipper.calls) == sorted(["peft", "gguf-lora", "gguf:q8_0", "gguf:q4_K_M"])
    quantized = [c for c in shipper.calls if c.startswith("gguf:")]
    assert quantized == ["gguf:q8_0", "gguf:q4_K_M"] and [c for c in shipper.calls if c not in quantized] == [
        "peft",
        "gguf-lora",
    ]
    assert list(ship.details["forms"]) == [
        "peft",
        "gguf-lora",
        "gguf:q8_0",
        "gguf:q4_K_M",
    ]  # the config's order
    assert all(row["seconds"] >= 0 for row in ship.details["forms"].values())
    gates = {g.name: g for g in rep.gates}
    assert {"peft_parity", "gguf_lora_parity", "served_adapter", "quant_types", "quant_quality"} <= set(gates)
    assert set(gates["quant_quality"].data["forms"]) == {"gguf:q8_0", "gguf:q4_K_M"}
    assert ship.details["forms"]["gguf:q4_K_M"]["kl_mean"] == 0.01
    assert {a.name for a in ship.artifacts} == {f"export {f}" for f in shipper.calls}


def test_the_quantized_forms_ship_beside_the_adapter_forms(world):
    import threading

    started = {"peft": threading.Event(), "gguf:q8_0": threading.Event()}
    met = {}

    class Meeting(FakeShipper):
        """peft and q8_0 each wait (5 s at most) until the other has started: only side by side do both meet."""

        def __call__(self, cfg, run_dir, base, form, *rest, **kw):
            if form in started:
                started[form].set()
                other = next(f for f in started if f != form)
                met[form] = started[other].wait(5)
            return super().__call__(cfg, run_dir, base, form, *rest, **kw)

    shipper = Meeting()
    result = _run(world, shipper, *FORMS)
    assert result.exit_code == 0 and met == {"peft": True, "gguf:q8_0": True}
    # their speeds are measured after every form was shipped, one after the other, and reach the report
    everything = sorted(["peft", "gguf-lora", "gguf:q8_0", "gguf:q4_K_M"])
    assert [(f, sorted(done)) for f, done in shipper.later] == [
        ("gguf:q8_0", everything),
        ("gguf:q4_K_M", everything),
    ]
    ship = next(s for s in result.report.stages if s.name == "ship")
    assert ship.details["forms"]["gguf:q4_K_M"]["ollama_tokens_per_second"] == 80.0


def test_quantized_forms_alone_measure_their_speed_as_they_ship(world):
    shipper = FakeShipper()
    result = _run(world, shipper, "export.adapters=[]", "export.gguf_types=[q8_0, q4_K_M]")
    assert result.exit_code == 0 and shipper.calls == ["gguf:q8_0", "gguf:q4_K_M"] and shipper.later == []


def test_a_quantized_form_that_raises_fails_the_ship_stage(world):
    class Broken(FakeShipper):
        def __call__(self, cfg, run_dir, base, form, *rest, **kw):
            if form == "gguf:q4_K_M":
                raise RuntimeError("the quantizer crashed")
            return super().__call__(cfg, run_dir, base, form, *rest, **kw)

    result = _run(world, Broken(), *FORMS)
    ship = next(s for s in result.report.stages if s.name == "ship")
    assert ship.status == "failed" and "the quantizer crashed" in ship.reason and result.exit_code != 0


def test_one_failed_form_fails_the_run_naming_it(world):
    shipper = FakeShipper()
    shipper.status = {"gguf:q4_K_M": {"quant_quality": "failed"}}
    result = _run(world, shipper, *FORMS)
    g = next(g for g in result.report.gates if g.name == "quant_quality")
    assert result.exit_code == 1 and g.status == "failed" and g.measured == 0.3
    assert g.data["worst"] == "gguf:q4_K_M" and "gguf:q8_0: quant_quality passed" in g.detail


def test_a_form_judged_by_no_one_is_degraded_not_passed(world):
    shipper = FakeShipper()
    shipper.status = {"gguf-lora": {"served_adapter": "skipped"}}
    result = _run(world, shipper, *FORMS)
    assert result.exit_code == 3 and result.report.status == "degraded"
    assert any("served_adapter" in r for r in result.report.reasons)
    world.environ["FT_ALLOW_SKIP"] = "ollama"  # served_adapter's runtime: the user may allow it
    assert _run(world, shipper, *FORMS).exit_code == 0


def test_without_ollama_the_quantized_forms_are_skipped_saying_why_and_the_adapters_still_ship(world):
    shipper, world.ollama_binary = FakeShipper(), None
    result = _run(world, shipper, *FORMS)
    gates = {g.name: g for g in result.report.gates}
    assert shipper.calls == ["peft", "gguf-lora"] and result.exit_code == 3
    assert (
        gates["quant_quality"].status == "skipped" and "Ollama's quantizer" in gates["quant_quality"].detail
    )
    assert gates["peft_parity"].status == "passed"


def test_without_an_exporter_wired_in_the_forms_are_skipped_not_passed(world):
    result = _run(world, None, *FORMS)
    ship = next(s for s in result.report.stages if s.name == "ship")
    assert result.exit_code == 3 and ship.status == "skipped" and "ship_form" in ship.reason


def test_no_forms_configured_ships_nothing_and_requires_no_export_gate(world):
    shipper = FakeShipper()
    result = _run(world, shipper)
    assert result.exit_code == 0 and shipper.calls == []
    assert "ship" not in [s.name for s in result.report.stages]
    assert form_gates(load_config("release")) == ()


def test_a_combined_verdict_is_the_worst_forms():
    per_form = {"a": verdict("g", True, 0.01, 0.1, "ok"), "b": skipped("g", "no runtime")}
    assert combined("g", per_form).status == "skipped"
    per_form["c"] = verdict("g", False, 0.5, 0.1, "bad")
    v = combined("g", per_form)
    assert (v.status, v.measured, v.data["worst"]) == ("failed", 0.5, "c")
