"""The FastAPI application: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON, or
server-sent events with ``stream: true``), over one Engine through a ``Batcher``.

Every refusal of a request is an OpenAI-style error object naming the field: 400 for a bad value, an
unknown model or a prompt too long for the context, 422 for a body that is not the request's shape,
503 while shutting down. Shutdown (SIGTERM, through uvicorn) stops taking requests and finishes the
ones in flight before the worker stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import fastapi
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from casa_jax.serve import protocol
from casa_jax.serve.batcher import Batcher


def _field(loc) -> str:
    return ".".join(str(p) for p in loc if p != "body")


def build_app(engine, model_name: str, *, max_tokens: int = 256, default_policy: str = "model",
              max_batch: int = 8, max_wait_s: float = 0.01, recheck_every: int = 0) -> fastapi.FastAPI:
    """The application for ``engine`` served as ``model_name``. ``max_tokens``: the most tokens one reply may
    ask for (and the default); ``default_policy``: what a client receives under an ``unsafe`` verdict when
    its request names no ``safety_policy``; ``recheck_every`` > 0: CASA's re-checking gate (a reply found
    unsafe mid-way ends with the refusal)."""
    if default_policy not in protocol.POLICIES:
        raise ValueError(f"default_policy={default_policy!r}: expected one of {protocol.POLICIES}")
    threshold = engine.casa.threshold if engine.is_casa else None
    state = {"batcher": None, "ready": False, "started": int(time.time())}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(engine, max_batch=max_batch, max_wait_s=max_wait_s,
                                   recheck_every=recheck_every if engine.is_casa else 0)
        state["ready"] = True
        yield
        state["ready"] = False
        await asyncio.to_thread(state["batcher"].close)  # in-flight requests finish first
        stats = state["batcher"].stats
        print(f"shut down: {stats.requests} requests answered in {stats.batches} batches, none left in flight"
              if stats.in_flight == 0 else f"shut down with {stats.in_flight} requests unanswered", flush=True)

    app = fastapi.FastAPI(title="casa-jax", lifespan=lifespan)
    app.state.serving = state

    @app.exception_handler(protocol.InvalidRequest)
    async def invalid(request, exc: protocol.InvalidRequest):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "malformed request"}
        field = _field(first.get("loc", ()))
        message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(protocol.InvalidRequest(message, field or None).body(), status_code=422)

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        stats = state["batcher"].stats
        return {"status": "ok", "model": model_name, "casa": engine.is_casa, "batches": stats.batches,
                "requests": stats.requests, "largest_batch": stats.largest, "in_flight": stats.in_flight}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state["started"],
                                            "owned_by": "casa-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: protocol.ChatRequest):
        if not state["ready"]:
            raise protocol.InvalidRequest("the server is shutting down", status=503, code="shutting_down")
        generation = protocol.check_request(request, model_name, max_tokens, default_policy)
        _check_context(engine, generation, state["batcher"].decode_tokens(generation))
        try:
            future = state["batcher"].submit(generation)
        except RuntimeError as e:
            raise protocol.InvalidRequest(str(e), status=503, code="shutting_down") from e
        try:
            reply = await asyncio.wrap_future(future)
        except Exception as e:  # noqa: BLE001 - a failed decode: an OpenAI-style server error, not a bare 500
            return JSONResponse({"error": {"message": f"generation failed: {type(e).__name__}: {e}",
                                           "type": "server_error", "param": None, "code": None}}, status_code=500)
        safety = protocol.safety_object(reply, threshold)
        unsafe = safety is not None and safety["verdict"] == "unsafe"
        if unsafe and generation.policy == "error":
            raise protocol.unsafe_error(safety)
        replaced = unsafe and generation.policy == "template"
        if not generation.stream:
            return protocol.completion(model_name, reply, generation, safety, replaced)
        chunks = protocol.stream_chunks(model_name, reply, generation, safety, replaced)

        async def events():
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _check_context(engine, generation, decode_tokens: int) -> None:
    """A prompt that cannot fit the model's context with its prefill and the decode length is a 400 now,
    not an error inside someone else's batch."""
    from casa_jax.casa.examples import render_conversation
    from casa_jax.infer.chat import check_context
    from casa_jax.infer.decode import PREFILL_BUCKETS
    from casa_jax.processing import InputError
    ids = render_conversation(engine.tokenizer, list(generation.conversation),
                              bool(engine.is_casa and engine.casa.safety_prompt))
    prefill = engine.tokenizer.encode(generation.prefill, add_special_tokens=False) if generation.prefill else []
    if len(ids) + len(prefill) > PREFILL_BUCKETS[-1]:
        raise protocol.InvalidRequest(f"messages: the prompt takes {len(ids) + len(prefill)} tokens, more than the largest "
                             f"prefill bucket ({PREFILL_BUCKETS[-1]})", "messages", code="context_length_exceeded")
    try:
        check_context(engine.spec.text.max_position_embeddings, [generation.conversation[-1]["content"]], [len(ids)],
                      [len(prefill)], decode_tokens)
    except InputError as e:
        raise protocol.InvalidRequest(f"messages: {e}", "messages", code="context_length_exceeded") from e
