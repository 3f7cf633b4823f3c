"""CUDA checks: every method trains, saves and reloads on a GPU; QLoRA's base is really 4-bit there;
resume is bit-exact; fp16 trains. Run by `make gpu-check` (bench/gpu_check.py) on a lent GPU
machine; skipped wherever `torch.cuda.is_available()` is false, so `make test` never runs them.

Dry run: `TUNEFORGE_GPU_CHECK_DEVICE=cpu` runs the same code paths on the CPU (the fp16 test with bf16
there, see HALF), so a typo is found here and not in lent GPU time:

    TUNEFORGE_GPU_CHECK_DEVICE=cpu OMP_NUM_THREADS=1 .venv/bin/python -m pytest -m gpu tests/gpu -q

Only tuneforge's stable entry points are used (`api.train`, `api.summary`, `api.load`, `api.merge`,
`make_tiny_model`); results are read from the run folder (metrics.jsonl, summary.json, adapter/ or
model/, checkpoints/).
"""
from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("TUNEFORGE_GPU_CHECK_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"TUNEFORGE_GPU_CHECK_DEVICE must be cuda or cpu (a dry run), not {DEVICE!r}")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA device (a dry run on the CPU: TUNEFORGE_GPU_CHECK_DEVICE=cpu)", allow_module_level=True)

# cuBLAS reads this when it creates its first handle; with it, its GEMMs are run-to-run deterministic
# (the resume test compares two runs bit for bit). Harmless for the other tests.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.conftest import CHAT_RECORDS, tiny_spec, write_jsonl  # noqa: E402
from tuneforge import api  # noqa: E402

pytestmark = pytest.mark.gpu

METHODS = ["lora", "dora", "qlora", "ia3", "prompt_tuning", "full"]
LR = {"ia3": 0.3, "prompt_tuning": 0.3, "full": 3e-3}  # as tests/unit/methods/test_method_matrix.py
STEPS = 15
# Loss in nats per target token. All 8 conversations in every step (batch 8): a memorisable batch,
# so the loss must fall (the CPU suite asks 0.05 after 8 steps; prompt tuning, the slowest, fell 0.10
# in 15 steps on the CPU, IA3 0.20, the LoRA family ~0.5, full 2.0).
MIN_DROP = 0.05
# fp32 logits of two computations of the same function (adapter merged into W vs applied beside it;
# CUDA kernels vs CPU kernels): the sums are reassociated, so they differ by float32 rounding,
# ~1e-6 relative per layer, on logits of magnitude <~10; the CPU suite uses the same bound for its
# merge check. TF32 (10-bit mantissa, ~1e-3 relative) would break it, hence "highest" below.
ATOL, RTOL = 2e-4, 1e-4
# A CPU dry run checks the fp16 test's code with bf16 (fp16 has no fast path on the CPU, and has been
# refused there); TUNEFORGE_GPU_CHECK_HALF=fp16 asks for fp16 on the CPU too.
HALF = os.environ.get("TUNEFORGE_GPU_CHECK_HALF", "fp16" if DEVICE == "cuda" else "bf16")


@pytest.fixture(scope="module", autouse=True)
def exact_fp32_matmuls():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: the fp32 tolerances above assume it
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from tuneforge.models.tiny import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", CHAT_RECORDS)


def make_spec(model: Path, data: Path, out: Path, method: str = "lora", **training) -> dict:
    spec = tiny_spec(model, data, out, **{"max_steps": STEPS, "batch_size": 8, "lr": LR.get(method, 1e-2),
                                          **training})
    spec["method"] = method
    spec["device"] = DEVICE
    return spec


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.fixture(scope="module")
def trained(llama, chat_data, tmp_path_factory):
    """trained(method) -> run folder of STEPS fp32 steps on DEVICE, trained once per module."""
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path | BaseException] = {}

    def get(method: str) -> Path:
        if method not in done:
            run = root / method
            try:
                api.train(make_spec(llama, chat_data, run, method), overwrite=True, progress=False)
                done[method] = run
            except Exception as e:  # noqa: BLE001 - every test of this method reports the same failure
                done[method] = e
        if isinstance(done[method], BaseException):
            raise done[method]
        return done[method]

    return get


