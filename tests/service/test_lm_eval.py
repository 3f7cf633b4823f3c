"""lm-evaluation-harness as a real client (opt-in: `pytest -m lmeval`, or `make test-clients`): a local
multiple-choice task of 20 support tickets through `--model local-completions` (token-id prompts, echo,
logprobs) against `tuneforge serve` chooses, item for item, the label tuneforge's own label log-likelihood
scoring (the classification scenario's eval) chooses for the same run.

lm-eval lives in its own virtual environment (it pulls its own torch): `make lmeval-venv` makes
.cache/lmeval-venv (or set TUNEFORGE_LMEVAL_VENV); without it the test is skipped, saying so."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_spec
from tests.service.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("TUNEFORGE_LMEVAL_VENV", ROOT / ".cache" / "lmeval-venv"))
LABELS = ["billing", "shipping", "technical", "account"]

pytestmark = [pytest.mark.lmeval,
              pytest.mark.skipif(not (VENV / "bin" / "lm_eval").is_file(),
                                 reason=f"lm-eval is not installed in {VENV} (make lmeval-venv)")]

TASK = """task: tf_tickets
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Text: {{{{text}}}}\\nLabel:"
target_delimiter: ""
doc_to_choice: {choices}
doc_to_target: "{{{{{labels}.index(label)}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_multiple_choice_matches_tuneforges_label_scoring(service_model, tmp_path):
    from tuneforge import api
    from tuneforge.demo_data import write_demo_data
    from tuneforge.evaluation.runner import classify

    data = write_demo_data(tmp_path / "data", n_train=32, n_heldout=20, n_valid=4, task="classification")
    spec = tiny_spec(service_model, data["train"], tmp_path / "run", max_steps=6, lr=2e-2)
    spec.update(task="classification", labels=LABELS)
    api.train(spec, progress=False)
    records = [json.loads(line) for line in data["heldout"].read_text().splitlines()]
    want = classify(api.load(tmp_path / "run"), records, LABELS)

    # The label and the end of the sequence, as tuneforge scores a label (data/templates.py: " label" + eos).
    eos = api.load(tmp_path / "run").tokenizer.eos_token
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tf_tickets.yaml").write_text(TASK.format(
        data=data["heldout"], choices=json.dumps([f" {label}{eos}" for label in LABELS]), labels=LABELS))
    server = Server(tmp_path / "serve", service_model, None, workers=0,
                    extra=["--inference-threads", "1", "--adapter", f"tickets={tmp_path / 'run'}"]).start()
    try:
        env = {**os.environ, "OPENAI_API_KEY": server.key("acme"), "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        args = (f"model=tickets,base_url={server.url}/completions,tokenizer={tmp_path / 'run' / 'adapter'},"
                "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1")
        done = subprocess.run([str(VENV / "bin" / "lm_eval"), "--model", "local-completions", "--model_args", args,
                               "--tasks", "tf_tickets", "--include_path", str(tmp_path / "tasks"), "--batch_size", "4",
                               "--output_path", str(tmp_path / "out"), "--log_samples"],
                              env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob("samples_tf_tickets*.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    got = [LABELS[max(range(len(LABELS)), key=lambda j: float(r["filtered_resps"][j][0]))] for r in rows]
    assert len(got) == len(records) == 20
    assert got == want
