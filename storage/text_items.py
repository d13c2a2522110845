"""Items with text in the feature store: rows for vectors computed elsewhere (storage knows no model).

An item with text is stored as extraction stores a video, so every reader (the study, `mvrec train
--extractor`, SQL) reads it the same way:
    videos         video_id = item id, uri = where the text came from, content_sha256 = sha256 of the text
    extractors     model = the text model, frame_policy "text", pooling "mean-tokens" (the lineage)
    captions       caption = the text, text_embedding = the model's sentence vector
    hidden_states  layer 0 = the embedding output, 1..L = each layer, mean-pooled over the text's tokens
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from storage.records import CaptionRow, ExtractionBatch, ExtractorRecord, HiddenStateRow, VideoRow

TEXT_FRAME_POLICY = "text"
TEXT_POOLING = "mean-tokens"
CODE_VERSION = "text-items-1"


def text_extractor(text_model: str, revision: str, num_layers: int, dim: int) -> ExtractorRecord:
    """The lineage of text-item features: the same model and code give the same extractor id."""
    return ExtractorRecord(text_model, revision, "", TEXT_FRAME_POLICY, TEXT_POOLING, CODE_VERSION,
                           {"kind": "text-items"}, dim=dim, num_layers=num_layers)


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def text_item_batch(extractor_id: str, text_model: str, item_ids: Sequence[str], texts: Sequence[str],
                    sentence: np.ndarray, layers: np.ndarray, source: str) -> ExtractionBatch:
    """One ExtractionBatch of items: sentence [N, D] and layers [N, L + 1, D] in the order of item_ids."""
    n = len(item_ids)
    if not (len(texts) == n == len(sentence) == len(layers)):
        raise ValueError(f"text items: {n} ids, {len(texts)} texts, {len(sentence)} sentence vectors and "
                         f"{len(layers)} layer stacks; they must match")
    shas = [text_sha(t) for t in texts]
    return ExtractionBatch(
        videos=[VideoRow(i, source, s, bytes=len(t.encode("utf-8"))) for i, t, s in zip(item_ids, texts, shas, strict=True)],
        captions=[CaptionRow(i, s, extractor_id, t, text_model, np.asarray(v, np.float32))
                  for i, t, s, v in zip(item_ids, texts, shas, sentence, strict=True)],
        hidden_states=[HiddenStateRow(i, s, extractor_id, layer, np.asarray(stack[layer], np.float32))
                       for i, s, stack in zip(item_ids, shas, layers, strict=True) for layer in range(stack.shape[0])])
