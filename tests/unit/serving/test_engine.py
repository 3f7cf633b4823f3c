"""The batching engine in-process: a request alone gets what transformers' generate gives; requests for
different adapters decoded in one batch get what they get alone (or diverge only at a near-tie); rows
join and leave mid-decode; LRU eviction reloads what it evicted; cancelled rows free their slot."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from tuneforge.serving.adapters import AdapterSet, AdapterSource
from tuneforge.serving.engine import BatchEngine
from tuneforge.serving.sequence import QueueFull, SamplingParams, Sequence

TIE = 1e-3  # two best logits closer than this: batched arithmetic may legitimately pick the other


@pytest.fixture(scope="module")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory) -> dict[str, Path]:
    """Two random LoRA adapters (non-zero B, so each changes the output) saved as peft folders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(llama)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                init_lora_weights=False))
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        model.save_pretrained(folder)
        out[name] = folder
    return out


def load(llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama).eval()


class Collect:
    """Gathers a sequence's outputs; `done` is set when it finishes."""

    def __init__(self):
        self.text, self.ids, self.reason = "", [], None
        self.done = threading.Event()

    def __call__(self, out):
        self.text += out.text
        if out.finish_reason:
            self.ids, self.reason = out.token_ids, out.finish_reason
            self.done.set()


def seq(prompt, adapter=None, max_tokens=12, stop_ids=(), **params) -> tuple[Sequence, Collect]:
    c = Collect()
    return Sequence(list(prompt), adapter, SamplingParams(max_tokens=max_tokens, temperature=0.0, **params),
                    set(stop_ids), c, lambda ids: bytes(i % 256 for i in ids).decode("latin-1")), c


def solo(model, prompt, n) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of transformers' own generate, and the logits that chose each."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [l[0] for l in out.logits]


