"""The `tuneforge` command: a table of subcommands over tuneforge.api. No logic lives here."""
from __future__ import annotations

import sys

try:  # a Ctrl-C while the command is still starting up: exit quietly, as later on
    import argparse
    import json
    import logging
    import os
    import signal
    import warnings
    from contextlib import contextmanager
except KeyboardInterrupt:
    raise SystemExit(130) from None


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, optional-kernel notices) hides our own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextmanager
def stop_on_signals(stop):
    """Ctrl-C or SIGTERM (a scheduler or container stop) while training: finish the step, write a
    checkpoint, exit 130/143. Outside the training loop, or a second time, they interrupt at once."""

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if stop.armed and not stop:
            stop.request(name)
            print(f"\n{name}: stopping after this step, with a checkpoint (press Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            return
        stop.request(name)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_train(args) -> int:
    from tuneforge import api
    from tuneforge.hardware import resolve_device
    from tuneforge.training.allocator import return_big_buffers_to_os
    from tuneforge.training.events import ConsoleProgress, StopRequest

    job = api.resolve_job(args.spec, args.set, resume=args.resume)
    if job.method == "qlora" and resolve_device(job.device).type == "cpu":
        return_big_buffers_to_os()  # process-wide, so set here at the entry point (see training/allocator.py)
    stop = StopRequest()
    console = ConsoleProgress(bar=not args.quiet)
    try:
        with stop_on_signals(stop):
            summary = api.train(job, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                                on_event=console, stop=stop)
    except KeyboardInterrupt:  # before training began, while nothing had been written
        print(f"\ninterrupted ({stop.reason or 'SIGINT'}) before training started; nothing was saved", file=sys.stderr)
        return 143 if stop.reason == "SIGTERM" else 130
    finally:
        console.close()  # an error message must not land inside the progress bar
    if args.json:
        print(summary.model_dump_json(indent=2))
    elif summary.report:
        print(f"before/after report: {summary.report}", file=sys.stderr)
    if summary.status == "stopped" and summary.stop_reason in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[summary.stop_reason].value
    return 0


def cmd_data_validate(args) -> int:
    from tuneforge.data.stats import describe

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    text, ok = describe(args.file, spec=args.spec, task=args.task, labels=labels, prompt_template=args.prompt_template,
                        model=args.model, max_seq_len=args.max_seq_len, as_json=args.json)
    print(text)
    return 0 if ok else 1


def cmd_data_generate(args) -> int:
    from tuneforge.data.synthetic import write_dataset
    from tuneforge.demo_data import write_demo_data

    if args.dataset in ("demo", "chat", "classification"):
        sizes = {"demo": (160, 40, 20), "chat": (240, 120, 40), "classification": (240, 120, 40)}[args.dataset]
        paths = write_demo_data(args.out, *sizes[:2], n_valid=sizes[2],
                                task="classification" if args.dataset == "classification" else "chat",
                                overwrite=args.overwrite)
    else:
        paths = write_dataset(args.dataset, args.out, overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_merge(args) -> int:
    from tuneforge import api

    out = api.merge(args.run_dir, args.out)
    print(f"merged model written to {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_generate(args) -> int:
    from tuneforge import api

    from tuneforge.errors import SpecError

    if args.prompt:
        prompts = args.prompt
    elif sys.stdin is None or sys.stdin.isatty():
        raise SpecError("no prompts: pass --prompt TEXT (repeatable) or pipe one prompt per line on stdin")
    else:
        prompts = [line for line in _stdin_text().splitlines() if line.strip()]
        if not prompts:
            raise SpecError("no prompts: stdin was empty; pass --prompt TEXT or pipe one prompt per line")
    loaded = api.load(args.model, task=args.task, prompt_template=args.prompt_template)
    for prompt, answer in zip(prompts, api.generate(loaded, prompts, max_new_tokens=args.max_new_tokens,
                                                     temperature=args.temperature)):
        print(json.dumps({"prompt": prompt, "output": answer}, ensure_ascii=False) if args.json else answer)
    return 0


def _stdin_text() -> str:
    """stdin as UTF-8 text; anything else is a usage error, not a traceback."""
    from tuneforge.errors import SpecError

    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"stdin is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "pass prompts as UTF-8") from None


def _read_line(prompt: str) -> str | None:
    from tuneforge.errors import SpecError

    try:
        line = input(prompt)
    except EOFError:
        return None
    except UnicodeDecodeError:
        raise SpecError("stdin is not UTF-8 text; type or pipe UTF-8") from None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes kept as surrogates (a C or POSIX locale)
        raise SpecError("stdin is not UTF-8 text; type or pipe UTF-8") from None
    return line


def cmd_chat(args) -> int:
    from tuneforge import api

    loaded = api.load(args.model, task="chat")
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        line = _read_line("you> ")
        if line is None or not line.strip():
            break
        line = line.strip()
        history.append({"role": "user", "content": line})
        reply = api.generate(loaded, [history], max_new_tokens=args.max_new_tokens, temperature=args.temperature)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def cmd_eval(args) -> int:
    from tuneforge import api

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    result = api.evaluate(args.model, args.data, args.task, max_new_tokens=args.max_new_tokens,
                          max_seq_len=args.max_seq_len, labels=labels, prompt_template=args.prompt_template)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        for key, value in result.items():
            if key != "outputs":
                print(f"{key:16s} {value:.4g}" if isinstance(value, float) else f"{key:16s} {value}")
    return 0


def cmd_report(args) -> int:
    from tuneforge import api

    print(f"report written to {api.report(args.run_dir, args.data)}")
    return 0


def cmd_demo(args) -> int:
    from tuneforge.demo import run_demo

    return run_demo(args.output_dir, epochs=args.epochs, overwrite=True)


def _number(kind, low: float, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not value >= low:  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = _number(int, 1, "a whole number of at least 1")
non_negative_float = _number(float, 0.0, "0 or more")

def _service_settings(args):
    from tuneforge.service.settings import ServiceSettings, parse_adapters, parse_base_models

    return ServiceSettings(data_dir=args.data_dir, database_url=args.database_url,
                           base_models=parse_base_models(getattr(args, "base_model", None) or []),
                           adapters=parse_adapters(getattr(args, "adapter", None) or []))


def cmd_serve(args) -> int:
    from tuneforge.service.supervisor import serve

    settings = _service_settings(args)
    settings = settings.model_copy(update={
        "max_upload_bytes": args.max_upload_mb * 2**20, "max_active_jobs_per_org": args.max_jobs_per_org,
        "heartbeat_seconds": args.heartbeat_seconds, "reclaim_after_seconds": args.reclaim_after_seconds,
        "poll_seconds": args.poll_seconds, "training_threads": args.training_threads, "max_batch": args.max_batch,
        "max_waiting": args.max_queue, "max_adapters": args.max_adapters,
        "max_adapter_bytes": args.max_adapter_mb * 2**20, "inference_threads": args.inference_threads,
        "inference_precision": args.inference_precision})
    return serve(settings, host=args.host, port=args.port, workers=args.workers)


def cmd_keys_create(args) -> int:
    from tuneforge.service.auth import create_key
    from tuneforge.service.context import ServiceContext

    settings = _service_settings(args)
    ctx = ServiceContext.open(settings)
    key = create_key(ctx.store, settings.pepper(), args.org)
    print(key)
    print(f"API key for org '{args.org}' (shown once; the server keeps only its HMAC)", file=sys.stderr)
    return 0


TEMPLATE_HELP = "prompt format string over the record's fields, e.g. 'Review: {text}\\nSentiment:' (default: the run's)"


def build_parser() -> argparse.ArgumentParser:
    from tuneforge.data.validate import TASKS

    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune small language models, offline or on GPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run a fine-tuning job from a YAML spec")
    p.add_argument("spec", help="job spec (YAML); with --resume also a run folder (resumed where it now lies)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="remove what an earlier run wrote in output_dir first "
                   "(only a folder tuneforge made; your own files in it stay)")
    p.add_argument("--stop-after", type=positive_int, metavar="N", help="stop after N steps, leaving a resumable checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or start-up messages (warnings and the last line stay)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="inspect training data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    v = dsub.add_parser("validate", help="check a JSONL file: every problem as FILE line N: field: problem")
    v.add_argument("file", nargs="?", help="JSONL file (optional with --spec: then the spec's data files)")
    v.add_argument("--spec", metavar="JOB.yaml", help="check as `train JOB.yaml` would: its files, task, labels, "
                   "prompt and chat templates, model and max_seq_len (options given here win)")
    v.add_argument("--task", choices=TASKS, help="default: the spec's, else chat")
    v.add_argument("--labels", help="classification: comma-separated label set, e.g. pos,neg")
    v.add_argument("--prompt-template", help=TEMPLATE_HELP.replace("(default: the run's)", "(default: the spec's)"))
    v.add_argument("--model", help="tokenizer for token counts and chat-template checks ('none' to skip; "
                   "default: the spec's, else smollm2-135m-instruct)")
    v.add_argument("--max-seq-len", type=positive_int, help="default: the spec's training.max_seq_len, else 512")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_validate)
    g = dsub.add_parser("generate", help="write a shipped dataset (support tickets) as JSONL")
    g.add_argument("dataset", choices=["demo", "chat", "classification", "qa", "translation", "ner", "creative", "text"])
    g.add_argument("--out", required=True, help="folder for train/valid/heldout.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace train/valid/heldout.jsonl there if they differ")
    g.set_defaults(func=cmd_data_generate)

    p = sub.add_parser("merge", help="merge a run's adapter into its base model")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.set_defaults(func=cmd_merge)

    for name, func, text in (("generate", cmd_generate, "complete prompts with a run or model"),
                             ("chat", cmd_chat, "chat interactively with a run or model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="run folder, model alias or folder")
        p.add_argument("--max-new-tokens", type=positive_int, default=128)
        p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
        if name == "generate":
            p.add_argument("--prompt", action="append", help="prompt (repeatable; default: one per stdin line)")
            p.add_argument("--task", choices=TASKS, help="default: the run's task")
            p.add_argument("--prompt-template", help=TEMPLATE_HELP)
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--system", help="system prompt")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="metrics of a run or model on held-out data")
    p.add_argument("model", help="run folder, model alias or folder")
    p.add_argument("--data", required=True, help="held-out JSONL")
    p.add_argument("--task", choices=TASKS, help="default: the run's task")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--max-seq-len", type=positive_int, default=512)
    p.add_argument("--labels", help="classification: comma-separated label set (default: the run's)")
    p.add_argument("--prompt-template", help=TEMPLATE_HELP)
    p.add_argument("--json", action="store_true", help="metrics and outputs as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="before/after report of a run (report.md in the run folder)")
    p.add_argument("run_dir")
    p.add_argument("--data", help="held-out JSONL (default: the spec's eval.data or validation file)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="OpenAI-compatible fine-tuning API (files, jobs, models) + workers")
    p.add_argument("--data-dir", required=True, help="files, job runs, the SQLite database and the key pepper")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=positive_int, default=8000)
    p.add_argument("--workers", type=_number(int, 0, "0 or more"), default=1, help="training worker processes")
    p.add_argument("--base-model", action="append", metavar="NAME=SOURCE",
                   help="a model users may fine-tune (alias, folder or .gguf; repeatable; default smollm2-135m-instruct)")
    p.add_argument("--database-url", help="postgresql://user:password@host/db (default: SQLite in --data-dir)")
    p.add_argument("--max-upload-mb", type=positive_int, default=512, help="largest upload (default 512)")
    p.add_argument("--max-jobs-per-org", type=positive_int, default=4, help="unfinished jobs per org (default 4)")
    positive_float = _number(float, 0.001, "a positive number of seconds")
    p.add_argument("--heartbeat-seconds", type=positive_float, default=10.0, help="worker heartbeat (default 10)")
    p.add_argument("--reclaim-after-seconds", type=positive_float, default=30.0,
                   help="requeue a running job whose worker is silent this long (default 30)")
    p.add_argument("--poll-seconds", type=positive_float, default=1.0,
                   help="how often workers look for jobs and for cancel/pause (default 1)")
    p.add_argument("--training-threads", type=positive_int, help="torch threads per training process")
    p.add_argument("--adapter", action="append", metavar="NAME=RUN_DIR",
                   help="serve a CLI-trained run (or merged model) as model NAME to every org (repeatable)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together per model")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests per model (429 beyond)")
    p.add_argument("--max-adapters", type=positive_int, default=8, help="LoRA adapters kept loaded per base (LRU)")
    p.add_argument("--max-adapter-mb", type=positive_int, default=2048, help="MB of LoRA adapters kept loaded per base")
    p.add_argument("--inference-threads", type=positive_int, help="torch threads for inference in the API process")
    p.add_argument("--inference-precision", choices=["fp32", "bf16"], default="fp32",
                   help="served weights: fp32 (= tuneforge generate, token for token) or bf16 (faster)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys of the fine-tuning service")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    k = ksub.add_parser("create", help="create an API key for an org (printed once)")
    k.add_argument("--data-dir", required=True)
    k.add_argument("--org", required=True, help="organization name: lowercase letters, digits, '-'")
    k.add_argument("--database-url", help="as given to `tuneforge serve`")
    k.set_defaults(func=cmd_keys_create)

    p = sub.add_parser("demo", help="fine-tune SmolLM2 on ticket triage and show before/after")
    p.add_argument("--output-dir", default="runs/demo", help="run folder (replaced if an earlier demo made it)")
    p.add_argument("--epochs", type=non_negative_float, default=2)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit code (see errors.py). User mistakes print one message, never a traceback."""
    try:
        from tuneforge.errors import TuneforgeError
    except KeyboardInterrupt:
        return 130
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
        return args.func(args)
    except TuneforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `tuneforge` console script: once the command has finished, a late Ctrl-C must not interrupt the
    interpreter's own shutdown (it would print 'Exception ignored in atexit callback')."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
