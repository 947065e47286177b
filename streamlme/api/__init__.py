"""The HTTP API (FastAPI): `create_app` for a configuration, `serve` to run it with uvicorn."""

from streamlme.api.app import build_app, create_app, serve

__all__ = ["build_app", "create_app", "serve"]
