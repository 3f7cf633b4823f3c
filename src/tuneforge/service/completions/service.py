"""Chat completions and completions over the serving engines: which model answers (org rules), the prompt
(the model's or the run's chat template, or token ids), constraints (response_format and tools through
serving/grammar.py), sampling, log-probabilities, streaming, usage. Testable without HTTP apart from the
answer objects it returns.

Log-probabilities (serving/sampling.py says exactly which distribution): chat `logprobs` + `top_logprobs` and
completions `logprobs` report each generated token's; completions `echo` with `logprobs` reports the prompt's
too (the first prompt token's is null), and `max_tokens: 0` scores a prompt without generating.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuneforge.errors import DataError, ModelError
from tuneforge.service.auth import Org
from tuneforge.service.completions.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                                                    ChatCompletionRequest, ChoiceLogprobs, ChunkChoice, Completion,
                                                    CompletionChoice, CompletionLogprobs, CompletionRequest, Delta,
                                                    DeltaToolCall, FunctionCall, TokenLogprob, ToolCall, TopLogprob,
                                                    Usage)
from tuneforge.service.completions.tools import CallStream, call_id, parse_calls
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import InvalidRequest, NotFound, ServerError, TooManyRequests, without_server_paths
from tuneforge.serving.registry import ModelServer, Target, checkpoint_target, operator_models, run_target
from tuneforge.serving.sequence import QueueFull, SamplingParams, Sequence

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
              ("frequency_penalty", req.frequency_penalty not in (None, 0)), ("logit_bias", bool(req.logit_bias))]
    if isinstance(req, ChatCompletionRequest):
        if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
            raise InvalidRequest("give max_completion_tokens or max_tokens, not both with different values",
                                 param="max_completion_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs: set logprobs to true to use it", param="top_logprobs")
        if req.tool_choice is not None and not req.tools:
            raise InvalidRequest("tool_choice: only allowed when tools are given", param="tool_choice")
        if req.tools and req.tool_choice != "none" and req.response_format is not None \
                and req.response_format.type != "text":
            raise InvalidRequest("response_format: give response_format or tools, not both (or tool_choice none)",
                                 param="response_format")
    else:
        checks += [("suffix", req.suffix is not None), ("best_of", req.best_of not in (None, 1))]
    for field, unsupported in checks:
        if unsupported:
            raise InvalidRequest(f"{field}: not supported by this server; leave it unset", param=field,
                                 code="unsupported_parameter")


@dataclass
class _Options:
    """What the engine is asked for each sequence of a request, besides its prompt."""

    max_tokens: int
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: object | None = None  # a compiled grammar (serving.grammar.Vocabulary.json or .tools)
    vocabulary: object | None = None  # serving.grammar.Vocabulary, for grammars and token bytes


class _Run:
    """The sequences of one request and the queue their outputs arrive on (from the engine thread)."""

    def __init__(self, server: ModelServer, target: Target, prompts: list[list[int]], req, options: _Options, tok):
        from tuneforge.inference import stop_ids

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine = server.engine(target)
        self.prompt_tokens = sum(len(p) for p in prompts) * req.n
        self.tokens = [0] * (len(prompts) * req.n)  # each choice's completion tokens so far
        stops, decode = set(stop_ids(tok)), (lambda ids: tok.decode(ids, skip_special_tokens=True))
        self.seqs = []
        for p, prompt in enumerate(prompts):
            for i in range(req.n):
                index = p * req.n + i
                seed = None if req.seed is None else req.seed + index
                params = SamplingParams(max_tokens=options.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                        seed=seed, stop=req.stops(), logprobs=options.logprobs,
                                        prompt_logprobs=options.prompt_logprobs, min_tokens=req.min_tokens,
                                        ignore_eos=req.ignore_eos)
                constraint = options.vocabulary.constraint(options.grammar) if options.grammar is not None else None
                self.seqs.append(Sequence(prompt, target.adapter, params, stops, self._emitter(index), decode,
                                          constraint=constraint))

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

    def usage(self) -> Usage:
        completion = sum(self.tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    async def outputs(self):
        """(index, Output) until every sequence has finished."""
        left = len(self.seqs)
        while left:
            index, out = await self.queue.get()
            if out.error:
                raise ServerError(f"generation failed: {out.error}")
            self.tokens[index] = out.tokens
            if out.finish_reason is not None:
                left -= 1
            yield index, out


class _Tokens:
    """Token ids as the API writes them: text and UTF-8 bytes (serving.grammar.Vocabulary's)."""

    def __init__(self, vocabulary):
        self.vocabulary = vocabulary

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def bytes(self, token: int) -> bytes:
        return self.vocabulary.token_bytes(token)

    def chat(self, entries) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[
            TokenLogprob(token=self.text(e.token), bytes=list(self.bytes(e.token)), logprob=e.logprob,
                         top_logprobs=[TopLogprob(token=self.text(t), bytes=list(self.bytes(t)), logprob=v)
                                       for t, v in e.top])
            for e in entries])

    def completion(self, entries, offset: int) -> CompletionLogprobs:
        tokens, offsets = [], []
        for e in entries:
            tokens.append(self.text(e.token))
            offsets.append(offset)
            offset += len(tokens[-1])
        tops = [None if e.logprob is None else {self.text(t): v for t, v in e.top} for e in entries]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries], top_logprobs=tops,
                                  text_offset=offsets)


