"""The `tuneforge` command: a table of subcommands over tuneforge.api. No logic lives here."""
from __future__ import annotations

import sys

try:  # a Ctrl-C while the command is still starting up: exit quietly, as later on
    import argparse
    import json
    import logging
    import os
    import signal

    from tuneforge.process import freeze_loaded_objects, quiet_libraries, stop_on_signals
except KeyboardInterrupt:
    raise SystemExit(130) from None


def cmd_train(args) -> int:
    from tuneforge import api
    from tuneforge.distributed import needs_launch
    from tuneforge.training.allocator import return_big_buffers_to_os, returns_big_buffers
    from tuneforge.training.events import ConsoleProgress, StopRequest

    job = api.resolve_job(args.spec, args.set + _distributed_overrides(args), resume=args.resume)
    if returns_big_buffers(job):
        return_big_buffers_to_os()  # process-wide, so set here at the entry point (see training/allocator.py)
    if not needs_launch(job.distributed):  # trained in this process: its imports out of the collector's sight
        import tuneforge.training.recipe  # noqa: F401

        freeze_loaded_objects()
    stop = StopRequest()
    console = ConsoleProgress(bar=not args.quiet)
    try:
        with stop_on_signals(stop):  # several ranks: api.train starts them in a child process
            summary = api.train(job, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after,
                                on_event=console, stop=stop, predict_memory=args.plan,
                                strict_memory=args.strict_memory)
    except KeyboardInterrupt:  # before training began, while nothing had been written
        print(f"\ninterrupted ({stop.reason or 'SIGINT'}) before training started; nothing was saved", file=sys.stderr)
        return 143 if stop.reason == "SIGTERM" else 130
    finally:
        console.close()  # an error message must not land inside the progress bar
    if args.json and os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this: the main rank's
        print(summary.model_dump_json(indent=2))
    elif summary.report:
        print(f"before/after report: {summary.report}", file=sys.stderr)
    if summary.status == "stopped" and summary.stop_reason in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[summary.stop_reason].value
    return 0


def _distributed_overrides(args) -> list[str]:
    """`--nproc 2 --node-rank 1 ...` as the spec's `distributed.*` overrides."""
    flags = {"nproc": args.nproc, "nnodes": args.nnodes, "node_rank": args.node_rank,
             "master_addr": args.master_addr, "master_port": args.master_port}
    return [f"distributed.{k}={v}" for k, v in flags.items() if v is not None]


def cmd_data_validate(args) -> int:
    from tuneforge.data.stats import describe

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    text, ok = describe(args.file, spec=args.spec, task=args.task, labels=labels, prompt_template=args.prompt_template,
                        model=args.model, max_seq_len=args.max_seq_len, as_json=args.json)
    print(text)
    return 0 if ok else 1


