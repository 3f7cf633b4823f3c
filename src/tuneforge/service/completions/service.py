"""Chat completions and completions over the batching engines: which model answers (org rules), the prompt
(the model's or the run's chat template), sampling, streaming, usage. Testable without HTTP apart from
the answer objects it returns."""
from __future__ import annotations

import asyncio
import json
import secrets
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneforge.errors import DataError, ModelError
from tuneforge.service.auth import Org
from tuneforge.service.completions.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                                                    ChatCompletionRequest, ChunkChoice, Completion, CompletionChoice,
                                                    CompletionRequest, Delta, Usage)
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import InvalidRequest, NotFound, ServerError, TooManyRequests, without_server_paths
from tuneforge.serving.engine import QueueFull, SamplingParams, Sequence
from tuneforge.serving.registry import ModelServer, Target, checkpoint_target, operator_models, run_target

DEFAULT_CHAT_MAX_TOKENS = 512
DISCONNECT_POLL_SECONDS = 0.1


def resolve_target(ctx: ServiceContext, org: Org, name: str) -> Target:
    """The model answering `name` for this org: a base model, an operator's adapter or ONNX export (every
    org), or this org's fine-tuned model or checkpoint. Another org's model is a 404."""
    from tuneforge.models import resolve_model

    try:
        if name in ctx.settings.base_models:
            base = resolve_model(ctx.settings.base_models[name])
            return Target(("base", str(base)), base)
        served = operator_models(ctx.settings.adapters)
        if name in served:
            folder, export_adapter = served[name]
            return run_target(folder, f"op:{name}", export_adapter=export_adapter)
        row = ctx.store.get_model(name, org.id)
        if row is not None:
            return run_target(ctx.settings.jobs_dir / row["job_id"] / "run", name)
        ckpt = ctx.store.get_checkpoint_by_model(name, org.id)
        if ckpt is not None:
            return checkpoint_target(ctx.settings.jobs_dir / ckpt["job_id"] / "run", ckpt["step"], name)
    except ModelError as e:
        raise InvalidRequest(f"model: {name} cannot be served: {without_server_paths(str(e))}", param="model",
                             code="model_not_servable") from None
    raise NotFound("model", name, param="model")


def _refuse_unsupported(req) -> None:
    checks = [("presence_penalty", req.presence_penalty not in (None, 0)),
              ("frequency_penalty", req.frequency_penalty not in (None, 0)),
              ("logprobs", bool(req.logprobs)), ("logit_bias", bool(req.logit_bias))]
    if isinstance(req, ChatCompletionRequest):
        checks += [("tools", bool(req.tools)), ("tool_choice", req.tool_choice not in (None, "none")),
                   ("response_format", bool(req.response_format) and req.response_format.get("type") != "text"),
                   ("top_logprobs", bool(req.top_logprobs))]
        if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
            raise InvalidRequest("give max_completion_tokens or max_tokens, not both with different values",
                                 param="max_completion_tokens")
    else:
        checks += [("echo", req.echo), ("suffix", req.suffix is not None), ("best_of", req.best_of not in (None, 1))]
    for field, unsupported in checks:
        if unsupported:
            raise InvalidRequest(f"{field}: not supported by this server; leave it unset", param=field,
                                 code="unsupported_parameter")


class _Run:
    """The sequences of one request and the queue their outputs arrive on (from the engine thread)."""

    def __init__(self, server: ModelServer, target: Target, prompts: list[list[int]], req, max_tokens: int, tok):
        from tuneforge.inference import stop_ids

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine = server.engine(target)
        self.prompt_tokens = sum(len(p) for p in prompts) * req.n
        stops, decode = set(stop_ids(tok)), (lambda ids: tok.decode(ids, skip_special_tokens=True))
        self.seqs = []
        for p, prompt in enumerate(prompts):
            for i in range(req.n):
                index = p * req.n + i
                seed = None if req.seed is None else req.seed + index
                params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                        seed=seed, stop=req.stops())
                self.seqs.append(Sequence(prompt, target.adapter, params, stops, self._emitter(index), decode))

    def _emitter(self, index: int):
        return lambda out: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

    def submit(self) -> None:
        try:
            self.engine.submit(*self.seqs)
        except QueueFull as e:
            raise TooManyRequests(f"the server is busy ({e}); retry shortly", code="server_busy",
                                  headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens)

    async def outputs(self):
        """(index, Output) until every sequence has finished."""
        left = len(self.seqs)
        while left:
            index, out = await self.queue.get()
            if out.error:
                raise ServerError(f"generation failed: {out.error}")
            if out.finish_reason is not None:
                left -= 1
            yield index, out


async def _prepare(ctx: ServiceContext, server: ModelServer, org: Org, req, render) -> tuple:
    _refuse_unsupported(req)
    target = await run_in_threadpool(resolve_target, ctx, org, req.model)
    tok = await run_in_threadpool(server.tokenizer, target)
    engine = await run_in_threadpool(server.engine, target)  # loads the model on first use
    try:
        prompts = render(tok)
    except DataError as e:
        raise InvalidRequest(f"messages: {without_server_paths(str(e))}", param="messages",
                             code="invalid_messages") from None
    limit = engine.context_length
    return target, tok, prompts, limit


