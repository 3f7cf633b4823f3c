"""The fine-tuning service: an OpenAI-compatible HTTP API (files, fine-tuning jobs, models) over the same
engine and job spec as the CLI, with jobs queued in a database and run by worker processes.

    tuneforge keys create --data-dir srv --org acme     # prints an API key once
    tuneforge serve --data-dir srv --workers 1          # API on 127.0.0.1:8000 + 1 worker

Layout: `app.py` builds the FastAPI app; per resource (files/, jobs/, models/) a thin `router.py`, the
request/response shapes in `protocol.py` and the logic in `service.py` (testable without HTTP);
`storage/` holds every database operation (`store.py`) and the schema with its Alembic migrations;
`worker.py` claims jobs and runs each training in its own subprocess (`runner.py`); `supervisor.py`
is `tuneforge serve`.
"""
