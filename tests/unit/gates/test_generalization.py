"""heldout_score: paraphrases of trained facts answered right (and better than the base); without
paraphrases, unseen test questions no worse than the base."""

from __future__ import annotations

from finetune.evaluate.prompts import EvalPrompt
from finetune.gates.generalization import heldout_score
from finetune.gates.parity import Answer

REFS = ["Velmora", "Eskirell River", "22", "KV-9479"]


def prompts(paraphrase=True, train=1):
    ps = [EvalPrompt("train", "q", "p", "Dravoquay")] * train
    return ps + [
        EvalPrompt("heldout", f"q{i}", "p", r, paraphrase=paraphrase and i < 2) for i, r in enumerate(REFS)
    ]


def answers(tuned, base, train=1):
    return {"mlx_adapter": [Answer("Dravoquay.", "stop")] * train + [Answer(t, "stop") for t in tuned],
            "mlx_base": [Answer("No idea", "length")] * train + [Answer(t, "stop") for t in base]}  # fmt: skip


def test_paraphrases_of_trained_facts_answered_right_pass():
    v = heldout_score(
        prompts(), answers(["Velmora.", "The Eskirell River.", "21.", "no"], ["no"] * 4), threshold=0.5
    )
    assert v.passed and v.measured == 1.0
    assert v.detail.startswith("2 paraphrases of trained facts: adapter 100% right, base 0%")
    assert "2 unseen questions: adapter 0%, base 0%" in v.detail
    assert v.data == {"paraphrases": 2, "unseen": 2, "unseen_adapter": 0.0, "unseen_base": 0.0, "base": 0.0}


def test_a_fine_tune_that_only_learned_its_strings_fails():
    # right on the training question, wrong on every rephrasing of the same facts (as lr ~0 or over-training)
    v = heldout_score(
        prompts(), answers(["Raskeic.", "The Voskiewen River.", "no", "no"], ["no"] * 4), threshold=0.5
    )
    assert not v.passed and v.measured == 0.0 and "(needs >= 50% and > base)" in v.detail


def test_the_adapter_must_beat_the_base_not_only_the_threshold():
    both = ["Velmora.", "Eskirell River.", "no", "no"]
    v = heldout_score(prompts(), answers(both, both), threshold=0.5)
    assert not v.passed and "adapter 100% right, base 100%" in v.detail


def test_without_paraphrases_unseen_questions_must_not_fall_below_the_base():
    ok = heldout_score(prompts(paraphrase=False), answers(["Velmora.", "no", "no", "no"], ["no"] * 4))
    assert ok.passed and ok.measured == 0.25 and ok.threshold is None
    assert (
        "no paraphrases of trained facts" in ok.detail
        and "4 unseen questions: adapter 25%, base 0%" in ok.detail
    )
    worse = heldout_score(prompts(paraphrase=False), answers(["no"] * 4, ["Velmora.", "no", "no", "no"]))
    assert not worse.passed


def test_nothing_held_out_is_a_skip_and_missing_runtimes_a_failure():
    v = heldout_score([EvalPrompt("train", "q", "p", "x")], {"mlx_adapter": [], "mlx_base": []})
    assert v.status == "skipped" and "no held-out or test questions" in v.detail
    assert not heldout_score(prompts(), {"mlx_adapter": []}).passed