def same_or_tied(got: list[int], want: list[int], logits: list[torch.Tensor]) -> None:
    """Equal, or equal up to a position where the solo run's two best logits were within TIE."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            top2 = logits[i].topk(2).values
            assert float(top2[0] - top2[1]) < TIE, f"diverged at {i} with margin {float(top2[0] - top2[1]):.4g}"
            return
    assert len(got) == len(want)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41]]


def test_single_request_equals_generate(llama):
    model = load(llama)
    engine = BatchEngine(model, name="t")
    try:
        for prompt in PROMPTS:
            s, c = seq(prompt)
            engine.submit(s)
            assert c.done.wait(30)
            assert c.ids == solo(model, prompt, 12)[0] and c.reason == "length"
    finally:
        engine.stop()


def test_mixed_adapters_in_one_batch_match_their_solo_runs(llama, adapters):
    from peft import PeftModel

    model = load(llama)
    aset = AdapterSet(model, max_adapters=4)
    for name, folder in adapters.items():
        aset.register(name, AdapterSource(folder=folder))
    engine = BatchEngine(model, adapters=aset, name="t")
    jobs = [(PROMPTS[0], "a"), (PROMPTS[1], "b"), (PROMPTS[2], None), (PROMPTS[1], "a")]
    try:
        collected = []
        for prompt, adapter in jobs:  # submitted together: decoded in one batch
            s, c = seq(prompt, adapter, max_tokens=16)
            collected.append(c)
            engine.submit(s)
        assert all(c.done.wait(60) for c in collected)
        deadline = time.time() + 5  # rows leave the batch just after their last output is emitted
        while engine.load()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.load() == {"active": 0, "waiting": 0}
    finally:
        engine.stop()
    outputs = [c.ids for c in collected]
    assert len({tuple(o) for o in outputs}) >= 3, "adapters must change the output"
    for (prompt, adapter), got in zip(jobs, outputs):
        reference = load(llama)
        if adapter:
            reference = PeftModel.from_pretrained(reference, adapters[adapter]).eval()
        want, logits = solo(reference, prompt, 16)
        same_or_tied(got, want, logits)


def wait_until(condition, what: str, seconds: float = 60) -> None:
    """Poll `condition` until it holds; fail (never hang) after `seconds`."""
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.005)


def test_rows_join_and_leave_mid_decode(llama):
    model = load(llama)
    engine = BatchEngine(model, name="t")
    try:
        long_seq, long_c = seq(PROMPTS[2], max_tokens=60)
        engine.submit(long_seq)
        wait_until(lambda: len(long_seq.out_ids) >= 5, "the long row's first 5 tokens")
        short = []
        for prompt in PROMPTS[:2]:  # join while the first is decoding; finish (leave) before it
            s, c = seq(prompt, max_tokens=6)
            engine.submit(s)
            short.append((prompt, c))
        for prompt, c in short:
            assert c.done.wait(30) and c.ids == solo(model, prompt, 6)[0]
        assert long_c.done.wait(60)
        want, logits = solo(model, PROMPTS[2], 60)
        same_or_tied(long_c.ids, want, logits)
    finally:
        engine.stop()


def test_lru_with_one_slot_reloads_evicted_adapters(llama, adapters):
    from peft import PeftModel

    model = load(llama)
    aset = AdapterSet(model, max_adapters=1)
    for name, folder in adapters.items():
        aset.register(name, AdapterSource(folder=folder))
    engine = BatchEngine(model, adapters=aset, name="t")
    want = {n: solo(PeftModel.from_pretrained(load(llama), f).eval(), PROMPTS[0], 8)[0] for n, f in adapters.items()}
    try:
        for name in ("a", "b", "a", "b"):
            s, c = seq(PROMPTS[0], name, max_tokens=8)
            engine.submit(s)
            assert c.done.wait(30) and c.ids == want[name], name
            assert list(aset.loaded) == [name]
        assert aset.loads == 4
    finally:
        engine.stop()


def test_cancelled_rows_free_their_slot_and_a_full_queue_refuses(llama):
    engine = BatchEngine(load(llama), max_batch=1, max_waiting=1, name="t")
    try:
        hog, hog_c = seq(PROMPTS[0], max_tokens=100_000)
        engine.submit(hog)
        wait_until(lambda: hog.out_ids, "the hog's first token")
        waiting, waiting_c = seq(PROMPTS[1], max_tokens=4)
        engine.submit(waiting)
        with pytest.raises(QueueFull):
            engine.submit(seq(PROMPTS[1])[0])
        hog.cancel()  # its client went away
        assert waiting_c.done.wait(10), "the cancelled row kept its slot"
        assert not hog_c.done.is_set() and len(hog.out_ids) < 100_000
    finally:
        engine.stop()


def test_stop_tokens_and_strings_and_sampling_seeds(llama):
    model = load(llama)
    engine = BatchEngine(model, name="t")
    try:
        greedy = solo(model, PROMPTS[0], 12)[0]
        s, c = seq(PROMPTS[0], stop_ids={greedy[3]})
        engine.submit(s)
        assert c.done.wait(30) and c.reason == "stop" and c.ids == greedy[:greedy.index(greedy[3])]
        text = bytes(i % 256 for i in greedy).decode("latin-1")
        s, c = seq(PROMPTS[0], stop=[text[4:6]])
        engine.submit(s)
        assert c.done.wait(30) and c.reason == "stop" and c.text == text[:text.index(text[4:6])]
        runs = []
        for seed in (1, 1, 2):
            col = Collect()
            engine.submit(Sequence(PROMPTS[0], None, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9,
                                                                    seed=seed), set(), col, lambda ids: ""))
            assert col.done.wait(30)
            runs.append(col.ids)
        assert runs[0] == runs[1] != runs[2]
    finally:
        engine.stop()


def test_tiny_top_p_or_temperature_is_greedy_and_a_failed_step_fails_only_its_requests(llama, monkeypatch):
    """top_p=5e-324 (0 in float32) once emptied the distribution: torch.multinomial raised inside the prefill,
    whose new rows were not yet in the batch, so they were never answered and their clients waited forever."""
    model = load(llama)
    engine = BatchEngine(model, name="t")
    try:
        greedy = solo(model, PROMPTS[0], 6)[0]
        col = Collect()
        engine.submit(Sequence(PROMPTS[0], None, SamplingParams(max_tokens=6, temperature=1.0, top_p=5e-324, seed=3),
                               set(), col, lambda ids: ""))
        assert col.done.wait(30), "a tiny top_p hung the request"
        assert col.reason == "length" and col.ids == greedy  # nucleus of one token: the greedy one
        col = Collect()  # a temperature of 5e-324 once divided the logits by float32 0: NaN, then a 500
        engine.submit(Sequence(PROMPTS[0], None, SamplingParams(max_tokens=6, temperature=5e-324, seed=3),
                               set(), col, lambda ids: ""))
        assert col.done.wait(30) and col.reason == "length" and col.ids == greedy

        import tuneforge.serving.sampling as sampling

        real = sampling.sample
        monkeypatch.setattr(sampling, "sample", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        bad, bad_c = seq(PROMPTS[1])
        engine.submit(bad)
        assert bad_c.done.wait(30), "a request whose prefill failed was never answered"
        assert bad_c.reason == "error"
        monkeypatch.setattr(sampling, "sample", real)
        good, good_c = seq(PROMPTS[0], max_tokens=6)
        engine.submit(good)
        assert good_c.done.wait(30) and good_c.ids == greedy  # the engine kept serving
    finally:
        engine.stop()


def solo_logprobs(model, prompt, tokens) -> list[float]:
    """log_softmax of the model's own logits at each chosen token (temperature 1: what greedy rows report)."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


