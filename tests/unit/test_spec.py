"""The job spec: defaults, YAML + --set overrides, and errors that name the line, field and fix."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tuneforge.errors import SpecError
from tuneforge.spec import build_spec, load_spec

GOOD = """model: smollm2-135m-instruct
task: chat
data:
  train: train.jsonl
training:
  lr: 1.0e-4
  epochs: 2
"""


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD)
    spec = load_spec(p, ["training.batch_size=8", "adapter.target_modules=[q_proj, v_proj]", "method=dora"])
    assert spec.training.lr == 1e-4 and spec.training.batch_size == 8 and spec.method == "dora"
    assert spec.adapter.target_modules == ["q_proj", "v_proj"]
    assert spec.training.precision == "auto" and spec.adapter.r == 16
    # Round trip: the resolved spec written into a run folder loads back identical.
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    assert load_spec(tmp_path / "spec.yaml") == spec


def test_unknown_key_names_line_and_closest_key(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD.replace("  lr: 1.0e-4", "  lrr: 1.0e-4"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert f"{p} line 6: training.lrr: unknown key (did you mean 'training.lr'?)" in str(e.value)


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(GOOD.replace("task: chat", "task: chatt").replace("epochs: 2", "epochs: -1") + "methd: lora\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert f"{p} line 2: task:" in msg and f"{p} line 7: training.epochs:" in msg
    assert "methd: unknown key (did you mean 'method'?)" in msg


def test_override_errors_name_the_flag():
    with pytest.raises(SpecError, match=r"--set training.batch_size: training.batch_size: .*greater than or equal to 1"):
        build_spec({"model": "m", "data": {"train": "t"}}, ["training.batch_size=0"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        build_spec({"model": "m", "data": {"train": "t"}}, ["training.lr"])


def test_missing_required_and_conflicts():
    with pytest.raises(SpecError, match="model: required but missing"):
        build_spec({"data": {"train": "t"}})
    with pytest.raises(SpecError, match="either `validation`"):
        build_spec({"model": "m", "data": {"train": "t", "validation": "v", "validation_split": 0.1}})


def test_yaml_syntax_and_shape_errors(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="line 2: not valid YAML"):
        load_spec(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(p)
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_every_shipped_example_config_is_valid():
    examples = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_spec(path)


def test_demo_spec_matches_shipped_example():
    from tuneforge.demo import DEMO_SPEC

    root = Path(__file__).resolve().parents[2]
    assert load_spec(root / "examples" / "demo.yaml") == build_spec(DEMO_SPEC)


def test_template_errors_point_at_their_line(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("model: m\ntask: classification\nlabels: [a, b]\ndata:\n  train: t.jsonl\n"
                 "  prompt_template: 'Review: {review}\\nSentiment:'\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert (f"{p} line 6: data.prompt_template: unknown field(s) review for task 'classification'; "
            "a template may use: text") in str(e.value)
    p.write_text(p.read_text().replace("{review}", "{text"))
    with pytest.raises(SpecError, match=rf"{p} line 6: data.prompt_template: not a format string \(unmatched '{{'"):
        load_spec(p)
    with pytest.raises(SpecError, match="data.prompt_template: task 'chat' has no prompt template .use data.chat_template"):
        build_spec({"model": "m", "data": {"train": "t", "prompt_template": "{text}"}})
    with pytest.raises(SpecError, match=r"data.chat_template: not a valid Jinja template"):
        build_spec({"model": "m", "data": {"train": "t", "chat_template": "{% for m in messages %}"}})
    with pytest.raises(SpecError, match=r"data.chat_template: only task chat"):
        build_spec({"model": "m", "task": "text", "data": {"train": "t", "chat_template": "{{ x }}"}})
    with pytest.raises(SpecError, match=r"\(top level\)|labels: task classification needs"):
        build_spec({"model": "m", "task": "classification", "data": {"train": "t"}})


@pytest.mark.timeout(30)
def test_preference_section():
    base = {"model": "m", "data": {"train": "t"}}
    spec = build_spec({**base, "task": "preference"})
    assert spec.preference is None and spec.preference_settings.loss == "dpo" and spec.preference_settings.beta == 0.1
    spec = build_spec({**base, "task": "preference", "preference": {"loss": "orpo", "beta": 0.2}})
    assert spec.preference.loss == "orpo"
    cases = [({"preference": {"beta": 0.1}}, "preference: only task preference reads it"),
             ({"task": "preference", "preference": {"beta": 0}}, "preference.beta: Input should be greater than 0"),
             ({"task": "preference", "preference": {"loss": "ipo"}},
              "preference.loss: Input should be 'dpo' or 'orpo'"),
             ({"task": "preference", "preference": {"lose": "dpo"}}, "did you mean 'preference.loss'"),
             ({"task": "preference", "preference": {"loss": "orpo", "reference": "precomputed"}},
              "preference.reference: orpo uses no reference model"),
             ({"task": "preference", "method": "prompt_tuning"}, "method: prompt tuning is not supported"),
             ({"task": "preference", "training": {"packing": True}}, "training.packing: task preference")]
    for extra, message in cases:
        with pytest.raises(SpecError, match=re.escape(message)):
            build_spec({**base, **extra})
