"""The two real PET/CT studies in ../shared/data/real-petct through process.py, as the container runs them.

They are thigh sarcomas, not head-and-neck cases: head localisation must fall back with a warning, and the
output must still be a valid mask on the exact CT grid."""

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import GC_OUTPUT, REAL_DATA, REPO, files_under, run_process

OUTPUT_RELATIVE = str(GC_OUTPUT)

sys.path.insert(0, str(REPO / "export"))
import make_suv_baseline  # noqa: E402

pytestmark = pytest.mark.slow

CASES = sorted(p for p in REAL_DATA.glob("STS_*") if p.is_dir()) if REAL_DATA.is_dir() else []


@pytest.mark.skipif(not CASES, reason=f"real cases not found at {REAL_DATA}")
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_real_case_end_to_end(case, tmp_path):
    out, report_path = tmp_path / "output", tmp_path / "report.json"
    make_suv_baseline.main(["--out", str(tmp_path / "suv-threshold")])
    result = run_process(case / "input", out, tmp_path / "suv-threshold", report_path)
    assert result.returncode == 0, result.stderr
    assert files_under(out)[-1] == OUTPUT_RELATIVE and len(files_under(out)) == 3
    ct = sitk.ReadImage(str(next((case / "input/images/ct").iterdir())))
    mask = sitk.ReadImage(str(out / OUTPUT_RELATIVE))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
           (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1, 2}
    report = json.loads(report_path.read_text())
    assert report["roi"]["fell_back"] is True
    assert any("no head" in w.lower() for w in report["warnings"]), report["warnings"]
    assert report["inputs"]["pet_unit"]["unit"] == "suv"
    # the SUV > 2.5 baseline finds the hot sarcoma: it overlaps the expert mask
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "reference/tumour-mask-on-ct.mha"))) > 0
    predicted = sitk.GetArrayFromImage(mask) > 0
    dice = 2 * (reference & predicted).sum() / (reference.sum() + predicted.sum())
    assert dice > 0.3, dice
