"""`mimic-engine serve` / `mimic-engine search`: options, env vars, the no-argument demo setup."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mimic_engine.checkpoint import save_checkpoint
from mimic_engine.config import DEFAULT_PRESET
from mimic_engine.data.demo import FORMAT_VERSION as DEMO_VERSION

DEMO_MODEL = f"demo-model-v{DEMO_VERSION}-{DEFAULT_PRESET}"  # named after the corpus version and the preset
from mimic_engine.server import cli as server_cli


@pytest.fixture
def tiny_ckpt(tiny_encoders, tmp_path):
    enc = tiny_encoders("decoder")
    return save_checkpoint(str(tmp_path / "model" / "ckpt.pt"), enc.model, enc.tokenizer, {"step": 1})


@pytest.fixture
def captured_app(monkeypatch):
    """uvicorn.run records the app and its address instead of serving forever."""
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return seen


def test_serve_options_and_env_vars(tiny_ckpt, tmp_path, captured_app):
    from fastapi.testclient import TestClient

    import torch

    threads = torch.get_num_threads()
    env = {"MIMIC_MODEL": tiny_ckpt, "MIMIC_PORT": "9123", "MIMIC_MAX_BATCH": "4", "MIMIC_API_KEY": "k",
           "MIMIC_BATCHING": "false", "MIMIC_THREADS": "1"}
    result = CliRunner().invoke(server_cli.serve_command, ["--index", str(tmp_path / "idx"), "--backend", "torch",
                                                           "--max-items", "3"], env=env)
    assert result.exit_code == 0, result.output
    assert captured_app["port"] == 9123 and captured_app["host"] == "127.0.0.1"
    app = captured_app["app"]
    settings = app.state.settings
    assert (settings.max_batch, settings.api_key, settings.batching, settings.max_items) == (4, "k", False, 3)
    assert settings.threads == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    with TestClient(app) as client:
        r = client.post("/v1/documents", json={"documents": [{"id": "a", "text": "hello"}]}, headers={"X-API-Key": "k"})
        assert r.status_code == 200
        assert client.post("/v1/search", json={"query": {"text": "hello"}}).json()["results"][0]["id"] == "a"
        assert client.post("/v1/embed", json={"items": [{"text": "x"}] * 4}).status_code == 413


def test_bad_options_are_refused(tiny_ckpt, tmp_path, captured_app):
    runner = CliRunner()
    result = runner.invoke(server_cli.serve_command, ["--model", tiny_ckpt, "--backend", "nope"])
    assert result.exit_code != 0 and "auto" in result.output
    result = runner.invoke(server_cli.serve_command, ["--model", tiny_ckpt, "--index", str(tmp_path / "i"),
                                                      "--max-items", "10", "--max-queue", "5"])
    assert result.exit_code != 0 and "max_queue" in str(result.exception)
    assert "app" not in captured_app


def test_no_arguments_serves_the_demo_model_on_the_demo_index(tiny_encoders, tmp_path, monkeypatch, captured_app):
    """A fresh home: the demo model is trained (here: a stand-in that saves a tiny model, since real
    training takes minutes) and the demo index is built from the demo corpus."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("MIMIC_HOME", str(tmp_path / "home"))
    calls = []

    def fake_train(options, echo=None):
        calls.append(options)
        enc = tiny_encoders("decoder")
        return save_checkpoint(f"{options.out}/ckpt.pt", enc.model, enc.tokenizer, {"step": 1})

    monkeypatch.setattr("mimic_engine.training.run.run_training", fake_train)
    result = CliRunner().invoke(server_cli.serve_command, ["--backend", "torch"])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "home" / DEMO_MODEL
    # trained in a .partial folder, renamed into place only once training has finished
    assert [(o.preset, o.data, o.out, o.resume) for o in calls] == [("small-effnet", "demo", str(model_dir) + ".partial", None)]
    assert (model_dir / "ckpt.pt").is_file() and not (tmp_path / "home" / f"{DEMO_MODEL}.partial").exists()
    assert "training one now" in result.output and "indexing the demo corpus" in result.output.lower()
    from mimic_engine.data import load_dataset

    n_docs = len(load_dataset("demo").documents)
    with TestClient(captured_app["app"]) as client:
        ready = client.get("/readyz").json()
        assert ready["documents"] == n_docs
        hits = client.post("/v1/search", json={"query": {"text": "a handwritten digit"}, "k": 5,
                                               "modality": "image"}).json()["results"]
        assert len(hits) == 5 and all(h["modality"] == "image" and h["image_ref"].startswith("dataset:demo:")
                                      for h in hits)
    # second start: nothing is trained or rebuilt
    result = CliRunner().invoke(server_cli.serve_command, ["--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1 and "indexing" not in result.output.lower()
    with TestClient(captured_app["app"]) as client:
        assert client.get("/readyz").json()["documents"] == n_docs


def test_search_command(tiny_ckpt, tiny_encoders, tmp_path):
    from mimic_engine.index import DocumentIndex, StoredDocument
    from mimic_engine.preprocess import Item
    from mimic_engine.runtime import load_backend
    from tests.conftest import make_image_bytes

    backend = load_backend("torch", tiny_ckpt)
    image = make_image_bytes(3)
    (tmp_path / "q.png").write_bytes(image)
    texts = ["the red bus", "a bowl of soup", "snow on the mountain"]
    vectors = backend.encode([Item(text=t) for t in texts] + [Item(images=[image])])
    with DocumentIndex(str(tmp_path / "idx"), backend.dim, backend.model_id) as index:
        index.upsert([StoredDocument(f"t{i}", "text", text=t) for i, t in enumerate(texts)]
                     + [StoredDocument("img", "image", image_ref="q.png")], vectors)
    runner = CliRunner()
    base = ["--model", tiny_ckpt, "--index", str(tmp_path / "idx")]
    result = runner.invoke(server_cli.search_command, ["a bowl of soup", *base, "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()  # the backend choice is reported on stderr
    assert len(lines) == 2 and "t1" in lines[0] and "a bowl of soup" in lines[0]
    result = runner.invoke(server_cli.search_command, ["--image", str(tmp_path / "q.png"), *base, "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits[0]["id"] == "img" and np.isclose(hits[0]["score"], 1.0, atol=1e-4)
    result = runner.invoke(server_cli.search_command, ["bus", *base, "--modality", "image", "--json"])
    assert [h["id"] for h in json.loads(result.stdout)] == ["img"]
    result = runner.invoke(server_cli.search_command, base)
    assert result.exit_code != 0 and "QUERY" in str(result.exception)


def test_interrupted_demo_training_resumes_instead_of_serving_a_half_trained_model(tmp_path, monkeypatch, tiny_encoders):
    monkeypatch.setenv("MIMIC_HOME", str(tmp_path / "home"))
    partial = tmp_path / "home" / f"{DEMO_MODEL}.partial"
    partial.mkdir(parents=True)
    enc = tiny_encoders("decoder")
    save_checkpoint(str(partial / "ckpt.pt"), enc.model, enc.tokenizer, {"step": 1})  # best-so-far of a killed run
    (partial / "last.pt").write_bytes(b"state")
    calls = []

    def fake_train(options, echo=None):
        calls.append(options)
        return str(partial / "ckpt.pt")

    monkeypatch.setattr("mimic_engine.training.run.run_training", fake_train)
    from mimic_engine.server.bootstrap import ensure_demo_model

    ckpt = ensure_demo_model()
    assert calls and calls[0].resume == str(partial / "last.pt")
    # the demo model is the published comparison's MiMIC run for seed 0: equal steps, no time limit
    import dataclasses

    from mimic_engine.training.comparison import DEFAULT_STEPS, VARIANTS, run_options
    from mimic_engine.training.options import TrainOptions
    published = run_options(TrainOptions(preset="small-effnet", data="demo"), VARIANTS["mimic"], 0, "x", DEFAULT_STEPS, None)
    assert dataclasses.replace(calls[0], out=published.out, resume=None, progress=False) == published
    assert (calls[0].steps, calls[0].max_minutes, calls[0].patience) == (DEFAULT_STEPS, 0.0, 0)
    assert ckpt == str(tmp_path / "home" / DEMO_MODEL / "ckpt.pt")
