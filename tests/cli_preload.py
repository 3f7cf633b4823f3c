"""What tests/cli_runner.py's fork server imports once: what a `tuneforge` command that trains, evaluates or
generates imports (torch, transformers' models, peft, the recipe, inference). Importing only: no thread pool
is started here, so every forked child starts its own."""
import torch  # noqa: F401
import transformers.modeling_utils  # noqa: F401
import peft  # noqa: F401

import tuneforge.cli  # noqa: F401
import tuneforge.inference  # noqa: F401
import tuneforge.training.recipe  # noqa: F401