def probe(tokenizer, device) -> dict[str, torch.Tensor]:
    """Three conversations, right-padded, through the run's own tokenizer and chat template."""
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in CHAT_RECORDS[:3]]
    enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    """(real tokens, V) fp32 logits: virtual-token positions (prompt tuning) and padding dropped."""
    out = model(**batch).logits
    T = batch["input_ids"].shape[1]
    return out[:, -T:][batch["attention_mask"].bool()].float().cpu()


def base_model(model_dir: Path, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_loss_falls(trained, method):
    run = trained(method)
    losses = train_losses(run)
    assert len(losses) == STEPS
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] - MIN_DROP, losses
    s = api.summary(run)
    assert s["steps"] == STEPS
    assert str(s["device"]).startswith(DEVICE), s["device"]
    assert s["precision"] == "float32"


@pytest.mark.parametrize("method", METHODS)
def test_saved_weights_are_the_trained_ones(trained, method):
    """The saved adapter/model holds exactly the weights training ended with. The newest checkpoint
    (written from the in-memory model at the last step) is the only view of those that the run
    folder gives; names differ between the two formats, so tensors are matched by value, bit for bit."""
    from safetensors.torch import load_file

    run = trained(method)
    saved = {}
    for f in sorted((run / ("model" if method == "full" else "adapter")).glob("*.safetensors")):
        saved.update(load_file(f))
    newest = max((run / "checkpoints").glob("step-*"), key=lambda p: p.name)
    assert newest.name.endswith(f"{STEPS:06d}"), f"no checkpoint at the last step: newest is {newest.name}"
    in_memory = {}
    for f in sorted(newest.glob("*.safetensors")):
        in_memory.update(load_file(f))
    assert saved and in_memory, (list(saved), list(in_memory))

    def fingerprint(t: torch.Tensor) -> tuple:
        return str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).flatten().numpy().tobytes()

    assert sorted(map(fingerprint, saved.values())) == sorted(map(fingerprint, in_memory.values())), (
        f"{method}: the saved tensors differ from the last checkpoint's "
        f"({len(saved)} saved: {sorted(saved)[:4]}..., {len(in_memory)} in the checkpoint)"
    )


