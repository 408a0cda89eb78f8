"""The wire format: OpenAI's chat-completions request, checked field by field, and the response, chunk and
error objects, each choice with a ``safety`` object for CASA models.

Extensions, all optional and ignored by stock clients: ``safety_policy`` in a request ("model": the
model's own reply, a learned refusal under ``unsafe``; "template": the fixed refusal; "error": a 400
carrying the verdict), and ``safety`` in every choice and first stream chunk.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Literal

import pydantic

POLICIES = ("model", "template", "error")


class InvalidRequest(ValueError):
    """A request the server refuses: HTTP ``status``, OpenAI error ``param`` (the field) and ``code``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.extra = message, param, status, code, extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code, **self.extra}}


class Message(pydantic.BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self, where: str) -> str:
        """The content as text; a list of parts may hold only ``{"type": "text", "text": ...}`` parts."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}.content.{i}: only text parts are served (got type "
                                     f"{part.get('type')!r})", f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(pydantic.BaseModel):
    """``POST /v1/chat/completions``. Fields OpenAI defines that change nothing here (``user``,
    ``metadata``, ...) are accepted and ignored; ones that would silently change the answer are refused."""

    model_config = pydantic.ConfigDict(extra="allow")

    model: str
    messages: list[Message] = pydantic.Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None  # greedy (0) when absent: deterministic answers unless asked otherwise
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    safety_policy: Literal["model", "template", "error"] | None = None


IGNORED = {"user", "metadata", "store", "stream_options", "frequency_penalty", "presence_penalty", "logit_bias",
           "parallel_tool_calls", "service_tier"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """A checked request, as the batcher runs it."""

    conversation: tuple  # ({"role", "content"}, ...), ending with a user turn
    prefill: str  # a trailing assistant message: the reply starts with it (CASA: after the safety token)
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int
    policy: str
    stream: bool


def check_request(request: ChatRequest, served: str, token_limit: int, default_policy: str) -> Generation:
    """``request`` -> a ``Generation``, or ``InvalidRequest`` naming the first bad field."""
    if request.model != served:
        raise InvalidRequest(f"model {request.model!r} is not served here; this server serves {served!r}", "model",
                             code="model_not_found")
    unknown = sorted(set(request.model_extra or {}) - IGNORED)
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: not supported by this server", unknown[0])
    temperature = 0.0 if request.temperature is None else request.temperature
    if request.n not in (None, 1):
        raise InvalidRequest(f"n={request.n}: only n=1 is served", "n")
    if request.stop:
        raise InvalidRequest("stop: stop sequences are not supported (replies end at the end-of-turn token)", "stop")
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    limit = token_limit if limit is None else limit
    if not 1 <= limit <= token_limit:
        raise InvalidRequest(f"{field}={limit}: expected 1 to {token_limit}", field)
    if not 0 <= temperature <= 2:
        raise InvalidRequest(f"temperature={temperature}: expected a value in [0, 2]", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise InvalidRequest(f"top_p={request.top_p}: expected a value in (0, 1]", "top_p")
    if request.top_p is not None and temperature == 0 and request.top_p != 1:
        raise InvalidRequest("top_p only applies to sampling; it would be ignored at temperature=0", "top_p")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages.{i}")}
                for i, m in enumerate(request.messages)]
    prefill = ""
    if messages[-1]["role"] == "assistant":  # a prefilled reply: generation continues it
        prefill = messages.pop()["content"]
    if not messages or messages[-1]["role"] != "user":
        raise InvalidRequest("messages: the conversation must end with a user message (optionally followed by one "
                             "assistant message to continue)", "messages")
    if not messages[-1]["content"].strip():
        raise InvalidRequest(f"messages.{len(messages) - 1}.content: the user message is empty", "messages")
    return Generation(conversation=tuple(messages), prefill=prefill, max_tokens=limit,
                      temperature=temperature,
                      top_p=None if temperature == 0 or request.top_p == 1 else request.top_p,
                      seed=0 if request.seed is None else request.seed,
                      policy=request.safety_policy or default_policy, stream=bool(request.stream))


def safety_object(reply, threshold: float | None) -> dict | None:
    """The verdict of a CASA reply (None for other models). ``threshold``: the one the gate used; with none
    set the decision is the argmax of the two safety tokens, i.e. p_unsafe > 0.5. A reply the re-checking
    gate ended says so (``rule: "recheck"`` and the decode step); v_s and p_unsafe stay the safety step's."""
    if reply.v_s is None:
        return None
    out = {"verdict": reply.verdict, "v_s": reply.v_s, "p_unsafe": reply.p_unsafe, "p_safe": reply.p_safe,
           "threshold": 0.5 if threshold is None else threshold, "rule": "argmax" if threshold is None else ">="}
    if reply.turned_at >= 0:  # safe at the safety step (or not), then ended by the re-checking gate
        out.update(rule="recheck", rechecked_unsafe_at=reply.turned_at)
    return out


def finish_reason(reply, generation: Generation, replaced: bool) -> str:
    if replaced:
        return "content_filter"
    return "length" if reply.completion_tokens >= generation.max_tokens else "stop"


def completion(model: str, reply, generation: Generation, safety: dict | None, replaced: bool) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": finish_reason(reply, generation, replaced), "safety": safety}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens}}


def stream_chunks(model: str, reply, generation: Generation, safety: dict | None, replaced: bool) -> list[dict]:
    """The reply as ``chat.completion.chunk`` objects: the role and the verdict first, then the text a word
    at a time, then the finish reason."""
    import re
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    pieces = re.findall(r"\s*\S+\s*|\s+", reply.text)
    chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                   "safety": safety}])]
    chunks += [dict(base, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in pieces]
    chunks.append(dict(base, choices=[{"index": 0, "delta": {},
                                       "finish_reason": finish_reason(reply, generation, replaced)}]))
    return chunks


def unsafe_error(safety: dict) -> InvalidRequest:
    return InvalidRequest("the request was judged unsafe by the model's safety head", "messages",
                          code="unsafe_request", extra={"safety": safety})
