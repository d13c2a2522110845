"""Items with text: each text's sentence vector and every layer of the text model, mean-pooled.

The text model is the project's caption model (tasks/text_embed.py, all-MiniLM-L6-v2 by default).
Its transformer runs once per batch with output_hidden_states: layer 0 is the embedding output,
layers 1..L the blocks' outputs, each mean-pooled over the text's tokens (the attention mask, as
the model's own pooling does). The sentence vector is the model's own output (normalised), so a
caption vector from here equals one from the captioning path.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tasks.text_embed import DEFAULT_TEXT_MODEL, embed_texts, load_text_model


def text_layers(texts: Sequence[str], model_name: str = DEFAULT_TEXT_MODEL, batch_size: int = 64,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(sentence vectors float32 [N, D], layer vectors float32 [N, L + 1, D])."""
    model = load_text_model(model_name, device)
    sentence = embed_texts(texts, model_name, batch_size, device)
    transformer = model[0]  # sentence-transformers' Transformer module: tokenizer + auto_model
    parts = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = transformer.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                          max_length=transformer.max_seq_length, return_tensors="pt").to(device)
            out = transformer.auto_model(**batch, output_hidden_states=True)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            pooled = [(h * mask).sum(1) / mask.sum(1).clamp(min=1) for h in out.hidden_states]
            parts.append(torch.stack(pooled, 1).float().cpu().numpy())
    dim = sentence.shape[1]
    layers = np.concatenate(parts) if parts else np.zeros((0, 1, dim), np.float32)
    return sentence, layers.astype(np.float32, copy=False)
