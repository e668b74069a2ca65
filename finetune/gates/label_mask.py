"""The label-mask gate: the tokens that carried loss in the batches training used are the answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune.gates.verdict import Verdict, verdict


@dataclass(frozen=True)
class MaskedRow:
    """One training row as training saw it: its decoded runs of loss-carrying tokens, and the answers."""

    row: int
    runs: list[str]  # decoded text of each contiguous run of tokens whose loss mask is 1
    answers: list[str]  # the assistant messages' contents, in order (empty for raw text rows)
    n_tokens: int
    n_masked: int
    truncated: bool


def _covers(run: str, answer: str, truncated: bool, end_markers: Sequence[str]) -> bool:
    """The run is exactly the answer, then exactly one end marker: a model that never trains its end marker
    never learns to stop (a longer run trained prompt text too). A row cut by max_seq_length may end early."""
    run, answer = run.strip(), answer.strip()
    if run.startswith(answer):
        rest = run[len(answer) :].strip()
        return rest in end_markers or (rest == "" and (truncated or not end_markers))
    return truncated and answer.startswith(run)  # the row was cut inside this answer


def label_mask(rows: Sequence[MaskedRow], *, mask_prompt: bool, end_markers: Sequence[str] = ()) -> Verdict:
    """mask_prompt on: one run per assistant turn, each exactly that answer plus one of the template's end
    markers (when it has any); no prompt text trained. Off: every token after the first carries loss."""
    name = "label_mask"
    if not rows:
        return verdict(name, False, None, 1.0, "no recorded training rows to check")
    bad: list[str] = []
    for r in rows:
        if not mask_prompt or not r.answers:
            if r.n_masked < r.n_tokens - 1:
                bad.append(f"row {r.row}: {r.n_masked}/{r.n_tokens} tokens trained, expected all")
            continue
        if len(r.runs) != len(r.answers) and not (r.truncated and len(r.runs) < len(r.answers)):
            bad.append(
                f"row {r.row}: {len(r.runs)} trained spans for {len(r.answers)} answers "
                f"(first: {r.runs[0][:40] if r.runs else ''!r})"
            )
            continue
        for run, answer in zip(r.runs, r.answers, strict=False):
            if not _covers(run, answer, r.truncated, [m.strip() for m in end_markers]):
                bad.append(
                    f"row {r.row}: trained {run.strip()[:50]!r}, the answer is {answer.strip()[:50]!r}"
                )
                break
    share = 1 - len(bad) / len(rows)
    what = "answers only" if mask_prompt else "every token"
    detail = f"{len(rows) - len(bad)}/{len(rows)} rows train {what}"
    if bad:
        detail += "; " + "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
    return verdict(name, not bad, share, 1.0, detail, {"problems": bad[:20]})