async def _prepare(ctx: ServiceContext, server: ModelServer, org: Org, req) -> tuple:
    _refuse_unsupported(req)
    target = await run_in_threadpool(resolve_target, ctx, org, req.model)
    tok = await run_in_threadpool(server.tokenizer, target)
    engine = await run_in_threadpool(server.engine, target)  # loads the model on first use
    return target, tok, engine


async def _vocabulary(server: ModelServer, target: Target, param: str):
    """The model's vocabulary for grammars and token bytes; a tokenizer it cannot read makes `param` (the field
    that needs it) unavailable for this model: a 400 naming it, not a server error."""
    try:
        return await run_in_threadpool(server.vocabulary, target)
    except ModelError as e:
        raise InvalidRequest(f"{param}: not available for this model ({without_server_paths(str(e))})",
                             param=param, code="unsupported_for_model") from None


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


async def _events(run: _Run, req, body, usage):
    """A stream's server-sent events: `body`'s, the usage chunk (`usage()`) when asked for, then [DONE]; a
    failed generation ends it with the error; the rows stop at once when the client goes away."""
    try:
        async for event in body:
            yield event
        if req.stream_options and req.stream_options.include_usage:
            yield _sse(usage())
        yield "data: [DONE]\n\n"
    except ServerError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        run.cancel()


def _sse(obj) -> str:
    return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"


def _content_chunk(head: str, index: int, text: str) -> str:
    """A content delta, the most frequent chunk of a stream, written directly (no model per token): the same
    JSON as ChatCompletionChunk(... choices=[ChunkChoice(index, Delta(content=text))]) serialises to."""
    return (f'data: {head}"choices":[{{"index":{index},"delta":{{"role":null,"content":{json.dumps(text)},'
            f'"tool_calls":null}},"finish_reason":null,"logprobs":null}}],"usage":null,"system_fingerprint":null}}\n\n')


# ---------------------------------------------------------------------------------------------- chat


@dataclass
class _ChatPlan:
    """A chat request turned into what the engine runs and how its output is read."""

    prompt: list[int]
    options: _Options
    tools: bool  # read tool calls out of the output


