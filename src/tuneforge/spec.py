"""The job spec: one pydantic model shared by the CLI, the Python API and the HTTP API.

A spec comes from a YAML file plus dotted `--set key.sub=value` overrides. Every problem is
reported at once as `FILE line N: field: problem`, and an unknown key names the closest valid one.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.errors import Problem, SpecError

Task = Literal["chat", "completion", "text", "classification", "qa", "translation", "creative", "ner", "preference"]
Method = Literal["lora", "dora", "qlora", "ia3", "prompt_tuning", "full"]
PEFT_METHODS = ("lora", "dora", "qlora", "ia3", "prompt_tuning")
# Upper bounds far beyond any real run, so an absurd value is a spec error rather than an overflow deep in torch.
MAX_RANK, MAX_VIRTUAL_TOKENS, MAX_EPOCHS, MAX_STEPS = 4096, 4096, 10_000, 10**9
MAX_BATCH, MAX_SEQ_LEN = 65_536, 1 << 20


class _Strict(BaseModel):
    # No infinities or NaNs in any number: `lr: .inf` would train NaN weights, `epochs: .inf` never ends.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSpec(_Strict):
    train: str = Field(min_length=1, description="Training JSONL file.")
    validation: str | None = Field(None, min_length=1, description="Validation JSONL file (for eval loss and token accuracy).")
    validation_split: float | None = Field(
        None, gt=0.0, lt=0.5, description="Hold out this fraction of `train` for validation when no file is given."
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than training.max_seq_len."
    )
    prompt_template: str | None = Field(
        None, description="Prompt for prompt/answer tasks as a format string over the record's fields, e.g. "
        "'Review: {text}\\nSentiment:' (defaults: docs/scenarios.md). The answer follows it and is the only "
        "trained part.",
    )
    chat_template: str | None = Field(
        None, description="chat: a Jinja chat template replacing the tokenizer's own (saved with the model)."
    )

    @field_validator("prompt_template")
    @classmethod
    def _format_string(cls, v: str | None) -> str | None:
        if v is not None:
            from tuneforge.data.templates import template_fields

            template_fields(v)  # ValueError names the problem
        return v

    @field_validator("chat_template")
    @classmethod
    def _jinja(cls, v: str | None) -> str | None:
        if v is not None:
            import jinja2

            try:
                jinja2.Environment().parse(v)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"not a valid Jinja template: {e.message} (template line {e.lineno})") from None
        return v

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataSpec:
        if self.validation and self.validation_split:
            raise ValueError("give either `validation` (a file) or `validation_split` (a fraction), not both")
        return self


class AdapterSpec(_Strict):
    r: int = Field(16, ge=1, le=MAX_RANK, description="LoRA/DoRA rank.")
    alpha: float = Field(32, gt=0, le=1e6, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every linear layer but the output head) or a list of names.",
    )
    num_virtual_tokens: int = Field(20, ge=1, le=MAX_VIRTUAL_TOKENS, description="Prompt tuning: number of virtual tokens.")
    prompt_init_text: str | None = Field(
        None, description="Prompt tuning: initialise the virtual tokens from this text instead of randomly."
    )


class KernelChoice(_Strict):
    loss: Literal["auto", "library"] = Field("auto", description="auto: chunked target-only cross-entropy.")
    rmsnorm: Literal["auto", "library"] = Field("auto", description="auto: the fused RMSNorm autograd node.")
    dropout: Literal["auto", "library"] = Field("auto", description="auto: byte-mask adapter dropout (CPU).")
    lora: Literal["auto", "library"] = Field("auto", description="auto: the fused LoRA layer (CPU).")
    attention: Literal["auto", "library"] = Field(
        "auto", description="auto: SDPA's math kernel for rows up to 160 tokens, faster there than its flash "
        "kernel (CPU).")


class TrainingSpec(_Strict):
    @field_validator("kernels", mode="before")
    @classmethod
    def _kernels_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in ("auto", "library"):
                raise ValueError("must be auto, library, or a mapping of loss/rmsnorm/dropout/lora/attention to "
                                 "auto|library")
            return {part: v for part in KernelChoice.model_fields}
        return v

    epochs: float = Field(3, gt=0, le=MAX_EPOCHS, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, le=10, description="Peak learning rate (AdamW).")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw: torch's fused AdamW, fp32 state. adamw_8bit: bitsandbytes' AdamW8bit, the two "
        "moments stored in 8 bits (block-wise quantised): a quarter of the optimizer memory, slightly different numerics.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Fraction of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0.0, le=10, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6, description="Clip the gradient norm to this; null disables.")
    max_seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN, description="Longest example in tokens (see data.overlong).")
    seed: int = Field(42, ge=0, le=2**63 - 1, description="Seed for initialisation, data order and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware has fast bf16, else fp32 (never fp16 on CPU)."
    )
    base_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Storage of the frozen base weights. auto: bf16 when training in bf16 with an adapter "
        "method (halves their memory, no per-step casts), else fp32. Full fine-tuning keeps fp32 master weights."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward: less memory, slower (on CPU measured 0.68x the speed at 0.6x the memory). "
        "Default: on for qlora (its point is memory), off otherwise.")
    checkpoint_every: int = Field(1, ge=1, le=10_000, description="With gradient checkpointing: checkpoint every N-th decoder "
                                  "layer only (2 keeps about half the activations, at less recompute).")
    micro_batch_tokens: int | None = Field(
        None, ge=16, le=MAX_BATCH * MAX_SEQ_LEN, description="Split a micro-batch whose padded size (rows x longest; packed: total length) "
        "exceeds this many tokens into near-equal parts run one after another. The update is the same (the loss "
        "is normalised over the whole step); peak activation memory follows the budget, not the longest batch.")
    kernels: KernelChoice = Field(
        default_factory=lambda: KernelChoice(), description="Implementations of the step's hot parts (loss, rmsnorm, dropout, lora, attention): auto = "
        "tuneforge's measured fast paths where they apply, library = plain transformers/peft; or a mapping per "
        "part, e.g. {lora: library}. The resolved choice is recorded in summary.json (see training/kernels.py).")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding).")
    packing: bool = Field(False, description="Padding-free: each micro-batch as one row, attention kept within "
                          "each example. Same loss and gradients; see docs/benchmarks.md for when it pays.")
    eval_every: int = Field(50, ge=1, le=MAX_STEPS, description="Validate every N optimizer steps (and at the end).")
    save_every: int = Field(50, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, le=10_000, description="Keep only the newest N checkpoints.")
    log_every: int = Field(1, ge=1, le=MAX_STEPS, description="Write metrics every N optimizer steps.")


class EvalSpec(_Strict):
    data: str = Field(min_length=1, description="Held-out JSONL (same format as training) for the before/after report.")
    before_after: bool = Field(True, description="After training, evaluate base and fine-tuned models and write report.md.")
    max_new_tokens: int = Field(64, ge=1, le=1_000_000, description="Generation budget per held-out example.")
    examples: int = Field(5, ge=0, le=10_000, description="Examples shown side by side in the report.")


class PreferenceSpec(_Strict):
    """task: preference (docs/scenarios.md): which of two replies is better, learnt from pairs."""

    loss: Literal["dpo", "orpo"] = Field(
        "dpo", description="dpo: Direct Preference Optimization, the sigmoid loss -log sigmoid(beta * (chosen - "
        "rejected log-ratio against the reference)); orpo: Odds-Ratio Preference Optimization, the chosen reply's "
        "negative log-likelihood minus beta * log sigmoid(log odds ratio): no reference model at all.")
    beta: float = Field(0.1, gt=0, le=100, description="dpo: how far the policy may move from the reference (higher: "
                        "stays closer); orpo: the weight of the odds-ratio term (the paper's lambda).")
    reference: Literal["auto", "precomputed"] = Field(
        "auto", description="dpo's reference log-probabilities. auto: adapter methods switch the adapter off for a "
        "no-grad pass of each batch (the base is the reference: no second model in memory), full fine-tuning "
        "precomputes them; precomputed: one pass over the data before the first step, kept in the run folder "
        "(reference_logps.safetensors) so a resumed run reads them back.")
    shared_prompt: bool = Field(
        True, description="Put both replies of a pair in one row after their common prompt, which is then computed "
        "once (a mask keeps each reply from seeing the other): the same log-probabilities as one row per reply "
        "(TRL's layout, false) at fewer tokens. Used where the model's attention takes such a mask (SDPA); prompt "
        "tuning always uses one row per reply.")


class DistributedSpec(_Strict):
    """Data parallelism over several processes (docs/distributed.md). Present = `tuneforge train` launches
    `nproc` ranks on this node through torch.distributed.run; absent = one process."""

    strategy: Literal["none", "ddp", "zero1", "zero2", "zero3"] = Field(
        "ddp", description="none: one process | ddp: replicated weights, gradients all-reduced | zero1: + optimizer "
        "state sharded | zero2: + gradients sharded | zero3: + weights sharded (torch: FSDP2; deepspeed: ZeRO stages).")
    backend: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: DDP / ZeroRedundancyOptimizer / FSDP2; deepspeed: DeepSpeed ZeRO (pip install "
        "'tuneforge[deepspeed]').")
    offload: Literal["none", "optimizer", "parameters"] = Field(
        "none", description="Keep state in CPU memory: optimizer (deepspeed) or parameters (+ gradients and optimizer "
        "state; zero2/zero3).")
    nproc: int = Field(1, ge=1, le=1024, description="Processes (ranks) per node; one per GPU on GPU machines.")
    nnodes: int = Field(1, ge=1, le=4096, description="Nodes taking part; each runs `tuneforge train` with its node_rank.")
    node_rank: int = Field(0, ge=0, description="This node's index, 0 .. nnodes-1 (node 0 hosts the rendezvous).")
    master_addr: str = Field("127.0.0.1", min_length=1, description="Address of node 0, reachable from every node.")
    master_port: int = Field(29500, ge=1, le=65535, description="Free TCP port on node 0 for the rendezvous.")
    timeout_seconds: float = Field(
        600, gt=0, le=86_400, description="A collective waiting longer than this fails the run, naming the rank that "
        "stopped responding (dead or hung peers never hang the job silently).")
    deepspeed_config: str | None = Field(
        None, min_length=1, description="backend deepspeed: your own DeepSpeed JSON; tuneforge fills batch sizes, "
        "gradient clipping and the optimizer from the spec and refuses values that contradict it.")

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        problems = []
        if self.node_rank >= self.nnodes:
            problems.append(f"node_rank: {self.node_rank} is not below nnodes={self.nnodes}")
        if self.strategy == "none" and self.world_size > 1:
            problems.append(f"strategy: none runs one process but nproc x nnodes = {self.world_size}; choose ddp, "
                            "zero1, zero2 or zero3")
        if self.offload != "none" and self.backend == "torch":
            if self.strategy in ("none", "ddp", "zero1"):
                problems.append(f"offload: {self.offload} needs strategy zero2 or zero3 with backend torch (FSDP2's "
                                "CPU offload), or backend deepspeed")
            elif self.offload == "optimizer":
                problems.append("offload: optimizer alone is DeepSpeed's; FSDP2 offloads parameters, gradients and "
                                "optimizer state together: use offload: parameters, or backend: deepspeed")
        if self.offload == "parameters" and self.backend == "deepspeed" and self.strategy != "zero3":
            problems.append("offload: parameters needs strategy zero3 with DeepSpeed (it shards the parameters); "
                            "use offload: optimizer for zero1/zero2")
        if self.deepspeed_config is not None and self.backend != "deepspeed":
            problems.append("deepspeed_config: only backend deepspeed reads it; set backend: deepspeed")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class JobSpec(_Strict):
    """A fine-tuning job. The resolved spec is written to `<output_dir>/spec.yaml`."""

    model: str = Field(min_length=1, description="Built-in alias (e.g. smollm2-135m-instruct), local HF folder, .gguf file or hub id.")
    task: Task = Field("chat", description="chat | completion | text | classification | qa | translation | creative | "
                       "ner | preference: data format, loss mask, metric.")
    labels: list[str] | None = Field(None, description="classification: the label set (predictions are scored over it).")
    data: DataSpec
    method: Method = Field("lora", description="lora | dora | qlora | ia3 | prompt_tuning | full")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present.")
    eval: EvalSpec | None = Field(None, description="Held-out evaluation and before/after report.")
    output_dir: str = Field("runs/demo", description="Run folder: checkpoints, adapter/model, metrics, summary.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder/hub (off: safer).")
    distributed: DistributedSpec | None = Field(
        None, description="Several processes / nodes (DDP, ZeRO 1-3 on FSDP2 or DeepSpeed); absent: one process.")
    preference: PreferenceSpec | None = Field(
        None, description="task preference: loss (dpo | orpo), beta and where dpo's reference comes from; absent: "
        "the defaults (dpo, beta 0.1, reference auto).")

    @property
    def preference_settings(self) -> PreferenceSpec:
        """The preference section, its defaults when the spec leaves it out."""
        return self.preference or PreferenceSpec()

    @model_validator(mode="after")
    def _fits_task(self) -> JobSpec:
        # "path: message" errors are reported at that key's line (see _format_errors).
        if self.task == "classification" and not self.labels:
            raise ValueError("labels: task classification needs `labels: [...]`, the label set")
        if self.data.prompt_template is not None:
            from tuneforge.data.templates import check_template

            problem = check_template(self.task, self.data.prompt_template)
            if problem:
                raise ValueError(f"data.prompt_template: {problem}")
        if self.training.packing and self.method == "prompt_tuning":
            raise ValueError("training.packing: prompt tuning prepends virtual tokens to each row, so it "
                             "cannot pack several examples into one; set packing: false")
        d = self.distributed
        if d is not None and d.strategy != "none":
            if self.method in ("ia3", "prompt_tuning"):
                raise ValueError(f"distributed.strategy: {self.method} is not supported with several processes "
                                 "(tested: lora, dora, qlora under ddp/zero1, full); drop `distributed`")
            if self.method == "qlora" and (d.strategy in ("zero2", "zero3") or d.backend == "deepspeed"):
                raise ValueError(f"distributed.strategy: qlora's 4-bit base weights cannot be sharded by "
                                 f"{'DeepSpeed' if d.backend == 'deepspeed' else 'FSDP2'} ({d.strategy}); use strategy "
                                 "ddp or zero1 with backend torch, or method lora")
            if self.training.precision == "fp16" and (d.strategy != "ddp" or d.backend == "deepspeed"):
                raise ValueError(f"training.precision: fp16's gradient scaler is not synchronised over "
                                 f"{d.strategy} shards; use precision bf16 (or strategy ddp)")
            if self.training.optimizer == "adamw_8bit" and (d.strategy != "ddp" or d.backend == "deepspeed"):
                raise ValueError(f"training.optimizer: adamw_8bit is not supported with {d.strategy}; use adamw "
                                 "(or strategy ddp)")
        if self.data.chat_template is not None and self.task not in ("chat", "preference"):
            raise ValueError(f"data.chat_template: only task chat (and preference) uses a chat template (task is "
                             f"'{self.task}'); use data.prompt_template")
        if self.preference is not None and self.task != "preference":
            raise ValueError(f"preference: only task preference reads it (task is '{self.task}'); set task: "
                             "preference or drop the section")
        if self.task == "preference":
            p = self.preference_settings
            if self.method == "prompt_tuning":
                raise ValueError("method: prompt tuning is not supported for task preference; use lora, dora, "
                                 "qlora, ia3 or full")
            if self.training.packing:
                raise ValueError("training.packing: task preference scores each reply as a sequence of its own; "
                                 "set packing: false")
            if p.loss == "orpo" and self.preference is not None and p.reference == "precomputed":
                raise ValueError("preference.reference: orpo uses no reference model; drop it (or use loss: dpo)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading and error reporting


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid field names of the sub-model that `loc` (a pydantic error location) points into."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields)


def _duplicate_keys(text: str) -> list[tuple[str, int, int]]:
    """(dotted key, line, first line) for every key given twice in one mapping (YAML keeps the last)."""
    found = []

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                name = key.value
                if name in seen:
                    found.append((".".join((*path, str(name))), key.start_mark.line + 1, seen[name]))
                seen.setdefault(name, key.start_mark.line + 1)
                walk(value, (*path, str(name)))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return found
    if root is not None:
        walk(root, ())
    return found


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML mapping to its 1-based line, so errors can point at the line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, key.value)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _overridden_by(loc: tuple, overridden: set[tuple]) -> tuple | None:
    """The --set key an error at `loc` comes from: that key, a key under it, or a key above it."""
    for key in sorted(overridden, key=len, reverse=True):
        n = min(len(key), len(loc))
        if n and key[:n] == loc[:n]:
            return key
    return None


def _problems(err: ValidationError, source: str, lines: dict[tuple, int], overridden: set[tuple]) -> list[Problem]:
    problems = []
    for e in err.errors():
        # Drop pydantic's own location parts (validator names, the branches of `kernels: str | mapping`).
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p.startswith(("function-", "literal[")) or
                                                                        False)))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(JobSpec, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?)" if close else ""
            msg = f"unknown key{hint}; valid keys here: {', '.join(valid)}"
        elif e["type"] == "missing":
            msg = "required but missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            located = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", msg, re.S)
            if located and loc:  # a section's cross-field check naming one of the section's own keys
                inner = tuple(located.group(1).split("."))
                located = located if inner[0] in _fields_at(JobSpec, loc + inner[:1]) else None
                if located:
                    loc, msg = loc + inner, located.group(2)
                    dotted = ".".join(map(str, loc))
            elif located:  # a cross-field check that names the key it is about
                loc, msg = tuple(located.group(1).split(".")), located.group(2)
                dotted = located.group(1)
            if not located and "input" in e and not isinstance(e["input"], dict):
                shown = repr(e["input"])
                msg += f" (got {shown if len(shown) <= 80 else shown[:60] + f'... ({len(shown)} characters)'})"
        key = _overridden_by(loc, overridden)
        if key is not None:
            problems.append(Problem("--set " + ".".join(key), None, dotted, msg))
        elif loc in lines or loc[:-1] in lines:
            problems.append(Problem(source, lines.get(loc) or lines[loc[:-1]], dotted, msg))
        else:
            problems.append(Problem(source, None, dotted, msg))
    return problems


def _annotation_at(parts: list[str] | tuple) -> tuple[bool, Any]:
    """(the path names a spec field, its type annotation) for e.g. ['data', 'prompt_template']."""
    current: Any = JobSpec
    annotation = None
    for part in parts:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return False, None
        annotation = current.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return True, annotation


def _is_section(annotation: Any) -> bool:
    candidates = [annotation, *getattr(annotation, "__args__", ())]
    return any(isinstance(c, type) and issubclass(c, BaseModel) for c in candidates)


def _text_field(parts: list[str]) -> tuple[bool, bool]:
    """(the field holds free text, it may be null): `--set` takes such values as written, not as YAML."""
    found, annotation = _annotation_at(parts)
    if not found:
        return False, False
    if annotation is str:
        return True, False
    return set(getattr(annotation, "__args__", ())) == {str, type(None)}, True


def _format_errors(problems: list[Problem]) -> str:
    return f"invalid job spec ({len(problems)} problem(s)):\n  " + "\n  ".join(map(str, problems))


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.lr=1e-4` -> (['training', 'lr'], 0.0001). Values are parsed as YAML, except for text fields
    (templates, paths, names), taken as written (`null` or nothing clears an optional one)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.lr=1e-4",
                        [Problem("--set", None, item, "expected KEY=VALUE")])
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise SpecError(f"--set {item!r}: empty key segment in {key!r}", [Problem("--set", None, key, "empty key segment")])
    text, nullable = _text_field(parts)
    if text:
        return parts, None if nullable and raw.strip() in ("", "null", "~") else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError):  # ValueError: an integer past Python's 4,300-digit limit
        value = raw
    return parts, value


def build_spec(
    raw: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    source: str = "spec",
    yaml_text: str | None = None,
) -> JobSpec:
    """Validate a dict (+ overrides) into a JobSpec, raising SpecError listing every problem."""
    data: dict[str, Any] = copy.deepcopy(dict(raw or {}))  # overrides must not edit the caller's dict
    overridden: set[tuple] = set()
    path_problems = []
    for item in overrides:
        parts, value = parse_override(item)
        leaf = next((i for i in range(1, len(parts)) if _annotation_at(parts[:i])[0]
                     and not _is_section(_annotation_at(parts[:i])[1])), None)
        if leaf is not None:  # e.g. training.lr.x: lr is a value, not a section
            name = ".".join(parts[:leaf])
            path_problems.append(Problem("--set " + ".".join(parts), None, name,
                                         f"is a single value, not a section; use --set {name}=VALUE"))
            continue
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
        overridden.add(tuple(parts))
    problems = list(path_problems)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        problems += _problems(err, source, _yaml_lines(yaml_text or ""), overridden)
    if problems:
        raise SpecError(_format_errors(problems), problems) from None
    return spec


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML spec file. Relative data paths stay relative to the current directory."""
    path = Path(path)

    def fail(message: str, field: str, line: int | None = None) -> SpecError:
        return SpecError(f"{path}{f' line {line}' if line else ''}: {message}", [Problem(str(path), line, field, message)])

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail("spec file not found", "file") from None
    except IsADirectoryError:
        raise fail("is a folder, expected a YAML spec file", "file") from None
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text ({e.reason} at byte {e.start})", "file") from None
    except OSError as e:
        raise fail(f"cannot read the spec file: {e.strerror or e}", "file") from None
    duplicates = _duplicate_keys(text)
    if duplicates:
        problems = [Problem(str(path), line, key, f"given twice (first at line {first}); keep one")
                    for key, line, first in duplicates]
        raise SpecError(_format_errors(problems), problems)
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:
        mark = getattr(e, "problem_mark", None)
        raise fail(f"not valid YAML: {getattr(e, 'problem', e)}", "yaml", mark.line + 1 if mark else None) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise fail(f"the spec must be a YAML mapping (key: value), got {type(raw).__name__}", "(top level)")
    return build_spec(raw, overrides, source=str(path), yaml_text=text)
