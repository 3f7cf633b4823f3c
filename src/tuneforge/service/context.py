"""What the logic of every resource needs: the store and the settings (built once per process)."""
from __future__ import annotations

from dataclasses import dataclass

from tuneforge.service.settings import ServiceSettings
from tuneforge.service.storage.store import Store


@dataclass
class ServiceContext:
    settings: ServiceSettings
    store: Store

    @classmethod
    def open(cls, settings: ServiceSettings, migrate: bool = True) -> ServiceContext:
        settings.files_dir.mkdir(parents=True, exist_ok=True)
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        store = Store(settings.url)
        if migrate:
            store.migrate()
        return cls(settings, store)
