"""The HTTP face of the service: edits in (journaled before they are acknowledged), answers out, an OpenAI-compatible
completions API, health and Prometheus metrics. `build_app(engine, token)` makes the FastAPI application."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from elder.serve.engine import Engine, ServiceError


class EditIn(BaseModel):
    """One edit in the project's JSONL record shape (`id` optional: a content id is made)."""

    model_config = {"extra": "allow"}
    id: str | None = None
    prompt: str
    target: str
    rephrases: list[str] = []
    subject: str | None = None


class EditsIn(BaseModel):
    """Several edits, applied in the order given."""

    edits: list[EditIn]


class Accepted(BaseModel):
    """An accepted op: its edit id, its place in the journal and in the queue."""

    id: str
    seq: int
    queue_position: int
    status: str = "queued"


class AcceptedEdits(BaseModel):
    """The accepted edits of one request."""

    edits: list[Accepted]


class AskIn(BaseModel):
    """Prompts to answer greedily."""

    prompts: list[str]
    max_new_tokens: int = 16


class AnswerOut(BaseModel):
    """One answer and how it was made."""

    prompt: str
    answer: str
    used_memory: bool
    edit_id: str | None
    distance: float | None


class AnswersOut(BaseModel):
    """The answers of one request, all from one state of the memory."""

    answers: list[AnswerOut]
    applied_seq: int


class CompletionIn(BaseModel):
    """OpenAI's /v1/completions request (the fields this service reads; others are accepted and ignored)."""

    model_config = {"extra": "allow"}
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = 16
    stream: bool = False


class Message(BaseModel):
    """One chat message."""

    model_config = {"extra": "allow"}
    role: str
    content: str


class ChatIn(BaseModel):
    """OpenAI's /v1/chat/completions request: the last user message is answered as a plain prompt."""

    model_config = {"extra": "allow"}
    model: str | None = None
    messages: list[Message]
    max_tokens: int = 16
    stream: bool = False


