"""Question: how much faster does `tuneforge serve` answer concurrent requests over many adapters of one base
than answering them one at a time, and how long do clients wait for their first token?

SmolLM2-135M-Instruct with 4 LoRA adapters (r=16, all linear layers; random weights, which cost what
trained ones cost), served by `tuneforge serve --adapter ...` in its own process. N clients (threads)
spread over the 4 adapters each stream one completion of exactly `--tokens` new tokens (greedy; the
prompts ask for long answers, and a reply that stops early is counted with the tokens it had).

Peer, in the same run: the same requests answered one at a time in this process, with transformers'
`generate` (KV cache) and peft's `set_adapter` between requests — what one would write without a
server. Each side runs alone: the peer first, then the server is started. (An earlier version ran the
server with OMP_WAIT_POLICY=PASSIVE: its torch threads then slept between the thousands of small ops of a
decode step, and the server used 1.4 of the 2 cores instead of 2.0: 84 instead of 130 tokens/s.)

Reported: aggregate decode tokens/s of each side and their ratio; time to first token (TTFT) and the
per-token interval, p50/p99, at 16 clients; aggregate tokens/s against the number of clients
(1, 2, 4, 8, 16), plotted. The same 16-client run driven by the openai SDK's `AsyncOpenAI` streaming
client (`--client openai` or `both`: one event loop, the SDK validating every chunk, as applications use
it), and one stream alone on the base model (what `tuneforge generate` decodes at). The server keeps
prefix caching on (`--prefix-cache-mb`, 0 turns it off to compare): every request shares SmolLM2's
default system prompt.

Results go to a scratch folder (printed) unless asked for; the tracked files are written only with

    .venv/bin/python bench/serve_load.py --client both --out bench/results/serve_load.json \
        --plot docs/serve_throughput.png
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a refrigerator works, step by step, for a curious child.",
    "Describe a walk through a busy market in a city you love, with every sound and smell.",
    "Give a thorough history of the bicycle, from its invention to today.",
]
SERVER_ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
LOG = open(os.environ.get("SERVE_LOAD_LOG", os.devnull), "ab")  # the server's output (SERVE_LOAD_LOG=file keeps it)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def make_adapters(base: Path, root: Path, n: int = 4) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(n):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        for name, p in model.named_parameters():  # small, so replies stay fluent
            if "lora_B" in name:
                p.data.mul_(0.01)
        folder = root / f"adapter-{i}"
        model.save_pretrained(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        folders.append(folder)
    return folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, adapters: list[Path], threads: int, precision: str = "fp32", base: Path | None = None,
                 prefix_cache_mb: int = 512) -> tuple[subprocess.Popen, str, str]:
    import httpx

    from tuneforge.service.auth import create_key
    from tuneforge.service.context import ServiceContext
    from tuneforge.service.settings import ServiceSettings

    settings = ServiceSettings(data_dir=data)
    ctx = ServiceContext.open(settings)
    key = create_key(ctx.store, settings.pepper(), "bench")
    port = free_port()
    cmd = [sys.executable, "-m", "tuneforge.cli", "serve", "--data-dir", str(data), "--port", str(port),
           "--workers", "0", "--inference-threads", str(threads), "--max-batch", "16", "--max-queue", "64",
           "--inference-precision", precision, "--prefix-cache-mb", str(prefix_cache_mb),
           *(["--base-model", f"base={base}"] if base else []),
           *[a for i, f in enumerate(adapters) for a in ("--adapter", f"a{i}={f}")]]
    proc = subprocess.Popen(cmd, env=SERVER_ENV, stdout=LOG, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1", key
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


def one_stream(http, url: str, key: str, model: str, prompt: str, tokens: int) -> dict:
    """One streamed chat completion, read with plain httpx (the client's own CPU would otherwise compete with
    the server's on these 2 cores: the openai SDK validates every chunk with pydantic)."""
    start = time.perf_counter()
    stamps, completion_tokens = [], 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": stamps[0] - start if stamps else float("nan"),
            "intervals": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": completion_tokens, "seconds": time.perf_counter() - start}


def load_test(url: str, key: str, clients: int, tokens: int) -> dict:
    import httpx

    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))
    results: list[dict] = [None] * clients
    barrier = threading.Barrier(clients)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = one_stream(http, url, key, f"a{i % 4}", PROMPTS[i % len(PROMPTS)], tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    http.close()
    total = sum(r["tokens"] for r in results)
    intervals = [x for r in results for x in r["intervals"]]
    ttfts = [r["ttft"] for r in results]
    return {"clients": clients, "tokens": total, "seconds": wall, "tokens_per_second": total / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "token_interval_p50": percentile(intervals, 50), "token_interval_p99": percentile(intervals, 99)}


def openai_load_test(url: str, key: str, clients: int, tokens: int, models: list[str] | None = None) -> dict:
    """The same streams from one AsyncOpenAI client: TTFT is the first content delta, tokens are the usage's."""
    import asyncio

    from openai import AsyncOpenAI

    async def one(client, model: str, prompt: str) -> dict:
        start, stamps, completion_tokens = time.perf_counter(), [], 0
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if chunk.usage:
                completion_tokens = chunk.usage.completion_tokens
        return {"ttft": stamps[0] - start if stamps else float("nan"), "tokens": completion_tokens,
                "intervals": [b - a for a, b in zip(stamps, stamps[1:])]}

    async def run() -> tuple[list[dict], float]:
        async with AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600) as client:
            t0 = time.perf_counter()
            names = models or ["a0", "a1", "a2", "a3"]  # spread over the adapters, as the bench's own clients
            results = await asyncio.gather(*[one(client, names[i % len(names)], PROMPTS[i % len(PROMPTS)])
                                             for i in range(clients)])
            return results, time.perf_counter() - t0

    results, wall = asyncio.run(run())
    total = sum(r["tokens"] for r in results)
    ttfts, intervals = [r["ttft"] for r in results], [x for r in results for x in r["intervals"]]
    return {"client": "AsyncOpenAI", "clients": clients, "tokens": total, "seconds": wall,
            "tokens_per_second": total / wall, "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "token_interval_p50": percentile(intervals, 50), "token_interval_p99": percentile(intervals, 99)}


def baseline(base: Path, adapters: list[Path], clients: int, tokens: int, threads: int) -> dict:
    """The same requests one at a time: transformers' generate, peft's set_adapter between them."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.data.encode import encode_prompt
    from tuneforge.inference import stop_ids
    from tuneforge.models import load_tokenizer

    torch.set_num_threads(threads)
    tok = load_tokenizer(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"a{i}")
    model.eval()
    total, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(clients):
            model.set_adapter(f"a{i % 4}")
            ids = torch.tensor([encode_prompt(tok, "chat", PROMPTS[i % len(PROMPTS)])])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, eos_token_id=stop_ids(tok), pad_token_id=tok.pad_token_id)
            total += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"clients": clients, "tokens": total, "seconds": wall, "tokens_per_second": total / wall}


def plot(sweep: list[dict], peer_tps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    xs = [r["clients"] for r in sweep]
    ax.plot(xs, [r["tokens_per_second"] for r in sweep], "o-", label="tuneforge serve (batched, mixed adapters)")
    ax.axhline(peer_tps, color="gray", linestyle="--", label="one at a time (generate + set_adapter)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent clients (spread over 4 adapters)")
    ax.set_ylabel("decode tokens/s, all clients")
    ax.set_title("SmolLM2-135M, 4 LoRA adapters, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--sweep", default="1,2,4,8,16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the one-at-a-time peer")
    ap.add_argument("--server-threads", type=int, default=2, help="torch threads of the server (--inference-threads)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the server's --inference-precision")
    ap.add_argument("--skip-peer", type=float, help="reuse this peer figure (tokens/s) instead of measuring it")
    ap.add_argument("--client", choices=["httpx", "openai", "both"], default="httpx",
                    help="who drives the 16-client run: the bench's own threads (httpx), AsyncOpenAI, or both")
    ap.add_argument("--prefix-cache-mb", type=int, default=512, help="the server's --prefix-cache-mb (0: off)")
    ap.add_argument("--out", help="result JSON (default: a scratch folder; bench/results/serve_load.json is tracked)")
    ap.add_argument("--plot", help="throughput plot (default: a scratch folder; docs/serve_throughput.png is tracked)")
    args = ap.parse_args()
    from tuneforge.models import resolve_model

    base = resolve_model("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="tf-serve-load-"))
    args.out = args.out or str(work / "serve_load.json")
    args.plot = args.plot or str(work / "serve_throughput.png")
    adapters = make_adapters(base, work)
    print("peer: one request at a time ...", file=sys.stderr)
    peer = (baseline(base, adapters, args.clients, args.tokens, args.threads) if args.skip_peer is None else
            {"clients": args.clients, "tokens_per_second": args.skip_peer, "reused": True})
    print(f"  {peer['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
    proc, url, key = start_server(work / "data", adapters, args.server_threads, args.precision, base=base,
                                  prefix_cache_mb=args.prefix_cache_mb)
    openai_run = alone = None
    try:
        load_test(url, key, 4, 8)  # warm-up: loads the base and the 4 adapters
        if args.client in ("openai", "both"):
            alone = openai_load_test(url, key, 1, args.tokens, models=["base"])
            print(f"one AsyncOpenAI stream alone on the base: {alone['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
            openai_run = openai_load_test(url, key, args.clients, args.tokens)
            print(f"serve, {args.clients} AsyncOpenAI streams: {openai_run['tokens_per_second']:.1f} tokens/s, "
                  f"TTFT p50 {openai_run['ttft_p50']:.2f} s p99 {openai_run['ttft_p99']:.2f} s", file=sys.stderr)
        main_run = load_test(url, key, args.clients, args.tokens) if args.client != "openai" else openai_run
        print(f"serve, {args.clients} clients: {main_run['tokens_per_second']:.1f} tokens/s, "
              f"TTFT p50 {main_run['ttft_p50']:.2f} s p99 {main_run['ttft_p99']:.2f} s", file=sys.stderr)
        sweep = []
        for n in [int(x) for x in args.sweep.split(",")]:
            sweep.append(main_run if n == args.clients else load_test(url, key, n, args.tokens))
            print(f"  {n:2d} clients: {sweep[-1]['tokens_per_second']:.1f} tokens/s", file=sys.stderr)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    plot(sweep, peer["tokens_per_second"], Path(args.plot))
    result = {"model": "smollm2-135m-instruct", "adapters": 4, "tokens_per_request": args.tokens,
              "threads": args.threads, "server_threads": args.server_threads, "precision": args.precision,
              "prefix_cache_mb": args.prefix_cache_mb, "peer_one_at_a_time": peer, "serve": main_run,
              "speedup": main_run["tokens_per_second"] / peer["tokens_per_second"], "ttft_p99": main_run["ttft_p99"],
              "serve_async_openai": openai_run, "one_stream_alone_async_openai": alone, "sweep": sweep,
              "plot": args.plot}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}, indent=2))
    print(f"written: {args.out}, {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
