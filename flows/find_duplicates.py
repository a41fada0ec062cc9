"""`find_duplicates`: groups of exact and near-duplicate images in an embeddings table or index.

Exact duplicates share a sha256 (byte-identical files, wherever they are); near duplicates are
joined when the cosine similarity of their embeddings reaches ``threshold``. Near pairs come from
each image's ``k`` nearest neighbours in a `VectorIndex` (IVF-PQ once large), never from all
pairs, and groups are the connected components of those pairs (union-find), so a chain of near
copies forms one group.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from prefect_roboflow.blocks.exceptions import InvalidInputError

from ._run.parameters import resolve_out_dir

if TYPE_CHECKING:
    import pandas as pd
from ._outputs.assets import assets_section, materialize_outputs
from ._outputs.files import ParquetSink
from ._run.artifacts import markdown_table, publish_summary
from ._run.events import emit_completed
from ._run.flow import roboflow_flow
from ._storage.access import is_remote, join
from .vector_index import MANIFEST, VectorIndex, update_index_from_table

__all__ = ["DUPLICATES_SCHEMA", "FindDuplicatesResult", "find_duplicates"]

FLOW_KEY = "find-duplicates"
#: Queries per batched kNN call (bounds memory: batch × candidates × dim floats).
QUERY_BATCH = 1024
DUPLICATES_SCHEMA = pa.schema(
    [
        ("group", pa.int64()),
        ("group_kind", pa.string()),  # "exact": every member has one sha256; "near": otherwise
        ("representative", pa.string()),  # image_ref of the group's representative
        ("member", pa.string()),  # image_ref of this row
        ("kind", pa.string()),  # "representative" | "exact" (the representative's sha256) | "near"
        ("similarity", pa.float32()),  # cosine to the representative
        ("image_sha256", pa.string()),
        ("detection_index", pa.int32()),
    ]
)


class FindDuplicatesResult(BaseModel):
    """What a `find_duplicates` run found and where its table is."""

    rows: int
    exact_groups: int
    near_groups: int
    rows_in_groups: int
    threshold: float
    duplicates_path: str


@roboflow_flow(name="find-duplicates", flow_run_name="find-duplicates", validate_parameters=True)
async def find_duplicates(source: str, out_dir: str, threshold: float = 0.95, k: int = 10) -> FindDuplicatesResult:
    """Group exact (same sha256) and near (cosine ≥ ``threshold``) duplicates.

    Args:
        source: An embeddings table (``.parquet`` written by ``embed_images``, ``classify_images``
            or ``detect_crop_classify``) or a vector index (a folder or object-storage URL).
        out_dir: Folder or bucket location (``s3://bucket/prefix/``, any fsspec URL,
            ``block://s3-bucket/<name>/<prefix>``) for ``duplicates.parquet``.
        threshold: Cosine similarity from which two images are near duplicates, in (0, 1].
        k: Neighbours looked at per image (1-100); a group larger than ``k + 1`` is still found
            when its members chain.

    Returns:
        Counts and the table's path. Rows, one per member of a group: ``group, group_kind,
        representative, member, kind, similarity, image_sha256, detection_index``.
    """
    _check_source(source)
    out = resolve_out_dir(out_dir)
    with tempfile.TemporaryDirectory(dir=None if is_remote(out) else out, prefix=".find-duplicates-") as scratch:
        index = _open_source(source, Path(scratch))
        groups = _groups(index, threshold, k)
        with ParquetSink(join(out, "duplicates.parquet"), DUPLICATES_SCHEMA) as sink:
            sink.write([{str(c): v for c, v in row.items()} for row in groups.to_dict("records")])
            path = sink.path
    kinds: Counter[str] = Counter(groups.drop_duplicates("group")["group_kind"].tolist())
    result = FindDuplicatesResult(
        rows=index.rows,
        exact_groups=int(kinds.get("exact", 0)),
        near_groups=int(kinds.get("near", 0)),
        rows_in_groups=len(groups),
        threshold=threshold,
        duplicates_path=str(path),
    )
    await _publish(result, groups, source)
    return result


def _check_source(source: str) -> None:
    if "://" not in source and not os.path.exists(source):
        raise InvalidInputError("source", f"{source} does not exist")


def _open_source(source: str, scratch: Path) -> VectorIndex:
    """The index to search: ``source`` itself, or one built from a table in ``scratch``."""
    is_table = source.endswith(".parquet") or ("://" not in source and os.path.isfile(source))
    if not is_table:
        if "://" not in source and not (Path(source) / MANIFEST).exists():
            raise InvalidInputError("source", f"{source} is neither a parquet table nor a vector index")
        try:
            return VectorIndex.open(source)
        except InvalidInputError as error:
            raise InvalidInputError("source", error.reason) from None
    try:
        update_index_from_table(source, scratch / "index")
    except InvalidInputError as error:
        raise InvalidInputError("source", error.reason) from None
    return VectorIndex.open(scratch / "index")


def _groups(index: VectorIndex, threshold: float, k: int) -> pd.DataFrame:
    """One row per member of every group of two or more (see `DUPLICATES_SCHEMA`)."""
    import pandas as pd

    if index.rows == 0:
        return pd.DataFrame(columns=DUPLICATES_SCHEMA.names)
    meta = index.metadata(np.arange(index.rows)).to_pandas()
    # Rows of one (sha256, detection) are exact copies; their first row stands for them all.
    key = meta["image_sha256"].fillna("").astype(str) + "/" + meta["detection_index"].fillna(-1).astype(str)
    meta["rep"] = meta.groupby(key, sort=False).cumcount().eq(0).to_numpy()
    first_of = meta.index.to_series().groupby(key, sort=False).transform("min").to_numpy()
    parent = _union_near(index, first_of, meta["rep"].to_numpy(), threshold, k)
    meta["group_root"] = _roots(parent)[first_of]
    sizes = meta.groupby("group_root")["group_root"].transform("size")
    grouped = meta[sizes > 1].copy()
    return _member_rows(index, grouped)


def _union_near(index: VectorIndex, first_of: np.ndarray, is_rep: np.ndarray, threshold: float, k: int) -> np.ndarray:
    """Union-find parents over rows, joining representatives whose kNN cosine ≥ threshold."""
    parent = np.arange(index.rows)
    reps = np.flatnonzero(is_rep)
    neighbours = min(index.rows, k + 1)
    for start in range(0, len(reps), QUERY_BATCH):
        rows = reps[start : start + QUERY_BATCH]
        scores, found = index.knn(index.vectors(rows), neighbours, nprobe=_dedup_nprobe(index), refine=2)
        close = (scores >= threshold) & (found >= 0)
        for a, b in zip(np.repeat(rows, neighbours)[close.ravel()], found[close], strict=True):
            _union(parent, int(a), int(first_of[b]))
    return parent


def _dedup_nprobe(index: VectorIndex) -> int | None:
    """IVF lists per dedup query: near copies share their list, so a few suffice."""
    return 4 if index.ann_rows else None


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)  # the lower row number is the root: a stable representative


def _find(parent: np.ndarray, a: int) -> int:
    root = a
    while parent[root] != root:
        root = int(parent[root])
    while parent[a] != root:
        parent[a], a = root, int(parent[a])
    return root


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every row's root (vectorised path halving until stable)."""
    roots = parent.copy()
    while True:
        nxt = roots[roots]
        if np.array_equal(nxt, roots):
            return roots
        roots = nxt


def _member_rows(index: VectorIndex, grouped: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    if grouped.empty:
        return pd.DataFrame(columns=DUPLICATES_SCHEMA.names)
    roots = grouped["group_root"].to_numpy()
    members = grouped.index.to_numpy()
    similarity = np.einsum("nd,nd->n", index.vectors(members), index.vectors(roots))
    rep_sha = grouped["image_sha256"].reindex(roots).to_numpy()
    one_sha = grouped.groupby("group_root")["image_sha256"].transform("nunique").eq(1).to_numpy()
    out = pd.DataFrame(
        {
            "group": pd.factorize(roots, sort=True)[0],
            "group_kind": np.where(one_sha, "exact", "near"),
            "representative": grouped["image_ref"].reindex(roots).to_numpy(),
            "member": grouped["image_ref"].to_numpy(),
            "kind": np.where(
                members == roots, "representative", np.where(grouped["image_sha256"] == rep_sha, "exact", "near")
            ),
            "similarity": np.clip(similarity, -1.0, 1.0).astype(np.float32),
            "image_sha256": grouped["image_sha256"].to_numpy(),
            "detection_index": [None if pd.isna(d) else int(d) for d in grouped["detection_index"]],
        }
    )
    return out.sort_values(["group", "member"], kind="stable").reset_index(drop=True)


async def _publish(result: FindDuplicatesResult, groups: pd.DataFrame, source: str) -> None:
    import pandas as pd

    largest = (
        groups.groupby(["group", "group_kind", "representative"]).size().nlargest(10).reset_index(name="members")
        if len(groups)
        else pd.DataFrame()
    )
    await publish_summary(
        FLOW_KEY,
        f"{result.exact_groups} exact and {result.near_groups} near-duplicate groups in {result.rows} rows",
        [
            markdown_table([result.model_dump()], list(FindDuplicatesResult.model_fields)),
            "Largest groups:\n\n"
            + markdown_table(
                [{str(c): v for c, v in r.items()} for r in largest.to_dict("records")], list(largest.columns)
            ),
            f"Table: `{result.duplicates_path}`",
            assets_section(
                await materialize_outputs(FLOW_KEY, [result.duplicates_path], source, {"rows": len(groups)}, [])
            ),
        ],
    )
    emit_completed(FLOW_KEY, result.model_dump())
