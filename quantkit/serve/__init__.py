"""``quantkit serve``: an OpenAI-compatible HTTP server with continuous batching.

    $ quantkit serve path/to/model --host 127.0.0.1 --port 8000
    $ curl 127.0.0.1:8000/v1/completions -d '{"model": "model", "prompt": "Once upon", "max_tokens": 16}'

Pieces: `engine.Engine` (the batching decode loop, no HTTP), `protocol` (OpenAI request checks and
response shapes), `app.create_app` (FastAPI routes), `kvbatch` (row operations on a batched KV cache),
`cli` (the click commands). FastAPI and uvicorn are optional (``pip install quantkit[serve]``);
importing this package does not need them.
"""

from quantkit.serve.cli import generate_command, serve_command

__all__ = ["generate_command", "serve_command"]
