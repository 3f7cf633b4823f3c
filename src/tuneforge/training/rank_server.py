"""What the ranks' fork server imports (training/entry.py names it in `multiprocessing.set_forkserver_preload`): the
fork server is an entry point of its own, so it makes the entry-point settings first (library chatter quieted, as
before any import), then imports the training stack and freezes it out of the collector's sight. Every rank of
the launch is forked from it with all of this done."""
from tuneforge.process import freeze_loaded_objects, quiet_libraries

quiet_libraries()

import tuneforge.training.recipe  # noqa: E402,F401

freeze_loaded_objects()
