"""What tests/cli_runner.py's fork server imports once: what a `tuneforge` command that trains, evaluates or
generates imports (torch, transformers' models, peft, the recipe, inference), then frozen out of the garbage
collector's sight as the CLI's own entry point does (tuneforge.process.freeze_loaded_objects), so every forked
child inherits it. Importing only: no thread pool is started here, so every forked child starts its own."""
import torch  # noqa: F401
import transformers.modeling_utils  # noqa: F401
import peft  # noqa: F401

import tuneforge.cli  # noqa: F401
import tuneforge.inference  # noqa: F401
import tuneforge.training.recipe  # noqa: F401
from tuneforge.process import freeze_loaded_objects

freeze_loaded_objects()
