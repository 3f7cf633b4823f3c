"""Preference tuning against TRL (the library it replaces), and the loop's invariants for preference runs:
same per-example log-probs, DPO loss and gradients as TRL's DPOTrainer on one batch; the precomputed and the
adapter-disabled references agree; gradient accumulation; exact resume; metrics."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_spec, write_jsonl
from tuneforge import api

pytestmark = pytest.mark.timeout(180)  # each test; the slowest takes ~5 s alone on 1 thread


PAIRS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
     "chosen": [{"role": "assistant", "content": str(a + b)}],
     "rejected": [{"role": "assistant", "content": f"Sure! {a} plus {b} makes {a + b}, I think."}]}
    for a, b in ((2, 3), (10, 7), (4, 4), (9, 1), (12, 30), (5, 6), (8, 13), (21, 2))
] + [
    {"input": {"messages": [{"role": "system", "content": "Answer in capitals."},
                            {"role": "user", "content": f"Say the word {w}."}]},
     "preferred_output": [{"role": "assistant", "content": w.upper()}],
     "non_preferred_output": [{"role": "assistant", "content": f"Here you go: {w}"}]}
    for w in ("river", "cloud", "stone", "lamp")
]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def pref_spec(model_dir, train, out, *, method="lora", loss="dpo", reference="auto", **training):
    spec = tiny_spec(model_dir, train, out, **{"max_steps": 4, **training})
    spec.update(task="preference", method=method, preference={"loss": loss, "beta": 0.5, "reference": reference})
    return spec


def metric(run_dir, key) -> list[float]:
    return [json.loads(l)[key] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(l)]


# ---------------------------------------------------------------- against TRL


def _model_and_batch(model_dir, kernels, shared_prompt=False):
    """Our LoRA model (with `kernels`) with a random non-zero adapter (B = 0 at init would make policy ==
    reference), and one batch of 6 pairs as our collator makes it (in TRL's layout, or `shared_prompt`)."""
    from tuneforge.data.batching import collate_pairs
    from tuneforge.data.encode import encode_example
    from tuneforge.models import load_model, load_tokenizer
    from tuneforge.spec import AdapterSpec
    from tuneforge.training.kernels import resolve_kernels
    from tuneforge.training.recipe import prepare_model

    tok = load_tokenizer(model_dir)
    ours = prepare_model(load_model(model_dir), method="lora", adapter=AdapterSpec(r=4, alpha=8, dropout=0.0),
                         kernels=resolve_kernels(kernels, torch.device("cpu"), "lora", 0.0), packing=False,
                         gradient_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = collate_pairs([encode_example(tok, "preference", r) for r in PAIRS[4:10]], tok.pad_token_id,
                          shared_prompt=shared_prompt)
    return tok, ours, batch


@pytest.mark.parametrize("kernels, shared_prompt", [("auto", True), ("auto", False), ("library", True)])
def test_dpo_matches_trl(tiny_models, tmp_path, kernels, shared_prompt):
    """TRL scores its own layout (one row per reply); ours either that one or one row per pair (shared prompt)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tuneforge.data.batching import collate_pairs
    from tuneforge.data.encode import encode_example
    from tuneforge.training.preference import PreferenceLoss, count_pairs

    from peft import LoraConfig

    from tuneforge.models import load_model

    model_dir = tiny_models["llama"]
    tok, ours, trl_batch = _model_and_batch(model_dir, kernels)
    batch = collate_pairs([encode_example(tok, "preference", r) for r in PAIRS[4:10]], tok.pad_token_id,
                          shared_prompt=True) if shared_prompt else trl_batch
    if shared_prompt:  # one row per pair, fewer tokens than TRL's two
        assert batch["input_ids"].shape[0] * 2 == trl_batch["input_ids"].shape[0]
        assert batch["input_ids"].numel() < 0.75 * trl_batch["input_ids"].numel()
    beta = 0.3
    # TRL applies the adapter itself (a PeftModel given to it would be an existing adapter, its reference that
    # adapter's copy): the base with a new adapter, whose weights are then set to ours.
    trainer = DPOTrainer(model=load_model(model_dir),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, use_cpu=True, bf16=False,
                                        report_to="none", gradient_checkpointing=False),
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                          for r in PAIRS[:8]]),
                         processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    theirs = trainer.model
    with torch.no_grad():
        ours_params = dict(ours.named_parameters())
        for n, q in theirs.named_parameters():
            if q.requires_grad:
                q.copy_(ours_params[n])
    inputs = {"input_ids": trl_batch["input_ids"], "attention_mask": trl_batch["attention_mask"],
              "completion_mask": (trl_batch["labels"] != -100).long()}
    theirs.train()
    trl_loss = trainer._compute_loss(theirs, inputs, return_outputs=False)
    trl_loss.backward()
    with torch.no_grad():  # TRL's own per-example log-probs: its fused head's per-token log-probs, summed
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        trl_logps = theirs(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                           use_cache=False, fused_lm_head=True).log_probs.sum(1)
        trl_ref = torch.cat(trainer.compute_ref_log_probs(theirs, inputs))

    loss_fn = PreferenceLoss(ours, loss="dpo", beta=beta, reference="adapter", chunked=kernels == "auto")
    ours.train()
    loss_sum, _ = loss_fn(batch)
    (loss_sum / count_pairs(batch)).backward()
    with torch.no_grad():
        our_logps = loss_fn.logps(batch)[0]
    our_ref = loss_fn.reference_logps(batch)

    # Summed log-probs are hundreds of nats (fp32 spacing there: 3e-5): compared relative to their size.
    diffs = {"logps": ((our_logps - trl_logps).abs() / trl_logps.abs().clamp(min=1)).max().item(),
             "ref_logps": ((our_ref - trl_ref).abs() / trl_ref.abs().clamp(min=1)).max().item(),
             "loss": abs((loss_sum / count_pairs(batch)).item() - trl_loss.item())}
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    trl_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == trl_grads.keys() and len(grads) == 28
    diffs["grad"] = max((grads[n] - trl_grads[n]).abs().max().item() for n in grads)
    print(f"vs TRL ({kernels} kernels): max relative diff of the summed log-probs {diffs['logps']:.2e} (abs "
          f"{(our_logps - trl_logps).abs().max().item():.2e} at |logp| up to {trl_logps.abs().max().item():.0f}), of "
          f"the reference's {diffs['ref_logps']:.2e} (abs {(our_ref - trl_ref).abs().max().item():.2e}); max abs diff "
          f"of the loss {diffs['loss']:.2e}, of the gradients {diffs['grad']:.2e}")
    assert trl_loss.item() > 0.1 and max(g.abs().max().item() for g in grads.values()) > 1e-3  # not trivial
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_orpo_odds_ratio_matches_trl():
    from types import SimpleNamespace

    from trl.experimental.orpo import ORPOTrainer

    from tuneforge.training.preference import orpo_losses

    chosen = torch.tensor([-0.5, -1.7, -0.05, -3.0], dtype=torch.float64)
    rejected = torch.tensor([-0.9, -1.2, -2.5, -0.4], dtype=torch.float64)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    losses, chosen_reward, rejected_reward = orpo_losses(chosen.float(), rejected.float(), 0.25)
    # ours: NLL of the chosen reply minus TRL's (beta-weighted) log-sigmoid odds-ratio term
    torch.testing.assert_close(losses.double(), -chosen - trl_losses.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(chosen_reward.double(), trl_chosen.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(rejected_reward.double(), trl_rejected.double(), atol=1e-6, rtol=0)


def test_chunked_log_probs_equal_full_logits(tiny_models):
    """The target-only chunked path (no (2B, T, V) logits) gives the logits path's log-probs and gradients."""
    from tuneforge.training import loss as loss_module
    from tuneforge.training.preference import logps_fn_for

    _, ours, batch = _model_and_batch(tiny_models["qwen2"], "library", shared_prompt=True)
    results = []
    for chunked, chunk in ((False, None), (True, 7)):  # a chunk that splits the targets unevenly
        ours.zero_grad()
        old = loss_module.CHUNK_TOKENS
        logps, counts = logps_fn_for(ours, chunked)(batch) if chunk is None else _with_chunk(ours, batch, chunk)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()  # a different weight per row
        results.append((logps.detach(), {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}))
        assert loss_module.CHUNK_TOKENS == old
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch, config", [("llama", {}), ("phi3", {"sliding_window": 9}),
                                          ("mistral", {"sliding_window": 5}),
                                          ("qwen2", {"use_sliding_window": True, "sliding_window": 7,
                                                     "max_window_layers": 1})])