def test_logprobs_and_constraints_are_the_same_alone_and_in_a_mixed_batch(llama, adapters):
    """A request's tokens and log-probabilities, with a grammar on or off, alone and inside a batch of other
    requests (other adapters, other grammars): the same tokens (or a near-tie), log-probabilities within 1e-4."""
    from tuneforge.models.tiny import make_tokenizer
    from tuneforge.serving.grammar import Vocabulary

    tok = make_tokenizer("llama")
    vocabulary = Vocabulary(tok, 259, [tok.eos_token_id])
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "yy"]}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
              "required": ["a", "n"], "additionalProperties": False}
    grammar = vocabulary.json(schema)
    model = load(llama)
    aset = AdapterSet(model, max_adapters=4)
    for name, folder in adapters.items():
        aset.register(name, AdapterSource(folder=folder))
    engine = BatchEngine(model, adapters=aset, name="t")
    jobs = [(PROMPTS[0], "a", True), (PROMPTS[1], "b", False), (PROMPTS[2], None, True), (PROMPTS[1], None, False)]

    def run(batch):
        collected = []
        for prompt, adapter, constrained in batch:
            c = LogCollect()
            engine.submit(Sequence(list(prompt), adapter, SamplingParams(max_tokens=24, temperature=0.0, logprobs=2),
                                   {tok.eos_token_id}, c, tok.decode,
                                   constraint=vocabulary.constraint(grammar) if constrained else None))
            collected.append(c)
        assert all(c.done.wait(60) for c in collected)
        return collected

    try:
        alone = [run([job])[0] for job in jobs]
        together = run(jobs)
    finally:
        engine.stop()
    for (prompt, adapter, constrained), a, b in zip(jobs, alone, together):
        if constrained:
            assert json.loads(tok.decode(a.ids))["a"] in ("x", "yy")  # the grammar held, and ended the output
        n = len(a.ids)
        for i in range(n):
            if a.ids[i] != b.ids[i]:  # only at a near-tie of the two best (the existing margin rule)
                top = a.entries[i].top
                assert top[0][1] - top[1][1] < TIE, f"diverged at {i}"
                break
            assert abs(a.entries[i].logprob - b.entries[i].logprob) < 1e-4
        if not constrained and adapter is None:  # the reported numbers are the model's own log-probabilities
            assert [e.logprob for e in a.entries] == pytest.approx(solo_logprobs(load(llama), prompt, a.ids), abs=1e-4)


