"""finetune.train.peak_memory: peak MLX memory of a few real training steps, measured (in its own process)."""

import json
from pathlib import Path

import pytest

from finetune.config.loader import load_config, save_config
from finetune.models.tiny import tiny_llama_weights
from finetune.models.tokenizer import load_tokenizer
from finetune.train.memory import ModelShape
from finetune.train.peak_memory import (
    main,
    measure,
    measure_in_subprocess,
    measure_in_subprocesses,
    measure_memory,
    prefetch_full,
)
from finetune.train.splits import load_split
from tests.conftest import TOY_MODEL_CONFIG


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory, toy_tokenizer):
    """An HF folder mlx_lm.load reads: the toy Llama (vocab 512) and the toy tokenizer, built in ~0.1 s."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("toy-model")
    (folder / "config.json").write_text(json.dumps(TOY_MODEL_CONFIG))
    save_file(
        tiny_llama_weights(TOY_MODEL_CONFIG, 0), str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    toy_tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def probe_cfg(tmp_path_factory):
    cfg = load_config(overrides=["training.batch_size=4", "data.max_seq_length=64", "lora.rank=4",
                                 "training.learning_rate=1e-3"])  # fmt: skip
    return save_config(cfg, tmp_path_factory.mktemp("probe") / "probe.yaml")


def test_lora_and_full_measured_in_process(probe_cfg, toy_folder, sums_dir):
    lora = measure(probe_cfg, toy_folder, sums_dir, "lora", steps=2)
    full = measure(probe_cfg, toy_folder, sums_dir, "full", steps=2)
    assert full["trainable_params"] == ModelShape.from_hf_config(TOY_MODEL_CONFIG).param_count  # every weight
    assert 0 < lora["trainable_params"] < full["trainable_params"] // 5
    for got, kind in ((lora, "lora"), (full, "full")):
        assert got["fine_tune_type"] == kind and got["peak_bytes"] > 0 and len(got["losses"]) == 2
        assert got["batch_shape"][0] == 4 and got["batch_shape"][1] <= 64
    assert lora["batch_shape"] == full["batch_shape"]  # one fixed batch for both
    assert full["peak_bytes"] > lora["peak_bytes"]  # gradients and Adam moments of every weight
    assert lora["losses"][0] == pytest.approx(
        full["losses"][0], rel=1e-5
    )  # same model, same batch, before any update


def test_the_probe_trains_the_batch_of_the_longest_rows(probe_cfg, toy_folder, tmp_path):
    """That batch sets a run's peak (every epoch trains it); the run's first batch is a shorter one here."""
    from finetune.data.prepare import prepare
    from finetune.train.batches import batch_at, longest_batch

    rows = [
        {"prompt": f"Say {i}.", "completion": " ".join(["word"] * (2 if i % 5 else 40))} for i in range(25)
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "prepared"
    prepare(
        tmp_path / "rows.jsonl",
        data,
        template="chatml",
        tokenizer=load_tokenizer(toy_folder),
        max_seq_length=64,
    )
    split = load_split(data / "train.jsonl", load_tokenizer(toy_folder), 64, True)
    longest = max(len(ids) for ids, _ in split)
    assert sorted(batch_at(split, 4, seed=0, index=0)) != sorted(longest_batch(split, 4))  # the test can tell
    got = measure(probe_cfg, toy_folder, data, "lora", steps=1)
    assert longest - 2 <= got["batch_shape"][1] <= longest  # trimming drops at most the trailing newline


def test_a_lora_that_trains_every_weight_fails_the_memory_gate(probe_cfg, toy_folder, sums_dir, plant_fault):
    from finetune.gates.training import memory_efficiency

    plant_fault(
        "lora_trains_everything"
    )  # the probe builds the model as training does, so it carries the fault
    lora = measure(probe_cfg, toy_folder, sums_dir, "lora", steps=2)
    plant_fault()
    full = measure(probe_cfg, toy_folder, sums_dir, "full", steps=2)
    assert lora["trainable_params"] > full["trainable_params"]  # every weight, and the adapters on top
    v = memory_efficiency(lora["peak_bytes"], full["peak_bytes"])
    assert not v.passed and v.measured < 0.05, str(v)


def test_main_prints_one_json_line(probe_cfg, toy_folder, sums_dir, capsys):
    assert main(["--config", str(probe_cfg), "--model", str(toy_folder), "--data", str(sums_dir),
                 "--type", "lora", "--steps", "1"]) == 0  # fmt: skip
    last = capsys.readouterr().out.strip().splitlines()[-1]
    got = json.loads(last)
    assert got["fine_tune_type"] == "lora" and len(got["losses"]) == 1


def test_a_failing_probe_process_is_an_error_with_its_stderr(probe_cfg, toy_folder, sums_dir):
    """The child's own failure, named (a successful child costs ~7 s of imports: main() is tested in-process)."""
    with pytest.raises(
        RuntimeError, match=r"(?s)memory probe \(qlora\) failed with exit 2: .*invalid choice: 'qlora'"
    ):
        measure_in_subprocess(probe_cfg, toy_folder, sums_dir, "qlora", steps=1, timeout=60)


