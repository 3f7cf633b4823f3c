"""The dashboard's pages and assets, all from package data (it works offline). A page is an HTML shell, the
layout around one page's markup; its data come from the public API, fetched by the page's own script with
the key of the browser tab, so the dashboard shows what any API client sees and the server renders nothing
that belongs to an org. Every answer carries a strict Content-Security-Policy: scripts and styles only from
files of this server, no inline code, no requests to other hosts."""
from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from functools import cache
from importlib import resources
from string import Template

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",  # uPlot draws on a canvas; a result file downloads from a blob: URL
    "connect-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".txt": "text/plain; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
UPLOT = "vendor/uplot/"


@dataclass(frozen=True)
class Page:
    title: str
    template: str
    script: str
    nav: str  # which navigation link is the current page
    styles: tuple[str, ...] = ()
    scripts: tuple[str, ...] = ()  # classic scripts, run before the page's module (a library)


PAGES = {
    "jobs": Page("Fine-tuning jobs", "jobs.html", "jobs.js", "jobs"),
    "job": Page("Fine-tuning job", "job.html", "job.js", "jobs", styles=(UPLOT + "uPlot.min.css",),
                scripts=(UPLOT + "uPlot.iife.min.js",)),
    "models": Page("Models", "models.html", "models.js", "models"),
    "playground": Page("Playground", "playground.html", "playground.js", "playground"),
}
NAV = (("jobs", "/", "Jobs"), ("models", "/models", "Models"), ("playground", "/playground", "Playground"))


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def _package_files(folder: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.is_file():
                found[prefix + child.name] = child.read_bytes()

    walk(resources.files("tuneforge.service.web") / folder, "")
    return found


@cache
def assets() -> dict[str, Asset]:
    """Every served asset by its path under /assets/ (a fixed table: a request names one of these or gets 404)."""
    table = {}
    for name, body in _package_files("assets").items():
        suffix = name[name.rfind("."):] if "." in name.rsplit("/", 1)[-1] else ""
        media_type = ASSET_TYPES.get(suffix, "text/plain; charset=utf-8" if name.endswith("LICENSE") else None)
        if media_type:
            table[name] = Asset(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return table


@cache
def _templates() -> dict[str, Template]:
    return {name: Template(body.decode()) for name, body in _package_files("templates").items()}


def render(name: str, **values: str) -> str:
    """The page `name` (a key of PAGES) with `values` (escaped) in its markup."""
    page, templates = PAGES[name], _templates()
    safe = {k: html.escape(v, quote=True) for k, v in values.items()}
    current = ' aria-current="page"'
    nav = "\n".join(f'<li><a href="{href}"{current if key == page.nav else ""}>{label}</a></li>'
                    for key, href, label in NAV)
    head = [f'<link rel="stylesheet" href="/assets/{s}">' for s in page.styles]
    head += [f'<script defer src="/assets/{s}"></script>' for s in page.scripts]
    return templates["layout.html"].substitute(
        title=html.escape(page.title), nav=nav, head="\n".join(head), script=page.script,
        main=templates[page.template].substitute(safe))
