"""Curation at scale for `curate_images`: which rows are unique, central, duplicated, leaking,
probably mislabelled, and which to label next.

Floor plan (each module owns one concern; they import only `vector_index`, `records`, `_index`,
`_outputs`, `_steps`, `_storage` and `blocks` from the rest of the package):

- `sources`: what a run reads — a vector index as it is, or tables (one per split, or a split
  column) added to a scratch index; their failed rows, each row's split and exact-copy key.
- `sketch`: one streaming read of the index into a compact per-row sketch (exact vectors up to
  250,000 rows; principal components plus a random projection as float16 above).
- `neighbours`: each row's nearest rows, list by list over a two-level k-means partition.
- `uniqueness`: FiftyOne Brain's uniqueness from those distances.
- `representativeness`: closeness to the row's k-means (20 clusters) centre, within its cluster.
- `duplicates`: candidate pairs confirmed on the index's vectors; groups by connected components.
- `leaks`: rows with a near copy in another split.
- `label_issues`: cleanlab's confident learning over a labelled table's zero-shot probabilities.
- `box_issues`: cleanlab's object-detection label quality of reviewed COCO boxes against the
  table's detections.
- `selection`: greedy k-centre picks under a budget, duplicates skipped.
- `scores`: the whole computation over one source, cached by the rows' content and the parameters.
- `table`: the output table's columns and its rows, written in blocks.
- `gallery`: the HTML page of the most and least unique rows and the suspected mistakes.
"""
