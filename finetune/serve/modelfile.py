"""Ollama Modelfiles: chat TEMPLATEs that match finetune.data.templates, and the Modelfile that serves them.

Quoting values as Ollama's parser reads them, and parsing a Modelfile back, is finetune.serve.modelfile_syntax.

Templates are Go text/templates. Since Ollama 0.3, when a TEMPLATE mentions .Messages the server renders
/api/generate through it too (the prompt becomes one user message), and system messages appear both in
.System and as role "system" inside .Messages (measured on 0.5.4). The templates below therefore take the
system text only from .Messages; the `else` branch, used when there are no messages, handles .System,
.Prompt and .Response the way Ollama's library templates do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One source for the texts training renders, so the served TEMPLATE cannot drift from it.
from finetune.data.templates import ALPACA_PREAMBLE
from finetune.data.templates import LLAMA2_DEFAULT_EOS as DEFAULT_EOS
from finetune.serve.modelfile_syntax import ModelfileError, path_value, quote, scalar, triple_quote

# Measured on this 2-core box: llama.cpp with 2 threads collapsed under load (OpenMP spin-waiting).
DEFAULT_PARAMETERS: dict[str, Any] = {"num_thread": 1}
# Ollama 0.5.4's default context, written out so that another server version cannot change what users get.
DEFAULT_NUM_CTX = 2048


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    stop: list[str]


# No BOS in any template: llama.cpp's tokenizer adds it when the GGUF says add_bos_token, as for Ollama's
# own library templates. Text otherwise matches finetune.data.templates.get_template(name).render_prompt().
_CHATML = """{{- if .Messages }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
{{ end }}"""

_LLAMA3 = """{{- if .Messages }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

{{ else }}
{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>
{{- end }}"""

# Meta's format: "[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ..." where the
# first <s> is the tokenizer's BOS. The system block goes into the first user turn only.
_LLAMA2 = """{{- if .Messages }}
{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}<<SYS>>
{{ $system }}
<</SYS>>

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }} @EOS@<s>
{{- end }}
{{- end }}
{{- else }}[INST] {{ if .System }}<<SYS>>
{{ .System }}
<</SYS>>

{{ end }}{{ .Prompt }} [/INST] {{ .Response }} @EOS@
{{- end }}"""

# Like finetune.data.templates: the system text, or the standard preamble, opens the prompt.
_ALPACA = """{{- if .Messages }}
{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- if $system }}{{ $system }}{{ else }}@PREAMBLE@{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}

### Instruction:
{{ .Content }}

### Response:
{{ else if eq .Role "assistant" }}{{ .Content }}@EOS@
{{- end }}
{{- end }}
{{- else }}
{{- if .System }}{{ .System }}{{ else }}@PREAMBLE@{{ end }}

### Instruction:
{{ .Prompt }}

### Response:
{{ .Response }}
{{- end }}"""

# Gemma (verified on Ollama 0.5.4 against HF's template on 4 conversation shapes): the system text opens the
# first user turn; no <bos> (Ollama adds it); the last model turn stays open.
_GEMMA = """{{- $system := "" }}{{- $first := true }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "system" }}{{ $system = $m.Content }}
{{- else if eq $m.Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ $first = false }}{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

# No chat format (GPT-2): "question\nanswer<eos>" per turn, as finetune.data.templates renders "plain".
_PLAIN = """{{- range .Messages }}
{{- if eq .Role "system" }}{{ .Content }}

{{ else if eq .Role "user" }}{{ .Content }}
{{ else if eq .Role "assistant" }}{{ .Content }}@EOS@
{{- end }}
{{- end }}"""

FORMAT_NAMES = ("chatml", "gemma", "llama3", "llama2", "alpaca", "plain")


def chat_format(name: str, *, eos: str = DEFAULT_EOS) -> ChatFormat:
    """The Ollama TEMPLATE and stop strings for a chat format; `eos` is the model's end-of-sequence text."""
    if name == "chatml":
        return ChatFormat("chatml", _CHATML, ["<|im_end|>", "<|im_start|>"])
    if name == "llama3":
        return ChatFormat("llama3", _LLAMA3, ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])
    if name == "llama2":
        return ChatFormat("llama2", _LLAMA2.replace("@EOS@", eos), [eos, "[INST]", "[/INST]"])
    if name == "gemma":
        return ChatFormat("gemma", _GEMMA, ["<end_of_turn>"])
    if name == "plain":
        return ChatFormat("plain", _PLAIN.replace("@EOS@", eos), [eos])
    if name == "alpaca":
        text = _ALPACA.replace("@EOS@", eos).replace("@PREAMBLE@", ALPACA_PREAMBLE)
        return ChatFormat("alpaca", text, [eos, "### Instruction:"])
    hint = (
        " ('tokenizer' has no fixed format: pass deploy.template explicitly)" if name == "tokenizer" else ""
    )
    raise ModelfileError(f"unknown chat format {name!r}{hint}; valid names: {', '.join(FORMAT_NAMES)}")


def template_for(name: str, *, eos: str = DEFAULT_EOS) -> str:
    return chat_format(name, eos=eos).template


def stop_for(name: str, *, eos: str = DEFAULT_EOS) -> list[str]:
    return list(chat_format(name, eos=eos).stop)


def chatml_template() -> str:
    return _CHATML


