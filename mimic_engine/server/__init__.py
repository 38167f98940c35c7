"""The HTTP server: `app.create_app(settings, backend, index)` (FastAPI), `settings.ServerSettings`
(every knob) and `cli` (`mimic-engine serve` / `mimic-engine search`). Nothing heavy is imported
here: FastAPI loads with `app`. The load generator is `mimic-engine bench serve` (bench/serve.py)."""
