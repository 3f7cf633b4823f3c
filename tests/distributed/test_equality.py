"""2 ranks (gloo, CPU) follow the 1-process trajectory of the same global batch, for every strategy
and method: losses within 1e-4, trained weights within 1e-4, and the consolidated output is an ordinary
adapter/model folder. Writes the compatibility matrix that docs/distributed.md shows."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import dist_spec, metrics, write_matrix
from tests.distributed.ranks import run_in_ranks

pytestmark = pytest.mark.distributed

METHODS = ("lora", "dora", "full", "qlora")
TORCH_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3+offload")


def _distributed(strategy: str) -> dict:
    name, _, offload = strategy.partition("+")
    return {"strategy": name, "offload": "parameters" if offload else "none"}


def _combos():
    for method in METHODS:
        for strategy in TORCH_STRATEGIES:
            if method == "qlora" and strategy not in ("ddp", "zero1"):
                continue  # refused up front (test_spec_refuses_...)
            yield method, strategy


def _run_matrix(tiny_models, root: Path) -> dict:
    from tests.conftest import write_jsonl
    from tests.distributed.conftest import chat_records
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import train

    data = write_jsonl(root / "train.jsonl", chat_records())
    model = tiny_models["llama"]
    for method in METHODS:  # the 1-process references
        train(build_spec(dist_spec(model, data, root / f"single-{method}", method)))
    jobs = [{**dist_spec(model, data, root / f"{m}-{s}", m, world=2, distributed=_distributed(s)), "_name": f"{m}/{s}"}
            for m, s in _combos()]
    return run_in_ranks(jobs, root / "results")


def _weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    folder = run / ("model" if method == "full" else "adapter")
    return load_file(folder / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))


def matches_one_process(root: Path, name: str, method: str, result: dict) -> str | None:
    """None when `name`'s run followed `single-<method>` (losses, gradient norms, weights within 1e-4)."""
    if not result["ok"]:
        return result.get("trace", result.get("error"))
    single, multi = metrics(root / f"single-{method}"), metrics(root / name)
    if [m["step"] for m in multi] != [m["step"] for m in single]:
        return f"steps {[m['step'] for m in multi]}"
    for a, b in zip(single, multi):
        if abs(a["train_loss"] - b["train_loss"]) >= 1e-4 or abs(a["grad_norm"] - b["grad_norm"]) >= 1e-4:
            return f"step {a['step']}: loss {b['train_loss']} vs {a['train_loss']}, grad norm {b['grad_norm']} vs {a['grad_norm']}"
    wa, wb = _weights(root / f"single-{method}", method), _weights(root / name, method)
    if wa.keys() != wb.keys():
        return f"weights differ in names: {sorted(set(wa) ^ set(wb))[:3]}"
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return None if worst < 1e-4 else f"weights differ by {worst}"


def test_every_method_and_strategy_matches_one_process(tiny_models, tmp_path):
    """One pair of ranks runs the whole matrix (one test, so test workers never run it twice); the
    table in docs/distributed.md is rewritten from it, then every combination must have passed."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results = _run_matrix(tiny_models, tmp_path)
    problems = {}
    for m, s in _combos():
        problem = matches_one_process(tmp_path, f"{m}-{s}", m, results[f"{m}/{s}"])
        results[f"{m}/{s}"]["ok"] = problem is None
        if problem:
            problems[f"{m}/{s}"] = problem
    refused = {("qlora", s): "4-bit weights cannot be sharded" for s in ("zero2", "zero3", "zero3+offload")}
    write_matrix("torch", TORCH_STRATEGIES, METHODS, results, refused)
    assert not problems, problems
    # zero3's gathered adapter and full model are ordinary folders that load in one process
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full-zero3" / "model")
    base = AutoModelForCausalLM.from_pretrained(yaml.safe_load((tmp_path / "lora-zero3" / "spec.yaml").read_text())["model"])
    lora = PeftModel.from_pretrained(base, tmp_path / "lora-zero3" / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(full(ids).logits).all() and torch.isfinite(lora(ids).logits).all()
