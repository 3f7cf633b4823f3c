"""The demo's dataset: support tickets -> strict one-line JSON triage, generated from templates.

The system prompt deliberately does not describe the JSON format, so the base model cannot guess
it: what the fine-tune teaches is visible in every answer and measurable as a format rate.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = ("billing", "shipping", "technical", "account")
SYSTEM_PROMPT = "You triage customer support tickets."

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mara",
         "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tom")
PRODUCTS = ("headphones", "desk lamp", "coffee grinder", "backpack", "keyboard", "phone case", "yoga mat",
            "water bottle", "monitor stand", "rain jacket")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")
APPS = ("mobile app", "web dashboard", "desktop app", "browser extension")

# (ticket template, summary template) per category; slots: {product} {month} {amount} {order} {app} {days}
TEMPLATES = {
    "billing": [
        ("I was charged twice for my {product} order #{order}.", "Double charge on order {order}"),
        ("My {month} invoice shows {amount} dollars but I expected less.", "Unexpected amount on {month} invoice"),
        ("I returned the {product} two weeks ago and still have no refund.", "Missing refund for returned {product}"),
        ("My card payment for order #{order} failed but the money left my account.", "Failed payment still debited"),
        ("Please explain the extra fee of {amount} dollars on my bill.", "Unexplained fee on bill"),
        ("I cancelled my subscription in {month} but was billed again.", "Billed after cancelling subscription"),
    ],
    "shipping": [
        ("My {product} from order #{order} has not arrived after {days} days.", "Order {order} not delivered"),
        ("The tracking number for order #{order} does not work.", "Tracking number not working"),
        ("The courier left my package at the wrong address.", "Package delivered to wrong address"),
        ("My {product} arrived broken in a crushed box.", "{product} arrived damaged"),
        ("Can I change the delivery address for order #{order}?", "Change delivery address request"),
        ("The parcel with my {product} is stuck in customs.", "Parcel stuck in customs"),
    ],
    "technical": [
        ("The {app} crashes every time I open my orders page.", "{app} crashes on orders page"),
        ("I get error code {order} when I try to upload a photo.", "Error {order} on photo upload"),
        ("The {app} won't load and just shows a blank screen.", "{app} shows blank screen"),
        ("Notifications stopped working in the {app} after the update.", "Notifications broken after update"),
        ("The search bar in the {app} returns no results for anything.", "Search returns no results"),
        ("The checkout button does nothing when I click it in the {app}.", "Checkout button unresponsive"),
    ],
    "account": [
        ("I forgot my password and the reset email never arrives.", "Password reset email missing"),
        ("My account is locked after too many login attempts.", "Account locked after login attempts"),
        ("How do I change the email address on my account?", "Change account email address"),
        ("I want to delete my account and all my data.", "Account deletion request"),
        ("Someone else seems to have logged into my account.", "Suspicious login on account"),
        ("Two-factor codes are not reaching my new phone.", "Two-factor codes not received"),
    ],
}
HIGH_CUES = ("This is urgent!", "Please fix this immediately.", "I need this sorted today.",
             "This is the third time I am writing!!", "I can't work until this is fixed.")
LOW_CUES = ("No rush, whenever you can.", "Thanks in advance.", "Just letting you know.", "", "Kind regards.")
OPENERS = ("Hi,", "Hello team,", "Hey there.", "", "Good morning,")


def _ticket(rng: random.Random) -> tuple[str, dict]:
    category = rng.choice(CATEGORIES)
    ticket_t, summary_t = rng.choice(TEMPLATES[category])
    slots = {"product": rng.choice(PRODUCTS), "month": rng.choice(MONTHS), "amount": rng.randint(5, 400),
             "order": rng.randint(10000, 99999), "app": rng.choice(APPS), "days": rng.randint(4, 30)}
    urgency = "high" if rng.random() < 0.4 else "low"
    cue = rng.choice(HIGH_CUES if urgency == "high" else LOW_CUES)
    name = rng.choice(NAMES)
    parts = [rng.choice(OPENERS), ticket_t.format(**slots), cue, f"- {name}"]
    ticket = " ".join(p for p in parts if p)
    summary = summary_t.format(**slots)
    return ticket, {"category": category, "urgency": urgency, "summary": summary[0].upper() + summary[1:]}


def make_examples(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`n` distinct chat examples (system, user ticket, assistant JSON), deterministic for `seed`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        ticket, answer = _ticket(rng)
        if ticket in seen:
            continue
        seen.add(ticket)
        out.append({"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ticket},
            {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
        ]})
    return out


def write_demo_data(out_dir: str | Path, n_train: int = 160, n_heldout: int = 40, n_valid: int = 20,
                    seed: int = 0) -> dict[str, Path]:
    """Write train/valid/heldout JSONL (no ticket in two splits) and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_rows = make_examples(n_train + n_valid + n_heldout, seed)
    splits = {"train": all_rows[:n_train], "valid": all_rows[n_train : n_train + n_valid],
              "heldout": all_rows[n_train + n_valid :]}
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def score_answer(output: str, reference: str) -> dict:
    """Is `output` exactly the strict format, and are its category and urgency right?"""
    ref = json.loads(reference)
    try:
        got = json.loads(output.strip())
    except (json.JSONDecodeError, ValueError):
        got = None
    valid = (
        isinstance(got, dict)
        and list(got) == ["category", "urgency", "summary"]
        and got["category"] in CATEGORIES
        and got["urgency"] in ("low", "high")
        and isinstance(got["summary"], str)
        and bool(got["summary"].strip())
    )
    category = valid and got["category"] == ref["category"]
    urgency = valid and got["urgency"] == ref["urgency"]
    return {"valid_format": valid, "category_correct": category, "urgency_correct": urgency,
            "exact": bool(category and urgency)}


def summarise(scores: list[dict]) -> dict:
    n = len(scores)

    def rate(key: str) -> float:
        return sum(bool(s[key]) for s in scores) / n if n else 0.0

    return {"format_rate": rate("valid_format"), "category_accuracy": rate("category_correct"),
            "urgency_accuracy": rate("urgency_correct"), "exact_match": rate("exact"), "n": n}
