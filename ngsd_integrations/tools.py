"""Tool calling for any chat template: rendering, grammar constraints and parsing.

Framework-free: the LangChain and LlamaIndex adapters both translate their own message and tool
types into the neutral forms here.

Format (Hermes-style), used when the chat template has no tool support of its own:

* the system message lists the tools as OpenAI function specs inside ``<tools>...</tools>``,
  followed by the calling instructions;
* a call the assistant makes is ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>``;
* a tool's result comes back in a user turn as
  ``<tool_response>{"name": NAME, "content": RESULT}</tool_response>``.

Tool-call JSON is never left to chance: :func:`tool_call_constraint` compiles an xgrammar
grammar in which the ``arguments`` object must match the tool's JSON schema, so even a 135M
model writes calls that parse and validate.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .constraints import GrammarConstraint
from .early_stop import refusal_excerpt

if TYPE_CHECKING:
    from .decoder import Generation

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "ToolCall",
    "ToolSpec",
    "answer_parts",
    "parse_tool_calls",
    "prepare_messages",
    "structured_output_constraint",
    "template_supports_tools",
    "tool_call_constraint",
    "tool_instructions",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

_CHOICES_ANY = ("required", "any")


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r} must be a non-empty string")
        if not isinstance(self.parameters, Mapping):
            raise ValueError(f"parameters={self.parameters!r} must be a JSON schema dict")

    def to_openai(self) -> dict:
        """The OpenAI function-tool form ``{"type": "function", "function": {...}}``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }

    @classmethod
    def from_openai(cls, spec: Mapping[str, Any]) -> "ToolSpec":
        """Build from an OpenAI function-tool dict (with or without the ``function`` wrapper)."""
        function = spec.get("function", spec)
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return cls(name=function["name"], description=function.get("description") or "", parameters=dict(parameters))


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name, its parsed arguments and a unique id."""

    name: str
    arguments: dict
    id: str = field(default_factory=lambda: new_call_id())

    def to_openai(self) -> dict:
        """The OpenAI assistant-message form, as tool-aware chat templates expect it."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# ---------------------------------------------------------------- chat templates
def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return template or ""