def test_shared_prompt_rows_score_like_one_row_per_reply(tmp_path, arch, config):
    """One row per pair (the prompt once, each reply masked from the other) gives each reply the log-prob and
    gradients of a row of its own, sliding attention windows included (phi3, mistral: every layer; qwen2 mixing
    full and sliding layers: one row per reply, as one 4D mask cannot serve both)."""
    from tuneforge.data.batching import collate_pairs
    from tuneforge.data.encode import encode_example
    from tuneforge.models import load_model, load_tokenizer
    from tuneforge.models.tiny import make_tiny_model
    from tuneforge.training.preference import PreferenceLoss, shared_prompt_window

    model_dir = make_tiny_model(arch, tmp_path / arch, **config)
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    pairs = [encode_example(tok, "preference", r) for r in PAIRS]
    shares, window = shared_prompt_window(model)
    assert (shares, window) == ((False, None) if arch == "qwen2" else (True, config.get("sliding_window")))
    if not shares:
        return
    rows, shared = (collate_pairs(pairs, tok.pad_token_id, shared_prompt=flag, window=window) for flag in (False, True))
    # the rejected replies never see the preferred ones: one row's mask, by segment
    b = 0
    n_c = len(pairs[b].chosen.input_ids)
    common = shared["position_ids"][b, n_c]  # where the other reply's positions restart: the shared prefix
    assert 0 < common < n_c and torch.equal(shared["input_ids"][b, :n_c], torch.tensor(pairs[b].chosen.input_ids))
    assert not shared["attention_mask"][b, 0, n_c:, common:n_c].any()
    assert shared["input_ids"].numel() < 0.8 * rows["input_ids"].numel()
    loss = PreferenceLoss(model, loss="dpo", beta=0.1, reference="adapter", chunked=False)
    model.eval()
    results = []
    for batch in (rows, shared):
        model.zero_grad()
        logps, counts = loss.logps(batch)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        results.append((logps.detach(), counts, {n: q.grad.clone() for n, q in model.named_parameters()}))
    (a, ca, ga), (b_, cb, gb) = results
    assert torch.equal(ca, cb) and ca.min() > 0
    torch.testing.assert_close(a, b_, atol=2e-5, rtol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4)


