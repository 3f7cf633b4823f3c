"""The demo's dataset: support tickets -> strict one-line JSON triage, generated from templates.

The system prompt deliberately does not describe the JSON format, so the base model cannot guess
it: what the fine-tune teaches is visible in every answer and measurable as a format rate.

Each ticket is 1-3 sentences: a core sentence whose cue words fix the category (billing: charged,
refund, invoice, payment ...; shipping: package, delivery, tracking, courier ...; technical: crashes,
error, won't load, bug ...; account: password, login, email change, locked out ...), an optional
detail sentence, and an urgency cue ("urgent", "immediately", "today", "can't work", "third time",
"!!" make it high; anything else is low). Every split is stratified: categories balanced, ~40 % high.
Pure Python (json, random), deterministic for a seed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = ("billing", "shipping", "technical", "account")
URGENCIES = ("low", "high")
SYSTEM_PROMPT = "You triage customer support tickets."
ANSWER_KEYS = ("category", "urgency", "summary")
HIGH_FRACTION = 0.4

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mara",
         "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tom", "Uma", "Victor", "Wen", "Yusuf", "Zoe")
PRODUCTS = ("headphones", "desk lamp", "coffee grinder", "backpack", "keyboard", "phone case", "yoga mat",
            "water bottle", "monitor stand", "rain jacket", "blender", "office chair")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
APPS = ("mobile app", "web dashboard", "desktop app", "browser extension")
DEVICES = ("an iPhone", "an Android phone", "Windows 11", "a Mac", "a Chromebook", "an iPad")
COURIERS = ("DHL", "UPS", "FedEx", "the local courier")
PLANS = ("Basic", "Plus", "Pro", "Family")

# (core sentence, summary) per category. Slots: {product} {month} {amount} {order} {code} {app} {days}
# {courier} {plan} {device}. Summaries are 3-8 words and derived only from the template and its slots.
TEMPLATES = {
    "billing": [
        ("I was charged twice for my {product} order #{order}.", "Double charge on order {order}"),
        ("My {month} invoice shows {amount} dollars, which is more than I expected.",
         "Unexpected amount on {month} invoice"),
        ("I returned the {product} {days} days ago and still have no refund.", "Missing refund for returned {product}"),
        ("My card payment for order #{order} failed but the money left my account.",
         "Failed payment still debited"),
        ("Please explain the extra fee of {amount} dollars on my bill.", "Unexplained fee on bill"),
        ("I cancelled my {plan} subscription in {month} but was billed again.", "Billed after cancelling subscription"),
        ("The discount code was not applied and I paid full price for the {product}.",
         "Discount not applied at payment"),
        ("Could you send me a VAT invoice for order #{order}?", "VAT invoice request for order {order}"),
    ],
    "shipping": [
        ("My {product} from order #{order} has not arrived after {days} days.", "Order {order} not delivered"),
        ("The tracking number for order #{order} has not updated in {days} days.", "Tracking not updating"),
        ("{courier} left my package at the wrong address.", "Package delivered to wrong address"),
        ("My {product} arrived broken in a crushed box.", "{product} arrived damaged"),
        ("Can I change the delivery address for order #{order}?", "Change delivery address request"),
        ("The parcel with my {product} is stuck in customs.", "Parcel stuck in customs"),
        ("Only half of order #{order} was in the package, the {product} is missing.",
         "Item missing from package"),
        ("The delivery was marked as completed but no package came.", "Delivered status but no package"),
    ],
    "technical": [
        ("The {app} crashes every time I open my orders page.", "{app} crashes on orders page"),
        ("I get error code E{code} when I try to upload a photo.", "Error E{code} on photo upload"),
        ("The {app} won't load and just shows a blank screen.", "{app} shows blank screen"),
        ("Notifications stopped working in the {app} after the update.", "Notifications broken after update"),
        ("There is a bug in the {app}: search returns no results at all.", "Search bug returns no results"),
        ("The checkout button in the {app} does nothing when I click it.", "Checkout button unresponsive"),
        ("The {app} freezes and shows error E{code}.", "{app} freezes with error E{code}"),
        ("Since the last update the {app} keeps logging errors and won't sync.", "{app} sync fails after update"),
    ],
    "account": [
        ("I forgot my password and the reset email never arrives.", "Password reset email missing"),
        ("My account is locked after too many login attempts.", "Account locked after login attempts"),
        ("How do I change the email address on my account?", "Change account email address"),
        ("I want to delete my account and all my data.", "Account deletion request"),
        ("Someone else seems to have logged into my account.", "Suspicious login on account"),
        ("Two-factor login codes are not reaching my new phone.", "Two-factor login codes not received"),
        ("I am locked out of my account since I changed my password.", "Locked out after password change"),
        ("Please merge my two accounts, I do not remember which login I use.", "Merge duplicate accounts request"),
    ],
}

# Optional second sentence: a neutral or category-reinforcing detail with no urgency cue.
DETAILS = {
    "billing": ("The charge of {amount} dollars shows up on my card statement.",
                "I pay with a credit card and have never had this problem before.",
                "I am on the {plan} plan and my billing date is the first of the month.",
                "I still have the receipt from {month} if you need it."),
    "shipping": ("I ordered it in {month} and chose standard shipping.",
                 "The shipment went with {courier}, according to the confirmation email.",
                 "It was meant to be a birthday gift for my sister.",
                 "I paid extra for express shipping, so this is disappointing."),
    "technical": ("I am using {device} with the latest version installed.",
                  "I already reinstalled it twice and restarted my device.",
                  "It worked fine last week, so something must have changed.",
                  "I cleared the cache and tried another network, same result."),
    "account": ("My username is {user}, in case that helps.",
                "I have had this account since {month} and never had issues.",
                "I usually sign in on {device} with the same password.",
                "I still have access to my old email address."),
}

# Urgency cues. High ones contain "urgent", "immediately", "today", "can't work", "third time" or "!!";
# low ones contain none of those (and no "!!").
HIGH_CUES = ("This is urgent!", "Please fix this immediately.", "I need this sorted today.",
             "This is the third time I am writing!!", "I can't work until this is fixed.",
             "Urgent, please help!!", "Please answer today, it is urgent.")
HIGH_PREFIXES = ("URGENT:", "Urgent -", "Third time asking:")
LOW_CUES = ("No rush, whenever you can.", "Thanks in advance.", "Just letting you know.", "", "Kind regards.",
            "Whenever you have a moment.", "Thank you.")
OPENERS = ("Hi,", "Hello team,", "Hey there.", "", "Good morning,", "Hello,")


def _slots(rng: random.Random, name: str) -> dict:
    return {"product": rng.choice(PRODUCTS), "month": rng.choice(MONTHS), "amount": rng.randint(5, 400),
            "order": rng.randint(10000, 99999), "code": rng.randint(100, 999), "app": rng.choice(APPS),
            "days": rng.randint(4, 30), "courier": rng.choice(COURIERS), "plan": rng.choice(PLANS),
            "device": rng.choice(DEVICES), "user": f"{name.lower()}{rng.randint(1, 99)}"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _ticket(rng: random.Random, category: str, urgency: str) -> tuple[str, dict]:
    """One ticket of the given category and urgency, and its reference answer."""
    core_t, summary_t = rng.choice(TEMPLATES[category])
    name = rng.choice(NAMES)
    slots = _slots(rng, name)
    core = _cap(core_t.format(**slots))
    opener = rng.choice(OPENERS)
    if opener.endswith(",") and not core.startswith(("I ", "I'", "DHL", "UPS", "FedEx")):
        core = core[0].lower() + core[1:]  # "Hi, the tracking number ..." reads naturally
    detail = rng.choice(DETAILS[category]).format(**slots) if rng.random() < 0.8 else ""
    if urgency == "high" and rng.random() < 0.25:
        parts = [rng.choice(HIGH_PREFIXES), _cap(core), detail]
    else:
        cue = rng.choice(HIGH_CUES if urgency == "high" else LOW_CUES)
        parts = [opener, core, detail, cue]
    parts.append(f"- {name}")
    ticket = " ".join(p for p in parts if p)
    answer = {"category": category, "urgency": urgency, "summary": _cap(summary_t.format(**slots))}
    return ticket, answer


def _plan(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Stratified (category, urgency) labels for `n` examples: categories balanced, ~40 % high per category."""
    labels = []
    for i, category in enumerate(CATEGORIES):
        k = n // len(CATEGORIES) + (1 if i < n % len(CATEGORIES) else 0)
        high = round(HIGH_FRACTION * k)
        labels += [(category, "high")] * high + [(category, "low")] * (k - high)
    rng.shuffle(labels)
    return labels


