"""The file-name and folder rules of docs/cli.md: views, study grouping, class folders, manifest."""

from pathlib import Path

import pytest

from bonescan_core.ingest import ManifestError, age_band, check_import_root, plan_file, read_manifest


@pytest.mark.parametrize(
    ("relative", "view", "label"),
    [
        ("metastatic/Anterior/A12.png", "anterior", "metastatic"),
        ("Normal/Posterior/P12.png", "posterior", "non_metastatic"),
        ("scans/0001-1-A.tif", "anterior", "metastatic"),
        ("scans/0001-0-P.tif", "posterior", "non_metastatic"),
        ("mets/case7_ANT.png", "anterior", "metastatic"),
        ("negative/case7 posterior.dcm", "posterior", "non_metastatic"),
        ("1/x/ANT/scan.png", "anterior", "metastatic"),
        ("other/scan.png", None, None),
        ("other/scan_ANT_POST.png", None, None),  # contradictory tokens: no view from the name
    ],
)
def test_view_and_class_from_path(tmp_path, relative, view, label):
    plan = plan_file(tmp_path / relative)
    assert plan.view == view
    assert plan.label == label


def test_views_of_one_study_share_a_group(tmp_path):
    pairs = [
        ("metastatic/Anterior/A12.png", "metastatic/Posterior/P12.png"),
        ("s/0001-1-A.tif", "s/0001-1-P.tif"),
        ("s/case7_ANT.png", "s/case7_POST.png"),
        ("s/case7-anterior.png", "s/case7-posterior.png"),
    ]
    for first, second in pairs:
        assert plan_file(tmp_path / first).group == plan_file(tmp_path / second).group, (first, second)
    assert plan_file(tmp_path / "m/Anterior/A12.png").group != plan_file(tmp_path / "m/Anterior/A13.png").group
    assert plan_file(tmp_path / "a/case7_ANT.png").group != plan_file(tmp_path / "b/case7_ANT.png").group


def test_upload_namespace_groups_by_name_only(tmp_path):
    first = plan_file(tmp_path / "0001" / "x_ANT.png", namespace="upload:b1")
    second = plan_file(tmp_path / "0002" / "x_POST.png", namespace="upload:b1")
    other_batch = plan_file(tmp_path / "0003" / "x_POST.png", namespace="upload:b2")
    assert first.group == second.group != other_batch.group


def test_manifest_rows(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,patient_id,study_id,view,label,sex,age,primary_cancer\n"
        "img/one.png,p1,s1,A,1,F,47,breast\n"
        "img/two.png,p1,s1,posterior,non_metastatic,,,\n"
    )
    first, second = read_manifest(manifest)
    assert first.path == tmp_path / "img/one.png"
    assert (first.view, first.label, first.sex, first.age, first.primary_cancer) == ("anterior", "metastatic", "F", 47, "breast")
    assert (second.view, second.label, second.sex, second.age) == ("posterior", "non_metastatic", None, None)
    assert first.group == second.group and first.patient == second.patient


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("img/a.png,p1,s1,left,1", "line 2: view"),
        ("img/a.png,p1,s1,A,maybe", "line 2: label"),
        (",p1,s1,A,1", "line 2: path, patient_id and study_id are required"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, row, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,patient_id,study_id,view,label\n" + row + "\n")
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest)


def test_manifest_missing_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("file,label\na.png,1\n")
    with pytest.raises(ManifestError, match="missing columns path, patient_id, study_id, view"):
        read_manifest(manifest)


@pytest.mark.parametrize(("age", "band"), [(None, None), (0, "0-9"), (47, "40-49"), (89, "80-89"), (90, "90+"), (103, "90+")])
def test_age_band(age, band):
    assert age_band(age) == band


def test_import_root_confinement(tmp_path):
    inside = tmp_path / "data" / "scans"
    inside.mkdir(parents=True)
    assert check_import_root(inside, [tmp_path]) == inside.resolve()
    with pytest.raises(PermissionError, match="outside the folders"):
        check_import_root(Path("/etc"), [tmp_path])
    with pytest.raises(PermissionError):
        check_import_root(tmp_path / ".." / "elsewhere", [tmp_path / "data"])
