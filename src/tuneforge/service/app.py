"""The FastAPI app: routers per resource, one error envelope, the store on app.state."""
from __future__ import annotations

from fastapi import FastAPI

from tuneforge import __version__
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import install_error_handlers
from tuneforge.service.settings import ServiceSettings


def create_app(settings: ServiceSettings, ctx: ServiceContext | None = None) -> FastAPI:
    from tuneforge.service.files.router import router as files_router
    from tuneforge.service.jobs.router import router as jobs_router
    from tuneforge.service.models.router import router as models_router

    ctx = ctx or ServiceContext.open(settings)
    app = FastAPI(title="tuneforge", version=__version__,
                  description="OpenAI-compatible fine-tuning API (files, fine-tuning jobs, models) over tuneforge.")
    app.state.ctx = ctx
    app.state.store = ctx.store
    app.state.pepper = settings.pepper()
    install_error_handlers(app)
    for router in (files_router, jobs_router, models_router):
        app.include_router(router)

    @app.get("/health", include_in_schema=False)
    def health():
        return {"status": "ok"}

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (`uvicorn --factory tuneforge.service.app:app_from_env`), settings from the environment."""
    return create_app(ServiceSettings.from_env())
