"""The encoder's loading, pooling and batching on a tiny random BERT saved to disk, and the
packaged all-MiniLM-L6-v2 on a few sentences."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from models.encoder import TextEncoder, default_model_path


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
