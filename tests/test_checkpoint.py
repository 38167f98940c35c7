import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mimic_engine.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from mimic_engine.errors import CheckpointError
from mimic_engine.preprocess import Item
from tests.conftest import make_image_bytes

ITEMS = [Item(text="hello world"), Item(images=[make_image_bytes(5)]), Item(text="cap", images=[make_image_bytes(6)])]


@pytest.mark.parametrize("fusion", ["decoder", "early", "late"])
def test_round_trip_reproduces_embeddings_in_a_fresh_process(fusion, tiny_encoders, tmp_path):
    enc = tiny_encoders(fusion)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, enc.model, enc.tokenizer, {"step": 3, "seed": 0, "metrics": {"mrr@10": 1.0}})
    expected = enc.encode(ITEMS)
    # plain torch.load with weights_only=True must accept the file
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == FORMAT_VERSION and payload["meta"]["step"] == 3
    # same intra-op thread count as this process: float reductions split differently otherwise
    script = (
        "import json, sys, torch; sys.path.insert(0, %r); torch.set_num_threads(%d)\n"
        "from mimic_engine.encoder import MimicEncoder\n"
        "from tests.test_checkpoint import ITEMS\n"
        "print(json.dumps(MimicEncoder.from_checkpoint(%r).encode(ITEMS).tolist()))\n"
    ) % (str(__import__("pathlib").Path(__file__).parents[1]), torch.get_num_threads(), path)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.asarray(json.loads(out.stdout.strip().splitlines()[-1]), np.float32), expected)


def test_bad_files_get_clear_errors(tiny_encoders, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a mimic-engine checkpoint"):
        load_checkpoint(str(foreign))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(str(text))
    enc = tiny_encoders("decoder")
    good = str(tmp_path / "good.pt")
    save_checkpoint(good, enc.model, enc.tokenizer)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(truncated))
    payload = torch.load(good, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(CheckpointError, match="upgrade mimic-engine"):
        load_checkpoint(str(newer))


@pytest.mark.parametrize("files", [{"..": b"x"}, {".": b"x"}, {"": b"x"}, {"../vocab.txt": b"x"}, {"sub/vocab.txt": b"x"},
                                   {"vocab.txt": "not bytes"}, ["vocab.txt"]])
def test_tokenizer_files_of_a_checkpoint_must_be_plain_files(files):
    from mimic_engine.checkpoint import tokenizer_from_files

    with pytest.raises(CheckpointError):
        tokenizer_from_files(files)


class NotAWeight:
    """An arbitrary class: unpickling it is what a weights-only load refuses."""


def test_a_file_with_python_objects_is_refused_without_unsafe_advice(tmp_path):
    from mimic_engine.checkpoint import read_checkpoint

    path = str(tmp_path / "evil.pt")
    torch.save({"format": "x", "hook": NotAWeight()}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "tests.test_checkpoint.NotAWeight" in message and "Do not load it unsafely" in message
    assert "will likely succeed" not in message and "trust the source" not in message
