"""Ready-made Prefect flows that chain the prefect-roboflow blocks.

- `detect_crop_classify`: OWLv2 few-shot detection → supervision crops → CLIP/PE embeddings →
  zero-shot labels, with a parquet table and annotated images.
- `embed_images`: images → a parquet table of embeddings.
- `classify_images`: whole-image zero-shot classification.
- `search_images`: a text or image query → the most similar rows of such a table.

All take image references (a folder, a glob, or paths and https URLs), cache every result by
content, write outputs atomically, and publish progress, tables, a summary and an event.
"""

from .classify_images import ClassifyImagesResult, classify_images
from .detect_crop_classify import DetectCropClassifyResult, ExampleSpec, detect_crop_classify
from .embed_images import EmbedImagesResult, embed_images
from .search_images import SearchHit, SearchImagesResult, search_images

__all__ = [
    "ClassifyImagesResult",
    "DetectCropClassifyResult",
    "EmbedImagesResult",
    "ExampleSpec",
    "SearchHit",
    "SearchImagesResult",
    "classify_images",
    "detect_crop_classify",
    "embed_images",
    "search_images",
]
