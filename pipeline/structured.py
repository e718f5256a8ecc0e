"""JSON-in, JSON-out LLM calls validated with pydantic and retried on invalid output.

Each agent sends a system message with its instructions and a user message that is a JSON
object of inputs; the reply must be a JSON object matching the agent's schema. Invalid
replies are shown back to the model with the validation error, a bounded number of times.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Callable, TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.providers import ChatModel, ChatTask

log = logging.getLogger("sceneref.agents")
T = TypeVar("T", bound=BaseModel)


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
