"""2 ranks (gloo, CPU) follow the 1-process trajectory of the same global batch, for every strategy
and method: losses, gradient norms and validation losses within 1e-4, trained weights within 1e-4, and
the consolidated output is an ordinary adapter/model folder. Writes the compatibility matrix that
docs/distributed.md shows. The runs are conftest.rank_runs' (one pair of ranks for all test files)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.conftest import ONE_PROCESS_METHODS, full_matrix, metrics, torch_matrix_combos, write_matrix

pytestmark = pytest.mark.distributed

TORCH_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3+offload")


def _weights(run: Path, method: str) -> dict[str, torch.Tensor]:
    folder = run / ("model" if method == "full" else "adapter")
    return load_file(folder / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))


def matches_one_process(single: Path, run: Path, method: str, result: dict) -> str | None:
    """None when `run` followed the 1-process run `single` (train losses, gradient norms, validation losses
    and token accuracies, weights: within 1e-4)."""
    if not result["ok"]:
        return result.get("trace", result.get("error"))
    one, multi = metrics(single), metrics(run)
    if [m["step"] for m in multi] != [m["step"] for m in one]:
        return f"steps {[m['step'] for m in multi]}"
    for a, b in zip(one, multi):
        if abs(a["train_loss"] - b["train_loss"]) >= 1e-4 or abs(a["grad_norm"] - b["grad_norm"]) >= 1e-4:
            return f"step {a['step']}: loss {b['train_loss']} vs {a['train_loss']}, grad norm {b['grad_norm']} vs {a['grad_norm']}"
        if ("eval_loss" in a) != ("eval_loss" in b):
            return f"step {a['step']}: validation ran in only one of the runs"
        for key in ("eval_loss", "eval_token_accuracy"):
            if key in a and abs(a[key] - b[key]) >= 1e-4:
                return f"step {a['step']}: {key} {b[key]} vs {a[key]}"
    wa, wb = _weights(single, method), _weights(run, method)
    if wa.keys() != wb.keys():
        return f"weights differ in names: {sorted(set(wa) ^ set(wb))[:3]}"
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return None if worst < 1e-4 else f"weights differ by {worst}"


def matrix_check(rank_runs, one_process_runs, combos, prefix: str = "") -> tuple[dict, dict]:
    """(problems, matrix cells) of every (method, strategy) 2-rank run against its 1-process run; `prefix`
    names the backend's runs (`ds-` for DeepSpeed)."""
    root, results = rank_runs
    problems, cells = {}, {}
    for m, s in combos:
        problem = matches_one_process(one_process_runs / f"single-{m}", root / f"{prefix}{m}-{s}", m,
                                      results[f"{prefix}{m}/{s}"])
        cells[f"{m}/{s}"] = {"ok": problem is None}
        if problem:
            problems[f"{m}/{s}"] = problem
    return problems, cells


def test_every_method_and_strategy_matches_one_process(rank_runs, one_process_runs, pytestconfig):
    """With `-m long` the table in docs/distributed.md is rewritten from these runs (every combination); then
    every combination that ran must have passed."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, results = rank_runs
    full = full_matrix(pytestconfig)
    problems, cells = matrix_check(rank_runs, one_process_runs, torch_matrix_combos(full))
    refused = {("qlora", s): "4-bit weights cannot be sharded" for s in ("zero2", "zero3", "zero3+offload")}
    if full:
        write_matrix("torch", TORCH_STRATEGIES, ONE_PROCESS_METHODS, cells, refused)
    assert not problems, problems
    # zero3's gathered adapter and full model are ordinary folders that load in one process
    full = AutoModelForCausalLM.from_pretrained(root / "full-zero3" / "model")
    base_dir = yaml.safe_load((root / "lora-zero3" / "spec.yaml").read_text())["model"]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = PeftModel.from_pretrained(base, root / "lora-zero3" / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(full(ids).logits).all() and torch.isfinite(lora(ids).logits).all()


@pytest.mark.parametrize("strategy", TORCH_STRATEGIES)
def test_validation_loss_equals_one_process(rank_runs, one_process_runs, strategy):
    """Validation during training (every 2 steps and after the last) runs through the wrapped forward on
    every rank; mid-run (step 2, training goes on after it) and at the end it reports the 1-process loss."""
    root, results = rank_runs
    for method in ("lora", "full"):
        assert results[f"{method}/{strategy}"]["ok"], results[f"{method}/{strategy}"].get("trace")
        one = {m["step"]: m["eval_loss"] for m in metrics(one_process_runs / f"single-{method}") if "eval_loss" in m}
        multi = {m["step"]: m["eval_loss"] for m in metrics(root / f"{method}-{strategy}") if "eval_loss" in m}
        assert sorted(one) == sorted(multi) == [2, 4], (one, multi)
        for step in one:
            assert abs(one[step] - multi[step]) < 1e-4, (method, step, one[step], multi[step])
        assert abs(one[4] - one[2]) > 1e-4  # training moved it, so the comparison sees the trained weights
        summary = json.loads((root / f"{method}-{strategy}" / "summary.json").read_text())
        assert summary["final_eval_loss"] == multi[4] and summary["eval_step"] == 4
