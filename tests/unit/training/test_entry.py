"""The training entry (a run in a process of its own) and how its errors come back: as their own types."""
from __future__ import annotations

import threading

import pytest

from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl


def test_every_error_comes_back_as_its_own_type():
    from tuneforge.distributed import DistributedError
    from tuneforge.errors import (CheckpointError, DataError, ModelError, OutputError, Problem, SpecError, Stopped,
                                  TuneforgeError, error_from_record)
    from tuneforge.export.gates import ExportError, GateFailed

    problem = Problem("train.jsonl", 3, "messages[1].content", "is empty")
    for error in (SpecError("bad spec", [problem]), DataError("bad data", [problem, problem]), ModelError("no model"),
                  CheckpointError("damaged"), OutputError("disk full"), Stopped("SIGTERM", exit_code=143),
                  DistributedError("rank 1 died"), ExportError("no builder"), GateFailed("tokens differ"),
                  TuneforgeError("plain")):
        back = error_from_record(error.to_record())
        assert type(back) is type(error), error
        assert (str(back), back.problems, back.exit_code) == (str(error), error.problems, error.exit_code)
    unknown = error_from_record({"kind": "from-a-newer-version", "message": "m", "exit_code": 1})
    assert type(unknown) is TuneforgeError and str(unknown) == "m"


@pytest.fixture
def run_spec(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_RECORDS)
    return tiny_spec(tiny_models["llama"], data, tmp_path / "run", max_steps=4, save_every=2)


def test_a_child_process_reports_its_events_and_summary_on_its_own_channel(run_spec):
    from tuneforge.spec import build_spec
    from tuneforge.training.entry import TrainingProcess
    from tuneforge.training.run_dir import RunDir

    events = []
    summary = TrainingProcess(build_spec(run_spec), capture=True).wait(events.append, timeout=120)
    kinds = [e.kind for e in events if e.kind not in ("warning", "info")]  # (the tiny data is shorter than asked)
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert [e.step for e in events if e.kind == "step"] == [1, 2, 3, 4]
    assert [e.step for e in events if e.kind == "checkpoint"] == [2, 4]
    assert all(isinstance(e.data["train_loss"], float) for e in events if e.kind == "step")
    assert summary.status == "succeeded" and summary.steps == 4
    written = RunDir(run_spec["output_dir"]).read_summary()  # what the child wrote is what the parent got
    assert summary.final_train_loss == written["final_train_loss"] and summary.tokens_seen == written["tokens_seen"]
    assert events[-2].kind == "checkpoint" and summary.output.endswith("adapter")


def test_a_stop_request_reaches_the_child_which_stops_at_a_step_with_a_checkpoint(run_spec):
    from tuneforge.spec import build_spec
    from tuneforge.training.entry import TrainingProcess
    from tuneforge.training.events import StopRequest

    run_spec["training"]["max_steps"] = 400
    stop, events = StopRequest(), []

    def on_event(e):
        events.append(e)
        if e.kind == "step" and e.step == 2:
            stop.request("the test's stop")  # passed on as SIGTERM

    summary = TrainingProcess(build_spec(run_spec), capture=True).wait(on_event, stop, timeout=120)
    assert summary.status == "stopped" and summary.stop_reason == "SIGTERM" and 2 <= summary.steps < 400
    assert summary.checkpoint.endswith(f"step-{summary.steps:06d}")
    assert events[-1].kind == "stopped" and not stop.armed


def test_a_childs_error_is_raised_as_its_own_type_with_its_problems(run_spec, tmp_path):
    from tuneforge.errors import DataError
    from tuneforge.spec import build_spec
    from tuneforge.training.entry import TrainingProcess

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"oops": 1}\n')
    run_spec["data"]["train"] = str(bad)
    with pytest.raises(DataError) as e:
        TrainingProcess(build_spec(run_spec), capture=True).wait(timeout=120)
    assert [p.line for p in e.value.problems] == [1, 2] and e.value.exit_code == 1


def test_a_child_that_dies_without_a_result_is_an_error_not_a_hang(run_spec):
    from tuneforge.errors import TuneforgeError
    from tuneforge.spec import build_spec
    from tuneforge.training.entry import TrainingProcess

    run_spec["training"]["max_steps"] = 400
    child = TrainingProcess(build_spec(run_spec), capture=True)
    threading.Timer(3.0, child.proc.kill).start()
    with pytest.raises(TuneforgeError, match="exited with status -9 without a result"):
        child.wait(timeout=120)
