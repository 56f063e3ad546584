"""Cohort sources (io/sources.py): each layout found with its cases, channels and references, and every ambiguous or
incomplete source refused before any case runs, naming the offending files."""

import json

import pytest

from hnseg_infer.errors import InputError
from hnseg_infer.io.sources import find_cases


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # detection reads no image: any bytes will do
    return path


def test_grand_challenge_layout_with_and_without_input_and_pet(tmp_path):
    a_ct = touch(tmp_path / "A" / "input" / "images" / "ct" / "u1.mha")
    a_pet = touch(tmp_path / "A" / "input" / "images" / "pet" / "u2.mha")
    a_ref = touch(tmp_path / "A" / "reference" / "r.mha")
    b_ct = touch(tmp_path / "B" / "images" / "ct" / "b.nii.gz")
    (tmp_path / "B" / "images" / "pet").mkdir()
    source = find_cases(tmp_path)
    assert source.layout == "gc"
    assert [(c.case, c.ct, c.pet, c.reference) for c in source.cases] == [("A", a_ct, a_pet, a_ref),
                                                                           ("B", b_ct, None, None)]
    assert "2 cases" in source.describe() and "1 without PET" in source.describe()


def test_grand_challenge_incomplete_cases_are_named(tmp_path):
    touch(tmp_path / "A" / "images" / "ct" / "a.mha")
    touch(tmp_path / "B" / "images" / "pet" / "b.mha")  # no CT
    touch(tmp_path / "C" / "images" / "ct" / "c1.mha")
    touch(tmp_path / "C" / "images" / "ct" / "c2.mha")  # two CTs
    (tmp_path / "D").mkdir()  # no images/
    with pytest.raises(InputError) as error:
        find_cases(tmp_path)
    message = str(error.value)
    assert "incomplete cases" in message and str(tmp_path / "B" / "images" / "ct") in message
    assert "(2 CT images, expected 1)" in message and f"{tmp_path / 'D'} (no images/ folder)" in message


def test_hecktor_2025_release_layout_with_labels(tmp_path):
    for case in ("CHUM-001", "MDA-120"):
        touch(tmp_path / "imagesTr" / f"{case}__CT.nii.gz")
        touch(tmp_path / "imagesTr" / f"{case}__PT.nii.gz")
    touch(tmp_path / "imagesTr" / "CHUM-001__RTDOSE.nii.gz")  # other modalities are ignored
    touch(tmp_path / "labelsTr" / "CHUM-001.nii.gz")
    source = find_cases(tmp_path)
    assert source.layout == "hecktor"
    chum, mda = source.cases
    assert (chum.case, chum.ct.name, chum.pet.name, chum.reference.name) == \
        ("CHUM-001", "CHUM-001__CT.nii.gz", "CHUM-001__PT.nii.gz", "CHUM-001.nii.gz")
    assert mda.case == "MDA-120" and mda.reference is None


def test_hecktor_case_without_its_partner_is_named(tmp_path):
    touch(tmp_path / "imagesTr" / "CHUM-001__CT.nii.gz")
    touch(tmp_path / "imagesTr" / "CHUM-001__PT.nii.gz")
    touch(tmp_path / "imagesTr" / "CHUP-007__CT.nii.gz")
    with pytest.raises(InputError, match=r"CHUP-007__CT\.nii\.gz have no partner"):
        find_cases(tmp_path)


@pytest.mark.parametrize("channel_names, ct_index", [({"0": "CT", "1": "PET"}, 0), ({"0": "pt", "1": "ct"}, 1)])
def test_nnunet_raw_layout_takes_the_channel_order_from_dataset_json(tmp_path, channel_names, ct_index):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": channel_names, "file_ending": ".nii.gz",
                                                       "labels": {"background": 0, "GTVp": 1, "GTVn": 2}}))
    for case in ("HN_001", "HN_002"):
        for channel in (0, 1):
            touch(tmp_path / "imagesTs" / f"{case}_{channel:04d}.nii.gz")
    source = find_cases(tmp_path)
    assert source.layout == "nnunet" and [c.case for c in source.cases] == ["HN_001", "HN_002"]
    assert source.cases[0].ct.name == f"HN_001_{ct_index:04d}.nii.gz"
    assert source.cases[0].pet.name == f"HN_001_{1 - ct_index:04d}.nii.gz"


