"""The shipped preference scenario: `tuneforge data generate preference` + a DPO run ends with a before/after
report whose held-out reward accuracy is above the base's (a tiny model in the default suite; the real SmolLM2
through the CLI with examples/preference.yaml is opt-in: `pytest -m long`, minutes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _example_spec(model, data: dict, out: Path) -> dict:
    spec = yaml.safe_load((ROOT / "examples" / "preference.yaml").read_text())
    spec.update(model=str(model), output_dir=str(out))
    spec["data"].update(train=str(data["train"]), validation=str(data["valid"]))
    spec["eval"]["data"] = str(data["heldout"])
    return spec


@pytest.mark.timeout(300)
def test_dpo_on_the_shipped_dataset_raises_heldout_reward_accuracy(tiny_models, tmp_path):
    from tuneforge import api
    from tuneforge.data.synthetic import write_dataset

    data = write_dataset("preference", tmp_path / "data")
    spec = _example_spec(tiny_models["llama"], data, tmp_path / "run")  # the shipped config, on a tiny model
    spec["training"].update(lr=5e-3, max_seq_len=192, precision="fp32", seed=0)
    spec["eval"].update(max_new_tokens=4, examples=2)
    summary = api.train(spec, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    base, tuned = report["base"], report["fine_tuned"]
    print(f"tiny llama, DPO on the shipped pairs: held-out reward accuracy {base['reward_accuracy']:.3f} -> "
          f"{tuned['reward_accuracy']:.3f}")
    assert base["pairs"] == tuned["pairs"] == 120
    assert tuned["reward_accuracy"] > base["reward_accuracy"] + 0.1
    assert tuned["implicit_reward_accuracy"] > 0.8 and "rule_pass_rate" in tuned
    assert summary.final_eval_reward_accuracy is not None
    text = (tmp_path / "run" / "report.md").read_text()
    assert "| reward_accuracy |" in text and "| rule_pass_rate |" in text


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1800)
def test_smollm2_example_config_raises_reward_accuracy_and_rule_compliance(smollm2_path, tmp_path):
    from tuneforge.cli import main

    assert main(["data", "generate", "preference", "--out", str(tmp_path / "data")]) == 0
    data = {split: tmp_path / "data" / f"{split}.jsonl" for split in ("train", "valid", "heldout")}
    spec_file = tmp_path / "preference.yaml"
    spec_file.write_text(yaml.safe_dump(_example_spec(smollm2_path, data, tmp_path / "run")))
    assert main(["train", str(spec_file), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    base, tuned = report["base"], report["fine_tuned"]
    assert tuned["reward_accuracy"] > base["reward_accuracy"] + 0.3
    assert tuned["rule_pass_rate"] > base["rule_pass_rate"]