async def _plan_chat(server: ModelServer, target: Target, tok, engine, req: ChatCompletionRequest) -> _ChatPlan:
    from tuneforge.data.chat import tool_problems
    from tuneforge.data.encode import encode_prompt
    from tuneforge.serving.grammar import GrammarError

    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    record = {"messages": req.messages, "tools": tools}
    if tools and tool_problems(tok, {"messages": [], "tools": tools}):
        if choice != "none":
            raise InvalidRequest("tools: the chat template of this model does not render tool definitions, so it "
                                 "cannot be asked to call them; serve a model fine-tuned with a template that does "
                                 "(examples/tools.yaml)", param="tools", code="tools_not_supported")
        record = {"messages": req.messages}  # tool_choice none: the tools are context the template cannot show
    try:
        prompt = encode_prompt(tok, "chat", record)
    except DataError as e:
        raise InvalidRequest(f"messages: {without_server_paths(str(e))}", param="messages",
                             code="invalid_messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_CHAT_MAX_TOKENS
    _check_length([prompt], max_tokens if (req.max_completion_tokens or req.max_tokens) else 1, engine.context_length,
                  "messages")
    options = _Options(max_tokens=min(max_tokens, engine.context_length - len(prompt)),
                       logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    use_tools = bool(tools) and choice != "none"
    wants_json = req.response_format is not None and req.response_format.type != "text"
    if req.logprobs or use_tools or wants_json:
        need = "response_format" if wants_json else "tools" if use_tools else "logprobs"
        options.vocabulary = await _vocabulary(server, target, need)
    if use_tools:
        functions = [{"name": t["function"]["name"], "parameters": t["function"].get("parameters")} for t in tools]
        if not isinstance(choice, str):
            functions = [f for f in functions if f["name"] == choice.function.name]
            if not functions:
                raise InvalidRequest(f"tool_choice: no tool named {choice.function.name!r} in tools",
                                     param="tool_choice")
        how = choice if isinstance(choice, str) else "named"
        try:
            options.grammar = await run_in_threadpool(options.vocabulary.tools, functions, how,
                                                      req.parallel_tool_calls is not False)
        except GrammarError as e:
            raise InvalidRequest(f"tools: a function's parameters are not a JSON schema this server can follow: {e}",
                                 param="tools", code="invalid_schema") from None
    elif wants_json:
        schema, strict = None, True
        if req.response_format.type == "json_schema":
            schema, strict = req.response_format.json_schema.schema_, req.response_format.json_schema.strict is not False
        try:
            options.grammar = await run_in_threadpool(options.vocabulary.json, schema, strict)
        except GrammarError as e:
            raise InvalidRequest(f"response_format.json_schema.schema: not a JSON schema this server can follow: {e}",
                                 param="response_format.json_schema.schema", code="invalid_schema") from None
    return _ChatPlan(prompt, options, use_tools)


async def chat(ctx: ServiceContext, server: ModelServer, org: Org, req: ChatCompletionRequest, request: Request):
    from tuneforge.data.chat import check_prompt

    problems = check_prompt(req.messages, [t.model_dump() for t in req.tools] if req.tools else None)
    if problems:
        field, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidRequest(f"{field}: {message}{more}", param=field, code="invalid_messages")
    target, tok, engine = await _prepare(ctx, server, org, req)
    plan = await _plan_chat(server, target, tok, engine, req)
    run = _Run(server, target, [plan.prompt], req, plan.options, tok)
    run.submit()
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    tokens = _Tokens(plan.options.vocabulary) if plan.options.vocabulary is not None else None
    if req.stream:
        return StreamingResponse(_chat_stream(run, req, rid, created, plan, tokens), media_type="text/event-stream")
    outs = await _collect(run, request)
    choices = []
    for i, (text, reason, entries) in enumerate(outs):
        content, calls = parse_calls(text) if plan.tools else (text, [])
        message = AssistantMessage(content=content, tool_calls=[
            ToolCall(id=call_id(), function=FunctionCall(**c)) for c in calls] or None)
        choices.append(ChatChoice(index=i, message=message, finish_reason="tool_calls" if calls and reason == "stop"
                                  else reason, logprobs=tokens.chat(entries) if req.logprobs else None))
    return JSONResponse(ChatCompletion(id=rid, created=created, model=req.model, choices=choices,
                                       usage=run.usage()).model_dump(mode="json"))


async def _collect(run: _Run, request: Request) -> list[tuple[str, str, list]]:
    """Every choice's (whole text, finish reason, generated tokens' log-probabilities), with the prompt's
    log-probabilities first when asked for; stops the rows if the client goes away."""
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    texts, reasons, entries = [""] * len(run.seqs), [None] * len(run.seqs), [[] for _ in run.seqs]
    try:
        async for index, out in run.outputs():
            texts[index] += out.text
            entries[index] += (out.prompt_logprobs or []) + out.logprobs
            if out.finish_reason:
                reasons[index] = out.finish_reason
    finally:
        watcher.cancel()
        run.cancel()
    return list(zip(texts, reasons, entries))


def _chat_stream(run: _Run, req: ChatCompletionRequest, rid: str, created: int, plan: _ChatPlan, tokens):
    head = (f'{{"id":{json.dumps(rid)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{json.dumps(req.model)},')
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    calls = [CallStream() for _ in run.seqs] if plan.tools else None
    called = [0] * len(run.seqs)

    def chunk(index: int, delta: Delta, finish_reason=None, logprobs=None) -> str:
        return _sse(ChatCompletionChunk(id=rid, created=created, model=req.model, usage=run.usage() if continuous
                                        else None, choices=[ChunkChoice(index=index, delta=delta, logprobs=logprobs,
                                                                        finish_reason=finish_reason)]))

    async def body():
        for i in range(len(run.seqs)):
            yield chunk(i, Delta(role="assistant", content=""))
        async for index, out in run.outputs():
            text, new_calls = out.text, []
            if calls is not None:
                text, new_calls = calls[index].feed(out.text, final=out.finish_reason is not None)
            logprobs = tokens.chat(out.logprobs) if req.logprobs and out.logprobs else None
            if text and logprobs is None and not continuous:
                yield _content_chunk(head, index, text)
            elif text or logprobs is not None:
                yield chunk(index, Delta(content=text or None), logprobs=logprobs)
            for call in new_calls:
                yield chunk(index, Delta(tool_calls=[DeltaToolCall(index=called[index], id=call_id(), type="function",
                                                                   function=FunctionCall(**call))]))
                called[index] += 1
            if out.finish_reason:
                reason = "tool_calls" if called[index] and out.finish_reason == "stop" else out.finish_reason
                yield chunk(index, Delta(), finish_reason=reason)

    usage = lambda: ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=run.usage())  # noqa: E731
    return _events(run, req, body(), usage)


# ---------------------------------------------------------------------------------------------- completions


async def complete(ctx: ServiceContext, server: ModelServer, org: Org, req: CompletionRequest, request: Request):
    from tuneforge.data.encode import encode_prompt

    given = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
        else list(req.prompt)
    if not given:
        raise InvalidRequest("prompt: give at least one prompt", param="prompt")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    target, tok, engine = await _prepare(ctx, server, org, req)
    prompts = [p if isinstance(p, list) else encode_prompt(tok, "completion", p) for p in given]
    if not all(prompts):
        raise InvalidRequest("prompt: an empty prompt has nothing to continue", param="prompt")
    vocab = engine.vocab_size
    if any(t >= vocab for p in prompts for t in p):
        raise InvalidRequest(f"prompt: token ids of this model are below {vocab}", param="prompt",
                             code="invalid_token_id")
    _check_length(prompts, max_tokens, engine.context_length, "prompt")
    scored = req.echo and req.logprobs is not None
    if scored and not engine.scores_prompts:
        raise InvalidRequest("echo: prompt log-probabilities are not available for ONNX exports; leave echo or "
                             "logprobs unset", param="echo", code="unsupported_parameter")
    options = _Options(max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=req.logprobs if scored else None)
    if req.logprobs is not None:
        options.vocabulary = await _vocabulary(server, target, "logprobs")
    run = _Run(server, target, prompts, req, options, tok)
    run.submit()
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    echoed = [tok.decode(p, skip_special_tokens=False) if isinstance(g, list) else g for g, p in zip(given, prompts)]
    echoed = [text for text in echoed for _ in range(req.n)] if req.echo else [""] * len(run.seqs)
    tokens = _Tokens(options.vocabulary) if options.vocabulary is not None else None
    if req.stream:
        return StreamingResponse(_completion_stream(run, req, rid, created, echoed, tokens),
                                 media_type="text/event-stream")
    outs = await _collect(run, request)
    choices = [CompletionChoice(index=i, text=echoed[i] + text, finish_reason=reason,
                                logprobs=tokens.completion(entries, 0) if tokens else None)
               for i, (text, reason, entries) in enumerate(outs)]
    return JSONResponse(Completion(id=rid, created=created, model=req.model, choices=choices,
                                   usage=run.usage()).model_dump(mode="json"))


def _completion_stream(run: _Run, req: CompletionRequest, rid: str, created: int, echoed: list[str], tokens):
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    sent = [None] * len(run.seqs)  # characters of each choice's text sent so far (None: nothing yet)

    async def body():
        async for index, out in run.outputs():
            text = out.text if sent[index] is not None else echoed[index] + out.text  # the echo comes first
            entries = (out.prompt_logprobs or []) + out.logprobs
            logprobs = tokens.completion(entries, sent[index] or 0) if tokens is not None and entries else None
            sent[index] = (sent[index] or 0) + len(text)
            if text or out.finish_reason or logprobs:
                yield _sse(Completion(id=rid, created=created, model=req.model, usage=run.usage() if continuous else None,
                                      choices=[CompletionChoice(index=index, text=text, finish_reason=out.finish_reason,
                                                                logprobs=logprobs)]))

    usage = lambda: Completion(id=rid, created=created, model=req.model, choices=[], usage=run.usage())  # noqa: E731
    return _events(run, req, body(), usage)
