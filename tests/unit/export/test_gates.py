"""The export gates as pure functions: what passes, what fails, and what each failure says."""
from __future__ import annotations

import numpy as np
import torch

from tuneforge.export import gates
from tuneforge.export.gates import Scores


def scores(greedy, nll, argmax) -> Scores:
    return Scores(greedy=greedy, nll=nll, argmax=argmax)


TUNED = scores([[5, 6, 7], [8, 9]], [[1.0, 2.0], [3.0]], [[10, 11], [12]])
BASE = scores([[5, 1, 1], [2, 2]], [[1.5, 2.5], [3.5]], [[10, 99], [98]])


def test_identical_export_passes_every_gate():
    results = gates.evaluate(TUNED, BASE, TUNED, "fp32")
    assert [g.name for g in results] == ["greedy_tokens", "heldout_loss", "adapter_present"]
    assert all(g.passed for g in results)
    assert results[2].detail["positions_where_finetune_differs"] == 2  # position 0 of example 0 agrees


def test_export_that_behaves_like_the_base_fails_the_adapter_gate_at_any_precision():
    for precision in ("fp32", "int8", "int4"):
        adapter = {g.name: g for g in gates.evaluate(TUNED, BASE, BASE, precision, tolerance=0.5)}["adapter_present"]
        assert not adapter.passed and "adapter lost" in adapter.message
        assert adapter.detail["export_agrees_with_base"] == 2 and adapter.detail["export_agrees_with_finetune"] == 0


def test_token_gate_names_the_first_mismatch():
    drifted = scores([[5, 6, 7], [8, 4]], TUNED.nll, TUNED.argmax)
    gate = gates.token_gate(TUNED, drifted)
    assert not gate.passed and "1/2 prompts" in gate.message
    assert gate.detail["first_mismatch"] == {"prompt": 1, "position": 1, "pytorch": [9], "export": [4]}


def test_loss_gate_uses_the_precision_tolerance_and_refuses_nan():
    close = scores(TUNED.greedy, [[1.02, 2.02], [3.02]], TUNED.argmax)  # +1 % loss
    by_name = lambda p: {g.name: g for g in gates.evaluate(TUNED, BASE, close, p)}  # noqa: E731
    assert not by_name("fp32")["heldout_loss"].passed  # 0.2 %
    assert by_name("int8")["heldout_loss"].passed and by_name("int4")["heldout_loss"].passed
    assert "greedy_tokens_info" in by_name("int8") and by_name("int8")["greedy_tokens_info"].passed
    nan = scores(TUNED.greedy, [[float("nan"), 2.0], [3.0]], TUNED.argmax)
    assert not gates.loss_gate(TUNED, nan, BASE, (0.5, 0.5)).passed


def test_quantised_loss_gate_allows_a_share_of_the_fine_tunes_gain():
    """A fine-tune that cut the loss from 3.0 to 0.2: int4 may lose 10 % of that gain (0.28), not 10 % of 0.2."""
    tuned, base = scores([], [[0.2]], [[1]]), scores([], [[3.0]], [[2]])
    drifted = scores([], [[0.45]], [[1]])  # +125 % of the loss, 9 % of the gain
    gate = gates.loss_gate(tuned, drifted, base, gates.LOSS_TOLERANCE["int4"])
    assert gate.passed and abs(gate.detail["share_of_gain_lost"] - 0.25 / 2.8) < 1e-9
    assert not gates.loss_gate(tuned, drifted, base, gates.LOSS_TOLERANCE["fp32"]).passed
    assert not gates.loss_gate(tuned, scores([], [[0.6]], [[1]]), base, gates.LOSS_TOLERANCE["int4"]).passed


def test_task_gate_compares_answers_with_the_references():
    words = {1: "billing", 2: "low", 3: "bug", 4: "high"}
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    tuned = scores([[1, 2], [3, 4]], [[0.1]], [[1]])
    refs = ["billing low", "bug high"]
    same = gates.task_gate(tuned, tuned, refs, decode, 0.05)
    assert same.passed and same.detail["token_f1_export"] == 1.0 and same.detail["exact_match_export"] == 1.0
    worse = gates.task_gate(tuned, scores([[1, 2], [3, 2]], [[0.1]], [[1]]), refs, decode, 0.1)
    assert not worse.passed and worse.detail["token_f1_export"] == 0.75
    by_name = {g.name: g for g in gates.evaluate(tuned, scores([[2], [1]], [[0.5]], [[2]]), tuned, "int8",
                                                  references=refs, decode=decode)}
    assert by_name["task_metric"].passed and "greedy_tokens" not in by_name


def test_adapter_gate_without_any_difference_cannot_pass():
    gate = gates.adapter_gate(TUNED, TUNED, TUNED)
    assert not gate.passed and "--data" in gate.message


def test_rope_permutation_is_undone_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tuneforge.export.gguf import permute_for_rope

    n_head, n_kv, head_dim, hidden = 4, 2, 8, 32
    q, k = torch.randn(n_head * head_dim, hidden), torch.randn(n_kv * head_dim, hidden)
    undo = LlamaTensorProcessor({"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    back_q = undo.process(permute_for_rope(q, n_head).numpy(), "blk.0.attn_q.weight").weights
    back_k = undo.process(permute_for_rope(k, n_kv).numpy(), "blk.0.attn_k.weight").weights
    assert np.array_equal(back_q, q.numpy()) and np.array_equal(back_k, k.numpy())
    assert not np.array_equal(permute_for_rope(q, n_head).numpy(), q.numpy())
