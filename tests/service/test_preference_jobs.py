"""DPO jobs through the openai SDK in strict mode: method {"type": "dpo"} on an org's own supervised fine-tune,
files in OpenAI's DPO format, preference metrics in the events, the result served; files of the other kind fail
validation naming the line."""
from __future__ import annotations

import json

import openai
import pytest
import torch
from safetensors.torch import load_file

from tests.service.conftest import tiny_job, wait_for

pytestmark = pytest.mark.timeout(400)

DPO_RECORDS = [
    {"input": {"messages": [{"role": "user", "content": f"What is {a} plus {b}? Digits only."}]},
     "preferred_output": [{"role": "assistant", "content": str(a + b)}],
     "non_preferred_output": [{"role": "assistant", "content": f"It is {a + b}, I am quite sure."}]}
    for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 2), (4, 3), (6, 5), (8, 7), (1, 9), (3, 3), (5, 5))
]


def upload_records(client, name: str, records: list[dict]) -> str:
    return client.files.create(file=(name, "".join(json.dumps(r) + "\n" for r in records).encode()),
                               purpose="fine-tune").id


def test_dpo_on_a_supervised_fine_tune_is_served(server, train_jsonl):
    from tuneforge import api
    from tuneforge.training.run_dir import RunDir

    client = server.client("prefs")
    with open(train_jsonl, "rb") as f:
        chat_file = client.files.create(file=f, purpose="fine-tune").id
    sft = client.fine_tuning.jobs.create(model="tiny", training_file=chat_file, suffix="sft",
                                         extra_body=tiny_job(max_steps=3))
    sft = wait_for(client, sft.id, ("succeeded", "failed"))
    assert sft.status == "succeeded", sft.error

    dpo_file = upload_records(client, "pairs.jsonl", DPO_RECORDS)
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=dpo_file, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4,
                                                           "learning_rate_multiplier": 2}}},
        extra_body=tiny_job(max_steps=4, save_every=2))
    assert job.method.type == "dpo" and job.model == sft.fine_tuned_model
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.method.dpo.hyperparameters.batch_size == 4
    done = wait_for(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:prefs:dpo:{job.id.split('-')[1][:8]}"  # named after the base model

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = sorted((e for e in events if e.type == "metrics"), key=lambda e: e.data["step"])
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4]
    assert {"train_loss", "train_reward_accuracy", "train_reward_margin", "train_chosen_logprob",
            "train_rejected_logprob"} <= set(metrics[0].data)
    assert "reward accuracy=" in metrics[0].message
    # A new adapter starts at zero: at the first step the policy is its reference (the adapter switched off), so
    # the DPO loss is log 2. That reference is the supervised fine-tune, merged into the base weights this job
    # trains on (not the server's base model).
    assert metrics[0].data["train_loss"] == pytest.approx(0.693147, abs=1e-4)
    assert any(e.message == f"Merged {sft.fine_tuned_model} into the base weights this job trains on" for e in events)
    base = server.data_dir / "jobs" / job.id / "base"
    sft_merged = api.load(server.data_dir / "jobs" / sft.id / "run").model.merge_and_unload().state_dict()
    trained_on = load_file(base / "model.safetensors")
    raw = load_file(server.base_model / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(trained_on[name], sft_merged[name]) and not torch.equal(trained_on[name], raw[name])
    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [4, 2]

    # Served: the chat answer is what the trained run generates (greedy, fp32), on the merged base.
    run = server.data_dir / "jobs" / job.id / "run"
    assert RunDir(run).read_spec().model == str(server.data_dir / "jobs" / job.id / "base")
    messages = [{"role": "user", "content": "What is 2 plus 5? Digits only."}]
    answer = client.chat.completions.create(model=done.fine_tuned_model, messages=messages, max_tokens=6,
                                            temperature=0)
    assert answer.choices[0].message.content.strip() == api.generate(run, [messages], max_new_tokens=6)[0]
    assert client.models.retrieve(done.fine_tuned_model).owned_by == "prefs"

    # Another org cannot fine-tune (or see) this org's model.
    other = server.client("someone-else")
    with pytest.raises(openai.BadRequestError) as e:
        other.fine_tuning.jobs.create(model=done.fine_tuned_model, method={"type": "dpo"},
                                      training_file=upload_records(other, "p.jsonl", DPO_RECORDS))
    assert e.value.body["code"] == "model_not_available" and e.value.body["param"] == "model"


def test_files_of_the_other_kind_fail_validation_naming_the_line(server, train_jsonl):
    client = server.client("prefs-errors")
    with open(train_jsonl, "rb") as f:
        chat_file = client.files.create(file=f, purpose="fine-tune").id
    dpo_file = upload_records(client, "pairs.jsonl", DPO_RECORDS)

    job = client.fine_tuning.jobs.create(model="tiny", training_file=chat_file, method={"type": "dpo"})
    assert job.status == "failed" and job.error.code == "invalid_training_file", job.error
    assert job.error.param == "training_file"
    assert "in preference format: line 1: messages: this is supervised chat data" in job.error.message

    job = client.fine_tuning.jobs.create(model="tiny", training_file=dpo_file,
                                         method={"type": "supervised"})
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "in chat format: line 1: messages: this is preference data" in job.error.message

    bad = [dict(DPO_RECORDS[0])] * 11 + [{**DPO_RECORDS[1], "non_preferred_output": DPO_RECORDS[1]["preferred_output"]}]
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload_records(client, "bad.jsonl", bad),
                                         method={"type": "dpo"})
    assert "line 12: non_preferred_output: identical to preferred_output" in job.error.message

    cases = [({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta"),
             ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, "method.dpo.hyperparameters.beta"),
             ({"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}, "method.supervised"),
             ({"type": "reinforcement"}, "method.type")]
    for method, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model="tiny", training_file=dpo_file, method=method)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", training_file=dpo_file, method={"type": "dpo"},
                                       extra_body={"tuneforge": {"task": "chat"}})
    assert e.value.body["param"] == "tuneforge.task"
