"""The FastAPI app: routers per resource, one error envelope, the store on app.state."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from tuneforge import __version__
from tuneforge.service.body_limits import BodyLimits
from tuneforge.service.context import ServiceContext
from tuneforge.service.errors import drop_default_validation_responses, install_error_handlers
from tuneforge.service.settings import ServiceSettings


def create_app(settings: ServiceSettings, ctx: ServiceContext | None = None) -> FastAPI:
    from tuneforge.service.completions.router import router as completions_router
    from tuneforge.service.extensions.router import router as extensions_router
    from tuneforge.service.files.router import router as files_router
    from tuneforge.service.jobs.router import router as jobs_router
    from tuneforge.service.models.router import router as models_router
    from tuneforge.service.web.router import router as web_router

    ctx = ctx or ServiceContext.open(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.models.stop()  # the engines' threads

    app = FastAPI(title="tuneforge", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning (files, fine-tuning jobs, models) and inference "
                              "(chat completions, completions) over tuneforge.")
    app.state.ctx = ctx
    app.state.store = ctx.store
    app.state.pepper = settings.pepper()
    install_error_handlers(app)
    app.add_middleware(BodyLimits)  # every JSON body bounded in size and depth before a handler parses it
    for router in (files_router, jobs_router, models_router, completions_router, extensions_router):
        app.include_router(router)
    app.include_router(web_router)  # the dashboard: pages and assets at /, calling the routers above
    app.state.models = _model_server(settings)

    @app.get("/health", include_in_schema=False)
    def health():
        """Liveness, and how busy the inference engines are (sequences decoding and waiting)."""
        loads = [engine.load() for engine in list(app.state.models.engines.values())]
        return {"status": "ok", "active": sum(l["active"] for l in loads), "waiting": sum(l["waiting"] for l in loads)}

    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = drop_default_validation_responses(default_openapi())
        return app.openapi_schema

    app.openapi = openapi

    return app


def _model_server(settings: ServiceSettings):
    from tuneforge.serving.registry import ModelServer

    if settings.inference_threads:
        import torch

        torch.set_num_threads(settings.inference_threads)  # process-wide: this is the API process's entry
    return ModelServer(max_batch=settings.max_batch, max_waiting=settings.max_waiting,
                       max_adapters=settings.max_adapters, max_adapter_bytes=settings.max_adapter_bytes,
                       precision=settings.inference_precision, threads=settings.inference_threads,
                       prefix_cache_bytes=settings.prefix_cache_bytes)


def app_from_env() -> FastAPI:
    """uvicorn factory (`uvicorn --factory tuneforge.service.app:app_from_env`), settings from the environment."""
    return create_app(ServiceSettings.from_env())