class LogCollect(Collect):
    def __init__(self):
        super().__init__()
        self.entries = []

    def __call__(self, out):
        self.entries += out.logprobs
        super().__call__(out)


def test_prefix_cache_keeps_greedy_output_and_its_memory_bound(llama):
    """Prompts sharing a prefix reuse its cached KV and decode what they decode without the cache (or diverge at a
    near-tie); the cache never holds more than its bound."""
    from tuneforge.serving.prefix_cache import PrefixCache

    model = load(llama)
    shared = list(range(40, 90))  # 50 tokens: 3 whole blocks of 16
    prompts = [shared + [5, 6, 7], shared + [9], shared + list(range(100, 120))]
    engine = BatchEngine(model, name="t", prefix_cache_bytes=2**20)
    try:
        for prompt in prompts:  # one at a time: every one after the first finds the shared blocks
            s, c = seq(prompt, max_tokens=10)
            engine.submit(s)
            assert c.done.wait(30)
            want, logits = solo(model, prompt, 10)
            same_or_tied(c.ids, want, logits)
        stats = engine.prefix_cache.stats()
        assert stats["hits"] == 2 and stats["reused_tokens"] == 2 * 48
    finally:
        engine.stop()
    block = 16 * 2 * 2 * 2 * 16 * 4  # tokens x (k, v) x layers x kv heads x head dim x fp32 bytes
    cache = PrefixCache(max_bytes=3 * block)
    layers = [(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)) for _ in range(2)]
    cache.store(None, list(range(64)), layers)  # 4 blocks: the last one in is the first evicted
    assert cache.bytes <= 3 * block and len(cache.blocks) == 3
    cached, got = cache.lookup(None, list(range(64)) + [1])
    assert cached == 48 and torch.equal(got[0][0], layers[0][0][:, :, :48])
    assert cache.lookup("other-adapter", list(range(64)))[0] == 0  # another adapter: other keys


def test_prompts_with_and_without_a_cached_prefix_prefill_in_one_batch(llama):
    """Prompts that arrive together go through one prefill, each after its own cached prefix (of any length, or
    none), and decode what each decodes alone (or diverge at a near-tie)."""
    model = load(llama)
    shared = list(range(40, 90))
    engine = BatchEngine(model, name="t", prefix_cache_bytes=2**20)
    forward, prefills = engine._forward, []

    def spy(ids, adapters, **kw):
        prefills.append((ids.shape[0], kw["past_key_values"].get_seq_length()))
        return forward(ids, adapters, **kw)

    engine._forward = spy
    try:
        s, c = seq(shared + [1], max_tokens=2)
        engine.submit(s)
        assert c.done.wait(30)  # its 3 whole blocks (48 tokens) are cached
        prompts = [shared + [5, 6, 7], shared[:20] + [9, 10], list(range(200, 230)), shared + list(range(100, 140))]
        pairs = [seq(p, max_tokens=10) for p in prompts]
        prefills.clear()
        engine.submit(*[s for s, _ in pairs])  # one request's sequences: admitted together
        assert all(c.done.wait(30) for _, c in pairs)
        assert prefills[0] == (4, 48), prefills[:3]  # one forward: 4 rows after the longest cached prefix
        assert engine.prefix_cache.stats()["hits"] == 3  # 48, 16 and 48 tokens reused; the third prompt is new
        for prompt, (_, c) in zip(prompts, pairs):
            want, logits = solo(model, prompt, 10)
            same_or_tied(c.ids, want, logits)
    finally:
        engine.stop()