def test_nnunet_imagestr_uses_labelstr_and_refuses_missing_channels(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"},
                                                       "file_ending": ".nii.gz"}))
    for channel in (0, 1):
        touch(tmp_path / "imagesTr" / f"HN_001_{channel:04d}.nii.gz")
    touch(tmp_path / "labelsTr" / "HN_001.nii.gz")
    assert find_cases(tmp_path).cases[0].reference == tmp_path / "labelsTr" / "HN_001.nii.gz"
    touch(tmp_path / "imagesTr" / "HN_002_0000.nii.gz")
    with pytest.raises(InputError, match=r"HN_002 \(has channels \[0\], needs \[0, 1\]\)"):
        find_cases(tmp_path)


def test_nnunet_dataset_json_without_a_pet_channel_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "MR"}}))
    touch(tmp_path / "imagesTs" / "HN_001_0000.nii.gz")
    with pytest.raises(InputError, match=r"dataset\.json: channel_names .* name 0 PET channels"):
        find_cases(tmp_path)


def test_csv_with_relative_paths_references_and_ct_only_rows(tmp_path):
    touch(tmp_path / "data" / "a_ct.mha")
    touch(tmp_path / "data" / "a_pet.mha")
    touch(tmp_path / "data" / "a_ref.mha")
    touch(tmp_path / "data" / "b_ct.mha")
    (tmp_path / "cohort.csv").write_text("case,ct,pet,reference\nA,data/a_ct.mha,data/a_pet.mha,data/a_ref.mha\n"
                                         f"B,{tmp_path / 'data' / 'b_ct.mha'},,\n")
    source = find_cases(tmp_path / "cohort.csv")
    assert source.layout == "csv"
    a, b = source.cases
    assert (a.ct, a.pet, a.reference) == (tmp_path / "data" / "a_ct.mha", tmp_path / "data" / "a_pet.mha",
                                          tmp_path / "data" / "a_ref.mha")
    assert (b.pet, b.reference) == (None, None)


def test_csv_missing_files_bad_header_and_duplicates_are_refused(tmp_path):
    touch(tmp_path / "ct.mha")
    csv = tmp_path / "c.csv"
    csv.write_text("case,ct,pet\nA,ct.mha,missing_pet.mha\n")
    with pytest.raises(InputError, match=r"1 input file\(s\) do not exist: .*missing_pet\.mha"):
        find_cases(csv)
    csv.write_text("name,image\nA,ct.mha\n")
    with pytest.raises(InputError, match="expected a header case,ct,pet"):
        find_cases(csv)
    csv.write_text("case,ct,pet\nA,ct.mha,\nA,ct.mha,\n")
    with pytest.raises(InputError, match="case names A occur more than once"):
        find_cases(csv)
    csv.write_text("case,ct,pet\n../up,ct.mha,\n")
    with pytest.raises(InputError, match="not usable as file names"):
        find_cases(csv)


def test_a_folder_in_two_layouts_is_ambiguous_and_an_empty_one_is_refused(tmp_path):
    touch(tmp_path / "A" / "images" / "ct" / "a.mha")
    touch(tmp_path / "imagesTr" / "X__CT.nii.gz")
    with pytest.raises(InputError, match=r"is ambiguous: it looks like the gc layout .* and like the hecktor layout"):
        find_cases(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no cases in a known layout"):
        find_cases(tmp_path / "empty")
    with pytest.raises(InputError, match="neither a folder nor a .csv file"):
        find_cases(tmp_path / "nothing")


def test_references_from_another_folder_for_every_case(tmp_path):
    from hnseg_infer.io.sources import with_references

    touch(tmp_path / "src" / "A" / "images" / "ct" / "a.mha")
    touch(tmp_path / "src" / "B" / "images" / "ct" / "b.mha")
    touch(tmp_path / "refs" / "A.nii.gz")
    touch(tmp_path / "refs" / "B.mha")
    touch(tmp_path / "refs" / "C.mha")  # masks of other cases are ignored
    source = with_references(find_cases(tmp_path / "src"), tmp_path / "refs")
    assert [c.reference.name for c in source.cases] == ["A.nii.gz", "B.mha"]
    (tmp_path / "refs" / "B.mha").unlink()
    with pytest.raises(InputError, match=r"has no mask for cases B"):
        with_references(find_cases(tmp_path / "src"), tmp_path / "refs")
    touch(tmp_path / "refs" / "A.mha")
    touch(tmp_path / "refs" / "B.mha")
    with pytest.raises(InputError, match=r"two masks for one case \(.*A\.mha.*A\.nii\.gz"):
        with_references(find_cases(tmp_path / "src"), tmp_path / "refs")