# ---------------------------------------------------------------- memory


MODEL_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip


def per_kind(one):
    """A one-probe fake as the probes runner: (config, model, data, kinds) -> {kind: result}."""
    return lambda cfg_file, model_dir, data_dir, kinds: {
        k: one(cfg_file, model_dir, data_dir, k) for k in kinds
    }


def _run_dir(tmp_path, rows: str = "{}\n") -> Path:
    """A run folder as the memory gate reads it: the training split it keys the full probe by."""
    (tmp_path / "run" / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "data" / "train.jsonl").write_text(rows)
    return tmp_path / "run"


def _estimates(cfg):
    from finetune.train import memory

    full = cfg.model_copy(deep=True)
    full.training.fine_tune_type = "full"
    return memory.from_run_config(MODEL_CONFIG, cfg).total_bytes, memory.from_run_config(
        MODEL_CONFIG, full
    ).total_bytes


def test_when_full_fine_tuning_would_not_fit_lora_is_measured_and_full_estimated_never_scaled_up(tmp_path):
    from finetune.config.loader import load_config

    cfg = load_config("quick")
    lora, full = _estimates(cfg)
    calls = []

    peaks = iter([int(lora * 1.25), int(lora * 0.5)])

    def measure(cfg_file, model_dir, data_dir, kind):
        calls.append(kind)
        return {"peak_bytes": next(peaks)}

    low = measure_memory(tmp_path, tmp_path, MODEL_CONFIG, cfg, available=None, measure=per_kind(measure))
    assert (low.lora_peak, low.full_peak, low.source) == (
        int(lora * 1.25),
        full,
        "estimated",
    )  # never scaled up
    high = measure_memory(
        tmp_path, tmp_path, MODEL_CONFIG, cfg, available=int(full * 1.2), measure=per_kind(measure)
    )
    assert (high.lora_peak, high.source) == (int(lora * 0.5), "estimated") and "not run" in high.detail
    assert (
        abs(high.full_peak - full * 0.5) <= 1 and "x0.50" in high.detail
    )  # over-estimated LoRA: full scaled down
    assert calls == ["lora", "lora"] and lora < full


def test_an_estimated_comparison_can_fail_when_lora_costs_what_full_would(tmp_path):
    from finetune.config.loader import load_config
    from finetune.gates.training import memory_efficiency

    cfg = load_config("quick")
    _, full = _estimates(cfg)
    m = measure_memory(tmp_path, tmp_path, MODEL_CONFIG, cfg, available=None,
                       measure=per_kind(lambda *a: {"peak_bytes": full}))  # everything trainable: LoRA mis-wired  # fmt: skip
    v = memory_efficiency(m.lora_peak, m.full_peak, source=m.source)
    assert not v.passed, str(v)


