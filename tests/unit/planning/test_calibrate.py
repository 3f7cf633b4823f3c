"""The process baseline's cache key: what the figure depends on (library versions, threads, the tokenizer's
bytes), not where the model folder is."""
from __future__ import annotations

import json
import shutil

from tuneforge.planning.calibrate import baseline_cache_path


def test_a_moved_or_copied_model_reuses_the_baseline_and_another_tokenizer_does_not(tiny_models, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    source = tiny_models["llama"]
    copy = shutil.copytree(source, tmp_path / "elsewhere" / "llama")
    path, key = baseline_cache_path(source, 1)
    assert baseline_cache_path(copy, 1)[0] == path  # same tokenizer bytes, another folder: one figure
    assert str(tmp_path) not in str(key) and str(source) not in str(key)  # no folder in the key
    assert path.parent == tmp_path / "cache" / "plan"
    assert baseline_cache_path(copy, 2)[0] != path  # threads change the figure
    assert baseline_cache_path(None, 1)[0] != path  # no tokenizer loaded
    vocab = json.loads((copy / "tokenizer.json").read_text())
    vocab["added_tokens"].append({**vocab["added_tokens"][-1], "id": 10_000, "content": "<extra>"})
    (copy / "tokenizer.json").write_text(json.dumps(vocab))
    assert baseline_cache_path(copy, 1)[0] != path  # another vocabulary: measured again
