"""Ready-made Prefect flows that chain the prefect-roboflow blocks.

- `detect_crop_classify`: OWLv2 few-shot detection → supervision crops → CLIP/PE embeddings →
  zero-shot labels, with a parquet table and annotated images.
- `embed_images`: images → a parquet table of embeddings.
- `classify_images`: whole-image zero-shot classification.
- `search_images`: a text or image query → the most similar rows of such a table.
- `auto_label`: detection + zero-shot classes → a COCO/YOLO dataset, a review table and gallery.
- `find_duplicates`: exact and near-duplicate groups from an embeddings table or vector index.
- `monitor_drift`: has a window of new images drifted from a reference or pinned baseline?
- `curate_images`: uniqueness, representativeness, duplicates, leaks and label issues of every
  row of a table or index, and the rows to label next (greedy k-centre under a budget).

`VectorIndex` (``prefect_roboflow.flows.vector_index``) keeps embeddings searchable at millions of
rows; the embedding flows add to one with ``index_path``.

All take image references (a folder, a glob, or paths and https URLs), cache every result by
content, write outputs atomically, and publish progress, tables, a summary and an event. They
are short compositions of the public steps in `prefect_roboflow.flows.steps` (``detect``,
``crop``, ``embed``, ``classify``, ``embed_labels``), which carry `ImageRecord` batches; compose
your own flows from the same steps.
"""

from . import steps
from .auto_label import AutoLabelResult, auto_label
from .classify_images import ClassifyImagesResult, classify_images
from .curate_images import CurateImagesResult, curate_images
from .detect_crop_classify import DetectCropClassifyResult, detect_crop_classify
from .embed_images import EmbedImagesResult, embed_images
from .find_duplicates import FindDuplicatesResult, find_duplicates
from .monitor_drift import MonitorDriftResult, monitor_drift
from .records import Batch, Failure, ImageRecord
from .search_images import SearchHit, SearchImagesResult, search_images
from .steps import ExampleSpec
from .vector_index import IndexHit, VectorIndex, update_index_from_table

__all__ = [
    "AutoLabelResult",
    "Batch",
    "ClassifyImagesResult",
    "CurateImagesResult",
    "DetectCropClassifyResult",
    "EmbedImagesResult",
    "ExampleSpec",
    "FindDuplicatesResult",
    "Failure",
    "ImageRecord",
    "IndexHit",
    "MonitorDriftResult",
    "SearchHit",
    "SearchImagesResult",
    "VectorIndex",
    "auto_label",
    "classify_images",
    "curate_images",
    "detect_crop_classify",
    "embed_images",
    "find_duplicates",
    "monitor_drift",
    "search_images",
    "steps",
    "update_index_from_table",
]