def _with_chunk(model, batch, chunk):
    from tuneforge.models.head import output_head
    from tuneforge.training.loss import linear_token_logprobs, model_inputs

    decoder, head = output_head(model)
    h = decoder(**model_inputs(batch)).last_hidden_state
    picked = h[batch["reply_rows"], batch["reply_positions"]]
    token = linear_token_logprobs(picked, head.weight, batch["reply_targets"], chunk=chunk)
    n = 2 * int(batch["pairs"])
    return torch.zeros(n).index_add(0, batch["reply_seq"], token), torch.bincount(batch["reply_seq"], minlength=n)


# ---------------------------------------------------------------- the loop's invariants, for pairs


def test_precomputed_reference_gives_the_same_losses(tiny_models, pairs_file, tmp_path):
    a = pref_spec(tiny_models["llama"], pairs_file, tmp_path / "auto", batch_size=4, reference="auto")
    b = pref_spec(tiny_models["llama"], pairs_file, tmp_path / "pre", batch_size=4, reference="precomputed")
    sa, sb = api.train(a, progress=False), api.train(b, progress=False)
    assert (sa.preference_reference, sb.preference_reference) == ("adapter", "precomputed")
    assert (tmp_path / "pre" / "reference_logps.safetensors").is_file()
    assert not (tmp_path / "auto" / "reference_logps.safetensors").exists()
    la, lb = metric(tmp_path / "auto", "train_loss"), metric(tmp_path / "pre", "train_loss")
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-5)
    assert la[-1] < la[0]


