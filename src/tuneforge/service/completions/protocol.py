"""Chat completions and completions shapes, as the openai SDK's ChatCompletion(Chunk) and Completion define
them. Request fields this server cannot honour are refused with a 400 naming them, never ignored."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_STOP, MAX_STOP_CHARS = 4, 256  # OpenAI: up to 4 stop sequences
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit seed, as OpenAI and vLLM take it (torch's generators take any of them)


def _stop(value):
    """A string or a list of up to 4 strings, with one message in the API's terms when it is neither."""
    if value is None:
        return value
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"must be a string or a list of up to {MAX_STOP} strings")
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(items)}")
    if any(len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
    return value


MAX_PROMPTS = 64  # prompts in one completions request (each becomes n sequences)
TOKEN_ID_RANGE = (0, 2**31 - 1)  # checked against the model's vocabulary once it is known
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


def _prompt(value):
    """A completions prompt as OpenAI and vLLM take it: a string, a list of strings, a list of token ids or a
    list of such lists; one message in the API's terms when it is none of them."""
    shape = f"must be a string, a list of strings, a list of token ids or a list of lists of token ids " \
            f"(at most {MAX_PROMPTS} prompts)"
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError(shape)
    if value and all(type(t) is int for t in value):
        return _token_ids(value, shape)
    if len(value) > MAX_PROMPTS:
        raise ValueError(shape)
    if all(isinstance(p, str) for p in value):
        return value
    if all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in value):
        return [_token_ids(p, shape) for p in value]
    raise ValueError(shape)


def _token_ids(ids: list[int], shape: str) -> list[int]:
    if not all(TOKEN_ID_RANGE[0] <= t <= TOKEN_ID_RANGE[1] for t in ids):
        raise ValueError(f"token ids are from {TOKEN_ID_RANGE[0]} to {TOKEN_ID_RANGE[1]}; {shape}")
    return ids


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="Extension (vLLM): usage so far in every chunk.")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=512)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8)
    stop: Annotated[str | Annotated[list[str], Field(max_length=MAX_STOP)] | None, BeforeValidator(_stop)] = Field(
        None, description=f"Up to {MAX_STOP} sequences (each at most {MAX_STOP_CHARS} characters) where generation stops.")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Accepted only at their neutral values (anything else is a clear 400).
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    # Extensions (vLLM's, sent by load testers such as guidellm).
    ignore_eos: bool = Field(False, description="Extension (vLLM): never stop at the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, le=1_000_000, description="Extension (vLLM): stop tokens and stop strings "
                            "cannot end the output before this many tokens.")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: any JSON object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class ResponseFormatJSONSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
                           Field(discriminator="type")]


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_prompt)] = Field(
        description="A string, a list of strings, a list of token ids or a list of lists of token ids.")
    max_tokens: int | None = Field(16, ge=0, le=1_000_000)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo the first prompt token's entries are null (nothing predicts it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