def cmd_data_generate(args) -> int:
    from tuneforge.data.synthetic import write_dataset
    from tuneforge.data.tool_calls import write_tool_dataset
    from tuneforge.demo_data import write_demo_data

    if args.dataset == "tools":
        paths = write_tool_dataset(args.out, overwrite=args.overwrite)
    elif args.dataset in ("demo", "chat", "classification"):
        sizes = {"demo": (160, 40, 20), "chat": (240, 120, 40), "classification": (240, 120, 40)}[args.dataset]
        paths = write_demo_data(args.out, *sizes[:2], n_valid=sizes[2],
                                task="classification" if args.dataset == "classification" else "chat",
                                overwrite=args.overwrite)
    else:
        paths = write_dataset(args.dataset, args.out, overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_k8s_render(args) -> int:
    from tuneforge import api, files
    from tuneforge.distributed.k8s import render_pytorchjob, write_manifest

    job = api.resolve_job(args.spec, args.set)
    name = args.name if args.name is not None else "tuneforge-" + files.expand(args.spec).stem.lower().replace("_", "-")
    text = render_pytorchjob(job, nodes=args.nodes, gpus_per_node=args.gpus_per_node, image=args.image, name=name,
                             namespace=args.namespace, volume_claim=args.volume_claim, resume=args.resume)
    if args.out:
        out = files.expand(args.out)
        write_manifest(out, text, overwrite=args.overwrite)
        print(f"wrote {out}: kubectl apply -f {out}", file=sys.stderr)
    else:
        print(text, end="")
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
    if args.engine == "onnx":  # an ONNX export (tuneforge export onnx), run by ONNX Runtime GenAI
        from tuneforge.export.onnx import generate as onnx_generate

        answers = onnx_generate(args.model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                adapter=args.adapter, task=args.task, prompt_template=args.prompt_template)
    else:
        if args.adapter:
            raise SpecError("--adapter: only with --engine onnx (an adapters export); a run folder is its own adapter")
        loaded = api.load(args.model, task=args.task, prompt_template=args.prompt_template)
        answers = api.generate(loaded, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    for prompt, answer in zip(prompts, answers):
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
            if key not in ("outputs", "pair_logps"):  # per-example lists: --json shows them
                print(f"{key:16s} {value:.4g}" if isinstance(value, float) else f"{key:16s} {value}")
    return 0


def cmd_report(args) -> int:
    from tuneforge import api

    print(f"report written to {api.report(args.run_dir, args.data)}")
    return 0


def cmd_export(args) -> int:
    from tuneforge import export

    common = dict(data=args.data, prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                  loss_tolerance=args.loss_tolerance, threads=args.threads, keep_failed=args.keep_failed)
    if args.export_format == "gguf":
        record = export.export_gguf(args.run_dir, args.out, args.type, **common)
    elif args.adapters:
        record = export.export_onnx_adapter(args.run_dir, args.out, args.precision, name=args.name, **common)
    else:
        record = export.export_onnx(args.run_dir, args.out, args.precision or "fp32", **common)
    if args.json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        for gate in record["gates"]:
            print(f"{'pass' if gate['passed'] else 'FAIL'}  {gate['name']}: {gate['message']}", file=sys.stderr)
        print(f"export written to {record['path']} (gates recorded in {record['record_file']})")
    return 0


def _plan_spec(args):
    """SPEC is a job spec (YAML) or, for a quick look, a model alias / folder / hub id (default training settings)."""
    from pathlib import Path

    from tuneforge import api
    from tuneforge.errors import SpecError

    target = Path(args.spec).expanduser()
    if target.suffix in (".yaml", ".yml", ".json") and not target.is_dir():
        if not target.is_file():
            raise SpecError(f"{args.spec}: no such spec file")
        return api.resolve_job(args.spec, args.set)
    return api.resolve_job({"model": args.spec, "data": {"train": "-"}}, args.set)


def cmd_plan(args) -> int:
    from tuneforge import api

    methods, strategies = args.methods, args.strategies
    progress = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = api.plan(_plan_spec(args), methods=methods, strategies=strategies, device=args.device,
                      memory_gb=args.memory_gb, nproc=args.nproc, progress=progress)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        from tuneforge.planning.plan import format_plan

        print(format_plan(result))
    return 0


def cmd_compare(args) -> int:
    from tuneforge import api

    path = api.compare(args.spec, methods=args.methods, out=args.out, overrides=args.set, steps=args.steps,
                       overwrite=args.overwrite, strategies=args.strategies or (), nproc=args.nproc,
                       backend=args.backend, progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(f"comparison written to {path}")
    return 0


def cmd_demo(args) -> int:
    import tuneforge.training.recipe  # noqa: F401  (it trains in this process)
    from tuneforge.demo import run_demo

    freeze_loaded_objects()
    return run_demo(args.output_dir, epochs=args.epochs, overwrite=True)


def _number(kind, low: float, what: str, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        # NaN fails `>=`; inf is no amount of anything
        if not value >= low or (high is not None and value > high) or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_int = _number(int, 1, "a whole number of at least 1")
non_negative_float = _number(float, 0.0, "0 or more")
non_negative_int = _number(int, 0, "a whole number, 0 or more")
port_number = _number(int, 1, "a TCP port, 1-65535", high=65535)


def name_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of names (--methods lora,dora): at least one, no blanks, no repeats."""
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError("must name at least one, comma-separated")
    if not all(names):
        raise argparse.ArgumentTypeError(f"has an empty name in {text!r}")
    return tuple(dict.fromkeys(names))


def _service_settings(args):
    from pathlib import Path

    from tuneforge.errors import SpecError
    from tuneforge.service.settings import ServiceSettings, parse_adapters, parse_base_models

    data_dir = Path(args.data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise SpecError(f"--data-dir: {args.data_dir} is a file, not a folder; give a folder (made if missing) for "
                        "the service's files, job runs and database")
    for parent in data_dir.absolute().parents:  # `mkdir -p` would fail on a file on the way
        if parent.exists():
            if not parent.is_dir():
                raise SpecError(f"--data-dir: {parent} is a file, so {args.data_dir} cannot be made there")
            break
    return ServiceSettings(data_dir=args.data_dir, database_url=args.database_url,
                           base_models=parse_base_models(getattr(args, "base_model", None) or []),
                           adapters=parse_adapters(getattr(args, "adapter", None) or []))


def cmd_serve(args) -> int:
    from tuneforge.service.supervisor import serve

    settings = _service_settings(args)
    settings = settings.model_copy(update={
        "max_upload_bytes": args.max_upload_mb * 2**20, "max_active_jobs_per_org": args.max_jobs_per_org,
        "heartbeat_seconds": args.heartbeat_seconds, "reclaim_after_seconds": args.reclaim_after_seconds,
        "poll_seconds": args.poll_seconds, "training_threads": args.training_threads,
        "fork_attempts": args.fork_attempts, "max_batch": args.max_batch,
        "max_waiting": args.max_queue, "max_adapters": args.max_adapters,
        "max_adapter_bytes": args.max_adapter_mb * 2**20, "inference_threads": args.inference_threads,
        "inference_precision": args.inference_precision, "shutdown_grace_seconds": args.shutdown_grace_seconds,
        "prefix_cache_bytes": args.prefix_cache_mb * 2**20,
        "max_job_ranks": args.max_job_ranks, "max_job_tokens": args.max_job_tokens,
        "max_running_jobs_per_org": args.max_running_jobs_per_org})
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
    p.add_argument("--plan", action="store_true", help="predict the peak memory first (`tuneforge plan`: a "
                   "calibration probe the first time for a model shape, then cached), warn when it exceeds 90%% of "
                   "this machine's, and record it in summary.json")
    p.add_argument("--strict-memory", action="store_true", help="like --plan, but refuse to start instead of warning")
    g = p.add_argument_group("several processes (distributed.*; docs/distributed.md)")
    g.add_argument("--nproc", type=positive_int, metavar="N", help="ranks on this node, launched through "
                   "torch.distributed.run (distributed.nproc; strategy ddp unless the spec says otherwise)")
    g.add_argument("--nnodes", type=positive_int, metavar="N", help="nodes taking part (distributed.nnodes)")
    g.add_argument("--node-rank", type=_number(int, 0, "a whole number, 0 or more"), metavar="R", help="this node's index, 0 on the node hosting the rendezvous")
    g.add_argument("--master-addr", metavar="HOST", help="address of node 0 (distributed.master_addr)")
    g.add_argument("--master-port", type=port_number, metavar="PORT", help="rendezvous port on node 0 (distributed.master_port)")
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
    g = dsub.add_parser("generate", help="write a shipped dataset (support tickets, a scenario's, preference pairs) "
                        "as JSONL")
    g.add_argument("dataset", choices=["demo", "chat", "classification", "qa", "translation", "ner", "creative", "text",
                                       "tools", "preference"])
    g.add_argument("--out", required=True, help="folder for train/valid/heldout.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace train/valid/heldout.jsonl there if they differ")
    g.set_defaults(func=cmd_data_generate)

    p = sub.add_parser("k8s", help="run a spec on Kubernetes (Kubeflow PyTorchJob)")
    ksub = p.add_subparsers(dest="k8s_command", required=True, metavar="SUBCOMMAND")
    r = ksub.add_parser("render", help="write a ConfigMap + PyTorchJob that runs SPEC on N nodes")
    r.add_argument("spec", help="job spec (YAML); its paths must exist in the image or on --volume-claim")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. distributed.strategy=zero3")
    r.add_argument("--nodes", type=positive_int, required=True, help="pods (nodes); one Master, the rest Workers")
    r.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs (= ranks) per pod; 0: CPU pods, 1 rank")
    r.add_argument("--image", required=True, help="container image with tuneforge installed")
    r.add_argument("--name", help="job name (default: tuneforge-<spec file name>)")
    r.add_argument("--namespace", help="Kubernetes namespace")
    r.add_argument("--volume-claim", metavar="PVC", help="PersistentVolumeClaim shared by all pods, mounted at "
                   "/workspace (the working directory): data, model and output_dir")
    r.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest checkpoint")
    r.add_argument("--out", help="write the manifest here (default: stdout)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.set_defaults(func=cmd_k8s_render)

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
            p.add_argument("--engine", choices=["torch", "onnx"], default="torch",
                           help="onnx: MODEL is a folder written by `tuneforge export onnx` (ONNX Runtime GenAI)")
            p.add_argument("--adapter", help="--engine onnx with an adapters export: the adapter to use")
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
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--workers", type=_number(int, 0, "0 or more"), default=1, help="training worker processes")
    p.add_argument("--base-model", action="append", metavar="NAME=SOURCE",
                   help="a model users may fine-tune (alias, folder or .gguf; repeatable; default smollm2-135m-instruct)")
    p.add_argument("--database-url", help="postgresql://user:password@host/db (default: SQLite in --data-dir)")
    p.add_argument("--max-upload-mb", type=positive_int, default=512, help="largest upload (default 512)")
    p.add_argument("--max-jobs-per-org", type=positive_int, default=4, help="unfinished jobs per org (default 4)")
    p.add_argument("--max-running-jobs-per-org", type=positive_int, metavar="N",
                   help="jobs of one org training at once (default: no cap; a free worker always takes the next job "
                   "of the org with the fewest running)")
    p.add_argument("--max-job-ranks", type=_number(int, 1, "a whole number from 1 to 1024", high=1024), default=1,
                   help="training processes one job may start (tuneforge.distributed.nproc; default 1: no "
                   "distributed jobs)")
    p.add_argument("--max-job-tokens", type=positive_int, default=100_000_000, metavar="N",
                   help="token budget per job: steps x batch x grad_accum x ranks x max_seq_len (default 100000000)")
    p.add_argument("--shutdown-grace-seconds", type=_number(float, 1, "a number of seconds from 1 to 3600", high=3600),
                   default=25.0, help="on SIGTERM/Ctrl-C, how long trainings have to checkpoint at a step boundary "
                   "before they are stopped at once (default 25; keep it below your orchestrator's kill timeout)")
    positive_float = _number(float, 0.001, "a positive number of seconds")
    p.add_argument("--heartbeat-seconds", type=positive_float, default=10.0, help="worker heartbeat (default 10)")
    p.add_argument("--reclaim-after-seconds", type=positive_float, default=30.0,
                   help="requeue a running job whose worker is silent this long (default 30)")
    p.add_argument("--poll-seconds", type=positive_float, default=1.0,
                   help="how often workers look for jobs and for cancel/pause (default 1)")
    p.add_argument("--training-threads", type=positive_int, help="torch threads per training process")
    p.add_argument("--no-fork-attempts", dest="fork_attempts", action="store_false",
                   help="start each training attempt as a fresh Python process (default: forked from its worker, "
                   "which imports the training stack once)")
    p.add_argument("--adapter", action="append", metavar="NAME=FOLDER",
                   help="serve a CLI-trained run, merged model or ONNX export (`tuneforge export onnx`) as model NAME "
                   "to every org; an ONNX adapters export serves NAME:ADAPTER per adapter, NAME:base the base "
                   "(repeatable)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="sequences decoded together per model")
    p.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests per model (429 beyond)")
    p.add_argument("--max-adapters", type=positive_int, default=8, help="LoRA adapters kept loaded per base (LRU)")
    p.add_argument("--max-adapter-mb", type=positive_int, default=2048, help="MB of LoRA adapters kept loaded per base")
    p.add_argument("--inference-threads", type=positive_int, help="torch threads for inference in the API process")
    p.add_argument("--inference-precision", choices=["fp32", "bf16"], default="fp32",
                   help="served weights: fp32 (= tuneforge generate, token for token) or bf16 (faster)")
    p.add_argument("--prefix-cache-mb", type=non_negative_int, default=512,
                   help="MB of shared prompt prefixes' KV cache kept per PyTorch model (LRU; 0: no prefix caching)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys of the fine-tuning service")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    k = ksub.add_parser("create", help="create an API key for an org (printed once)")
    k.add_argument("--data-dir", required=True)
    k.add_argument("--org", required=True, help="organization name: lowercase letters, digits, '-'")
    k.add_argument("--database-url", help="as given to `tuneforge serve`")
    k.set_defaults(func=cmd_keys_create)

    p = sub.add_parser("export", help="export a run to ONNX Runtime or GGUF, gated on equivalence with the run")
    esub = p.add_subparsers(dest="export_format", required=True, metavar="FORMAT")
    for fmt, text in (("onnx", "ONNX Runtime GenAI folder (fp32/int8/int4; merged, or a base + adapters with --adapters)"),
                      ("gguf", "GGUF file for llama.cpp / Ollama (f16/q8_0; merged weights, tokenizer, chat template)")):
        e = esub.add_parser(fmt, help=text)
        e.add_argument("run_dir", help="finished run folder")
        e.add_argument("--out", required=True, help="export folder" if fmt == "onnx" else "the .gguf file to write")
        if fmt == "onnx":
            e.add_argument("--precision", choices=["fp32", "int8", "int4"],
                           help="weights: fp32 (the default; gate: identical greedy tokens) or int8/int4 (gate: held-out "
                           "loss); --adapters into an existing export: its precision")
            e.add_argument("--adapters", action="store_true", help="export the base once with LoRA inputs and this run "
                           "as an adapter file in OUT/adapters/ (run again with other runs to add adapters)")
            e.add_argument("--name", help="--adapters: the adapter's name (default: the run folder's name)")
        else:
            e.add_argument("--type", choices=["f16", "q8_0"], default="f16",
                           help="f16 (gate: identical greedy tokens) or q8_0 (gate: held-out loss)")
        e.add_argument("--data", help="held-out JSONL for the gates (default: the spec's eval.data, else its validation file)")
        e.add_argument("--prompts", type=positive_int, default=8, help="held-out prompts decoded greedily (default 8)")
        e.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per greedy decode (default 64)")
        e.add_argument("--loss-tolerance", type=_number(float, 1e-9, "a positive fraction, e.g. 0.05"),
                       help="held-out loss drift allowed, as a fraction of the loss (and, quantised, of the "
                       "fine-tune's gain over the base); default per precision, see export.json")
        e.add_argument("--threads", type=positive_int, help="ONNX Runtime threads for the gate runs")
        e.add_argument("--keep-failed", action="store_true", help="keep an export that failed its gates (still exit 3)")
        e.add_argument("--json", action="store_true", help="print the export record (export.json) as JSON")
        e.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="predict each method's memory and step time before training; which fit")
    p.add_argument("spec", help="job spec (YAML), or a model alias / folder (config.json is enough) / hub id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.batch_size=8")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the run would train (default: the spec's)")
    p.add_argument("--memory-gb", type=_number(float, 0.01, "a number of GB from 0.01 to 1000000", high=1e6),
                   help="memory to plan for (default: this machine's RAM, or the GPU's)")
    p.add_argument("--nproc", type=positive_int, default=1, help="data-parallel processes: per-rank estimates "
                   "for ddp, zero1, zero2, zero3")
    p.add_argument("--methods", type=name_list, help="comma-separated (default: full,lora,dora,qlora,ia3,prompt_tuning)")
    p.add_argument("--strategies", type=name_list, help="comma-separated: none,ddp,zero1,zero2,zero3 (default: none; with --nproc: the others)")
    p.add_argument("--json", action="store_true", help="per combination: method, strategy, total_params, "
                   "trainable_params, predicted_peak_mb, predicted_step_seconds, fits, ...")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("compare", help="train each method for the same steps and data; compare.md + charts")
    p.add_argument("spec", help="job spec (YAML): model, data, training settings")
    p.add_argument("--methods", type=name_list, default=("lora", "dora", "qlora", "ia3", "full"), help="comma-separated (default: lora,dora,qlora,ia3,full)")
    p.add_argument("--out", required=True, help="folder for compare.md, the PNG charts and the runs")
    p.add_argument("--steps", type=positive_int, help="optimizer steps per method (default: the spec's max_steps, else 20)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every method's run")
    p.add_argument("--strategies", type=name_list, help="also full fine-tuning at --nproc ranks under each of "
                   "ddp,zero1,zero2,zero3: the source's DeepSpeed/ZeRO columns, per-rank memory")
    p.add_argument("--nproc", type=positive_int, default=2, help="ranks for --strategies (default: 2)")
    p.add_argument("--backend", choices=["torch", "deepspeed"], default="torch",
                   help="--strategies through torch (DDP, ZeroRedundancyOptimizer, FSDP2) or DeepSpeed (default: torch)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    p.set_defaults(func=cmd_compare)

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
        quiet_libraries()
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
