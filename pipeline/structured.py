"""JSON-in, JSON-out LLM calls validated with pydantic and retried on invalid output.

Each agent sends a system message with its instructions and a user message that is a JSON
object of inputs; the reply must be a JSON object matching the agent's schema. Where the
endpoint supports structured outputs, the schema itself goes with the request
(`response_format` of type `json_schema`, strict), so the model cannot answer another shape;
the validation stays as the safety net (endpoints that only promise JSON, constraints strict
mode cannot carry, a fallback to `json_object`). Invalid replies are shown back to the model
with the validation error, a bounded number of times.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Iterable
from functools import cache
from typing import Callable, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.costs import CallUsage
from pipeline.providers.base import ChatModel, ChatTask
from pipeline.schemas import CinematographerOutput, PromptReview, StoryboardOutput

log = logging.getLogger("sceneref.agents")
T = TypeVar("T", bound=BaseModel)

ResponseFormat = Literal["json_schema", "json_object"]

# The schema each task's reply must match. Keyed by task, not passed along with the messages, so
# a chat model in another process (a Serve replica) finds the schema from the task name alone.
TASK_SCHEMAS: dict[str, type[BaseModel]] = {
    "storyboard": StoryboardOutput,
    "cinematographer": CinematographerOutput,
    "prompt_engineer": PromptReview,
}

# The JSON Schema keywords strict structured outputs accept besides the structure itself
# (OpenAI's documented subset). Others (default, title, minLength, maxLength) are dropped from
# the request: pydantic still checks them on the reply.
_STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "$ref", "$defs",
    "enum", "const", "description", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
})


@cache
def strict_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema in the form strict mode requires: every object closed
    (`additionalProperties: false`) with every property required (an optional field stays
    optional by being nullable, as pydantic already writes `X | None`), no unsupported keywords,
    and no `readOnly` field (one our code sets, such as the consistency sheet's `source`).
    A field with a default becomes required: the model must then write it, which pydantic accepts."""
    return _strict(model.model_json_schema(), "")


def _strict(node: dict, where: str) -> dict:
    if "allOf" in node and len(node["allOf"]) == 1:  # a $ref with siblings, in older pydantic
        node = {**{k: v for k, v in node.items() if k != "allOf"}, **node["allOf"][0]}
    if "$ref" in node:  # strict mode refuses keywords beside $ref (description included)
        return {"$ref": node["$ref"]}
    if isinstance(node.get("additionalProperties"), dict):
        raise ValueError(f"{where or 'the root'}: an open mapping cannot be a strict schema")
    out: dict = {}
    for key, value in node.items():
        if key not in _STRICT_KEYWORDS:
            continue
        if key == "properties":  # a readOnly field is set by our code: the model does not write it
            out[key] = {name: _strict(sub, f"{where}/{name}") for name, sub in value.items() if not sub.get("readOnly")}
        elif key == "$defs":
            out[key] = {name: _strict(sub, f"{where}/{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _strict(value, f"{where}[]")
        elif key == "anyOf":
            out[key] = [_strict(sub, where) for sub in value]
        else:
            out[key] = value
    if out.get("type") == "object":
        out.pop("description", None)  # a class docstring: written for developers, not the model
        out["properties"] = out.get("properties", {})
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    return out


def response_format(task: str, mode: ResponseFormat) -> dict:
    """The chat request's `response_format` for `task`: its strict schema in `json_schema`
    mode (a task without a schema asks for any JSON object), or plain JSON mode."""
    schema = TASK_SCHEMAS.get(task)
    if mode == "json_object" or schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": schema.__name__, "strict": True, "schema": strict_schema(schema)}}


def structured_output_summary(calls: Iterable[CallUsage]) -> dict | None:
    """How the chat calls among `calls` constrained their replies, for the traces: the count per
    mode and, where an endpoint refused `json_schema`, its answer. None when no call says
    (offline agents)."""
    chat = [call for call in calls if call.kind == "chat" and call.response_format]
    if not chat:
        return None
    fallbacks = sorted({call.response_format_fallback for call in chat if call.response_format_fallback})
    return {"calls": dict(Counter(call.response_format for call in chat)), "fallback": fallbacks[0] if fallbacks else None}


class InvalidOutputError(RuntimeError):
    """The LLM kept answering something that is not valid for the schema."""

    def __init__(self, task: str, attempts: int, errors: list[str]):
        super().__init__(f"{task}: invalid output after {attempts} attempt(s): {errors[-1]}")
        self.task = task
        self.attempts = attempts
        self.errors = errors


def _parse(text: str, schema: type[T], check: Callable[[T], None] | None) -> T:
    body = text.strip()
    if body.startswith("```"):  # tolerate a fenced block; some endpoints ignore json mode
        body = body.strip("`").removeprefix("json").strip()
    result = schema.model_validate(json.loads(body))
    if check is not None:
        check(result)
    return result


async def ask_json(
    chat: ChatModel,
    *,
    task: ChatTask,
    system: str,
    inputs: dict,
    schema: type[T],
    retries: int,
    check: Callable[[T], None] | None = None,
    image: bytes | None = None,
) -> T:
    """Ask for a JSON object of `schema`; `check` adds rules the schema cannot express and
    raises ValueError. Raises InvalidOutputError after `retries` corrective re-asks. An
    `image` (PNG) goes with the inputs as an OpenAI-style `image_url` content part; without
    one the user message stays a plain JSON string."""
    text_inputs = json.dumps(inputs, ensure_ascii=False)
    content: str | list = text_inputs
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
        content = [{"type": "text", "text": text_inputs}, {"type": "image_url", "image_url": {"url": url}}]
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": content},
    ]
    errors: list[str] = []
    for attempt in range(1, retries + 2):
        text = await chat.complete(messages, task=task)
        try:
            return _parse(text, schema, check)
        except (json.JSONDecodeError, ValidationError, ValueError) as exc:
            reason = _short(exc)
            errors.append(reason)
            log.warning("%s: invalid output (attempt %d/%d): %s", task, attempt, retries + 1, reason)
            messages = messages[:2] + [
                {"role": "assistant", "content": text[:4000]},
                {
                    "role": "user",
                    "content": "Your reply was not valid: "
                    f"{reason}. Answer again with only a JSON object in the required format.",
                },
            ]
    raise InvalidOutputError(task, retries + 1, errors)


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'reply'}: {e['msg']}" for e in exc.errors()[:3]]
        return "; ".join(parts)
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg} at position {exc.pos})"
    return str(exc)
