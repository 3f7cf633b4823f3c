"""OpenAI's chat fine-tuning format: text parts, names, tool calls and tool messages, read the same way by
validation, training (loss masks) and evaluation (prompts and references)."""
from __future__ import annotations

import copy
import json

import pytest

from tuneforge.data.encode import IGNORE_INDEX, encode_chat, encode_prompt, encode_records
from tuneforge.data.validate import validate_jsonl
from tuneforge.errors import DataError, Problem
from tuneforge.models.tiny import make_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CONVO = {
    "messages": [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Weather in "},
                                                   {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "tool_calls": [CALL]},  # no content: the turn is only the call
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": '{"temp_c": 21}'}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 21 C in Paris."}]},
    ],
    "tools": TOOLS,
    "parallel_tool_calls": False,
}
PLAIN = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
PARTS = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of "},
                                                   {"type": "text", "text": "France?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]}]}

# ChatML that also renders tools and tool calls (as Qwen2.5's template does, in fewer lines).
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write(tmp_path, *records, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def target_runs(tokenizer, example) -> list[str]:
    runs, current = [], []
    for tok_id, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(tok_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def tool_tokenizer():
    tok = make_tokenizer("llama")
    tok.chat_template = TOOL_TEMPLATE
    return tok


# --- validation ---------------------------------------------------------------------------------------------

def test_openai_format_is_valid(tmp_path):
    null_content = copy.deepcopy(TOOL_CONVO)
    null_content["messages"][2]["content"] = None
    null_content["messages"][3]["content"] = '{"temp_c": 21}'
    path = write(tmp_path, TOOL_CONVO, null_content, PARTS)
    report = validate_jsonl(path, "chat")
    assert [str(p) for p in report.errors + report.warnings] == []
    assert report.lines == [1, 2, 3]


def with_message(i: int, **changes) -> dict:
    rec = copy.deepcopy(TOOL_CONVO)
    for key, value in changes.items():
        if value is ...:
            del rec["messages"][i][key]
        else:
            rec["messages"][i][key] = value
    return rec


def with_record(**changes) -> dict:
    rec = copy.deepcopy(TOOL_CONVO)
    rec.update(changes)
    return rec


TEXT_PARTS = '({"type": "text", "text": "..."})'


@pytest.mark.parametrize("record, expected", [
    (with_message(1, content=[{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": "x"}}]),
     [f"messages[1].content[1].type: 'image_url' parts are not supported; only text parts {TEXT_PARTS} can be trained on"]),
    (with_message(1, content=["Weather?"]),
     ['messages[1].content[0]: must be a text part {"type": "text", "text": "..."}, got string']),
    (with_message(1, content=[{"type": "text", "text": None}]), ["messages[1].content[0].text: must be a string, got null"]),
    (with_message(1, content=7), ["messages[1].content: must be a string or a list of text parts, got int"]),
    (with_message(1, name=3), ["messages[1].name: must be a string, got int"]),
    (with_message(4, content=None), ["messages[4].content: must be a string or a list of text parts, got null"]),
    (with_message(4, content=[]), ["messages[4].content: assistant reply is empty: nothing to learn"]),
    (with_message(2, tool_calls={"id": "call_1"}), ["messages[2].tool_calls: must be a non-empty list of tool calls, got object"]),
    (with_message(2, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]),
     ["messages[2].tool_calls[0].id: missing; give each tool call an id that its tool message's tool_call_id names"]),
    (with_message(2, tool_calls=[{**CALL, "type": "code"}]), ['messages[2].tool_calls[0].type: must be "function", got "code"']),
    (with_message(2, tool_calls=[{**CALL, "function": "get_weather"}]),
     ["messages[2].tool_calls[0].function: must be an object with name and arguments, got string"]),
    (with_message(2, tool_calls=[{**CALL, "function": {"arguments": "{}"}}]), ["messages[2].tool_calls[0].function.name: missing"]),
    (with_message(2, tool_calls=[{**CALL, "function": {"name": "get_wether", "arguments": "{}"}}]),
     ["messages[2].tool_calls[0].function.name: 'get_wether' is not one of the record's tools (did you mean 'get_weather'?): get_weather"]),
    (with_message(2, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]),
     ["messages[2].tool_calls[0].function.arguments: must be a string holding JSON (OpenAI format), got object"]),
    (with_message(2, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": "city=Paris"}}]),
     ["messages[2].tool_calls[0].function.arguments: not valid JSON: Expecting value at column 1"]),
    (with_message(1, tool_calls=[CALL]), ["messages[1].tool_calls: only assistant turns make tool calls"]),
    (with_message(3, tool_call_id=...), ["messages[3].tool_call_id: missing; a tool message names the tool call it answers"]),
    (with_message(3, tool_call_id="call_9"), ["messages[3].tool_call_id: 'call_9' matches no tool call of messages[2]"]),
    (with_message(1, tool_call_id="call_1"), ["messages[1].tool_call_id: only tool messages answer a tool call; remove it"]),
    (with_message(3, weight=1), ["messages[3].weight: weight only applies to assistant turns; remove it"]),
    (with_message(2, tool_calls=...), ["messages[2].content: missing; add \"content\": \"<the text of this turn>\"",
                                       "messages[3].role: a tool message must follow an assistant turn with tool_calls"]),
    (with_record(tools={"get_weather": {}}), ["tools: must be a list of tools, got object"]),
    (with_record(tools=[{"type": "retrieval"}]), ['tools[0].type: must be "function", got "retrieval"',
                                                  "tools[0].function: missing"]),
    (with_record(tools=[{"type": "function", "function": {"description": "?"}}]), ["tools[0].function.name: missing"]),
    (with_record(parallel_tool_calls="yes"), ['parallel_tool_calls: must be true or false, got string "yes"']),
])
def test_openai_format_problem_names_line_and_field(tmp_path, record, expected):
    path = write(tmp_path, PLAIN, record)
    report = validate_jsonl(path, "chat")
    assert [str(p) for p in report.errors] == [f"{path} line 2: {e}" for e in expected]
    assert report.lines == [1]


# --- rendering and loss masks -------------------------------------------------------------------------------

def test_tool_call_turns_are_targets_and_tool_results_are_masked():
    tok = tool_tokenizer()
    ex = encode_chat(tok, TOOL_CONVO)
    text = tok.decode(ex.input_ids)
    # the tools are declared, the user's text parts are joined, and the arguments render as JSON (not a string)
    assert text.startswith('<|im_start|>system\nTools: [{"type": "function", "function": {"name": "get_weather"')
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>" in text
    assert target_runs(tok, ex) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n',
        "It is 21 C in Paris.<|im_end|>\n",
    ]
    assert '<|im_start|>tool\n{"temp_c": 21}<|im_end|>' in text  # in the input, never a target


def test_weight_zero_tool_call_turn_is_not_a_target():
    tok = tool_tokenizer()
    rec = with_message(2, weight=0)
    assert target_runs(tok, encode_chat(tok, rec)) == ["It is 21 C in Paris.<|im_end|>\n"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_text_parts_encode_like_strings(arch):
    tok = make_tokenizer(arch)
    a, b = encode_chat(tok, PARTS), encode_chat(tok, {"messages": [
        {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]})
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    prompt = PARTS["messages"][:1]
    assert encode_prompt(tok, "chat", prompt) == encode_prompt(tok, "chat", "Capital of France?")


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_template_without_tool_support_is_a_data_error_naming_file_line_and_field(arch):
    tok = make_tokenizer(arch)  # the tiny ChatML / Phi-3 templates, like SmolLM2's, ignore tools and tool_calls
    with pytest.raises(DataError) as e:
        encode_records(tok, "chat", [PLAIN, TOOL_CONVO, PARTS], [1, 3, 4], 512, source="train.jsonl")
    assert e.value.problems == [
        Problem("train.jsonl", 3, "tools", "the chat template of this model does not render tool definitions; "
                "use a model whose template does (e.g. Qwen2.5-Instruct) or set data.chat_template to one that does"),
        Problem("train.jsonl", 3, "messages[2].tool_calls", "the chat template of this model does not render tool "
                "calls; use a model whose template does (e.g. Qwen2.5-Instruct) or set data.chat_template to one that does"),
    ]
    assert str(e.value).startswith("train.jsonl: 1 example(s) cannot be rendered by this model's chat template:\n"
                                   "  train.jsonl line 3: tools: the chat template")


def test_chat_prompt_record_with_tools_renders_them():
    tok = tool_tokenizer()
    ids = encode_prompt(tok, "chat", {"messages": TOOL_CONVO["messages"][:2], "tools": TOOLS})
    assert tok.decode(ids).startswith("<|im_start|>system\nTools: [")
    assert tok.decode(ids).endswith("Weather in Paris?<|im_end|>\n<|im_start|>assistant\n")


def test_evaluation_reference_is_the_text_of_the_last_reply():
    from tuneforge.evaluation.runner import prompt_and_reference

    prompt, reference = prompt_and_reference("chat", TOOL_CONVO)
    assert reference == "It is 21 C in Paris."
    assert prompt == {"messages": TOOL_CONVO["messages"][:4], "tools": TOOLS}  # the model is asked with its tools


@pytest.mark.slow
def test_smollm2_template_refuses_tool_calls_and_joins_text_parts(smollm2_tokenizer):
    # SmolLM2's ChatML template prints role and content only: tool calls would vanish from training
    with pytest.raises(DataError) as e:
        encode_records(smollm2_tokenizer, "chat", [TOOL_CONVO], [2], 512, source="train.jsonl")
    assert [str(p) for p in e.value.problems] == [
        "train.jsonl line 2: tools: the chat template of this model does not render tool definitions; use a model "
        "whose template does (e.g. Qwen2.5-Instruct) or set data.chat_template to one that does",
        "train.jsonl line 2: messages[2].tool_calls: the chat template of this model does not render tool calls; use "
        "a model whose template does (e.g. Qwen2.5-Instruct) or set data.chat_template to one that does",
    ]
    ex = encode_chat(smollm2_tokenizer, PARTS)
    assert target_runs(smollm2_tokenizer, ex) == ["Paris.<|im_end|>\n"]
