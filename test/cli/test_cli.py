"""The `hnseg` command: predict one case, and batch over case folders with a failing case reported."""

import json

import SimpleITK as sitk
from conftest import small_case, write_gc_input

from hnseg_infer.cli.main import main


def test_predict_writes_mask_and_report(tmp_path, weights_dir):
    ct, pet = small_case()
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(pet, str(tmp_path / "pet.nrrd"))
    code = main(["predict", "--ct", str(tmp_path / "ct.nii.gz"), "--pet", str(tmp_path / "pet.nrrd"),
                 "--out", str(tmp_path / "mask.nii.gz"), "--weights", str(weights_dir),
                 "--report", str(tmp_path / "r.json"), "--device", "cpu"])
    assert code == 0
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert mask.GetSize() == ct.GetSize() and sitk.GetArrayFromImage(mask).max() == 1
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "ok"


def test_batch_reports_failed_cases_and_goes_on(tmp_path, weights_dir, capsys):
    ct, pet = small_case()
    write_gc_input(tmp_path / "cases" / "A" / "input", ct, pet)
    write_gc_input(tmp_path / "cases" / "B", ct, pet)
    write_gc_input(tmp_path / "cases" / "C", ct, None)  # PET missing
    code = main(["batch", "--input", str(tmp_path / "cases"), "--out", str(tmp_path / "masks"),
                 "--weights", str(weights_dir), "--device", "cpu"])
    assert code == 2
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.mha")) == ["A.mha", "B.mha"]
    out = capsys.readouterr()
    assert "2 of 3 cases ok; failed: C" in out.out and "no PET image" in out.err