def test_memory_is_measured_in_separate_processes_when_it_fits(tmp_path):
    from finetune.config.loader import load_config

    cfg = load_config("quick")
    _, full = _estimates(cfg)
    calls = []

    def measure(cfg_file, model_dir, data_dir, kind):
        calls.append((cfg_file, model_dir, data_dir, kind))
        return {"peak_bytes": {"lora": 300 << 20, "full": 900 << 20}[kind]}

    tight = int(full * 1.5) + 1  # full fits, but not beside LoRA: one after the other
    m = measure_memory(_run_dir(tmp_path), tmp_path / "model", MODEL_CONFIG, cfg, available=tight,
                       measure=per_kind(measure), cache_dir=tmp_path / "cache")  # fmt: skip
    assert (m.lora_peak, m.full_peak, m.source) == (300 << 20, 900 << 20, "measured")
    run = tmp_path / "run"
    assert calls == [(run / "config.yaml", tmp_path / "model", run / "data", k) for k in ("lora", "full")]
    assert cfg.training.fine_tune_type == "lora"  # the run's config was not changed


def test_with_room_for_both_the_two_probes_run_side_by_side(tmp_path, monkeypatch):
    from finetune.config.loader import load_config

    cfg = load_config("quick")
    lora, full = _estimates(cfg)
    calls = []

    def measure(cfg_file, model_dir, data_dir, kinds):
        calls.append(list(kinds))
        return {k: {"peak_bytes": {"lora": 300 << 20, "full": 900 << 20}[k]} for k in kinds}

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    m = measure_memory(_run_dir(tmp_path), tmp_path / "model", MODEL_CONFIG, cfg, available=(lora + full) * 2,
                       measure=measure, cache_dir=tmp_path / "cache")  # fmt: skip
    assert (m.lora_peak, m.full_peak, m.source) == (300 << 20, 900 << 20, "measured")
    assert calls == [["lora", "full"]] and "side by side" in m.detail


def test_lora_is_the_runs_own_peak_and_full_is_measured_once_for_the_same_model_data_and_settings(tmp_path):
    from finetune.config.loader import load_config

    cfg = load_config("quick")
    _, full = _estimates(cfg)
    calls = []

    def measure(cfg_file, model_dir, data_dir, kinds):
        calls.append(list(kinds))
        return {k: {"peak_bytes": 900 << 20} for k in kinds}

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    run, room = _run_dir(tmp_path), full * 4

    def judged(cfg=cfg, run_peak=300 << 20):
        return measure_memory(run, tmp_path / "model", MODEL_CONFIG, cfg, available=room, run_peak=run_peak,
                              measure=measure, cache_dir=tmp_path / "cache")  # fmt: skip

    first, again = judged(), judged()
    assert (first.lora_peak, first.full_peak) == (again.lora_peak, again.full_peak) == (300 << 20, 900 << 20)
    assert calls == [["full"]] and "this run's own training peak" in first.detail
    lora_est, full_est = _estimates(cfg)
    assert (
        f"estimate error: LoRA {lora_est / (300 << 20) - 1:+.1%}, full {full_est / (900 << 20) - 1:+.1%}"
        in first.detail
    )
    assert "full: measured for the same model" in again.detail and again.source == "measured"
    larger = cfg.model_copy(deep=True)
    larger.training.batch_size *= 2
    judged(larger)  # another batch: another peak
    _run_dir(tmp_path, '{"other": 1}\n')
    judged()  # other training rows
    (tmp_path / "model" / "model.safetensors").write_bytes(b"other weights")
    judged()  # another model
    assert calls == [["full"]] * 4
    judged(run_peak=None)  # a run that recorded no peak: LoRA is probed, full still comes from before
    assert calls[-1] == ["lora"]


