"""The tool-call scenario's dataset (`tuneforge data generate tools`): OpenAI-format chats in which an
assistant calls one of three functions with JSON-schema arguments, generated from templates and word lists
(license-clean, deterministic for a seed).

    {"tools": [TOOLS...], "messages": [{"role": "user", "content": "Convert 40 EUR to JPY."},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function",
        "function": {"name": "convert_currency", "arguments": "{\"amount\": 40, \"from\": \"EUR\", \"to\": \"JPY\"}"}}]}]}

Most records end with the call; some go on with the tool's result and the assistant's answer from it; some
are small talk that calls nothing, so the model learns that a call is a choice. Arguments list every
property (OpenAI's strict mode requires them all) in the schema's order, the order a grammar that follows
the schema writes them in; every string and number is bounded, so a call constrained by its schema ends
within a known number of tokens whatever the model. SmolLM2's own chat template does not render tools: examples/tools.yaml trains
with a template that does.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Valencia", "Winnipeg", "Zagreb", "Accra", "Bergen",
          "Hanoi", "Lima", "Porto", "Kraków", "Dakar", "Perth")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD")
LABELS = ("pasta", "tea", "laundry", "stretch break", "oven", "meeting", "bread", "call home")
SKIES = ("sunny", "cloudy", "rainy", "windy", "foggy")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40, "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "minimum": 0, "maximum": 1000000},
            "from": {"type": "string", "enum": list(CURRENCIES)},
            "to": {"type": "string", "enum": list(CURRENCIES)}},
            "required": ["amount", "from", "to"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "set_timer", "description": "Start a countdown timer.",
        "parameters": {"type": "object", "properties": {
            "minutes": {"type": "integer", "minimum": 1, "maximum": 180},
            "label": {"type": "string", "maxLength": 40}},
            "required": ["minutes", "label"], "additionalProperties": False}}},
]

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mara")
SMALL_TALK = [("Hello, I'm {name}!", "Hello {name}! I can check the weather, convert currencies or set a timer."),
              ("Thanks, that's all. Bye from {name}.", "You're welcome, {name}!"),
              ("{name} here. What can you do?", "Hi {name}! I can check the weather in a city, convert money between "
               "currencies and set timers."),
              ("Good morning, this is {name}", "Good morning, {name}! How can I help?")]


def _weather(rng: random.Random) -> tuple[str, dict, str]:
    city = rng.choice(CITIES)
    unit = rng.choice(["celsius", "fahrenheit", None])
    said = {"celsius": rng.choice([" in Celsius", " in °C"]), "fahrenheit": rng.choice([" in Fahrenheit", " in °F"]),
            None: ""}[unit]
    ask = rng.choice([f"What's the weather in {city}{said}?", f"How warm is it in {city} right now{said}?",
                      f"Weather for {city}{said}, please.", f"Is it raining in {city}?{said and ' Answer' + said + '.'}"])
    return ask, {"city": city, "unit": unit or "celsius"}, city


def _currency(rng: random.Random) -> tuple[str, dict, str]:
    source, target = rng.sample(CURRENCIES, 2)
    amount = rng.choice([rng.randint(1, 999), round(rng.uniform(1, 500), 2)])
    ask = rng.choice([f"Convert {amount} {source} to {target}.", f"How much is {amount} {source} in {target}?",
                      f"I have {amount} {source}. What is that in {target}?"])
    return ask, {"amount": amount, "from": source, "to": target}, target


def _timer(rng: random.Random) -> tuple[str, dict, str]:
    minutes, label = rng.randint(1, 90), rng.choice(LABELS)
    ask = rng.choice([f"Set a timer for {minutes} minutes for the {label}.", f"Remind me in {minutes} minutes: {label}.",
                      f"Start a {minutes} minute timer called {label}."])
    return ask, {"minutes": minutes, "label": label}, label


CALLS = {"get_weather": _weather, "convert_currency": _currency, "set_timer": _timer}


def _result(rng: random.Random, name: str, args: dict) -> tuple[dict, str]:
    """A made-up tool result and the answer an assistant gives from it."""
    if name == "get_weather":
        degrees, sky = rng.randint(-5, 35), rng.choice(SKIES)
        if args["unit"] == "fahrenheit":
            degrees = round(degrees * 9 / 5 + 32)
        mark = "°F" if args["unit"] == "fahrenheit" else "°C"
        return {"temperature": degrees, "sky": sky}, f"It is {degrees} {mark} and {sky} in {args['city']}."
    if name == "convert_currency":
        value = round(args["amount"] * rng.uniform(0.5, 160), 2)
        return {"amount": value, "currency": args["to"]}, f"{args['amount']} {args['from']} is {value} {args['to']}."
    return {"status": "started"}, f"Timer set: {args['minutes']} minutes for the {args['label']}."


def make_tool_chat(rng: random.Random) -> dict:
    if rng.random() < 0.12:
        ask, reply = rng.choice(SMALL_TALK)
        name = rng.choice(NAMES)
        ask, reply = ask.format(name=name), reply.format(name=name)
        return {"tools": TOOLS, "messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": reply}]}
    name = rng.choice(list(CALLS))
    ask, args, _ = CALLS[name](rng)
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
    messages = [{"role": "user", "content": ask}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    if rng.random() < 0.25:
        result, answer = _result(rng, name, args)
        messages += [{"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result)},
                     {"role": "assistant", "content": answer}]
    return {"tools": TOOLS, "messages": messages}


def expected_call(record: dict) -> dict | None:
    """The first call a record's assistant makes ({"name", "arguments" as an object}), or None."""
    for m in record["messages"]:
        if m["role"] == "assistant" and m.get("tool_calls"):
            function = m["tool_calls"][0]["function"]
            return {"name": function["name"], "arguments": json.loads(function["arguments"])}
    return None


def write_tool_dataset(out_dir: str | Path, n_train: int = 240, n_heldout: int = 120, n_valid: int = 40,
                       seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """train / valid / heldout JSONL; no user request appears in two splits."""
    from tuneforge.files import write_jsonl_splits

    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_valid + n_heldout:
        record = make_tool_chat(rng)
        key = record["messages"][0]["content"]
        if key in seen:
            continue
        seen.add(key)
        rows.append(record)
    heldout, valid, train = rows[:n_heldout], rows[n_heldout:n_heldout + n_valid], rows[n_heldout + n_valid:]
    return write_jsonl_splits(out_dir, {"train": train, "valid": valid, "heldout": heldout}, overwrite=overwrite)
