"""`curate_images` against references it did not compute.

On 20,000 planted rows in three splits (exact and near copies, some across splits): uniqueness and
representativeness against FiftyOne Brain's own code on the same embeddings (run in its side
virtualenv, tests/support/fiftyone_brain), duplicate groups and leaks against brute force over all
pairs, the selection's coverage radius against brute-force greedy k-centre; label issues against
cleanlab called on the same labels and probabilities, and against planted label flips. Then the
scale path (sketches, lists) on the same rows, the cache, failed rows and bad parameters.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import spearmanr

from prefect_roboflow.blocks.exceptions import InvalidInputError
from prefect_roboflow.flows import curate_images
from prefect_roboflow.flows.vector_index import RowBatch, VectorIndex

REPO = Path(__file__).resolve().parents[2]
ORACLE = REPO / "tests" / "support" / "fiftyone_brain"
DIM, ROWS, THRESHOLD = 512, 20_000, 0.95
SPLITS = ["train", "val", "test"]


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters of ~200 of varying spread, each in a random 32-d subspace."""
    rng = np.random.default_rng(seed)
    clusters = max(1, n // 200)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    spread = rng.uniform(0.1, 0.4, clusters).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for c in range(clusters):
        members = np.flatnonzero(labels == c)
        basis = rng.standard_normal((32, DIM), dtype=np.float32) * spread[c]
        out[members] = centres[c] + rng.standard_normal((len(members), 32), dtype=np.float32) @ basis
    out += 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def planted(n: int = ROWS, seed: int = 0) -> dict[str, Any]:
    """Rows with 200 exact copies, 300 near copies (cosine ≈ 0.99) and 50 near chains of 3, in three splits."""
    rng = np.random.default_rng(seed + 1)
    vectors = clustered(n, seed)
    shas = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
    splits = rng.choice(SPLITS, n, p=[0.7, 0.15, 0.15]).tolist()
    free = iter(rng.permutation(n).tolist())

    def moved(v: np.ndarray, scale: float) -> np.ndarray:
        w = v + scale * rng.standard_normal(DIM, dtype=np.float32)
        return w / np.linalg.norm(w)

    for _ in range(200):
        a, b = next(free), next(free)
        vectors[b], shas[b] = vectors[a], shas[a]
    for _ in range(300):
        a, b = next(free), next(free)
        vectors[b] = moved(vectors[a], 0.006)
    for _ in range(50):
        a, b, c = next(free), next(free), next(free)
        vectors[b] = moved(vectors[a], 0.009)
        vectors[c] = moved(vectors[b], 0.009)
    return {"vectors": vectors.astype(np.float32), "shas": shas, "splits": splits}


def write_table(
    path: Path, vectors: np.ndarray, shas: list[str], splits: list[str] | None = None, **extra: Any
) -> Path:
    n = len(vectors)
    columns: dict[str, Any] = {
        "image_ref": [f"img/{i:06d}.jpg" for i in range(n)],
        "image_sha256": shas,
        "model": ["clip"] * n,
        "version": ["ViT-B-16"] * n,
        "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
        "status": ["ok"] * n,
    }
    if splits is not None:
        columns["split"] = splits
    columns.update(extra)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return planted()


@pytest.fixture(scope="module")
def curated(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("curate")
    table = write_table(root / "embeddings.parquet", data["vectors"], data["shas"], data["splits"])
    result = curate_images(str(table), str(root / "out"), budget=100, cache_storage=str(root / "cache"))
    return {"root": root, "table": table, "result": result, "rows": pq.read_table(result.curation_path).to_pandas()}


@pytest.fixture(scope="module")
def fiftyone(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """FiftyOne Brain's scores of the same embeddings (its side venv made once by ``up``)."""
    python = (
        subprocess.run([str(ORACLE / "up")], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )
    root = tmp_path_factory.mktemp("fiftyone")
    np.save(root / "embeddings.npy", data["vectors"])
    subprocess.run(
        [python, str(ORACLE / "oracle.py"), str(root / "embeddings.npy"), str(root / "scores.npz")], check=True
    )
    with np.load(root / "scores.npz") as scores:
        return {name: scores[name] for name in scores.files}


def test_uniqueness_ranks_as_fiftyone_brains(curated: dict[str, Any], fiftyone: dict[str, np.ndarray]) -> None:
    ours = curated["rows"]["uniqueness"].to_numpy()
    assert spearmanr(ours, fiftyone["uniqueness"]).statistic >= 0.99  # exact neighbours at this size
    assert np.allclose(ours, fiftyone["uniqueness"], atol=1e-4)


def test_representativeness_is_fiftyone_brains_clusters_with_the_documented_direction(
    curated: dict[str, Any], fiftyone: dict[str, np.ndarray]
) -> None:
    rows = curated["rows"]
    assert (rows["cluster"].to_numpy() == fiftyone["cluster"]).mean() >= 0.999  # its k-means, its seed
    # FiftyOne returns distance / the cluster's largest (farthest = 1) though its docs promise
    # proximity; ours is the documented closeness: 1 - that.
    assert spearmanr(rows["representativeness"], 1.0 - fiftyone["representativeness"]).statistic >= 0.99
    assert spearmanr(rows["representativeness"], fiftyone["representativeness"]).statistic <= -0.99


def _brute_force_pairs(vectors: np.ndarray, threshold: float) -> np.ndarray:
    pairs = []
    for start in range(0, len(vectors), 2048):
        block = vectors[start : start + 2048] @ vectors.T
        a, b = np.nonzero(block >= threshold)
        a += start
        keep = a < b
        pairs.append(np.stack([a[keep], b[keep]], axis=1))
    return np.concatenate(pairs)


def test_duplicate_groups_and_leaks_equal_brute_forces(data: dict[str, Any], curated: dict[str, Any]) -> None:
    vectors, shas, splits = data["vectors"], np.asarray(data["shas"]), np.asarray(data["splits"])
    pairs = _brute_force_pairs(vectors, THRESHOLD)
    same_sha = [
        (a, b) for sha in set(shas) if len(rows := np.flatnonzero(shas == sha)) > 1 for a in rows for b in rows if a < b
    ]
    every = np.concatenate([pairs, np.asarray(same_sha, dtype=np.int64).reshape(-1, 2)])
    graph = coo_matrix((np.ones(len(every)), (every[:, 0], every[:, 1])), shape=(ROWS, ROWS))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    rows = curated["rows"]
    group = rows["duplicate_group"].fillna(-1).astype(int).to_numpy()
    assert ((group >= 0) == (sizes[component] > 1)).all()
    ours = {frozenset(np.flatnonzero(group == g).tolist()) for g in set(group[group >= 0].tolist())}
    theirs = {frozenset(np.flatnonzero(component == c).tolist()) for c in np.flatnonzero(sizes > 1)}
    assert ours == theirs and len(theirs) >= 550
    # leaks: a row with a row of another split at cosine >= threshold (or the same image)
    across = every[splits[every[:, 0]] != splits[every[:, 1]]]
    leaking = set(across.ravel().tolist())
    assert set(np.flatnonzero(rows["leak"].to_numpy()).tolist()) == leaking and len(leaking) > 50
    refs = rows["image_ref"].to_numpy()
    partner = {r: i for i, r in enumerate(refs)}
    for row in sorted(leaking)[:200]:
        other = partner[rows["leak_with"].iloc[row]]
        assert splits[other] != splits[row] and vectors[row] @ vectors[other] >= THRESHOLD - 1e-6


def _radius(vectors: np.ndarray, picks: np.ndarray) -> float:
    """The largest cosine distance from any row to its nearest pick."""
    return float((1.0 - (vectors @ vectors[picks].T).max(axis=1)).max())


def test_the_selection_covers_within_1_2_of_brute_force_greedy(data: dict[str, Any], curated: dict[str, Any]) -> None:
    vectors = data["vectors"]
    rows = curated["rows"]
    picks = rows.loc[rows["selected"], "selection_rank"].sort_values().index.to_numpy()
    assert len(picks) == 100 == curated["result"].selected
    greedy = [0]
    nearest = 1.0 - vectors @ vectors[0]
    while len(greedy) < 100:  # textbook farthest-point greedy from row 0
        greedy.append(int(np.argmax(nearest)))
        np.minimum(nearest, 1.0 - vectors @ vectors[greedy[-1]], out=nearest)
    assert _radius(vectors, picks) <= 1.2 * _radius(vectors, np.asarray(greedy))
    assert abs(_radius(vectors, picks) - curated["result"].coverage_radius) < 1e-3
    # a duplicate group's other members are never picked
    assert rows.loc[rows["selected"], "duplicate_of"].isna().all()


def test_a_rerun_reads_the_scores_from_the_cache(curated: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_roboflow.flows._curation import scores

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a cached rerun computed scores")

    monkeypatch.setattr(scores, "compute_scores", refuse)
    root = curated["root"]
    again = curate_images(str(curated["table"]), str(root / "again"), budget=100, cache_storage=str(root / "cache"))
    assert again.from_cache and not curated["result"].from_cache
    assert pq.read_table(again.curation_path).equals(pq.read_table(curated["result"].curation_path))
    html = Path(again.gallery_path).read_text()
    assert "Most unique" in html and "Least unique" in html and "Selected first" in html


def test_the_scale_path_agrees_with_exact_search(
    data: dict[str, Any], curated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sketches (principal components + a random projection, float16) and lists, forced on 20,000 rows."""
    from prefect_roboflow.flows._curation import neighbours, sketch

    monkeypatch.setattr(sketch, "EXACT_ROWS", 1_000)
    monkeypatch.setattr(sketch, "SKETCH_BYTES", ROWS * 2 * 128)  # 128 values a row
    monkeypatch.setattr(neighbours, "EXACT_SEARCH_ROWS", 1_000)
    result = curate_images(str(curated["table"]), str(tmp_path), budget=100, cache_storage=str(tmp_path / "cache"))
    rows, exact = pq.read_table(result.curation_path).to_pandas(), curated["rows"]
    assert spearmanr(rows["uniqueness"], exact["uniqueness"]).statistic >= 0.8
    # pairs are confirmed on the stored vectors: the planted near copies and chains are all found
    assert (rows["duplicate_group"].notna() == exact["duplicate_group"].notna()).mean() >= 0.99
    assert result.coverage_radius <= 1.2 * curated["result"].coverage_radius


def test_label_issues_are_cleanlabs_and_find_planted_flips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(3)
    n, classes = 2_000, ["apple", "orange", "box", "can"]
    vectors = clustered(n, seed=3)
    truth = rng.integers(0, 4, n)
    logits = rng.normal(0.0, 1.0, (n, 4))
    logits[np.arange(n), truth] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(n, 100, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, 4, 100)) % 4
    shas = [hashlib.sha256(f"l{i}".encode()).hexdigest() for i in range(n)]
    table = write_table(
        tmp_path / "labels.parquet",
        vectors,
        shas,
        label=[classes[g] for g in given],
        label_scores=pa.array([list(p) for p in probs.astype(np.float32)], pa.list_(pa.float32())),
    )
    cache = str(tmp_path / "cache")
    result = curate_images(
        str(table), str(tmp_path / "out"), budget=10, labels=str(table), classes=classes, cache_storage=cache
    )
    rows = pq.read_table(result.curation_path).to_pandas()
    theirs = find_label_issues(given, probs.astype(np.float32) / probs.astype(np.float32).sum(axis=1, keepdims=True))
    assert (rows["label_issue"].to_numpy(dtype=bool) == theirs).all()
    assert result.label_issues == int(theirs.sum()) and result.labelled == n
    found = rows["label_issue"].to_numpy(dtype=bool)
    assert found[flipped].mean() >= 0.6 and found.sum() <= 3 * len(flipped)  # planted flips, few others
    assert (rows["label"].to_numpy() == np.asarray(classes)[given]).all()
    assert "Suspected label mistakes" in Path(result.gallery_path).read_text()
    # a rerun reads cleanlab's verdicts from the cache
    from prefect_roboflow.flows._curation import label_issues, scores

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a cached rerun judged labels again")

    monkeypatch.setattr(label_issues, "label_issues", refuse)
    monkeypatch.setattr(scores, "compute_scores", refuse)
    again = curate_images(
        str(table), str(tmp_path / "again"), budget=10, labels=str(table), classes=classes, cache_storage=cache
    )
    assert pq.read_table(again.curation_path).equals(pq.read_table(result.curation_path))


def test_failed_rows_and_indexes_and_splits_by_source(tmp_path: Path) -> None:
    vectors = clustered(300, seed=5)
    shas = [hashlib.sha256(f"f{i}".encode()).hexdigest() for i in range(300)]
    train = write_table(tmp_path / "train.parquet", vectors[:200], shas[:200])
    good = pq.read_table(write_table(tmp_path / "t.parquet", vectors[200:], shas[200:]))
    good = good.append_column("error", pa.nulls(good.num_rows, pa.string()))
    failed = pa.table(
        {
            "image_ref": ["broken.jpg"],
            "image_sha256": pa.nulls(1, pa.string()),
            "model": ["clip"],
            "version": ["ViT-B-16"],
            "embedding": pa.nulls(1, good.schema.field("embedding").type),
            "status": ["failed"],
            "error": ["read: not an image"],
        },
        schema=good.schema,
    )
    test_rows = pa.concat_tables([good, failed])
    pq.write_table(test_rows, tmp_path / "test.parquet")
    index = VectorIndex.open(tmp_path / "index", create=True)
    index.add(RowBatch(["img/000000.jpg"], [shas[0]], vectors[:1]), family="clip", version="ViT-B-16")  # train's row 0
    result = curate_images(
        {"train": str(train), "test": str(tmp_path / "test.parquet"), "extra": str(tmp_path / "index")},
        str(tmp_path / "out"),
        budget=5,
    )
    rows = pq.read_table(result.curation_path).to_pandas()
    assert result.rows == 302 and result.failed == 1
    bad = rows[rows["status"] == "failed"]
    assert bad["image_ref"].tolist() == ["broken.jpg"] and bad["error"].tolist() == ["read: not an image"]
    assert bad["split"].tolist() == ["test"]
    # the same image in two splits stays two rows, and both leak
    same = rows[rows["image_sha256"] == shas[0]]
    assert sorted(same["split"]) == ["extra", "train"] and same["leak"].all()
    assert result.leaks == 2


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"budget": -1}, "budget"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"leak_threshold": float("nan")}, "leak_threshold"),
        ({"k": 2}, "k"),
        ({"k": True}, "k"),
        ({"seed": -3}, "seed"),
        ({"classes": []}, "classes"),
        ({"source": ""}, "source"),
        ({"source": {}}, "source"),
        ({"source": {"train": ""}}, "source['train']"),
        ({"source": "missing.parquet"}, "source"),
    ],
)
def test_bad_parameters_are_refused_naming_them_before_any_work(
    tmp_path: Path, parameters: dict[str, Any], field: str
) -> None:
    call = {"source": str(tmp_path / "missing.parquet"), "out_dir": str(tmp_path / "out"), **parameters}
    with pytest.raises(InvalidInputError) as caught:
        curate_images(**call)
    assert caught.value.field == field
    assert not (tmp_path / "out" / "curation.parquet").exists()


def test_box_label_issues_are_cleanlabs_on_reviewed_coco(tmp_path: Path) -> None:
    """Reviewed COCO boxes against a detections table: the images whose reviewer swapped a class
    (planted) are cleanlab's object-detection issues, and the scores are cleanlab's own."""
    import json

    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import get_label_quality_scores

    rng = np.random.default_rng(11)
    classes, images, per_image = ["apple", "orange", "box"], 40, 3
    refs, shas, boxes, truth = [], [], [], []
    for i in range(images):
        for d in range(per_image):
            x, y = 10 + 100 * d, 10 + rng.integers(0, 50)
            refs.append(f"shelf/{i:03d}.png")
            shas.append(hashlib.sha256(f"b{i}".encode()).hexdigest())
            boxes.append([float(x), float(y), float(x + 60), float(y + 60)])
            truth.append(int(rng.integers(0, 3)))
    probs = np.full((len(refs), 3), 0.02, dtype=np.float32)
    probs[np.arange(len(refs)), truth] = 0.96
    n = len(refs)
    table = write_table(
        tmp_path / "labels.parquet",
        clustered(n, seed=11),
        shas,
        detection_index=pa.array([i % per_image for i in range(n)], pa.int32()),
        label=[classes[t] for t in truth],
        label_scores=pa.array([list(p) for p in probs], pa.list_(pa.float32())),
        box_xyxy=pa.array(boxes, pa.list_(pa.float32(), 4)),
    )
    table_rows = pq.read_table(table).set_column(0, "image_ref", pa.array(refs))
    pq.write_table(table_rows, table)
    swapped = set(rng.choice(images, 6, replace=False).tolist())
    annotations, given, predictions = [], [], []
    for i in range(images):
        rows = range(i * per_image, (i + 1) * per_image)
        labels = [(truth[r] + 1) % 3 if i in swapped and r == rows[0] else truth[r] for r in rows]
        for r, label in zip(rows, labels, strict=True):
            x1, y1, x2, y2 = boxes[r]
            annotations.append({"id": r, "image_id": i, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1]})
        given.append({"bboxes": np.asarray([boxes[r] for r in rows], np.float32), "labels": np.asarray(labels)})
        per_class = np.empty(3, dtype=object)
        for k in range(3):
            per_class[k] = np.asarray([[*boxes[r], probs[r, k]] for r in rows], np.float32)
        predictions.append(per_class)
    coco = {
        "images": [{"id": i, "file_name": f"{i:03d}-{shas[i * per_image][:10]}.png"} for i in range(images)],
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)],
        "annotations": annotations,
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    result = curate_images(
        str(table), str(tmp_path / "out"), budget=5, labels=str(table), reviewed=str(tmp_path / "annotations.json"),
        classes=classes,
    )  # fmt: skip
    assert result.box_issues_path is not None
    rows = pq.read_table(result.box_issues_path).to_pandas()
    assert rows["image_ref"].tolist() == [f"shelf/{i:03d}.png" for i in range(images)]
    theirs = find_label_issues(given, predictions)
    assert (rows["label_issue"].to_numpy() == theirs).all() and result.box_label_issues == int(theirs.sum())
    assert np.allclose(rows["label_quality"], get_label_quality_scores(given, predictions, verbose=False), atol=1e-6)
    assert set(np.flatnonzero(theirs).tolist()) == swapped  # the planted swaps, and only they
    assert "Suspected box label mistakes" in Path(result.gallery_path).read_text()


def test_reviewed_boxes_need_a_labelled_table(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as caught:
        curate_images(str(tmp_path / "t.parquet"), str(tmp_path / "out"), reviewed=str(tmp_path / "a.json"))
    assert caught.value.field == "reviewed"


def test_the_deployment_curates_the_table_of_each_embed_images_run() -> None:
    """serve.py's trigger, rendered by Prefect's own code on the event `embed_images` emits."""
    import json
    import sys
    from datetime import datetime, timezone
    from uuid import uuid4

    import yaml
    from prefect.events.schemas.events import Resource
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    sys.path.insert(0, str(REPO / "deployments"))
    import serve

    trigger = serve.embedded_trigger("/data/out/curate-images")
    run_id = uuid4()
    event = ReceivedEvent.model_validate(
        {
            "id": uuid4(),
            "occurred": datetime.now(timezone.utc),
            "event": "prefect_roboflow.embed_images.completed",  # what emit_completed("embed-images", ...) sends
            "resource": {
                "prefect.resource.id": f"prefect_roboflow.flow-run.{run_id}",
                "prefect.resource.name": "embed-images",
            },
            "payload": {"embeddings_path": "/data/out/embed-images/embeddings.parquet", "images": 12},
        }
    )
    assert event.event in trigger.expect
    assert trigger.match.matches(event.resource)
    other = Resource.model_validate(
        {"prefect.resource.id": "prefect_roboflow.flow-run.x", "prefect.resource.name": "x"}
    )
    assert not trigger.match.matches(other)  # another flow's completion starts nothing
    action = RunDeployment.model_validate(
        {"source": "selected", "deployment_id": uuid4(), "parameters": trigger.parameters}
    )
    templates = json.loads(json.dumps(action.parameters))
    RunDeployment._upgrade_v1_templates(templates)
    context = HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event})
    rendered = hydrate(templates, context)
    assert rendered == {
        "source": "/data/out/embed-images/embeddings.parquet",
        "out_dir": f"/data/out/curate-images/events/{event.id}",
    }
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["entrypoint"].endswith(":curate_images")]
    (declared,) = deployment["triggers"]
    assert declared["expect"] == sorted(trigger.expect) and declared["match"] == trigger.match.root
    assert declared["parameters"]["source"] == trigger.parameters["source"]


def test_a_table_whose_every_row_failed_is_a_table_of_failed_rows(tmp_path: Path) -> None:
    table = pa.table(
        {
            "image_ref": ["a.jpg", "b.jpg"],
            "image_sha256": pa.nulls(2, pa.string()),
            "model": ["clip", "clip"],
            "version": ["ViT-B-16", "ViT-B-16"],
            "embedding": pa.nulls(2, pa.list_(pa.float32())),
            "status": ["failed", "failed"],
            "error": ["read: not an image", "server: 500"],
        }
    )
    pq.write_table(table, tmp_path / "failed.parquet")
    result = curate_images(str(tmp_path / "failed.parquet"), str(tmp_path / "out"), budget=3)
    rows = pq.read_table(result.curation_path).to_pandas()
    assert result.rows == 2 == result.failed and result.selected == 0
    assert rows["status"].tolist() == ["failed", "failed"] and rows["error"].tolist() == table["error"].to_pylist()
