"""tuneforge: fine-tune small language models with LoRA, DoRA, QLoRA, IA3, prompt tuning or full training."""
from tuneforge.api import generate, load, merge, summary, train
from tuneforge.errors import TuneforgeError
from tuneforge.spec import JobSpec, build_spec, load_spec

__version__ = "0.1.0"
__all__ = ["JobSpec", "TuneforgeError", "build_spec", "generate", "load", "load_spec", "merge", "summary", "train"]