@pytest.mark.parametrize("method, loss", [("lora", "dpo"), ("full", "dpo"), ("lora", "orpo")])
def test_grad_accum_matches_big_batch(tiny_models, pairs_file, tmp_path, method, loss):
    kw = dict(method=method, loss=loss, max_steps=3)
    api.train(pref_spec(tiny_models["llama"], pairs_file, tmp_path / "a", batch_size=6, grad_accum=1, **kw),
              progress=False)
    api.train(pref_spec(tiny_models["llama"], pairs_file, tmp_path / "b", batch_size=2, grad_accum=3, **kw),
              progress=False)
    for key in ("train_loss", "reward_accuracy", "reward_margin", "logps_chosen"):
        assert metric(tmp_path / "a", key) == pytest.approx(metric(tmp_path / "b", key), abs=1e-5), key
    assert_same_weights(tmp_path / "a", tmp_path / "b", method, atol=1e-4, rtol=1e-3)


def assert_same_weights(a, b, method: str, **tolerance) -> None:
    """The trained weights of runs `a` and `b` (the full model, or the adapter) agree within `tolerance`."""
    from safetensors.torch import load_file

    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    wa, wb = load_file(a / name), load_file(b / name)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **tolerance)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_is_exact(tiny_models, pairs_file, tmp_path, method):
    kw = dict(method=method, batch_size=4, max_steps=6, save_every=2)
    straight = pref_spec(tiny_models["qwen2"], pairs_file, tmp_path / "straight", **kw)
    straight["adapter"]["dropout"] = 0.1
    straight["data"]["validation"] = str(pairs_file)
    straight["training"]["eval_every"] = 2
    split = {**straight, "output_dir": str(tmp_path / "split")}
    api.train(straight, progress=False)
    assert api.train(split, progress=False, stop_after=3).status == "stopped"
    done = api.train(split, progress=False, resume=True)
    assert done.status == "succeeded" and done.steps == 6
    for key in ("train_loss", "reward_margin", "eval_loss", "eval_reward_accuracy"):
        assert metric(tmp_path / "split", key) == pytest.approx(metric(tmp_path / "straight", key), abs=1e-6), key
    assert_same_weights(tmp_path / "straight", tmp_path / "split", method, atol=1e-6, rtol=1e-5)


def test_full_fine_tune_cannot_resume_without_its_reference(tiny_models, pairs_file, tmp_path):
    from tuneforge.errors import CheckpointError

    spec = pref_spec(tiny_models["llama"], pairs_file, tmp_path / "run", method="full", max_steps=4, save_every=2)
    api.train(spec, progress=False, stop_after=2)
    (tmp_path / "run" / "reference_logps.safetensors").unlink()
    with pytest.raises(CheckpointError, match="reference is its weights before the first step"):
        api.train(spec, progress=False, resume=True)


def test_metrics_events_and_summary(tiny_models, pairs_file, tmp_path):
    spec = pref_spec(tiny_models["mistral"], pairs_file, tmp_path / "run", loss="orpo", max_steps=3)
    spec["data"]["validation"] = str(pairs_file)
    events = []
    summary = api.train(spec, progress=False, on_event=events.append)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= set(rows[0])
    assert "train_token_accuracy" not in rows[0]
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(rows[-1])
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 3 and "reward_accuracy" in steps[0].data
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tensorboard").iterdir())
    assert summary.preference_reference == "none" and summary.final_eval_reward_accuracy is not None
    assert "16 train pairs" not in steps[0].message and "12 train pairs" in events[0].message