def _check_length(prompts: list[list[int]], max_tokens: int, limit: int, param: str) -> None:
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > limit:
        raise InvalidRequest(f"{param}: {longest} prompt tokens + max_tokens {max_tokens} exceed this model's context "
                             f"of {limit} tokens", param=param, code="context_length_exceeded")


async def _watch_disconnect(request: Request, run: _Run) -> None:
    while True:
        if await request.is_disconnected():
            run.cancel()  # frees the batch slots at the engine's next step
            return
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"


def _content_chunk(head: str, index: int, text: str) -> str:
    """A content delta, the most frequent chunk of a stream, written directly (no model per token): the same
    JSON as ChatCompletionChunk(... choices=[ChunkChoice(index, Delta(content=text))]) serialises to."""
    return (f'data: {head}"choices":[{{"index":{index},"delta":{{"role":null,"content":{json.dumps(text)}}},'
            f'"finish_reason":null,"logprobs":null}}],"usage":null,"system_fingerprint":null}}\n\n')


async def chat(ctx: ServiceContext, server: ModelServer, org: Org, req: ChatCompletionRequest, request: Request):
    from tuneforge.data.encode import encode_prompt

    from tuneforge.data.chat import check_prompt

    problems = check_prompt(req.messages)
    if problems:
        field, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidRequest(f"{field}: {message}{more}", param=field, code="invalid_messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    target, tok, prompts, limit = await _prepare(
        ctx, server, org, req, lambda tok: [encode_prompt(tok, "chat", {"messages": req.messages})])
    _check_length(prompts, max_tokens if (req.max_completion_tokens or req.max_tokens) else 1, limit, "messages")
    max_tokens = min(max_tokens, limit - len(prompts[0]))
    run = _Run(server, target, prompts, req, max_tokens, tok)
    run.submit()
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    if req.stream:
        return StreamingResponse(_chat_stream(run, req, rid, created), media_type="text/event-stream")
    texts, reasons, usage = await _collect(run, request)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r)
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse(ChatCompletion(id=rid, created=created, model=req.model, choices=choices,
                                       usage=usage).model_dump(mode="json"))


async def _collect(run: _Run, request: Request) -> tuple[list[str], list[str | None], Usage]:
    """Every choice's whole text and finish reason, and the usage; stops the rows if the client goes away."""
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    texts, reasons, completion_tokens = [""] * len(run.seqs), [None] * len(run.seqs), 0
    try:
        async for index, out in run.outputs():
            texts[index] += out.text
            if out.finish_reason:
                reasons[index] = out.finish_reason
                completion_tokens += len(out.token_ids)
    finally:
        watcher.cancel()
        run.cancel()
    return texts, reasons, run.usage(completion_tokens)


async def _chat_stream(run: _Run, req: ChatCompletionRequest, rid: str, created: int):
    completion_tokens = 0
    head = (f'{{"id":{json.dumps(rid)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(req.model)},')
    try:
        for i in range(len(run.seqs)):
            yield _sse(ChatCompletionChunk(id=rid, created=created, model=req.model,
                                           choices=[ChunkChoice(index=i, delta=Delta(role="assistant", content=""))]))
        async for index, out in run.outputs():
            if out.text:
                yield _content_chunk(head, index, out.text)
            if out.finish_reason:
                completion_tokens += len(out.token_ids)
                yield _sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[
                    ChunkChoice(index=index, delta=Delta(), finish_reason=out.finish_reason)]))
        if req.stream_options and req.stream_options.include_usage:
            usage = run.usage(completion_tokens)
            yield _sse(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield "data: [DONE]\n\n"
    except ServerError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        run.cancel()  # a client that went away stops its rows at once


async def complete(ctx: ServiceContext, server: ModelServer, org: Org, req: CompletionRequest, request: Request):
    from tuneforge.data.encode import encode_prompt

    texts_in = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not texts_in:
        raise InvalidRequest("prompt: give at least one prompt", param="prompt")
    max_tokens = req.max_tokens or 16
    target, tok, prompts, limit = await _prepare(
        ctx, server, org, req, lambda tok: [encode_prompt(tok, "completion", p) for p in texts_in])
    if not all(prompts):
        raise InvalidRequest("prompt: an empty prompt has nothing to continue", param="prompt")
    _check_length(prompts, max_tokens, limit, "prompt")
    run = _Run(server, target, prompts, req, max_tokens, tok)
    run.submit()
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    if req.stream:
        return StreamingResponse(_completion_stream(run, req, rid, created), media_type="text/event-stream")
    texts, reasons, usage = await _collect(run, request)
    choices = [CompletionChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse(Completion(id=rid, created=created, model=req.model, choices=choices,
                                   usage=usage).model_dump(mode="json"))


async def _completion_stream(run: _Run, req: CompletionRequest, rid: str, created: int):
    completion_tokens = 0
    try:
        async for index, out in run.outputs():
            if out.finish_reason:
                completion_tokens += len(out.token_ids)
            if out.text or out.finish_reason:
                yield _sse(Completion(id=rid, created=created, model=req.model, choices=[
                    CompletionChoice(index=index, text=out.text, finish_reason=out.finish_reason)]))
        if req.stream_options and req.stream_options.include_usage:
            usage = run.usage(completion_tokens)
            yield _sse(Completion(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield "data: [DONE]\n\n"
    except ServerError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        run.cancel()
