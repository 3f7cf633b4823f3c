"""Small scenario datasets the project generates (license-clean, deterministic for a seed).

Each generator draws one record from templates and word lists; `write_dataset` de-duplicates and
writes train / valid / heldout JSONL. They are small on purpose: a CPU fine-tune of SmolLM2 on
them takes minutes, and each has a clear right answer so a before/after report can show a gain.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

PEOPLE = ("Alice Moreau", "Bilal Khan", "Chen Wei", "Dara Okafor", "Elena Rossi", "Farah Haddad", "Goran Petrov",
          "Hana Sato", "Ivan Novak", "Julia Berg", "Kofi Mensah", "Lena Vogel", "Mateo Silva", "Nora Lind")
PLACES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Valencia", "Winnipeg", "Zagreb", "Accra", "Bergen")
ORGS = ("Northwind Labs", "Bluefin Bank", "Orchid Foods", "Helix Motors", "Pinecrest Media", "Arcadia Health")
PLANETS = ("Zorb", "Quell", "Marix", "Tovan", "Lyra", "Penth", "Odrin", "Kess", "Vashti", "Ulmo", "Brisk", "Caldo")

# A closed English -> French lexicon: real translation, small enough to learn from a few hundred pairs.
NOUNS = {"cat": ("chat", "m"), "dog": ("chien", "m"), "house": ("maison", "f"), "car": ("voiture", "f"),
         "bird": ("oiseau", "m"), "book": ("livre", "m"), "table": ("table", "f"), "garden": ("jardin", "m"),
         "door": ("porte", "f"), "bike": ("vélo", "m"), "chair": ("chaise", "f"), "boat": ("bateau", "m")}
# Colours only: French places them after the noun, so word order stays regular.
ADJS = {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "black": ("noir", "noire"),
        "white": ("blanc", "blanche"), "blue": ("bleu", "bleue"), "grey": ("gris", "grise"),
        "yellow": ("jaune", "jaune"), "brown": ("marron", "marron")}
VERBS = {"sleeps": "dort", "is here": "est ici", "is big": "est grand", "is far": "est loin",
         "is near": "est près", "is outside": "est dehors"}

TOPICS = ("rain", "the sea", "autumn", "a lighthouse", "the moon", "a city at night", "snow", "an old tree")
IMAGES = {"rain": ("grey roofs", "soft drumming", "wet stones", "a closed umbrella"),
          "the sea": ("salt wind", "slow waves", "a far sail", "white foam"),
          "autumn": ("red leaves", "cold mornings", "bare branches", "smoke from chimneys"),
          "a lighthouse": ("a turning beam", "dark rocks", "a keeper's lamp", "gulls at dawn"),
          "the moon": ("silver light", "quiet fields", "a pale road", "long shadows"),
          "a city at night": ("neon signs", "empty trams", "a late cafe", "wet asphalt"),
          "snow": ("white streets", "muffled steps", "a frozen pond", "blue evenings"),
          "an old tree": ("deep roots", "a hollow trunk", "moss on bark", "a rope swing")}
ENDINGS = ("the day lets go", "and then it is still", "something stays")

PRODUCTS = ("the K2 kettle", "the Aero fan", "the Lumo lamp", "the Tern router", "the Brio blender")
MANUAL_STEPS = ("unplug the device", "hold the reset button for five seconds", "wait for the blue light",
                "clean the filter with warm water", "check the power cable", "update the firmware from the app")


def make_qa(rng: random.Random) -> dict:
    planet, moons, capital = rng.choice(PLANETS), rng.randint(0, 9), rng.choice(PLACES)
    days = rng.randint(100, 900)
    context = f"The planet {planet} has {moons} moons. Its capital city is {capital}, and a year there lasts {days} days."
    q, a = rng.choice([(f"How many moons does {planet} have?", str(moons)),
                       (f"What is the capital city of {planet}?", capital),
                       (f"How many days does a year last on {planet}?", str(days))])
    return {"context": context, "question": q, "answer": a}


def make_translation(rng: random.Random) -> dict:
    noun, adj, verb = rng.choice(list(NOUNS)), rng.choice(list(ADJS)), rng.choice(list(VERBS))
    fr_noun, gender = NOUNS[noun]
    fr_adj = ADJS[adj][0 if gender == "m" else 1]
    article = "le" if gender == "m" else "la"
    if fr_noun[0] in "aeiou":
        article = "l'"
    fr_verb = VERBS[verb].replace("grand", "grande") if gender == "f" else VERBS[verb]
    fr = f"{article}{'' if article.endswith(chr(39)) else ' '}{fr_noun} {fr_adj} {fr_verb}"
    return {"source": f"The {adj} {noun} {verb}.", "target": fr[0].upper() + fr[1:] + ".",
            "source_lang": "English", "target_lang": "French"}


def make_ner(rng: random.Random) -> dict:
    person, place, org = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(ORGS)
    parts = rng.choice([
        [("", None), (person, "PER"), (" joined ", None), (org, "ORG"), (" in ", None), (place, "LOC"), (".", None)],
        [("Yesterday ", None), (person, "PER"), (" flew to ", None), (place, "LOC"), (".", None)],
        [("", None), (org, "ORG"), (" opened an office in ", None), (place, "LOC"), (" last week.", None)],
        [("The talk by ", None), (person, "PER"), (" was moved.", None)],
        [("Nothing happened today.", None)],
    ])
    text, entities = "", []
    for surface, label in parts:
        if label:
            entities.append({"start": len(text), "end": len(text) + len(surface), "label": label})
        text += surface
    return {"text": text, "entities": entities}


def make_creative(rng: random.Random) -> dict:
    topic = rng.choice(TOPICS)
    a, b = rng.sample(IMAGES[topic], 2)
    form = rng.choice(["haiku", "couplet"])
    if form == "haiku":
        poem = f"{a.capitalize()} at dusk /\n{b} beneath {topic} /\n{rng.choice(ENDINGS)}"
    else:
        poem = f"Of {topic} I keep {a} in mind,\nand {b} the hours leave behind."
    return {"prompt": f"Write a {form} about {topic}.", "completion": " " + poem}


def make_text(rng: random.Random) -> dict:
    product = rng.choice(PRODUCTS)
    steps = rng.sample(MANUAL_STEPS, 3)
    return {"text": f"To reset {product}, first {steps[0]}, then {steps[1]}, and finally {steps[2]}. "
                    f"If {product} still does not start, contact support with its serial number."}


# Preference: the preferred reply answers in the format the prompt asks for, the other says the same thing in
# another form. Each family: (instruction, rule the preferred reply passes and the other fails).
CAPITALS_QUESTIONS = (("What colour is snow?", "White"), ("What colour is grass?", "Green"),
                      ("What colour is the sky on a clear day?", "Blue"), ("What colour is coal?", "Black"),
                      ("What colour is a ripe banana?", "Yellow"), ("What colour is a ripe tomato?", "Red"),
                      ("What is the opposite of hot?", "Cold"), ("What is the opposite of up?", "Down"),
                      ("What is the opposite of fast?", "Slow"), ("What is the opposite of day?", "Night"),
                      ("What is the opposite of open?", "Closed"), ("What is the opposite of full?", "Empty"),
                      ("What do bees make?", "Honey"), ("What do cows drink?", "Water"),
                      ("Which animal barks?", "A dog"), ("Which animal says meow?", "A cat"),
                      ("What falls from clouds when it rains?", "Water"), ("What do we call frozen water?", "Ice"),
                      ("Which season comes after winter?", "Spring"), ("Which season comes after summer?", "Autumn"),
                      ("Which day comes after Monday?", "Tuesday"), ("Which day comes before Sunday?", "Saturday"),
                      ("Which month comes after March?", "April"), ("How many legs does a spider have?", "Eight"),
                      ("How many days are in a week?", "Seven"), ("How many sides does a triangle have?", "Three"))
CAPITALS_ASKS = ("Answer in capital letters only.", "Reply in uppercase letters.", "Write your answer in capitals.")
DIGIT_ASKS = ("Reply with digits only.", "Answer with the number in digits, nothing else.",
              "Give only the number, written in digits.")
JSON_ASKS = ('Reply only with JSON like {"city": "..."}.', 'Answer as a JSON object {"city": "..."} and nothing else.')
ONE_WORD_ASKS = ("Answer in one word.", "Reply with a single word.")
ONE_WORD_QUESTIONS = (("What do bees make?", "Honey", "Bees make honey."),
                      ("What is frozen water called?", "Ice", "Frozen water is called ice."),
                      ("What do you call a baby cat?", "Kitten", "A baby cat is called a kitten."),
                      ("What do you call a baby dog?", "Puppy", "A baby dog is called a puppy."),
                      ("What do you use to write on paper?", "Pen", "You usually use a pen to write on paper."),
                      ("Where do fish live?", "Water", "Fish live in the water."),
                      ("What do you wear on your feet?", "Shoes", "You wear shoes on your feet."),
                      ("What do plants need from the sun?", "Light", "Plants need light from the sun."),
                      ("What do you sleep in at night?", "Bed", "At night you sleep in a bed."),
                      ("What shines in the sky at night?", "Moon", "The moon shines in the sky at night."),
                      ("What do cows give us to drink?", "Milk", "Cows give us milk to drink."),
                      ("What do you open to enter a house?", "Door", "You open the door to enter a house."),
                      ("What do you read stories in?", "Books", "You read stories in books."),
                      ("What do birds use to fly?", "Wings", "Birds use their wings to fly."),
                      ("Which planet do we live on?", "Earth", "We live on the planet Earth."))
UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """0..99 in English words."""
    if n < 20:
        return UNITS[n]
    return TENS[n // 10] + ("-" + UNITS[n % 10] if n % 10 else "")


def make_preference(rng: random.Random) -> dict:
    """A prompt that asks for a format, the reply in that format (preferred) and the same answer in another
    form (not preferred), and the `rules` that check a generated reply for the format (OpenAI's DPO format)."""
    family = rng.choice(("capitals", "digits", "json", "one_word"))
    if family == "capitals":
        question, answer = rng.choice(CAPITALS_QUESTIONS)
        prompt = f"{question} {rng.choice(CAPITALS_ASKS)}"
        chosen, rejected = answer.upper() + ".", answer + "."
        rules = [{"regex": r"^[^a-z]*[A-Z][^a-z]*$"}]
    elif family == "digits":
        op = rng.choice(("plus", "minus", "times"))
        a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "times" else (rng.randint(2, 49), rng.randint(2, 49))
        a, b = (max(a, b), min(a, b)) if op == "minus" else (a, b)
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]  # 0..98: number_words covers it
        prompt = f"What is {number_words(a)} {op} {number_words(b)}? {rng.choice(DIGIT_ASKS)}"
        chosen, rejected = str(value), number_words(value).capitalize() + "."
        rules = [{"regex": r"^\d+$"}]
    elif family == "json":
        person, city = rng.choice(PEOPLE), rng.choice(PLACES)
        first = person.split()[0]
        prompt = f"{person} lives in {city}. Which city does {first} live in? {rng.choice(JSON_ASKS)}"
        chosen, rejected = json.dumps({"city": city}), f"{first} lives in {city}."
        rules = [{"regex": r'^\{"city": "[^"]+"\}$'}]
    else:
        question, word, sentence = rng.choice(ONE_WORD_QUESTIONS)
        prompt = f"{question} {rng.choice(ONE_WORD_ASKS)}"
        chosen, rejected = word + ".", sentence
        rules = [{"regex": r"^\W*[A-Za-z]+\W*$"}]
    return {"input": {"messages": [{"role": "user", "content": prompt}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}], "rules": rules}


GENERATORS = {"qa": make_qa, "translation": make_translation, "ner": make_ner, "creative": make_creative,
              "text": make_text, "preference": make_preference}


def write_dataset(name: str, out_dir: str | Path, n_train: int = 240, n_heldout: int = 120, n_valid: int = 40,
                  seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write train/valid/heldout JSONL for scenario `name`; no record appears in two splits.

    Generators with few distinct records (a closed lexicon) fill the splits with as many as exist.
    """
    make = GENERATORS[name]
    rng, seen, rows = random.Random(seed), set(), []
    attempts = 0
    while len(rows) < n_train + n_valid + n_heldout and attempts < 50_000:
        attempts += 1
        rec = make(rng)
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(rec)
    # Held-out first, so it keeps its size when a generator runs short.
    heldout, valid, train = rows[:n_heldout], rows[n_heldout : n_heldout + n_valid], rows[n_heldout + n_valid :]
    from tuneforge.files import write_jsonl_splits

    return write_jsonl_splits(out_dir, {"train": train, "valid": valid, "heldout": heldout}, overwrite=overwrite)
