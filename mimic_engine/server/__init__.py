"""The HTTP server: `app.create_app(settings, backend, index)` (FastAPI), `settings.ServerSettings`
(every knob), `cli` (`mimic-engine serve` / `mimic-engine search`) and `loadtest` (HTTP load
generator). Nothing heavy is imported here: FastAPI loads with `app`."""
