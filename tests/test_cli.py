"""The `bonescan` command as scripts use it: verbs, JSON fields and exit codes of docs/cli.md."""

import csv
import json

from conftest import run_cli


def test_demo_studies_images_json(db_path):
    result = run_cli("demo", "--studies", "6", "--seed", "4", db_path=db_path)
    assert result.returncode == 0, result.stderr
    studies = json.loads(run_cli("studies", "--json", db_path=db_path).stdout)
    assert len(studies) == 6
    assert set(studies[0]) >= {"id", "patient_id", "n_images", "label", "included"}
    assert all(s["n_images"] == 2 and s["included"] and s["label"] in ("metastatic", "non_metastatic") for s in studies)
    assert sum(s["label"] == "metastatic" for s in studies) == round(6 * 0.4)
    images = json.loads(run_cli("images", "--json", db_path=db_path).stdout)
    assert len(images) == 12
    assert set(images[0]) == {"id", "study_id", "view", "source", "height", "width"}
    assert {i["view"] for i in images} == {"anterior", "posterior"}
    assert {(i["height"], i["width"]) for i in images} == {(1024, 256)}
    again = run_cli("demo", "--studies", "6", "--seed", "4", db_path=db_path)
    assert "added 0 demo studies (6 already present)" in again.stdout


def test_label_agreement_and_csv(db_path, tmp_path):
    run_cli("demo", "--studies", "3", "--seed", "5", db_path=db_path)
    ok = run_cli("label", "1", "--reviewer", "ann", "--metastatic", "--criteria", "typical_pattern,flare", "--note", "hot T7",
                 db_path=db_path)
    assert ok.returncode == 0, ok.stderr
    missing = run_cli("label", "2", "--reviewer", "ann", "--no-metastasis", db_path=db_path)
    assert missing.returncode == 2 and "tick at least one criterion" in missing.stderr
    excluded = run_cli("label", "2", "--reviewer", "ann", "--exclude", "medical_device", db_path=db_path)
    assert excluded.returncode == 0, excluded.stderr
    pairs = json.loads(run_cli("agreement", "--json", db_path=db_path).stdout)
    assert [p["reviewers"] for p in pairs] == [["ann", "reference"]]
    assert set(pairs[0]) >= {"reviewers", "n", "kappa", "kappa_ci95", "percent_agreement"}

    exported = tmp_path / "reviews.csv"
    assert run_cli("labels", "export", "--csv", str(exported), db_path=db_path).returncode == 0
    rows = list(csv.DictReader(exported.open()))
    assert [r["reviewer"] for r in rows].count("ann") == 2
    assert {"study_id", "reviewer", "decision", "label", "criteria", "exclusion_reason", "note", "created_at"} <= set(rows[0])

    sheet = tmp_path / "sheet.csv"
    sheet.write_text("study_id,reviewer,decision,label,criteria\n3,bob,include,metastatic,flare\n99,bob,include,metastatic,flare\n")
    result = run_cli("labels", "import", "--csv", str(sheet), db_path=db_path)
    assert result.returncode == 1
    assert "line 3: study 99 does not exist" in result.stderr
    assert "added 1 reviews" in result.stdout


def test_usage_errors_exit_2(db_path, tmp_path):
    assert run_cli("import", str(tmp_path / "nope"), db_path=db_path).returncode == 2
    assert run_cli("frobnicate", db_path=db_path).returncode == 2
    result = run_cli("import", db_path=db_path)
    assert result.returncode == 2 and "name files or folders" in result.stderr


def test_help_of_every_verb_renders():
    from bonescan_core.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse keeps them here
    assert {"init", "demo", "import", "images", "studies", "label", "labels", "agreement", "split", "train", "worker",
            "runs", "cancel", "evaluate", "predictions", "explain", "export"} <= set(verbs)
    for sub in verbs.values():
        sub.format_help()  # argparse %-formats every help string here: a stray "%" in one raises
    assert "usage: bonescan" in build_parser().format_help()


def test_every_error_of_the_family_is_one_line_and_exit_2(db_path, tmp_path):
    """Errors raised deep in the core (a missing run, a missing column, a duplicate run) reach the
    user as `bonescan VERB: sentence` with exit 2, through the one mapping in cli.main."""
    missing_run = [("cancel", "999"), ("evaluate", "999"), ("predictions", "999", "--csv", str(tmp_path / "p.csv")),
                   ("export", "999", "--out", str(tmp_path / "bundle"))]
    for args in missing_run:
        result = run_cli(*args, db_path=db_path)
        assert result.returncode == 2, args
        assert result.stderr.startswith(f"bonescan {args[0]}: run 999 does not exist; ") and result.stderr.count("\n") == 1
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("study,who\n1,ann\n")
    result = run_cli("labels", "import", "--csv", str(sheet), db_path=db_path)
    assert result.returncode == 2 and result.stderr.startswith("bonescan labels: ") and "missing columns" in result.stderr
    result = run_cli("account", "roles", "nobody", "--role", "reader", db_path=db_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
