"""`gkv-jax serve`: an OpenAI-compatible HTTP server on the slot engine.

* `protocol`: the request bodies, checked field by field (`BadRequest` names the field).
* `worker`: `EngineWorker`, the thread that runs the engine and takes commands.
* `choices`: one sample as it grows (stop strings, streaming), and the response objects.
* `metrics`: the Prometheus metrics of /metrics.
* `app`: `create_app`, the FastAPI app (completions, chat completions, models, health).

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client).
"""

from gkv_jax.serve.app import ServerConfig, create_app
from gkv_jax.serve.worker import EngineWorker, Submission, Update

__all__ = ["EngineWorker", "ServerConfig", "Submission", "Update", "create_app"]
