"""Chat templates: render a normalized conversation into training text with trainable character spans.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}: an optional system
message, then user/assistant turns alternating, ending with an assistant message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.errors import UserError

ROLES = ("system", "user", "assistant")
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
LLAMA2_DEFAULT_EOS = "</s>"


class TemplateError(UserError):
    """A conversation cannot be rendered, or a tokenizer's chat template cannot be used."""


@dataclass(frozen=True)
class Rendered:
    text: str
    train_spans: list[tuple[int, int]]
    prompt: str


def validate_messages(messages: Sequence[dict], *, final_role: str = "assistant") -> None:
    """Raise TemplateError unless messages are [system?] user, assistant, user, ... ending in final_role."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise TemplateError("messages must be a non-empty list of {'role', 'content'} objects")
    expected = "user"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TemplateError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise TemplateError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TemplateError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise TemplateError(f"messages[{i}]: a system message is only allowed first")
            continue
        if role != expected:
            raise TemplateError(f"messages[{i}]: expected role {expected!r}, got {role!r}")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != final_role:
        raise TemplateError(
            f"conversation must end with an {final_role} message, not {messages[-1]['role']!r}"
        )


@dataclass(frozen=True)
class _Segment:
    text: str
    trained: bool = False
    answer_start: bool = False  # marks where an assistant response begins


@dataclass
class Template:
    """Renders conversations. `segments(messages, add_generation_prompt)` yields the pieces of the text."""

    name: str
    stop_strings: list[str]
    _segments: Callable[[Sequence[dict], bool], list[_Segment]] = field(repr=False)
    special: tuple[
        str, ...
    ] = ()  # the control tokens it writes: each must be one token of the model's vocabulary

    def render(self, messages: Sequence[dict]) -> Rendered:
        validate_messages(messages)
        text, spans, prompt_end = _join(self._segments(messages, False))
        weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
        if 0 in weights:  # every template trains one span per assistant turn: drop those weighted 0
            if len(spans) != len(weights):
                raise TemplateError(f"{len(spans)} trained spans for {len(weights)} assistant turns")
            spans = [s for s, w in zip(spans, weights, strict=True) if w]
        return Rendered(text=text, train_spans=spans, prompt=text[:prompt_end])

    def render_prompt(self, messages: Sequence[dict]) -> str:
        """Text to feed a model so it generates the next assistant response (messages end with a user turn)."""
        validate_messages(messages, final_role="user")
        text, _, _ = _join(self._segments(messages, True))
        return text


def _join(segments: list[_Segment]) -> tuple[str, list[tuple[int, int]], int]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = prompt_end = 0
    for seg in segments:
        if seg.answer_start:
            prompt_end = pos
        if seg.trained and seg.text:
            spans.append((pos, pos + len(seg.text)))
        parts.append(seg.text)
        pos += len(seg.text)
    return "".join(parts), spans, prompt_end


def _split_system(messages: Sequence[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def _chatml(messages: Sequence[dict], gen: bool) -> list[_Segment]:
    out: list[_Segment] = []
    for msg in messages:
        header = f"<|im_start|>{msg['role']}\n"
        if msg["role"] == "assistant":
            out += [_Segment(header), _Segment(msg["content"] + "<|im_end|>", True, True), _Segment("\n")]
        else:
            out.append(_Segment(f"{header}{msg['content']}<|im_end|>\n"))
    if gen:
        out.append(_Segment("<|im_start|>assistant\n"))
    return out


def _llama3(messages: Sequence[dict], gen: bool) -> list[_Segment]:
    out = [_Segment("<|begin_of_text|>")]
    for msg in messages:
        header = f"<|start_header_id|>{msg['role']}<|end_header_id|>\n\n"
        if msg["role"] == "assistant":
            out += [_Segment(header), _Segment(msg["content"] + "<|eot_id|>", True, True)]
        else:
            out.append(_Segment(f"{header}{msg['content']}<|eot_id|>"))
    if gen:
        out.append(_Segment("<|start_header_id|>assistant<|end_header_id|>\n\n"))
    return out


def _llama2(eos: str) -> Callable[[Sequence[dict], bool], list[_Segment]]:
    # Meta's format: "<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST] {answer} </s>" per turn. The space
    # before the answer belongs to the answer, so a prompt ending in "[/INST]" tokenizes as in training.
    def segments(messages: Sequence[dict], gen: bool) -> list[_Segment]:
        system, turns = _split_system(messages)
        out: list[_Segment] = []
        for msg in turns:
            if msg["role"] == "user":
                sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system is not None and not out else ""
                out.append(_Segment(f"<s>[INST] {sys_block}{msg['content']} [/INST]"))
            else:
                out.append(_Segment(f" {msg['content']} {eos}", True, True))
        return out

    return segments


def _alpaca(eos: str) -> Callable[[Sequence[dict], bool], list[_Segment]]:
    def segments(messages: Sequence[dict], gen: bool) -> list[_Segment]:
        system, turns = _split_system(messages)
        out = [_Segment(ALPACA_PREAMBLE if system is None else system)]
        for msg in turns:
            if msg["role"] == "user":
                out.append(_Segment(f"\n\n### Instruction:\n{msg['content']}\n\n### Response:\n"))
            else:
                out.append(_Segment(msg["content"] + eos, True, True))
        return out

    return segments


def _gemma(messages: Sequence[dict], gen: bool) -> list[_Segment]:
    # Google's Gemma format: a system prompt opens the first user turn; the assistant's role is "model". No
    # <bos> in the text: Gemma's tokenizer adds it (a rendered <bos> would be doubled).
    system, turns = _split_system(messages)
    out: list[_Segment] = []
    for i, msg in enumerate(turns):
        if msg["role"] == "user":
            prefix = f"{system}\n\n" if system is not None and i == 0 else ""
            out.append(_Segment(f"<start_of_turn>user\n{prefix}{msg['content']}<end_of_turn>\n"))
        else:
            answer = _Segment(msg["content"] + "<end_of_turn>", True, True)
            out += [_Segment("<start_of_turn>model\n"), answer, _Segment("\n")]
    if gen:
        out.append(_Segment("<start_of_turn>model\n"))
    return out


def _plain(eos: str) -> Callable[[Sequence[dict], bool], list[_Segment]]:
    # For models without a chat format (GPT-2): "question\nanswer<eos>"; the answer and its EOS are trained.
    def segments(messages: Sequence[dict], gen: bool) -> list[_Segment]:
        system, turns = _split_system(messages)
        out = [_Segment(f"{system}\n\n")] if system is not None else []
        for msg in turns:
            if msg["role"] == "user":
                out.append(_Segment(f"{msg['content']}\n"))
            else:
                out.append(_Segment(msg["content"] + eos, True, True))
        return out

    return segments


def _tokenizer_template(tokenizer: Any) -> Template:
    def apply(messages: Sequence[dict], gen: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
        except Exception as exc:  # jinja errors surface as many types; keep the template's own message
            raise TemplateError(f"the tokenizer's chat template failed: {exc}") from exc
        if not isinstance(text, str):
            raise TemplateError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
            )
        return text

    def segments(messages: Sequence[dict], gen: bool) -> list[_Segment]:
        # Render each prefix; the template must only ever append, so every boundary is a prefix length.
        full = apply(messages, gen)
        out: list[_Segment] = []
        pos = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            before = apply(messages[:i], True)
            upto = apply(messages[: i + 1], False)
            if not upto.startswith(before) or not full.startswith(upto) or len(before) < pos:
                raise TemplateError(
                    "the tokenizer's chat template is not prefix-stable (rendering a longer conversation "
                    f"changes earlier text at message {i}); use a built-in template such as 'chatml'"
                )
            answer = upto[len(before) :].rstrip()
            if msg["content"].strip() not in answer:
                raise TemplateError(
                    f"the tokenizer's chat template does not render message {i}'s content verbatim"
                )
            out += [_Segment(full[pos : len(before)]), _Segment(answer, True, True)]
            pos = len(before) + len(answer)
        out.append(_Segment(full[pos:]))
        return out

    return Template("tokenizer", _tokenizer_stop_strings(tokenizer, apply), segments)


def _tokenizer_stop_strings(tokenizer: Any, apply: Callable[[Sequence[dict], bool], str]) -> list[str]:
    probe = [{"role": "user", "content": "ping"}]
    before = apply(probe, True)
    after = apply([*probe, {"role": "assistant", "content": "pong"}], False)
    stops = []
    if after.startswith(before) and "pong" in after[len(before) :]:
        end_marker = after[len(before) :].split("pong", 1)[1].strip()
        if end_marker:
            stops.append(end_marker)
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos and eos not in stops:
        stops.append(eos)
    return stops


TEMPLATE_NAMES = ("alpaca", "auto", "chatml", "gemma", "llama2", "llama3", "plain", "tokenizer")
# Markers of a chat template's family in its Jinja source, most specific first.
FAMILY_MARKERS = (
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|start_header_id|>", "llama3"),
    ("[INST]", "llama2"),
)


def auto_template_name(tokenizer: Any) -> str:
    """What "auto" means for this tokenizer: the built-in format of its chat template's family (without a
    system prompt the template injects: SmolLM2's adds ~30 tokens to every example), "plain" when it has no
    chat template (GPT-2), or "tokenizer" (its own template, as is) when the family is not one we know."""
    if tokenizer is None:
        raise TemplateError("template 'auto' is chosen from the model's tokenizer: pass tokenizer=")
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        return "plain"
    return next((name for marker, name in FAMILY_MARKERS if marker in str(source)), "tokenizer")


LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def split_special_tokens(template: Template, tokenizer: Any) -> dict[str, int]:
    """{control token: how many tokens it becomes} for each of the template's that the vocabulary lacks."""
    tok = tokenizer._tokenizer if not callable(tokenizer) and hasattr(tokenizer, "_tokenizer") else tokenizer
    counts = {s: len(tok(s, add_special_tokens=False)["input_ids"]) for s in template.special}
    return {s: n for s, n in counts.items() if n != 1}


