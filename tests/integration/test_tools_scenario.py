"""The shipped tool-call scenario end to end on the real SmolLM2 (opt-in, minutes: `pytest -m long`): fine-tuned with examples/tools.yaml's
template on `tuneforge data generate tools`, served by `tuneforge serve`, it calls the right function with
arguments that follow the function's schema, through the openai SDK in strict mode."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.long
def test_smollm2_fine_tuned_on_the_tool_scenario_calls_the_right_function(smollm2_path, tmp_path):
    import yaml

    from tests.service.conftest import Server
    from tuneforge import api
    from tuneforge.data.tool_calls import TOOLS, expected_call, write_tool_dataset

    data = write_tool_dataset(tmp_path / "data")
    spec = yaml.safe_load((ROOT / "examples" / "tools.yaml").read_text())
    spec.update(model=str(smollm2_path), output_dir=str(tmp_path / "run"))
    spec["data"].update(train=str(data["train"]), validation=str(data["valid"]))
    spec["training"].update(batch_size=4, lr=2e-3, max_steps=40, eval_every=1000, save_every=1000)
    spec.pop("eval")
    api.train(spec, progress=False)

    server = Server(tmp_path / "serve", smollm2_path, None, workers=0,
                    extra=["--inference-threads", "2", "--adapter", f"tools={tmp_path / 'run'}"]).start()
    try:
        client = server.client()
        records = [r for r in map(json.loads, data["heldout"].read_text().splitlines()) if expected_call(r)][:20]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        right = 0
        for record in records:
            reply = client.chat.completions.create(model="tools", messages=record["messages"][:1], tools=TOOLS,
                                                   tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                   max_tokens=96)
            (call,) = reply.choices[0].message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            right += call.function.name == expected_call(record)["name"]
    finally:
        server.stop()
    assert right >= 0.9 * len(records), f"{right} of {len(records)} calls named the right function"
