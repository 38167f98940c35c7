"""The HTTP server: `app.create_app(settings, backend, index)` (FastAPI) wires `schemas` (request and
response bodies), `routes` (the handlers and their helpers, over a `routes.ServerState`), `metrics`
(Prometheus series, the limits-and-metrics middleware), `api_errors` (the error shapes), `openai_api`
(/v1/embeddings and /v1/models, OpenAI-compatible) and `page` (the search page at /, files in static/);
`settings.ServerSettings` (every knob) and `cli` (`mimic-engine serve` / `mimic-engine search`).
Nothing heavy is imported here: FastAPI loads with `app`. The load generator is `mimic-engine bench
serve` (bench/serve.py)."""
