"""QLoRA's 4-bit base: quantised once per model, saved as a pre-quantised checkpoint, and cached.

bitsandbytes quantises while loading, and on CPU that reads every full-precision weight into memory
first (a 1.1B model whose NF4 weights take 0.5 GB peaks at 3.4 GB resident). So quantisation runs
once, in a child process whose memory is returned when it exits, and training loads the saved NF4
checkpoint instead (0.4 GB resident after loading the same model; see docs/benchmarks.md).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from tuneforge.errors import ModelError

KEEP = 4  # quantised copies kept in the cache, most recently used first
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def bnb_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _key(path: Path, compute_dtype: torch.dtype) -> str:
    import bitsandbytes
    import transformers

    files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    stamp = [str(path.resolve()), str(compute_dtype), bitsandbytes.__version__, transformers.__version__,
             [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]


def _prune(folder: Path, keep: Path) -> None:
    import shutil

    copies = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[KEEP:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def quantized_copy(path: Path, compute_dtype: torch.dtype, trust_remote_code: bool = False) -> Path:
    """A cached NF4 (double-quantised) copy of the model in `path`, made in a child process if missing."""
    from tuneforge.models.load import build_once, cache_dir

    dtype_name = str(compute_dtype).removeprefix("torch.")
    target = cache_dir() / "quantized" / f"{path.name}-nf4-{dtype_name}-{_key(path, compute_dtype)}"

    def build(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "tuneforge.models.quantize", str(path), str(tmp), dtype_name,
               "trust" if trust_remote_code else "safe"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(f"could not quantise {path} to 4 bits: {proc.stderr.strip()[-1500:]}")

    existed = (target / "config.json").is_file()
    build_once(target, build)
    target.touch()  # most recently used
    if not existed:
        _prune(target.parent, target)
    return target


def _quantize(src: str, dst: str, dtype_name: str, trust: str) -> None:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, quantization_config=bnb_config(dtype),
                                                 device_map={"": "cpu"}, trust_remote_code=trust == "trust")
    model.save_pretrained(dst, safe_serialization=True)


if __name__ == "__main__":
    _quantize(*sys.argv[1:5])
