# Copyright © 2026 mstream-mlx contributors.
"""The OpenAI chat-completions shapes for a multi-stream run.

The first output stream is the message ``content``; every other output stream comes in
``message.streams`` (``delta.streams`` when streamed) as ``{name: text}``; ``usage``
counts prompt and completion tokens, and ``usage.streams`` the tokens of each output
stream.  Field names follow OpenAI and mlx_lm.server (``chat.completion``,
``chat.completion.chunk``, ``finish_reason``, ``stream_options.include_usage``).
"""

import time
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mstream_mlx import StepEvent

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16  # stop strings a request may give


def stop_strings(value: Any) -> List[str]:
    """The request's ``stop``: null, a string or a list of strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not (isinstance(items, list) and all(isinstance(v, str) and v for v in items)):
        raise ValueError("'stop' must be a non-empty string or a list of them.")
    if len(items) > MAX_STOP:
        raise ValueError(f"'stop' has {len(items)} strings; at most {MAX_STOP}.")
    return items


def message_text(message: Any, i: int) -> Tuple[str, str]:
    """``(role, text)`` of ``messages[i]``; content is a string or a list of text parts."""
    if not isinstance(message, Mapping):
        raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}.")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}.")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(
                    f"messages[{i}].content: only text parts are supported, got {part!r:.60}."
                )
            parts.append(part["text"])
        return role, "".join(parts)
    raise ValueError(f"messages[{i}].content must be a string or a list of text parts.")


def prompt_from_messages(messages: Any) -> Tuple[Optional[str], str]:
    """``(system, user)`` text from OpenAI ``messages``.

    A multi-stream conversation is one system block and one user block (paper §5-7), so
    system (and developer) messages join into the system prompt and user messages into
    the user text; earlier assistant and tool turns have no block to go in and are left
    out.  Blocks models read them as the system and user blocks; rows models read the
    system prompt, then the user text, word by word on the user stream, as ``generate``.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list.")
    system, user = [], []
    for i, m in enumerate(messages):
        role, text = message_text(m, i)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            user.append(text)
    user_text = "\n".join(t for t in user if t.strip())
    if not user_text.strip():
        raise ValueError("'messages' has no user text.")
    return ("\n".join(system) if any(s.strip() for s in system) else None), user_text


class Completion:
    """Accumulates a run's events into OpenAI responses.

    Args:
        inputs, outputs: the input and output stream names (``outputs[0]`` is the
            ``content``).
        model_id: echoed in every response.
        stream: chunks (``chat.completion.chunk``) rather than one response.
        stop: strings that end the ``content`` (left out of it, as OpenAI does); the
            last ``len(longest) - 1`` characters are held back from the stream until
            they cannot start one.
    """

    def __init__(self, inputs: List[str], outputs: List[str], model_id: str, stream: bool,
                 stop: Sequence[str] = ()):
        self.inputs = inputs
        self.outputs = outputs
        self.model_id = model_id
        self.id = f"chatcmpl-{uuid.uuid4()}"
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if stream else "chat.completion"
        self.texts = {n: "" for n in outputs}
        self.tokens = {n: 0 for n in outputs}
        self.read = 0  # input tokens read during decode (rows read the prompt there)
        self.prompt_tokens = 0  # prefilled tokens
        self.finish_reason: Optional[str] = None
        self.stop = list(stop)
        self.stopped = False  # a stop string ended the content
        self._hold = max(map(len, self.stop), default=1) - 1
        self._sent = 0  # content characters handed out as deltas
        self._sent_role = False

    def add(self, event: StepEvent) -> Dict[str, str]:
        """Take one event; returns its text deltas of the output streams."""
        self.prompt_tokens = event.prompt_tokens
        self.read += sum(event.tokens[n] is not None for n in self.inputs if n in event.tokens)
        first = self.outputs[0]
        deltas = {}
        for n in self.outputs:
            if event.tokens.get(n) is not None:
                self.tokens[n] += 1
            if n != first and event.text.get(n):
                deltas[n] = event.text[n]
                self.texts[n] += event.text[n]
        if not self.stopped:
            self.texts[first] += event.text.get(first, "")
            hits = [i for i in map(self.texts[first].find, self.stop) if i >= 0]
            if hits:
                self.texts[first] = self.texts[first][: min(hits)]
                self.stopped, self.finish_reason = True, "stop"
        content = self.texts[first]
        end = self.stopped or event.finish_reason
        upto = len(content) if end else max(self._sent, len(content) - self._hold)
        if upto > self._sent:
            deltas[first] = content[self._sent : upto]
            self._sent = upto
        if event.finish_reason and not self.stopped:
            self.finish_reason = event.finish_reason
        return deltas

    def _base(self, choices: list) -> dict:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }

    def usage(self) -> dict:
        prompt = self.prompt_tokens + self.read
        completion = sum(self.tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "streams": dict(self.tokens),
        }

    def response(self) -> dict:
        """The non-streamed ``chat.completion``."""
        first, rest = self.outputs[0], self.outputs[1:]
        message = {
            "role": "assistant",
            "content": self.texts[first],
            "streams": {n: self.texts[n] for n in rest},
        }
        out = self._base(
            [{"index": 0, "message": message, "finish_reason": self.finish_reason}]
        )
        out["usage"] = self.usage()
        return out

    def chunk(
        self, deltas: Mapping[str, str], finish_reason: Optional[str] = None
    ) -> Optional[dict]:
        """A ``chat.completion.chunk`` for ``deltas`` (``None`` if there is nothing to say)."""
        first = self.outputs[0]
        delta: Dict[str, Any] = {}
        if not self._sent_role:
            delta["role"] = "assistant"
            self._sent_role = True
        if deltas.get(first):
            delta["content"] = deltas[first]
        others = {n: d for n, d in deltas.items() if n != first and d}
        if others:
            delta["streams"] = others
        if not delta and not finish_reason:
            return None
        return self._base([{"index": 0, "delta": delta, "finish_reason": finish_reason}])

    def usage_chunk(self) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        out = self._base([])
        out["usage"] = self.usage()
        return out


def models_list(model_id: str, spec, created: int) -> dict:
    """``GET /v1/models``: the one served model, with its streams."""
    return {
        "object": "list",
        "data": [
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": "mstream-mlx",
                "layout": spec.layout,
                "streams": list(spec.names),
                "inputs": [spec.names[c] for c in spec.inputs],
                "outputs": [spec.names[c] for c in spec.outputs],
            }
        ],
    }