@pytest.mark.parametrize("method", [m for m in METHODS if m != "prompt_tuning"])
def test_reloaded_run_matches_merged_model(trained, llama, tmp_path, method):
    from transformers import AutoModelForCausalLM

    run = trained(method)
    loaded = api.load(run, device=DEVICE)
    assert next(loaded.model.parameters()).device.type == DEVICE
    batch = probe(loaded.tokenizer, DEVICE)
    reloaded = logits(loaded.model, batch)
    assert not torch.allclose(reloaded, logits(base_model(llama, DEVICE), batch), atol=1e-3), "training changed nothing"
    merged_dir = api.merge(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(DEVICE).eval()
    torch.testing.assert_close(logits(merged, batch), reloaded, atol=ATOL, rtol=RTOL)


def test_prompt_tuning_reloads_and_cannot_merge(trained, llama, tmp_path):
    run = trained("prompt_tuning")
    loaded = api.load(run, device=DEVICE)
    batch = probe(loaded.tokenizer, DEVICE)
    assert not torch.allclose(logits(loaded.model, batch), logits(base_model(llama, DEVICE), batch), atol=1e-3)
    with pytest.raises(Exception, match="nothing to merge"):
        api.merge(run, tmp_path / "merged")


@pytest.mark.parametrize("method", METHODS)
def test_reloaded_on_device_matches_cpu(trained, method):
    """The same saved run on DEVICE and on the CPU: only the kernels differ (a no-op in a dry run)."""
    run = trained(method)
    on_device, on_cpu = api.load(run, device=DEVICE), api.load(run, device="cpu")
    torch.testing.assert_close(logits(on_device.model, probe(on_device.tokenizer, DEVICE)),
                               logits(on_cpu.model, probe(on_cpu.tokenizer, "cpu")), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- QLoRA is really 4-bit


def test_qlora_trains_on_a_4bit_base(trained, llama):
    run = trained("qlora")
    weights = api.summary(run)["base_weight_bytes"]
    base = base_model(llama, "cpu")
    linear = [m for name, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    linear_numel = sum(m.weight.numel() for m in linear)
    # bitsandbytes' Params4bit: two NF4 values per byte, every linear layer of the decoder (not the head).
    assert weights.get("nf4") == linear_numel // 2, weights
    assert weights.get("nf4_absmax", 0) > 0, weights


def test_bitsandbytes_4bit_layers_run_on_device(llama):
    """What QLoRA's loader asks transformers for, checked directly: Linear4bit layers on DEVICE whose
    forward runs there (on CUDA: bitsandbytes' CUDA kernels, not its CPU fallback)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32, quantization_config=config,
                                             device_map={"": DEVICE}).eval()
    layers = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    base = base_model(llama, DEVICE)
    n_linear = sum(isinstance(m, torch.nn.Linear) for name, m in base.named_modules() if "lm_head" not in name)
    assert len(layers) == n_linear > 0
    assert all(m.weight.device.type == DEVICE and m.weight.quant_type == "nf4" for m in layers)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]], device=DEVICE)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    out4, out32 = logits(q, batch), logits(base, batch)
    assert torch.isfinite(out4).all()
    # NF4 rounds each weight to one of 16 levels per block: close to the fp32 base, not equal to it.
    err = ((out4 - out32).norm() / out32.norm()).item()
    assert 0 < err < 0.5, err


# ---------------------------------------------------------------- exact resume


@pytest.fixture
def deterministic():
    """Deterministic kernels where torch has them (warn where it has none), as the bit-exact check needs."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def test_resume_is_bit_exact(llama, chat_data, tmp_path, deterministic):
    """Stopped after 5 steps and resumed = uninterrupted, bit for bit (fp32, deterministic kernels).
    Dropout on, so the CUDA RNG state must be restored too; batch 4 over 8 conversations is 2 steps
    per epoch, so the resume also crosses an epoch boundary."""
    from safetensors.torch import load_file

    def spec(name):
        s = make_spec(llama, chat_data, tmp_path / name, batch_size=4, max_steps=10, save_every=3)
        s["adapter"]["dropout"] = 0.1
        return s

    api.train(spec("straight"), overwrite=True, progress=False)
    api.train(spec("again"), overwrite=True, progress=False)
    straight = train_losses(tmp_path / "straight")
    assert len(straight) == 10 and straight[-1] < straight[0]
    # Separates a resume bug from kernel nondeterminism: two identical runs must agree first.
    assert train_losses(tmp_path / "again") == straight, "two identical runs differ: nondeterministic kernels"

    api.train(spec("split"), overwrite=True, progress=False, stop_after=5)
    assert len(train_losses(tmp_path / "split")) == 5
    api.train(spec("split"), resume=True, progress=False)
    split = train_losses(tmp_path / "split")
    worst = max((abs(a - b) for a, b in zip(split, straight)), default=float("nan"))
    assert split == straight, f"resumed losses differ (max |diff| {worst:.3g}):\n{split}\n{straight}"
    assert api.summary(tmp_path / "split")["steps"] == 10
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ---------------------------------------------------------------- fp16


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fp16_trains(llama, chat_data, tmp_path, method):
    """fp16 autocast trains: every loss finite, and it falls at least half as far as fp32's does over
    the same steps. Not step-by-step equality: a dynamic loss scaler may skip the first steps while it
    finds its scale, and fp16 rounds differently. Without loss scaling, small gradients underflow in
    fp16 and training stalls, which this catches. (A CPU dry run uses bf16 unless asked otherwise: see HALF.)"""
    api.train(make_spec(llama, chat_data, tmp_path / "fp32", method), overwrite=True, progress=False)
    api.train(make_spec(llama, chat_data, tmp_path / "half", method, precision=HALF), overwrite=True,
                    progress=False)
    ref, half = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "half")
    assert len(half) == STEPS
    assert all(math.isfinite(x) for x in half), half
    assert half[0] - half[-1] >= 0.5 * (ref[0] - ref[-1]) > 0, (half, ref)
    s = api.summary(tmp_path / "half")
    assert s["precision"] == {"fp16": "float16", "bf16": "bfloat16"}[HALF]
    scaled = HALF == "fp16"  # fp16 trains with a gradient scaler, bf16 without (summary key where recorded)
    assert s.get("grad_scaler", scaled) == scaled, s.get("grad_scaler")
    assert math.isfinite(s["final_train_loss"])
