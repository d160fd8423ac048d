"""The `bonescan` command as scripts use it: verbs, JSON fields and exit codes of docs/cli.md."""

import csv
import json
import sys

import pytest
from conftest import REPO, run_cli


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


GOLDEN = REPO / "tests" / "golden"


def test_evaluate_output_is_byte_for_byte_what_it_was(db_path):
    """``evaluate`` (text and --json) on a fixed database prints exactly tests/golden: scripts parse it.
    Rewritten deliberately for issue 11: the default unit is the study (the contract's fields kept,
    ``unit``, ``threshold_rule``, ``threshold_target``, ``image_level`` and ``notes`` added).
    Run 1's stored threshold is 0.0 (kept, not replaced by 0.5); run 2 has none (0.5)."""
    from test_evaluation import populate

    from bonescan_core import db as dbm

    with dbm.opened(db_path) as db:
        assert populate(db, n_patients=12, seed=3, runs=(("densenet121", 0.0, 1.5), ("vgg19", None, 0.6)))[0] == [1, 2]
    for run in (1, 2):
        as_json = run_cli("evaluate", str(run), "--json", db_path=db_path)
        assert as_json.returncode == 0, as_json.stderr
        assert as_json.stdout == (GOLDEN / f"evaluate-run{run}.json").read_text()
        assert run_cli("evaluate", str(run), db_path=db_path).stdout == (GOLDEN / f"evaluate-run{run}.txt").read_text()
    fields = json.loads((GOLDEN / "evaluate-run1.json").read_text())
    assert list(fields)[:10] == ["run", "backbone", "threshold", "threshold_source", "subset", "n_images", "n_studies",
                                 "n_patients", "metrics", "confusion"]
    assert (fields["threshold"], fields["threshold_source"]) == (0.0, "run")
    assert (fields["unit"], fields["threshold_rule"]) == ("study", "youden")
    assert fields["metrics"] == fields["study_level"]["metrics"] and "metrics" in fields["image_level"]


def test_train_queue_shares_the_split_and_refuses_a_duplicate(db_path):
    run_cli("demo", "--studies", "12", "--seed", "4", db_path=db_path)
    options = ("--weights", "none", "--mode", "full", "--epochs", "1", "--queue")
    first = run_cli("train", "--backbone", "resnet50", *options, db_path=db_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("train", "--backbone", "vgg19", *options, db_path=db_path)
    again = run_cli("train", "--backbone", "resnet50", *options, db_path=db_path)
    assert again.returncode == 2 and f"already queued (run {first.stdout.strip()})" in again.stderr
    runs = json.loads(run_cli("runs", "--json", db_path=db_path).stdout)
    assert [(r["backbone"], r["status"]) for r in runs] == [("vgg19", "queued"), ("resnet50", "queued")]
    assert runs[0]["split_id"] == runs[1]["split_id"] is not None
    assert str(runs[0]["id"]) == second.stdout.strip()


def test_terminal_progress_line_is_the_pages_text(monkeypatch):
    """A prediction pass is not an epoch: the CLI printed 'predicting epoch -/20' where the page said 'predicting: 3/10'."""
    import io

    from bonescan_core import cli
    from bonescan_core.results import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    fields = {"phase": "predicting", "epoch": None, "epochs": 20, "batch": 3, "batches": 10}
    monkeypatch.setattr("sys.stderr", Terminal())
    cli._terminal_progress(fields)
    line = sys.stderr.getvalue()
    assert line.strip() == "predicting: 3/10" == Progress.from_record(fields).format()
    training = Progress.from_record({"phase": "finetune", "epoch": 3, "epochs": 20, "batch": 5, "batches": 10,
                                     "loss": 0.41234, "eta_s": 90})
    assert training.format() == "finetune: epoch 3/20, batch 5/10, loss 0.4123, about 1.5 min left"
    assert training.fraction() == pytest.approx(2.5 / 20)
    assert Progress.from_record(None, epochs=20).format() == "starting"


def test_label_applies_the_screening_rule_of_the_review_page(db_path, tmp_path):
    """A study whose indication is not metastasis screening can only be excluded (paper's rule)."""
    run_cli("demo", "--studies", "3", "--seed", "5", db_path=db_path)
    refused = run_cli("label", "1", "--reviewer", "ann", "--metastatic", "--criteria", "typical_pattern", "--not-screening",
                      db_path=db_path)
    assert refused.returncode == 2 and "not metastasis screening: use Exclude" in refused.stderr
    excluded = run_cli("label", "1", "--reviewer", "ann", "--not-screening", db_path=db_path)
    assert excluded.returncode == 0, excluded.stderr
    assert "study 1 excluded (non_screening_indication) by ann" in excluded.stdout
    other_reason = run_cli("label", "2", "--reviewer", "ann", "--exclude", "poor_quality", "--not-screening", db_path=db_path)
    assert other_reason.returncode == 0, other_reason.stderr
    assert run_cli("label", "3", "--reviewer", "ann", db_path=db_path).returncode == 2  # no decision at all
    exported = tmp_path / "reviews.csv"
    run_cli("labels", "export", "--csv", str(exported), db_path=db_path)
    mine = [(r["study_id"], r["decision"], r["label"], r["exclusion_reason"]) for r in csv.DictReader(exported.open())
            if r["reviewer"] == "ann"]
    assert mine == [("1", "exclude", "", "non_screening_indication"), ("2", "exclude", "", "poor_quality")]