def served_chat(data_template: str, d: Any, tokenizer: Any) -> tuple[str, list[str], str | None]:
    """(TEMPLATE, stop strings, SYSTEM) so that Ollama renders a question exactly as training rendered it.

    d is the config's deploy section (template/stop/system override the derived ones).

    data.template "tokenizer" is matched against ChatML, Gemma and Llama 3; a default system prompt that the
    tokenizer's own ChatML template injects (SmolLM2's does) becomes the Modelfile's SYSTEM.
    """
    from finetune.data.templates import auto_template_name, get_template

    eos = getattr(tokenizer, "eos_token", None) or "</s>"
    if d.template is not None:
        if not d.stop:
            raise ModelfileError(
                "deploy.template is set: give deploy.stop too (the model's end-of-turn strings)"
            )
        return d.template, list(d.stop), d.system
    name = auto_template_name(tokenizer) if data_template == "auto" else data_template
    if name in FORMAT_NAMES:
        fmt = chat_format(name, eos=eos)
        return fmt.template, list(d.stop or fmt.stop), d.system
    probe = [{"role": "user", "content": "ping"}]
    got = get_template(name, tokenizer=tokenizer).render_prompt(probe)
    bos = getattr(tokenizer, "bos_token", None)
    # a rendered BOS (Gemma's template writes "<bos>") is the token Ollama adds itself, as training did
    bare = got[len(bos) :] if bos and got.startswith(bos) else got
    for known in ("chatml", "gemma", "llama3"):
        if get_template(known).render_prompt(probe) in (got, bare):
            fmt = chat_format(known, eos=eos)
            return fmt.template, list(d.stop or fmt.stop), d.system
    chatml = get_template("chatml").render_prompt(probe)
    fmt = chat_format("chatml")
    head, sep = got[: len(got) - len(chatml)], "<|im_start|>system\n"
    if got.endswith(chatml) and head.startswith(sep) and head.endswith("<|im_end|>\n"):
        system = head[len(sep) : -len("<|im_end|>\n")]
        if d.system is not None and d.system != system:
            raise ModelfileError(
                f"deploy.system {d.system!r} differs from the system prompt the data template adds"
            )
        return fmt.template, list(d.stop or fmt.stop), system
    raise ModelfileError(
        f"data.template {name!r} renders {got[:80]!r}, which no Ollama template here reproduces: "
        "set deploy.template and deploy.stop, or use a named data.template"
    )


def served_parameters(
    configured: Mapping[str, Any], *, trained_context: int, model_context: int | None, num_predict: int
) -> dict[str, Any]:
    """The Modelfile's PARAMETERs: the configured ones, plus what a default request would otherwise leave to
    the server's version: num_ctx (the trained context, or DEFAULT_NUM_CTX when more, within the model's own
    context length) and num_predict (finetune.evaluate.budget's serve_tokens)."""
    ctx = max(trained_context, DEFAULT_NUM_CTX)
    if model_context:
        ctx = min(ctx, model_context)
    return {"num_ctx": ctx, "num_predict": min(num_predict, ctx), **dict(configured)}


def render_modelfile(
    gguf_path: str | Path,
    *,
    template: str,
    stop: Sequence[str],
    parameters: Mapping[str, Any],
    system: str | None = None,
    adapter: str | Path | None = None,
    relative_to: str | Path | None = None,
) -> str:
    """Modelfile text. DEFAULT_PARAMETERS fill in what `parameters` leaves out.

    Paths become absolute, or relative to `relative_to` (the Modelfile's folder: `ollama create` resolves them
    from there), so a Modelfile shipped with its GGUF keeps working when their folder moves.

    A list value in `parameters` becomes one PARAMETER line per item (as `stop` does).
    """
    if isinstance(stop, str):
        raise ModelfileError("stop must be a list of strings, not a single string")
    params = {**DEFAULT_PARAMETERS, **dict(parameters)}
    if "stop" in params:
        raise ModelfileError("pass stop strings with stop=, not in parameters")
    lines = [f"FROM {path_value(gguf_path, 'FROM', relative_to)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {path_value(adapter, 'ADAPTER', relative_to)}")
    lines.append(f"TEMPLATE {triple_quote(template, 'TEMPLATE')}")
    if system is not None:
        lines.append(f"SYSTEM {triple_quote(system, 'SYSTEM')}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ModelfileError(f"stop strings must be non-empty strings, got {s!r}")
        lines.append(f"PARAMETER stop {quote(s, 'stop')}")
    for key, value in params.items():
        if not key.replace("_", "").isalnum() or not key.isascii():
            raise ModelfileError(f"parameter name {key!r} must be letters, digits and '_'")
        for item in value if isinstance(value, list | tuple) else [value]:
            lines.append(f"PARAMETER {key} {scalar(item, key)}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ModelfileParts:
    """What a run's Modelfile holds besides FROM / ADAPTER: its chat format and PARAMETERs."""

    template: str
    stops: list[str]
    system: str | None
    parameters: dict[str, Any]
    model_context: int | None


def modelfile_parts(
    cfg: Any, tokenizer: Any, model_config: Mapping[str, Any], num_predict: int
) -> ModelfileParts:
    """cfg: the run's RunConfig; model_config: the base's config.json; num_predict: the data's serve budget. The
    one derivation the pipeline's Modelfile and every exported one (adapter, quantized) share."""
    from finetune.export.gguf_inspect import config_context_length

    template, stops, system = served_chat(cfg.data.template, cfg.deploy, tokenizer)
    context = config_context_length(dict(model_config))
    params = served_parameters(cfg.deploy.parameters, trained_context=cfg.data.max_seq_length,
                               model_context=context, num_predict=num_predict)  # fmt: skip
    return ModelfileParts(template, list(stops), system, params, context)
