"""telefuser-serve: an HTTP video service for one plan, its API generated from the plan's Layer 3.

    from telefuser.serve import Settings, serve
    serve(telefuser.load_plan("plan.json"), Settings(port=8000))   # blocks; returns the exit code

`create_app(plan, manager)` gives the ASGI app alone (tests, or a user's own ASGI server); `JobManager` is the
queue and worker. See docs/serve.md. Needs the `serve` extra (FastAPI, uvicorn, python-multipart).
"""

from __future__ import annotations

from .server import Settings, build, serve

__all__ = ["Settings", "build", "serve"]
