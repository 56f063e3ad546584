"""The cohort manifest (cli/manifest.py) and the resume plan (cli/cohort.py's `plan`), without Ray: what is skipped,
what runs again (changed input, recipe or model file, missing mask, a failed case, --force), and the file itself."""

import shutil

import pytest
from builders import save_linear_model, write_weights

from hnseg_infer.cli.manifest import Manifest, failed_row, input_sha256, recipe_sha256
from hnseg_infer.errors import InputError
from hnseg_infer.io.sources import CaseSource, Source
from hnseg_infer.recipe.load import load_recipe

pytest.importorskip("ray")
from hnseg_infer.cli.cases import CohortLayout  # noqa: E402
from hnseg_infer.cli.cohort import plan  # noqa: E402


@pytest.fixture
def cohort(tmp_path):
    """Two finished cases (files, masks, ok rows) under tmp_path/out."""
    cases = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ct.mha").write_bytes(f"ct {name}".encode())
        (tmp_path / name / "pet.mha").write_bytes(f"pet {name}".encode())
        cases.append(CaseSource(name, tmp_path / name / "ct.mha", tmp_path / name / "pet.mha"))
    layout = CohortLayout(tmp_path / "out")
    manifest = Manifest(tmp_path / "out" / "manifest.csv")
    for case in cases:
        mask = layout.outputs(case.case, qc=False).mask
        mask.parent.mkdir(parents=True, exist_ok=True)
        mask.write_bytes(b"mask")
        manifest.record({"case": case.case, "status": "ok", "error": "", "ct": str(case.ct), "pet": str(case.pet),
                         "recipe_sha256": "r1", "seconds": 1.25, "gtvp_ml": 3.5, **input_sha256(case)})
    return Source("gc", tmp_path, tuple(cases)), layout


def todo(source, layout, *, recipe_sha="r1", force=False):
    manifest = Manifest.open(layout.out / "manifest.csv")
    return [c.case for c in plan(source, manifest, recipe_sha=recipe_sha, layout=layout, force=force)], manifest


def test_finished_cases_are_skipped_and_keep_their_row(cohort):
    source, layout = cohort
    names, manifest = todo(source, layout)
    assert names == []
    assert manifest.rows["a"]["status"] == "skipped" and manifest.rows["a"]["gtvp_ml"] == "3.5"
    assert Manifest.open(layout.out / "manifest.csv").rows["b"]["status"] == "skipped"  # written back
    assert todo(source, layout)[0] == []  # and skipped again the next time


def test_a_changed_input_a_changed_recipe_a_missing_mask_or_force_runs_again(cohort):
    source, layout = cohort
    assert todo(source, layout, force=True)[0] == ["a", "b"]
    assert todo(source, layout, recipe_sha="r2")[0] == ["a", "b"]
    source.cases[0].pet.write_bytes(b"another pet")
    assert todo(source, layout)[0] == ["a"]
    layout.outputs("b", qc=False).mask.unlink()
    assert todo(source, layout)[0] == ["a", "b"]


def test_a_failed_case_or_a_moved_input_runs_again(cohort):
    source, layout = cohort
    manifest = Manifest.open(layout.out / "manifest.csv")
    manifest.record(failed_row(source.cases[1], "boom", recipe_sha="r1"))
    assert todo(source, layout)[0] == ["b"]
    moved = tuple(CaseSource(c.case, c.ct, None) for c in source.cases)  # same CT, now without its PET
    assert todo(Source("csv", source.root, moved), layout)[0] == ["a", "b"]


def test_partial_files_of_a_killed_worker_are_removed(cohort):
    source, layout = cohort
    partial = layout.out / "masks" / ".partial-x1y2.mha"
    partial.write_bytes(b"half")
    todo(source, layout)
    assert not partial.exists() and (layout.out / "masks" / "a.mha").exists()


def test_the_manifest_round_trips_and_refuses_other_csvs(tmp_path):
    manifest = Manifest(tmp_path / "m.csv")
    manifest.record({"case": "x", "status": "ok", "error": "a, \"quoted\" error", "seconds": 0.1234567,
                     "peak_memory_mib": None, "gtvp_dice": 0.5})
    back = Manifest.open(tmp_path / "m.csv").rows["x"]
    assert back["error"] == "a, \"quoted\" error" and back["seconds"] == "0.123457" and back["peak_memory_mib"] == ""
    assert back["gtvp_dice"] == "0.5" and not list(tmp_path.glob(".partial-*"))
    manifest.record({"case": "y", "status": "ok", "gtvn_fn": 2})  # a new column after lines were rendered
    manifest.record({"case": "x", "status": "failed", "error": "again"})  # a replaced row is rendered again
    back = Manifest.open(tmp_path / "m.csv").rows
    assert (back["x"]["status"], back["x"]["error"], back["x"]["gtvn_fn"]) == ("failed", "again", "")
    assert (back["y"]["gtvn_fn"], back["y"]["gtvp_dice"]) == ("2", "") and list(back) == ["x", "y"]
    (tmp_path / "other.csv").write_text("name,value\nx,1\n")
    with pytest.raises(InputError, match="is not an hnseg manifest"):
        Manifest.open(tmp_path / "other.csv")


def test_the_recipe_hash_covers_recipe_json_and_the_model_files(tmp_path):
    weights = write_weights(tmp_path / "w")
    first = recipe_sha256(load_recipe(weights))
    assert recipe_sha256(load_recipe(weights)) == first
    shutil.copytree(weights, tmp_path / "w2")
    save_linear_model(tmp_path / "w2" / "model.onnx", [[0, 0], [0, 3.0], [0, 0]], [0, -10.0, -10.0])
    assert recipe_sha256(load_recipe(tmp_path / "w2")) != first  # same recipe.json, another model
    write_weights(weights, postprocess={"min_volume_mm3": {"GTVp": 10}})
    assert recipe_sha256(load_recipe(weights)) != first


def test_the_recipe_hash_covers_the_harmonisation_references(tmp_path):
    import numpy as np
    from builders import model_entry

    from hnseg_infer.channels.harmonise import low_frequency_block, save_reference

    rng = np.random.default_rng(0)
    channels = [{"source": "ct", "ops": [{"op": "spectrum_swap", "reference": "ref.npz"}]}, {"source": "pet"}]
    weights = write_weights(tmp_path / "w", models=[model_entry(channels=channels)], roi={"method": "ct_extent"})
    hashes = []
    for _ in range(2):  # the same recipe.json and model, another reference file
        ct = rng.normal(0, 100, (7, 24, 20))
        save_reference(weights / "ref.npz", low_frequency_block(ct, 3), ct.shape)
        hashes.append(recipe_sha256(load_recipe(weights)))
    assert hashes[0] != hashes[1]


def test_a_dicom_series_folder_is_hashed_by_its_files(tmp_path):
    from hnseg_infer.cli.manifest import path_sha256

    series = tmp_path / "ct"
    series.mkdir()
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(bytes([i]) * 10)
    before = path_sha256(series)
    assert path_sha256(series) == before
    (series / "1.dcm").write_bytes(b"changed")
    assert path_sha256(series) != before
