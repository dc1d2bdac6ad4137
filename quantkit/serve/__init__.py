"""``quantkit serve``: an OpenAI-compatible HTTP server with continuous batching.

    $ quantkit serve path/to/model --host 127.0.0.1 --port 8000      # or: python -m quantkit.cli serve ...
    $ curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
          -d '{"model": "model", "prompt": "Once upon", "max_tokens": 16}'

Pieces: `engine.Engine` (the batching decode loop, no HTTP), `protocol` (OpenAI request checks and
response shapes), `app.create_app` (FastAPI routes), `security` (API key, browser origins, Host,
JSON bodies), `timeouts` (uvicorn's protocol with a request-head deadline), `kvbatch` (row operations
on a batched KV cache).
The click commands `serve` and `generate` are in :mod:`quantkit.cli.serve`. FastAPI and uvicorn
are optional (``pip install quantkit[serve]``); importing this package does not need them.
"""