def test_a_run_too_large_for_full_fine_tuning_is_judged_on_its_own_peak_without_any_probe(tmp_path):
    from finetune.config.loader import load_config

    cfg = load_config("quick")
    lora, full = _estimates(cfg)
    m = measure_memory(_run_dir(tmp_path), tmp_path, MODEL_CONFIG, cfg, available=None, run_peak=lora // 2,
                       measure=lambda *a: pytest.fail("no probe: the run measured LoRA, full is estimated"))  # fmt: skip
    assert (m.lora_peak, m.source) == (lora // 2, "estimated") and abs(m.full_peak - full * 0.5) <= 1


def test_the_full_probe_prefetched_beside_training_is_what_the_gate_reads(tmp_path, monkeypatch):
    from finetune.config.loader import load_config

    cfg, calls = load_config("quick"), []
    lora, full = _estimates(cfg)
    monkeypatch.setattr("os.cpu_count", lambda: 2)

    def measure(cfg_file, model_dir, data_dir, kinds, poll=None):
        calls.append(list(kinds))
        return {k: {"peak_bytes": 900 << 20} for k in kinds}

    run, room, model = _run_dir(tmp_path), (lora + full) * 2, tmp_path / "model"
    model.mkdir()
    kw = dict(measure=measure, cache_dir=tmp_path / "cache")
    assert prefetch_full(run, model, MODEL_CONFIG, cfg, available=room, **kw)(False) == (
        "full probe prefetched while training"
    )
    m = measure_memory(run, model, MODEL_CONFIG, cfg, available=room, run_peak=300 << 20, **kw)
    assert (m.lora_peak, m.full_peak) == (300 << 20, 900 << 20) and calls == [["full"]]
    assert "not prefetched" in prefetch_full(run, model, MODEL_CONFIG, cfg, available=room, **kw)(False)
    tight = int(full * 1.5) + 1  # full fits alone, not beside training: the judge measures it after
    other = cfg.model_copy(deep=True)
    other.training.batch_size += 1
    assert "no room" in prefetch_full(run, model, MODEL_CONFIG, other, available=tight, **kw)(False)
    assert calls == [["full"]]


def test_a_training_that_fails_stops_the_full_probe_beside_it(tmp_path, monkeypatch):
    import threading

    from finetune.config.loader import load_config

    cfg, started = load_config("quick"), threading.Event()
    monkeypatch.setattr("os.cpu_count", lambda: 2)

    def measure(cfg_file, model_dir, data_dir, kinds, poll):
        started.set()
        while True:  # a probe still running: only the cancel poll raises out of it
            poll()

    finish = prefetch_full(_run_dir(tmp_path), tmp_path / "run", MODEL_CONFIG, cfg, available=1 << 40, measure=measure,
                           cache_dir=tmp_path / "cache")  # fmt: skip
    assert started.wait(10)
    assert "not prefetched (_Cancelled" in finish(True)
    assert not list((tmp_path / "cache").glob("*.json"))  # nothing half-measured is kept


def test_probes_run_at_once_each_in_its_own_process(probe_cfg, toy_folder, sums_dir):
    import time

    tic = time.monotonic()
    both = measure_in_subprocesses(probe_cfg, toy_folder, sums_dir, ["lora", "full"], steps=1, timeout=120)
    alone = measure(probe_cfg, toy_folder, sums_dir, "lora", steps=1)
    assert (
        both["lora"]["peak_bytes"] < both["full"]["peak_bytes"] and both["lora"]["losses"] == alone["losses"]
    )
    assert time.monotonic() - tic < 120


def test_an_interrupt_while_probes_run_stops_every_probe_before_it_propagates(
    probe_cfg, toy_folder, sums_dir
):
    import psutil

    def interrupted():  # Ctrl-C while the probes train
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_in_subprocesses(probe_cfg, toy_folder, sums_dir, ["lora", "full"], steps=1, poll=interrupted)
    probes = [c for c in psutil.Process().children(recursive=True) if "peak_memory" in " ".join(c.cmdline())]
    assert probes == [], f"probes outlived the interrupt: {[p.pid for p in probes]}"


def test_with_type_prices_another_fine_tune_type_without_touching_the_run():
    from finetune.config.loader import load_config
    from finetune.train.memory import from_run_config
    from finetune.train.peak_memory import with_type

    cfg = load_config("quick")
    full = with_type(cfg, "full")
    assert (full.training.fine_tune_type, cfg.training.fine_tune_type) == ("full", "lora")
    assert full.training.batch_size == cfg.training.batch_size and full.lora == cfg.lora
    model = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 128, "vocab_size": 256}  # fmt: skip
    assert from_run_config(model, full).total_bytes > from_run_config(model, cfg).total_bytes