def check_special_tokens(template: Template, tokenizer: Any) -> None:
    """A template whose control tokens this model splits (llama3's <|eot_id|> on SmolLM2: 9 pieces) would
    teach the model to spell its markers, and stop strings would end answers a few tokens late."""
    if tokenizer is None or not (split := split_special_tokens(template, tokenizer)):
        return
    pieces = ", ".join(f"{s} -> {n} tokens" for s, n in split.items())
    raise TemplateError(
        f"data.template {template.name!r} writes control tokens this model's vocabulary does not have as one "
        f"token ({pieces}); use data.template=auto, the model's own format ({auto_template_name(tokenizer)!r})"
    )


def get_template(name: str, tokenizer: Any = None) -> Template:
    """Template by name. "tokenizer" uses tokenizer.apply_chat_template; "auto" picks by the tokenizer's family
    (auto_template_name); alpaca ends answers with its EOS."""
    if name == "auto":
        name = auto_template_name(tokenizer)
    if name == "chatml":
        return Template("chatml", ["<|im_end|>"], _chatml, ("<|im_start|>", "<|im_end|>"))
    if name == "llama3":
        return Template("llama3", ["<|eot_id|>"], _llama3, LLAMA3_SPECIAL)
    if name == "gemma":
        return Template("gemma", ["<end_of_turn>"], _gemma, ("<start_of_turn>", "<end_of_turn>"))
    if name == "plain":
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise TemplateError("template 'plain' ends each answer with the tokenizer's EOS: pass tokenizer=")
        return Template("plain", [eos], _plain(eos), (eos,))
    if name in ("llama2", "alpaca"):
        eos = getattr(tokenizer, "eos_token", None) or LLAMA2_DEFAULT_EOS
        if name == "llama2":
            return Template("llama2", [eos], _llama2(eos), ("<s>", eos))
        return Template("alpaca", [eos, "### Instruction:"], _alpaca(eos), (eos,))
    if name == "tokenizer":
        if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
            raise TemplateError(
                "template 'tokenizer' needs a tokenizer with apply_chat_template (pass tokenizer=)"
            )
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'tokenizer': this tokenizer has no chat_template; pick a built-in one"
            )
        return _tokenizer_template(tokenizer)
    raise TemplateError(f"unknown template {name!r}; valid names: {', '.join(TEMPLATE_NAMES)}")
