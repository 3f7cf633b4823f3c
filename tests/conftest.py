"""Shared tiny fixtures: random models of real architectures and small data files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# One intra-op thread per test worker: two xdist workers on two cores, no oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, easily."}]},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there, friend!"}]},
    {"messages": [{"role": "user", "content": "Opposite of hot?"}, {"role": "assistant", "content": "Cold"}]},
    {"messages": [{"role": "user", "content": "Name a fruit"}, {"role": "assistant", "content": "A ripe banana."}]},
    {"messages": [{"role": "user", "content": "Is water wet? Answer in one long sentence please."},
                  {"role": "assistant", "content": "Water makes other things wet, which is what we usually mean."}]},
    {"messages": [{"role": "user", "content": "Count to three"}, {"role": "assistant", "content": "1, 2, 3"}]},
]


OPT_IN = ("lmeval", "long")  # marks whose tests run only when `-m` names them


def asked_for(config, mark: str) -> bool:
    """Whether `-m` names the opt-in `mark`."""
    return mark in (config.option.markexpr or "")


def pytest_collection_modifyitems(config, items):
    """Opt-in marks: lmeval (a real client in its own venv) and long (minutes of training or measuring) run only
    when `-m` names them (`make test-all` runs everything; `make test-clients` the real clients)."""
    for mark in OPT_IN:
        if asked_for(config, mark):
            continue
        skip = pytest.mark.skip(reason=f"opt-in: pytest -m {mark} (make test-all)")
        for item in items:
            if mark in item.keywords:
                item.add_marker(skip)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tuneforge.models.tiny import ARCHITECTURES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS)


def saved_bytes(fn):
    """(fn(), bytes of the distinct storages autograd keeps for backward while running fn)."""
    import torch

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def tiny_spec(model_dir: Path, train_file: Path, out: Path, **training) -> dict:
    """A spec dict for a few fast steps on a tiny model (fp32 so invariants hold to 1e-5)."""
    return {
        "model": str(model_dir),
        "task": "chat",
        "data": {"train": str(train_file)},
        "method": "lora",
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"epochs": 1, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0.0,
                     "max_seq_len": 128, "eval_every": 1000, "save_every": 1000, **training},
        "device": "cpu",
        "output_dir": str(out),
    }


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the GGUF once into the cache."""
    from tuneforge.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from tuneforge.models import load_tokenizer

    return load_tokenizer(smollm2_path)


def pytest_collection_finish(session):
    """A test worker trains in its own process, as the CLI does: the same entry-point setting, once the training
    stack is imported (tuneforge.process.freeze_loaded_objects: each run's two full collections then skip it)."""
    import tuneforge.training.recipe  # noqa: F401
    from tuneforge.process import freeze_loaded_objects

    freeze_loaded_objects()
