"""The encoder's loading, pooling and batching on a tiny random BERT saved to disk, and the
packaged all-MiniLM-L6-v2 on a few sentences."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from models.encoder import OnnxEncoder, TextEncoder, default_model_path, open_encoder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    src = default_model_path()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{src}/{name}", path / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    return str(path)


def test_tiny_model_vectors_are_unit_length_and_batch_independent(tiny_model):
    enc = TextEncoder(tiny_model, device="cpu", max_length=32, batch_size=2)
    texts = ["a short one", "a much longer sentence that needs more padding than the others", "x", ""]
    v = enc.encode(texts)
    assert v.shape == (4, 32) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([enc.encode([t]) for t in texts])
    assert np.allclose(v, one_by_one, atol=1e-5)  # padding does not leak into the pooled vector
    assert enc.encode([]).shape == (0, 32)
    assert enc.version.endswith(":32:32")


def test_truncation_to_max_length(tiny_model):
    enc = TextEncoder(tiny_model, device="cpu", max_length=8)
    long = "word " * 500
    assert enc.encode([long]).shape == (1, 32)


@pytest.mark.slow
def test_packaged_minilm_puts_related_texts_close():
    enc = TextEncoder(device="cpu")
    v = enc.encode(["creamy mushroom risotto recipe", "how to cook italian pasta", "premier league football match"])
    assert enc.dim == 384
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


@pytest.mark.gpu
def test_cuda_vectors_match_cpu(tiny_model):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    texts = ["a short one", "another sentence about something else"]
    cpu = TextEncoder(tiny_model, device="cpu").encode(texts)
    gpu_enc = TextEncoder(tiny_model, device="auto")
    assert gpu_enc.device == "cuda"
    assert np.allclose(gpu_enc.encode(texts), cpu, atol=1e-3)


# -- the ONNX Runtime backend -----------------------------------------------------------------------

TEXTS = ["creamy mushroom risotto recipe", "how to cook italian pasta", "premier league football match",
         "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy", "x", "",
         "a much longer sentence that needs more padding than the others in its batch, " * 6]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.mark.slow
def test_onnx_fp32_makes_the_torch_vectors_and_shares_their_version(onnx_cache):
    torch_enc = TextEncoder(device="cpu", batch_size=3)
    onnx_enc = OnnxEncoder(cache_dir=onnx_cache, batch_size=3)
    a, b = torch_enc.encode(TEXTS), onnx_enc.encode(TEXTS)
    assert b.shape == a.shape == (len(TEXTS), 384) and b.dtype == np.float32
    cosines = (a * b).sum(1)
    assert cosines.min() >= 0.999, cosines
    assert onnx_enc.version == torch_enc.version and onnx_enc.backend == "onnx"
    assert np.allclose(np.concatenate([onnx_enc.encode([t]) for t in TEXTS]), b, atol=1e-5)  # batch-independent
    assert onnx_enc.encode([]).shape == (0, 384)


@pytest.mark.slow
def test_onnx_int8_is_another_encoder_close_to_fp32(onnx_cache):
    fp32 = OnnxEncoder(cache_dir=onnx_cache)
    int8 = OnnxEncoder(cache_dir=onnx_cache, quantized=True)
    assert int8.version != fp32.version and int8.backend == "onnx-int8"
    a, b = fp32.encode(TEXTS), int8.encode(TEXTS)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    assert (a * b).sum(1).min() > 0.8  # close, but not the same space: never mixed with fp32's
    assert int8.path.stat().st_size < fp32.path.stat().st_size / 2
    # exported once: a second encoder reuses the cached graphs
    assert sorted(p.name for p in onnx_cache.iterdir()) == sorted([fp32.path.name, int8.path.name])


def test_auto_picks_onnx_on_the_cpu_and_unknown_backends_are_refused(tmp_path, tiny_model):
    enc = open_encoder("auto", tiny_model, device="cpu", cache_dir=tmp_path)
    assert isinstance(enc, OnnxEncoder) and enc.dim == 32
    assert isinstance(open_encoder("torch", tiny_model, device="cpu"), TextEncoder)
    with pytest.raises(ValueError, match="unknown encoder backend 'tensorrt'"):
        open_encoder("tensorrt", tiny_model)