def template_supports_tools(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template renders a ``tools=`` list itself.

    Checked by rendering a conversation with and without a probe tool: a template that ignores
    tools (SmolLM2's ChatML, for one) renders both the same.
    """
    template = _template_text(tokenizer)
    if not template or "tools" not in template:
        return False
    messages = [{"role": "user", "content": "hi"}]
    probe = ToolSpec("ngsd_probe_tool", "probe", {"type": "object", "properties": {}}).to_openai()
    try:
        plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with_tools = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=[probe])
    except Exception:  # noqa: BLE001 - a template that chokes on tools does not support them
        return False
    return plain != with_tools and "ngsd_probe_tool" in with_tools


def _template_supports_system(tokenizer: Any) -> bool:
    """False for templates that raise on a system message (e.g. some Gemma / Mistral ones)."""
    if not _template_text(tokenizer):
        return True
    try:
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False
        )
    except Exception:  # noqa: BLE001
        return False
    return True


def tool_instructions(tools: Sequence[ToolSpec], choice: str = "auto") -> str:
    """The system-prompt section that lists ``tools`` and says how to call them."""
    listing = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
    example = f'{TOOL_CALL_OPEN}{{"name": "{tools[0].name}", "arguments": {{...}}}}{TOOL_CALL_CLOSE}'
    if choice in _CHOICES_ANY:
        when = "You must call one of the tools now."
    elif choice not in ("auto", "none"):
        when = f"You must call the tool {choice} now."
    else:
        when = (
            "If a tool can help answer the user, call it instead of guessing. "
            "If no tool is needed, or the tool results already answer the question, reply normally."
        )
    return (
        "You have access to these tools:\n"
        f"<tools>\n{listing}\n</tools>\n"
        f"{when}\n"
        "To call a tool, write exactly one line per call, in this format:\n"
        f'{TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": <JSON object matching its parameters>}}{TOOL_CALL_CLOSE}\n'
        f"For example: {example}\n"
        f"Each result comes back as {TOOL_RESPONSE_OPEN}...{TOOL_RESPONSE_CLOSE}. "
        "Use the results to answer the user's question."
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return json.dumps(content, ensure_ascii=False) if isinstance(content, Mapping) else str(content)


def _as_tool_call(call: Any) -> ToolCall:
    if isinstance(call, ToolCall):
        return call
    if isinstance(call, Mapping):
        function = call.get("function", call)
        arguments = function.get("arguments", function.get("args", {}))
        if isinstance(arguments, str):
            arguments = json.loads(arguments) if arguments.strip() else {}
        return ToolCall(name=function["name"], arguments=dict(arguments), id=call.get("id") or new_call_id())
    raise TypeError(f"tool call {call!r} must be a ToolCall or a dict")


def format_tool_call(call: ToolCall) -> str:
    """A call in the documented text format."""
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def format_tool_response(content: str, name: str | None) -> str:
    """A tool result in the documented text format (JSON results stay JSON)."""
    try:
        value: Any = json.loads(content)
    except (TypeError, ValueError):
        value = content
    body = json.dumps({"name": name, "content": value} if name else {"content": value}, ensure_ascii=False)
    return f"{TOOL_RESPONSE_OPEN}{body}{TOOL_RESPONSE_CLOSE}"


def prepare_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[ToolSpec] | None,
    tokenizer: Any,
    tool_choice: str = "auto",
) -> tuple[list[dict], list[dict] | None]:
    """Turn neutral messages into ones any chat template accepts.

    Args:
        messages: ``{"role": system|user|assistant|tool, "content": str, "tool_calls": [ToolCall]?,
            "tool_call_id"?, "name"?}``; ``human``/``ai`` are accepted for user/assistant.
        tools: the tools the model may call (None or empty: no tools).
        tokenizer: the tokenizer whose chat template will render the result.
        tool_choice: shapes the instruction text (``auto``, ``required``/``any``, a tool name, ``none``).

    Returns:
        ``(messages, tools_for_template)``. All system messages become one leading system
        message (folded into the first user turn when the template rejects system messages);
        consecutive same-role messages are merged. Without template tool support, tool calls
        and results are written in the documented text format, tool results in user turns, and
        the tool list goes into the system message, so ``tools_for_template`` is None.
        With template support, calls and results keep their structured form and the OpenAI
        specs are returned for ``GatedDecoder(..., tools=...)``.
    """
    native = bool(tools) and template_supports_tools(tokenizer)
    system_parts: list[str] = []
    turns: list[dict] = []
    names_by_id: dict[str, str] = {}
    for message in messages:
        role = {"human": "user", "ai": "assistant", "function": "tool", "developer": "system"}.get(
            message.get("role", ""), message.get("role", "")
        )
        content = _content_text(message.get("content"))
        if role == "system":
            if content.strip():
                system_parts.append(content)
            continue
        if role == "assistant":
            calls = [_as_tool_call(c) for c in message.get("tool_calls") or ()]
            for call in calls:
                names_by_id[call.id] = call.name
            if native and calls:
                turns.append({"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]})
            else:
                text = "\n".join([content] * bool(content) + [format_tool_call(c) for c in calls])
                turns.append({"role": "assistant", "content": text})
            continue
        if role == "tool":
            name = message.get("name") or names_by_id.get(message.get("tool_call_id") or "")
            if native:
                turn = {"role": "tool", "content": content}
                if message.get("tool_call_id"):
                    turn["tool_call_id"] = message["tool_call_id"]
                if name:
                    turn["name"] = name
                turns.append(turn)
            else:
                turns.append({"role": "user", "content": format_tool_response(content, name)})
            continue
        if role != "user":
            raise ValueError(f"message role={message.get('role')!r} is not one of system, user, assistant, tool")
        turns.append({"role": "user", "content": content})

    merged: list[dict] = []
    for turn in turns:
        previous = merged[-1] if merged else None
        # Structured tool turns stay apart: tool-aware templates pair each result with its call.
        mergeable = previous is not None and previous["role"] == turn["role"] and turn["role"] != "tool"
        if mergeable and "tool_calls" not in turn and "tool_calls" not in previous:
            parts = [p for p in (previous["content"], turn["content"]) if p]
            previous["content"] = "\n\n".join(parts)
        else:
            merged.append(dict(turn))

    if tools and not native:
        system_parts.append(tool_instructions(list(tools), tool_choice))
    if system_parts:
        system = "\n\n".join(system_parts)
        if _template_supports_system(tokenizer):
            merged.insert(0, {"role": "system", "content": system})
        elif merged and merged[0]["role"] == "user":
            merged[0]["content"] = f"{system}\n\n{merged[0]['content']}"
        else:
            merged.insert(0, {"role": "user", "content": system})
    return merged, ([t.to_openai() for t in tools] if native else None)


# ---------------------------------------------------------------- grammars
_constraint_cache: "OrderedDict[tuple, GrammarConstraint]" = OrderedDict()
_constraint_cache_lock = threading.Lock()
_CACHE_SIZE = 64


def _cached(key: tuple, build: Any) -> GrammarConstraint:
    """Compiled grammars are immutable and shared; compiling costs up to a second, so keep a few."""
    with _constraint_cache_lock:
        if key in _constraint_cache:
            _constraint_cache.move_to_end(key)
            return _constraint_cache[key]
    constraint = build()
    with _constraint_cache_lock:
        _constraint_cache[key] = constraint
        while len(_constraint_cache) > _CACHE_SIZE:
            _constraint_cache.popitem(last=False)
    return constraint


def _arguments_schema(tool: ToolSpec) -> dict:
    schema = dict(tool.parameters) if tool.parameters else {}
    if not schema or schema.get("type") in (None, "object") and not schema.get("properties") and "anyOf" not in schema:
        # No parameters: the only valid arguments are an empty object.
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return schema


def _call_tag(tool: ToolSpec) -> dict:
    return {
        "type": "tag",
        "begin": f'{TOOL_CALL_OPEN}{{"name": {json.dumps(tool.name)}, "arguments": ',
        "content": {"type": "json_schema", "json_schema": _arguments_schema(tool), "max_whitespace_cnt": 1},
        "end": f"}}{TOOL_CALL_CLOSE}",
    }


def tool_call_constraint(
    tokenizer: Any, vocab_size: int, tools: Sequence[ToolSpec], choice: str = "auto"
) -> GrammarConstraint | None:
    """A grammar under which every tool call is valid JSON for its tool's schema.

    Args:
        choice: ``auto`` (free text; whatever follows ``<tool_call>`` must be a valid call),
            ``required`` / ``any`` (the output is one call of any tool and nothing else), a tool
            name (exactly one call of that tool) or ``none`` (no constraint: returns None).

    Raises:
        ValueError: ``choice`` names no tool in ``tools``, or ``tools`` is empty for a choice
            that needs one.
    """
    if choice == "none":
        return None
    tools = list(tools)
    if not tools:
        raise ValueError(f"tools={tools!r} is empty; tool_choice={choice!r} needs at least one tool")
    if choice == "auto":
        fmt: dict = {
            "type": "triggered_tags",
            "triggers": [TOOL_CALL_OPEN],
            "tags": [_call_tag(t) for t in tools],
            # A small model imitates the result format instead of answering: forbid it.
            "excludes": [TOOL_RESPONSE_OPEN],
        }
    elif choice in _CHOICES_ANY:
        # One call: left free to continue, a small model repeats the same call until the budget ends.
        fmt = {"type": "or", "elements": [_call_tag(t) for t in tools]}
    else:
        chosen = [t for t in tools if t.name == choice]
        if not chosen:
            raise ValueError(f"tool_choice={choice!r} names no tool; tools are {[t.name for t in tools]}")
        fmt = _call_tag(chosen[0])
    structural_tag = {"type": "structural_tag", "format": fmt}
    key = ("tools", id(tokenizer), vocab_size, json.dumps(structural_tag, sort_keys=True))
    return _cached(key, lambda: GrammarConstraint.from_structural_tag(tokenizer, vocab_size, structural_tag))


def structured_output_constraint(tokenizer: Any, vocab_size: int, schema: Mapping[str, Any]) -> GrammarConstraint:
    """Output must be one JSON value matching ``schema``."""
    text = json.dumps(dict(schema), sort_keys=True)
    key = ("schema", id(tokenizer), vocab_size, text)
    return _cached(key, lambda: GrammarConstraint.from_json_schema(tokenizer, vocab_size, dict(schema)))


# ---------------------------------------------------------------- parsing
_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def _parse_call(body: str) -> ToolCall | None:
    try:
        value = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, Mapping):
        return None
    return ToolCall(name=value["name"], arguments=dict(arguments), id=new_call_id())


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split generated text into its prose and its tool calls.

    Well-formed ``<tool_call>...</tool_call>`` blocks become :class:`ToolCall` objects (with
    fresh ``call_<hex>`` ids) and are removed from the content; a malformed block stays in the
    content as written; an unterminated block at the very end (cut off by the token budget) is
    dropped.
    """
    calls: list[ToolCall] = []

    def take(match: re.Match) -> str:
        call = _parse_call(match.group(1))
        if call is None:
            return match.group(0)
        calls.append(call)
        return ""

    content = _CALL_BLOCK.sub(take, text)
    tail = content.rfind(TOOL_CALL_OPEN)
    if tail >= 0 and TOOL_CALL_CLOSE not in content[tail:]:
        content = content[:tail]
    if calls:
        content = re.sub(r"\n{3,}", "\n\n", content).strip()
    return content, calls


def answer_parts(generation: Generation, parse_tools: bool) -> tuple[str, list[ToolCall]]:
    """An answer's prose and tool calls; grammar-bound output the gate refused becomes the refusal."""
    if generation.finish_reason == "refused":
        return refusal_excerpt(generation.text), []
    return parse_tool_calls(generation.text) if parse_tools else (generation.text, [])


def iter_tool_specs(tools: Iterable[Any]) -> list[ToolSpec]:
    """Accept ToolSpec objects or OpenAI function-tool dicts."""
    return [t if isinstance(t, ToolSpec) else ToolSpec.from_openai(t) for t in tools]
