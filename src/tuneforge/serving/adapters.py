"""LoRA adapters over one loaded base model: loaded through peft on first use, evicted least-recently-used
under a count and a byte limit (never one that a running row uses), reloaded when asked for again."""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import ModelError

log = logging.getLogger("tuneforge.serving")


@dataclass(frozen=True)
class AdapterSource:
    """A LoRA adapter: a peft folder (adapter_config.json + weights), or a training checkpoint's
    `trainable.safetensors` with the peft config its run used (for an OnnxEngine: an ONNX adapters export's
    `.onnx_adapter` file, no config)."""

    folder: Path | None = None
    weights: Path | None = None
    config: object | None = None  # peft LoraConfig for a checkpoint

    def nbytes(self) -> int:
        if self.folder is not None:
            return sum(p.stat().st_size for p in self.folder.glob("adapter_model.*"))
        return self.weights.stat().st_size


class AdapterSet:
    def __init__(self, base_model, *, max_adapters: int = 8, max_bytes: int = 2 * 2**30):
        self.model = base_model  # becomes a peft PeftModel when the first adapter loads
        self.wrapped = False
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self.sources: dict[str, AdapterSource] = {}
        self.internal: dict[str, str] = {}  # served name -> peft adapter name (served names may hold '.' or "lora_")
        self.loaded: collections.OrderedDict[str, int] = collections.OrderedDict()  # name -> bytes, LRU first
        self.lock = threading.Lock()
        self.loads = 0  # how many times an adapter was loaded (evictions make it grow)
        from tuneforge.serving.lora import RowAdapters  # torch and peft: only once a model is served

        self.rows = RowAdapters()  # the engine's per-row adapters, read by the gathered LoRA layers
        self.gathered = False  # the model's LoRA layers take `rows` (serving/lora.py); else peft's adapter_names

    def register(self, name: str, source: AdapterSource) -> None:
        with self.lock:
            self.sources.setdefault(name, source)
            self.internal.setdefault(name, f"tfadapter{len(self.internal)}")

    def acquire(self, name: str, in_use: set[str | None]) -> bool:
        """Make adapter `name` loaded (the engine thread calls this). False when it cannot be made room for
        now, because every adapter it would have to evict is in use by a running row."""
        with self.lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return True
            source = self.sources.get(name)
            if source is None:
                raise ModelError(f"adapter {name} is not registered")
            size = source.nbytes()
            evictable = [n for n in self.loaded if n not in in_use]
            count, total = len(self.loaded) + 1, sum(self.loaded.values()) + size
            victims = []
            for victim in evictable:  # least recently used first
                if count <= self.max_adapters and total <= self.max_bytes:
                    break
                victims.append(victim)
                count, total = count - 1, total - self.loaded[victim]
            if count > self.max_adapters or (total > self.max_bytes and len(self.loaded) > len(victims)):
                return False
            self._load(name, source)  # load first: a PeftModel must never be left without adapters
            self.loaded[name] = size
            for victim in victims:
                self.model.delete_adapter(self.internal[victim])
                del self.loaded[victim]
                log.info("evicted adapter %s", victim)
            self._restack()
            return True

    def _restack(self) -> None:
        from tuneforge.serving.lora import install

        self.gathered = install(self.model, self.rows)
        self.rows.slots = {self.internal[n]: i + 1 for i, n in enumerate(self.loaded)}
        self.rows.version += 1

    def _load(self, served: str, source: AdapterSource) -> None:
        from peft import PeftModel, get_peft_model, set_peft_model_state_dict

        name = self.internal[served]
        self.loads += 1
        if source.folder is not None:
            if not self.wrapped:
                self.model = PeftModel.from_pretrained(self.model, source.folder, adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(source.folder, adapter_name=name, is_trainable=False)
        else:
            from safetensors.torch import load_file

            if not self.wrapped:
                self.model = get_peft_model(self.model, source.config, adapter_name=name)
            else:
                self.model.add_adapter(name, source.config)
            # checkpoint names carry the training adapter's name ("...lora_A.default.weight"); peft's loader wants none
            state = {k.replace(".default.", "."): v for k, v in load_file(source.weights).items()}
            result = set_peft_model_state_dict(self.model, state, adapter_name=name)
            missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
            if missing:
                raise ModelError(f"checkpoint {source.weights} does not fit its config (missing {missing[:2]})")
        self.wrapped = True
        self.model.eval()
        log.info("loaded adapter %s as %s", served, name)