def _record(ticket: str, answer: dict) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ticket},
        {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
    ]}


def _generate(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    out = []
    for category, urgency in _plan(rng, n):
        for _ in range(1000):
            ticket, answer = _ticket(rng, category, urgency)
            if ticket not in seen:
                break
        else:  # pragma: no cover - the template space is far larger than any demo split
            raise RuntimeError("could not generate a new distinct ticket")
        seen.add(ticket)
        out.append(_record(ticket, answer))
    return out


def make_examples(n: int, seed: int) -> list[dict]:
    """`n` distinct chat examples (system, user ticket, assistant JSON), stratified, deterministic for `seed`.

    ``make_examples(n_train, seed)`` equals the train split that ``write_demo_data(..., seed=seed)`` writes.
    """
    return _generate(random.Random(seed), n, set())


def as_classification(record: dict) -> dict:
    """The same ticket as a classification example: {"text": ticket, "label": category}."""
    return {"text": record["messages"][1]["content"], "label": json.loads(record["messages"][2]["content"])["category"]}


def write_demo_data(out_dir: str | Path, n_train: int = 160, n_heldout: int = 40, seed: int = 0, *,
                    n_valid: int = 20, task: str = "chat", overwrite: bool = False) -> dict[str, Path]:
    """Write train.jsonl, valid.jsonl (validation loss) and heldout.jsonl (before/after metric) into `out_dir`.

    No ticket text appears in two splits; each split is stratified; the output is deterministic for `seed`.
    `task="classification"` writes the same tickets as {"text", "label": category} records.
    Returns {"train": path, "valid": path, "heldout": path}.
    """
    from tuneforge.files import write_jsonl_splits

    rng, seen = random.Random(seed), set()
    splits = {"train": _generate(rng, n_train, seen), "valid": _generate(rng, n_valid, seen),
              "heldout": _generate(rng, n_heldout, seen)}
    if task == "classification":
        splits = {name: [as_classification(r) for r in rows] for name, rows in splits.items()}
    return write_jsonl_splits(out_dir, splits, overwrite=overwrite)


def parse_answer(output: str) -> dict | None:
    """The answer as a dict if `output` (stripped) is exactly the strict format, else None."""
    try:
        got = json.loads(output.strip())
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
        return None
    if not (isinstance(got, dict) and tuple(got) == ANSWER_KEYS):
        return None
    if got["category"] not in CATEGORIES or got["urgency"] not in URGENCIES:
        return None
    if not (isinstance(got["summary"], str) and got["summary"].strip()):
        return None
    return got


def score_answer(output: str, reference: str) -> dict:
    """Is `output` exactly the strict format, and are its category and urgency right? (summary not compared)"""
    ref = json.loads(reference)
    got = parse_answer(output)
    valid = got is not None
    category = valid and got["category"] == ref["category"]
    urgency = valid and got["urgency"] == ref["urgency"]
    return {"valid_format": valid, "category_correct": category, "urgency_correct": urgency,
            "exact": category and urgency}


def summarise(scores: list[dict]) -> dict:
    """Rates over per-example scores from `score_answer` (all 0.0 for an empty list)."""
    n = len(scores)

    def rate(key: str) -> float:
        return sum(bool(s[key]) for s in scores) / n if n else 0.0

    return {"format_rate": rate("valid_format"), "category_accuracy": rate("category_correct"),
            "urgency_accuracy": rate("urgency_correct"), "exact_match": rate("exact"), "n": n}
