"""Held-out evaluation and the before/after report, end to end on a tiny model."""
from __future__ import annotations

import json

from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl
from tests.integration.test_cli import tuneforge, write_spec
from tuneforge import api


def test_train_with_eval_writes_before_after_report(tiny_models, chat_file, tmp_path):
    heldout = [dict(r) for r in CHAT_RECORDS[:3]]
    heldout[0] = {**heldout[0], "rules": [{"contains": "Paris"}, {"regex": "^P"}]}
    held = write_jsonl(tmp_path / "heldout.jsonl", heldout)
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=12, batch_size=8, lr=2e-2)
    spec["eval"] = {"data": str(held), "max_new_tokens": 8, "examples": 2}
    s = api.train(spec, progress=False)
    run = tmp_path / "run"
    assert s.report == str(run / "report.md")
    report = json.loads((run / "report.json").read_text())
    base, tuned = report["base"], report["fine_tuned"]
    # Trained on these very replies: the fine-tuned model must fit them better than the random base.
    assert tuned["loss"] < base["loss"] and tuned["perplexity"] < base["perplexity"]
    assert {"exact_match", "token_f1", "rule_pass_rate", "token_accuracy"} <= set(tuned)
    assert len(tuned["outputs"]) == 3
    text = (run / "report.md").read_text()
    assert "| loss |" in text and "| perplexity |" in text and "![loss curve](loss_curve.png)" in text
    assert text.count("Capital of France?") == 1 and (run / "before_after.png").exists()


def test_eval_cli_json(tiny_models, chat_file, tmp_path):
    held = write_jsonl(tmp_path / "heldout.jsonl", CHAT_RECORDS[:2])
    out = tuneforge("eval", tiny_models["qwen2"], "--data", held, "--task", "chat", "--max-new-tokens", "4", "--json")
    metrics = json.loads(out.stdout)
    assert metrics["examples"] == 2 and metrics["perplexity"] > 1 and len(metrics["outputs"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    out = tuneforge("eval", tiny_models["qwen2"], "--data", bad, "--task", "chat", check=False)
    assert out.returncode == 1 and f"{bad} line 1: messages" in out.stderr and "Traceback" not in out.stderr
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(tiny_models["qwen2"], chat_file, tmp_path / "run", max_steps=2))
    tuneforge("train", spec, "--quiet")
    rep = tuneforge("report", tmp_path / "run", "--data", held)
    assert "report.md" in rep.stdout and (tmp_path / "run" / "report.md").exists()