class _EngineCollector:
    """Reads the engine's counters at each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        stats, engine = self.engine.stats, self.engine
        yield CounterMetricFamily("elder_edits_applied", "edit and replace ops applied", value=stats.applied)
        yield CounterMetricFamily("elder_edits_failed", "ops the method refused", value=stats.failed)
        yield CounterMetricFamily("elder_prompts_answered", "prompts answered", value=stats.prompts)
        yield CounterMetricFamily("elder_prompts_memory_used", "prompts answered through the edit memory",
                                  value=stats.memory_used)
        yield GaugeMetricFamily("elder_memory_used_rate", "share of prompts answered through the edit memory",
                                value=stats.memory_used / stats.prompts if stats.prompts else 0.0)
        yield GaugeMetricFamily("elder_queue_length", "ops accepted and not yet applied", value=engine.queued())
        yield GaugeMetricFamily("elder_edits_held", "edits the answering memory holds",
                                value=len(engine.serving.held_edits))
        yield GaugeMetricFamily("elder_applied_seq", "journal position of the answering memory",
                                value=engine.applied_seq)
        yield GaugeMetricFamily("elder_last_batch_seconds", "wall time of the last applied batch",
                                value=stats.batch_seconds)


def build_app(engine: Engine, token: str | None = None) -> FastAPI:
    """The application over an engine; with `token`, every endpoint that changes state needs it as a bearer."""
    app = FastAPI(title="elder serve", version="1",
                  description="A live editing service: edits are journaled before they are acknowledged and applied "
                              "in order by one worker; every answer comes from one whole state of the memory.")
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    latency = Histogram("elder_request_seconds", "latency of answering requests", ["endpoint"], registry=registry)
    bearer = HTTPBearer(auto_error=False)
    model_name = engine.base_name

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise ServiceError("a valid bearer token is needed to change the memory", 401)

    @app.exception_handler(ServiceError)
    def refused(request: Request, error: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"detail": str(error)}, status_code=error.status, headers=headers)

    @app.middleware("http")
    async def bounded(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > engine.limits.body_bytes):
            return JSONResponse({"detail": f"request body over {engine.limits.body_bytes} bytes"}, status_code=413)
        if length is None and request.method in ("POST", "PUT"):
            return JSONResponse({"detail": "a request body needs a Content-Length"}, status_code=411)
        return await call_next(request)

    @app.post("/edits", status_code=202, response_model=AcceptedEdits, dependencies=[Depends(authorised)])
    def submit(body: EditsIn | EditIn) -> AcceptedEdits:
        """Submit one edit or several (`{"edits": [...]}`); answered once they are journaled."""
        edits = body.edits if isinstance(body, EditsIn) else [body]
        records = [e.model_dump(exclude_none=True) for e in edits]
        return AcceptedEdits(edits=[Accepted(id=i, seq=s, queue_position=q) for i, s, q in engine.submit(records)])

    @app.get("/edits")
    def list_edits() -> dict:
        """The edits the answering memory holds, and the ops queued."""
        return engine.edits()

    @app.get("/edits/{edit_id}")
    def edit_status(edit_id: str) -> dict:
        """Where an edit stands: queued, applied, failed or forgotten."""
        return engine.status(edit_id)

    @app.put("/edits/{edit_id}", status_code=202, response_model=Accepted, dependencies=[Depends(authorised)])
    def replace(edit_id: str, body: EditIn) -> Accepted:
        """Replace an edit: the new target wins and the old one is forgotten."""
        seq, position = engine.replace(edit_id, body.model_dump(exclude_none=True))
        return Accepted(id=edit_id, seq=seq, queue_position=position)

    @app.delete("/edits/{edit_id}", status_code=202, response_model=Accepted, dependencies=[Depends(authorised)])
    def forget(edit_id: str) -> Accepted:
        """Forget an edit."""
        seq, position = engine.forget(edit_id)
        return Accepted(id=edit_id, seq=seq, queue_position=position)

    @app.post("/ask", response_model=AnswersOut)
    def ask(body: AskIn) -> AnswersOut:
        """Greedy answers, each saying whether the memory was used and which stored edit answered."""
        with latency.labels("ask").time():
            seq = engine.applied_seq
            answers = engine.answer(body.prompts, body.max_new_tokens)
        return AnswersOut(applied_seq=seq, answers=[AnswerOut(
            prompt=a.prompt, answer=a.text, used_memory=a.used_memory, edit_id=a.edit_id,
            distance=None if a.distance == float("inf") else a.distance) for a in answers])

    @app.get("/health")
    def health() -> JSONResponse:
        """ok while the edit worker runs; 503 with its error once it has stopped."""
        body = {"status": "ok" if engine.worker_error is None else "worker stopped", "error": engine.worker_error,
                "method": engine.cls.name, "model": model_name, "applied_seq": engine.applied_seq,
                "queued": engine.queued(), "edits_held": len(engine.serving.held_edits)}
        return JSONResponse(body, status_code=200 if engine.worker_error is None else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        """The one model this service answers with (OpenAI's list shape)."""
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "elder"}]}

    @app.post("/v1/completions", response_model=None)
    def completions(body: CompletionIn) -> dict | StreamingResponse:
        """OpenAI-compatible text completions from the edited model (greedy; `stream` sends server-sent events)."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        with latency.labels("completions").time():
            answers = engine.answer(prompts, body.max_tokens)
        made, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [{"index": i, "text": a.text, "logprobs": None,
                    "finish_reason": _finish(engine, a.text, body.max_tokens),
                    "elder": {"used_memory": a.used_memory, "edit_id": a.edit_id}} for i, a in enumerate(answers)]
        if body.stream:
            return _stream([{"id": made, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [{"index": c["index"], "text": piece, "logprobs": None, "finish_reason": None}]}
                            for c in choices for piece in _pieces(engine, c["text"])] +
                           [{"id": made, "object": "text_completion", "created": created, "model": model_name,
                             "choices": [{"index": c["index"], "text": "", "logprobs": None,
                                          "finish_reason": c["finish_reason"]}]} for c in choices])
        return {"id": made, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": _usage(engine, prompts, [a.text for a in answers])}

    @app.post("/v1/chat/completions", response_model=None)
    def chat(body: ChatIn) -> dict | StreamingResponse:
        """OpenAI-compatible chat completions: the last user message is answered as a plain prompt, as edits are
        written (greedy; `stream` sends server-sent events)."""
        users = [m.content for m in body.messages if m.role == "user"]
        if not users:
            raise ServiceError("no user message to answer")
        with latency.labels("chat").time():
            answer = engine.answer([users[-1]], body.max_tokens)[0]
        made, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        finish = _finish(engine, answer.text, body.max_tokens)
        if body.stream:
            head = {"id": made, "object": "chat.completion.chunk", "created": created, "model": model_name}
            opening = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
            return _stream([{**head, "choices": [opening]}] +
                           [{**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                            for piece in _pieces(engine, answer.text)] +
                           [{**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}])
        return {"id": made, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": finish,
                             "elder": {"used_memory": answer.used_memory, "edit_id": answer.edit_id}}],
                "usage": _usage(engine, [users[-1]], [answer.text])}

    return app


def _pieces(engine: Engine, text: str) -> list[str]:
    """The answer as the tokens it was generated in, for streaming."""
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    pieces, done = [], ""
    for end in range(1, len(ids) + 1):
        part = engine.tokenizer.decode(ids[:end])
        if part.startswith(done):
            pieces.append(part[len(done):])
            done = part
    if done != text:
        pieces.append(text[len(done):] if text.startswith(done) else text)
    return [p for p in pieces if p]


def _finish(engine: Engine, text: str, max_tokens: int) -> str:
    return "length" if len(engine.tokenizer(text, add_special_tokens=False).input_ids) >= max_tokens else "stop"


def _usage(engine: Engine, prompts: list[str], texts: list[str]) -> dict[str, Any]:
    count = lambda items: sum(len(engine.tokenizer(t).input_ids) for t in items)  # noqa: E731
    prompt, completion = count(prompts), count(texts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stream(chunks: list[dict]) -> StreamingResponse:
    def events() -> Iterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")
