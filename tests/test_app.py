"""AppTest: every page renders without an exception, empty and with demo data; the main
flows of the Scans and Review pages work through the widgets."""

import re

import pytest
from conftest import REPO
from streamlit.testing.v1 import AppTest

from bonescan_core import db as dbm
from bonescan_core import jobs, runs
from bonescan_core import review as rv
from bonescan_core.ingest import add_demo_studies

PAGES = ["app_pages/scans.py", "app_pages/review.py", "app_pages/agreement.py", "app_pages/train.py", "app_pages/evaluate.py"]
TIMEOUT = 60


def run_page(page: str, reviewer: str | None = None) -> AppTest:
    app = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=TIMEOUT)
    if reviewer:
        app.query_params["reviewer"] = reviewer
    app.run()
    if page != PAGES[0]:
        app.switch_page(page).run()
    return app


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_database(db_path, page):
    app = run_page(page, reviewer="ann")
    assert not app.exception, [e.value for e in app.exception]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_demo_data(db_path, page):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 4, seed=1)
    app = run_page(page, reviewer="ann")
    assert not app.exception, [e.value for e in app.exception]


def test_scans_page_loads_the_demo_dataset(db_path):
    app = run_page(PAGES[0])
    app.number_input(key="demo_studies").set_value(10)
    app.button(key="load_demo").click().run()
    assert not app.exception
    assert any("Added 10 demo studies" in s.value for s in app.success)
    assert any("Studies (10)" in h.value for h in app.subheader)
    with dbm.opened(db_path) as db:
        assert db["studies"].count == 10 and db["images"].count == 20


def test_review_tick_criterion_and_save(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 3, seed=2)
    app = run_page(PAGES[1], reviewer="ann")
    first = app.session_state["rv_study"]
    app.checkbox(key=f"rv_{first}_typical_pattern").check()
    app.button(key="rv_metastatic").click().run()
    assert not app.exception
    with dbm.opened(db_path) as db:
        rows = [r for r in rv.history(db, first) if r["reviewer"] == "ann"]
    assert len(rows) == 1 and (rows[0]["label"], rows[0]["criteria"]) == ("metastatic", "typical_pattern")
    assert app.session_state["rv_study"] != first, "a save moves on to the next study"


def test_review_without_criterion_shows_error_and_stores_nothing(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 2, seed=3)
    app = run_page(PAGES[1], reviewer="ann")
    first = app.session_state["rv_study"]
    app.button(key="rv_no_metastasis").click().run()
    assert any("tick at least one criterion" in e.value for e in app.error)
    with dbm.opened(db_path) as db:
        assert not [r for r in rv.history(db, first) if r["reviewer"] == "ann"]
    assert app.session_state["rv_study"] == first


def test_review_page_asks_for_a_name(db_path):
    app = run_page(PAGES[1])
    assert any("Enter your name" in w.value for w in app.warning)


def test_train_page_enqueues_one_run_per_backbone_and_refuses_duplicates(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")  # the test checks the queue, not a worker
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=4)
    app = run_page("app_pages/train.py", reviewer="ann")
    app.multiselect(key="tr_backbones").set_value(["resnet50", "vgg19"])
    app.radio(key="tr_weights").set_value("none")
    app.selectbox(key="tr_mode").set_value("full")
    app.number_input(key="tr_epochs").set_value(2)
    app.get("form_submit_button")[0].click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("queued" in s.value for s in app.success)
    with dbm.opened(db_path) as db:
        queued = runs.list_runs(db)
    assert [(r.backbone, r.status) for r in queued] == [("vgg19", "queued"), ("resnet50", "queued")]
    assert queued[0].settings.split_id == queued[1].settings.split_id is not None
    assert (queued[0].settings.weights, queued[0].settings.mode, queued[0].settings.epochs) == ("none", "full", 2)
    app.get("form_submit_button")[0].click()
    app.run()
    assert any("already queued" in s.value for s in app.success)
    with dbm.opened(db_path) as db:
        assert len(runs.list_runs(db)) == 2


def test_train_page_queues_repeats_as_one_group_per_backbone(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 16, seed=4)
    app = run_page("app_pages/train.py", reviewer="ann")
    app.multiselect(key="tr_backbones").set_value(["resnet50", "vgg19"])
    app.radio(key="tr_weights").set_value("none")
    app.selectbox(key="tr_mode").set_value("full")
    app.number_input(key="tr_seed").set_value(5)
    app.number_input(key="tr_repeats").set_value(2)
    app.checkbox(key="tr_resplit").check()
    app.get("form_submit_button")[0].click()
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    with dbm.opened(db_path) as db:
        queued = sorted(runs.list_runs(db), key=lambda r: r.id)
    assert [(r.backbone, r.settings.seed) for r in queued] == [("resnet50", 5), ("vgg19", 5), ("resnet50", 6), ("vgg19", 6)]
    assert [r.repeat_group for r in queued] == [queued[0].id, queued[1].id, queued[0].id, queued[1].id]
    assert queued[0].split_id == queued[1].split_id != queued[2].split_id == queued[3].split_id  # a split per repeat
    assert any(f"repeat group {queued[0].id}" in s.value for s in app.success)
def test_train_page_offline_says_so_before_train_and_offers_training_from_scratch(db_path, monkeypatch):
    from bonescan_core import availability, models

    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    offline = dict.fromkeys((n for n in models.BACKBONES if availability.has_imagenet(n)), False)
    monkeypatch.setattr(availability, "imagenet_available", lambda: offline)
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=4)
    app = run_page("app_pages/train.py", reviewer="ann")
    assert not app.exception, [e.value for e in app.exception]
    assert any("ImageNet weights are not available here" in w.value for w in app.warning), "said before Train is pressed"
    assert "imagenet" not in app.radio(key="tr_weights").options
    assert app.radio(key="tr_weights").value == "none" and app.selectbox(key="tr_mode").value == "full"
    expected = ["scintinet"] if "scintinet" in models.BACKBONES else list(offline)
    assert app.multiselect(key="tr_backbones").value == expected


def test_train_page_refuses_imagenet_runs_that_cannot_get_their_weights(db_path, monkeypatch):
    from bonescan_core import availability

    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    monkeypatch.setattr(availability, "imagenet_available", lambda: {"resnet50": False, "vgg19": True, "densenet121": False})
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 12, seed=4)
    app = run_page("app_pages/train.py", reviewer="ann")
    assert any("resnet50" in w.value and "not available" in w.value for w in app.warning)
    assert app.multiselect(key="tr_backbones").value == ["vgg19"] and app.radio(key="tr_weights").value == "imagenet"
    app.multiselect(key="tr_backbones").set_value(["vgg19", "resnet50"])
    app.get("form_submit_button")[0].click()
    app.run()
    assert any("resnet50" in e.value for e in app.error), [e.value for e in app.error]
    with dbm.opened(db_path) as db:
        assert runs.list_runs(db) == [], "nothing enqueued that would fail with WeightsUnavailable"


def test_train_page_shows_passes_by_their_own_count_and_maps_still_to_come(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    with dbm.opened(db_path) as db:
        done = jobs.enqueue(db, "resnet50", {"backbone": "resnet50", "mode": "full", "epochs": 3}, "done run")
        running = jobs.enqueue(db, "vgg19", {"backbone": "vgg19", "mode": "full", "epochs": 3}, "running run")
        with dbm.write(db):
            db["runs"].update(done, {"status": "done", "threshold": 0.4, "images_per_second": 2.0,
                                     "progress": '{"phase": "explaining", "batch": 2, "batches": 5}'})
            db["runs"].update(running, {"status": "running", "heartbeat_at": dbm.utc_now(),
                                        "progress": '{"phase": "predicting", "epoch": 0, "batch": 3, "batches": 10}'})
    app = run_page("app_pages/train.py", reviewer="ann")
    assert not app.exception, [e.value for e in app.exception]
    bars = [element.proto.text for element in app.get("progress")]
    assert bars == ["predicting: 3/10"], "a prediction pass is not an epoch"
    assert any("Grad-CAM maps ready for 2 of 5 studies" in caption.value for caption in app.caption)


TEXT_ELEMENTS = ("markdown", "caption", "title", "header", "subheader", "error", "warning", "info", "success", "toast")


@pytest.mark.parametrize("page", PAGES)
def test_reader_names_and_notes_are_not_rendered_as_markdown(db_path, page):
    """A reader named like an image link must not make every viewer's browser fetch the URL:
    wherever a page shows the name (or a note) as Markdown, it is escaped."""
    evil = "![x](http://127.0.0.1:9/x.png)"
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 2, seed=11)
        studies = [row[0] for row in db.execute("SELECT id FROM studies ORDER BY id")]
        for study in studies:  # two readers who disagree: the Agreement page names both
            rv.add_review(db, rv.Review(study, evil, "include", "metastatic", ("flare",), note=evil))
            rv.add_review(db, rv.Review(study, "bob", "include", "non_metastatic", ("trauma",), note=evil))
        rv.set_adjudicator(db, evil)
    app = run_page(page, reviewer=evil)
    assert not app.exception, [e.value for e in app.exception]
    shown = [element.value for kind in TEXT_ELEMENTS for element in app.get(kind)]
    assert not [text for text in shown if re.search(r"(?<!\\)!\[", text)], "an unescaped image link"
    if page.endswith("agreement.py"):  # the names are there, escaped
        assert any(r"\!\[x\]\(http\:\/\/127\.0\.0\.1\:9\/x\.png\)" in text for text in shown)


def test_evaluate_compare_tab_respects_a_stored_threshold_of_zero(db_path):
    """A run whose validation-chosen threshold is 0.0 is compared at 0.0 (everything
    metastatic: recall 1, specificity 0), not at the 0.5 fallback for runs without one."""
    from test_evaluation import populate

    with dbm.opened(db_path) as db:
        (at_zero, _), _, _ = populate(db, n_patients=12, seed=3, runs=(("densenet121", 0.0, 1.5), ("vgg19", None, 0.6)))
    app = run_page("app_pages/evaluate.py", reviewer="ann")
    assert not app.exception, [e.value for e in app.exception]
    (table,) = [frame.value for frame in app.dataframe if "run" in frame.value.columns]
    row = table[table["run"] == f"DenseNet121 (run {at_zero})"].iloc[0]
    assert row["Recall (sensitivity)"] == 1.0


def test_review_page_not_screening_refuses_a_label_and_excludes(db_path):
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 3, seed=2)
    app = run_page(PAGES[1], reviewer="ann")
    first = app.session_state["rv_study"]
    app.radio(key=f"rv_{first}_screening").set_value("no")
    app.checkbox(key=f"rv_{first}_typical_pattern").check()
    app.button(key="rv_metastatic").click().run()
    # the page shows review errors Markdown-escaped (they may quote a typed name): compare unescaped
    assert any("not metastasis screening: use Exclude" in e.value.replace("\\", "") for e in app.error)
    assert app.session_state["rv_study"] == first
    app.button(key="rv_exclude").click().run()
    assert not app.exception
    with dbm.opened(db_path) as db:
        rows = [(r["decision"], r["exclusion_reason"]) for r in rv.history(db, first) if r["reviewer"] == "ann"]
    assert rows == [("exclude", "non_screening_indication")]


def test_scans_page_filters_through_catalog(db_path):
    """The study filters are catalog.filter_studies: a missing value is its own choice."""
    from bonescan_core import catalog

    with dbm.opened(db_path) as db:
        add_demo_studies(db, 5, seed=6)
        table = catalog.study_table(db)
    rows = [{**table[0], "label": None, "sex": None}, *table[1:]]
    assert catalog.filter_options(rows)["label"] == ["metastatic", "non_metastatic", "none"]
    assert "unknown" in catalog.filter_options(rows)["sex"]
    assert catalog.filter_studies(rows, {"label": ["none"]}) == [rows[0]]
    assert catalog.filter_studies(rows, {"label": [], "sex": ["unknown"], "origin": [rows[0]["origin"]]}) == [rows[0]]
    assert catalog.filter_studies(rows, {}) == rows
    metastatic = [r for r in table if r["label"] == "metastatic"]
    app = run_page(PAGES[0])
    app.multiselect(key="filter_label").set_value(["metastatic"]).run()
    assert not app.exception
    assert any(f"{len(metastatic)} studies)" in e.label for e in app.expander)


def test_train_and_agreement_cards_count_through_catalog(db_path, monkeypatch):
    monkeypatch.setenv("BONESCAN_AUTOSTART_WORKER", "0")
    from bonescan_core import catalog, splits

    with dbm.opened(db_path) as db:
        add_demo_studies(db, 16, seed=4)
        # ann's exclusion disagrees with the reference label: study 1 waits, outside the split
        rv.add_review(db, rv.Review(study_id=1, reviewer="ann", decision="exclude", exclusion_reason="poor_quality"))
        split = splits.get_split(db, splits.ensure_split(db, seed=0))
        studies = catalog.list_studies(db)
    metastatic = sum(s["label"] == "metastatic" for s in studies)
    app = run_page("app_pages/train.py", reviewer="ann")
    cards = {m.label: m.value for m in app.metric}
    assert cards["Included, metastatic"] == str(metastatic)
    assert cards["Included, no metastasis"] == str(sum(s["label"] == "non_metastatic" for s in studies))
    assert cards["Waiting for adjudication"] == "1"
    label = {s["id"]: s["label"] for s in studies}
    expected = "; ".join(f"{name} {len(ids)} studies ({sum(label[i] == 'metastatic' for i in ids)} metastatic)"
                         for name, ids in split["subsets"].items())
    assert f"Current split {split['id']} (grouped by patient; stratified): {expected}" in [c.value for c in app.caption]
    app.switch_page("app_pages/agreement.py").run()
    cards = {m.label: m.value for m in app.metric}
    assert (cards["Studies"], cards["With a training label"], cards["Excluded"]) == ("16", "15", "0")


def test_cached_study_pages_never_show_a_stale_label(db_path):
    """The Scans, Agreement and Train pages cache what they derive from every study under the
    data version: a review stored between two reruns shows on the next one."""
    with dbm.opened(db_path) as db:
        add_demo_studies(db, 3, seed=2)
    app = run_page(PAGES[0])
    labels = app.dataframe[-1].value.set_index("study")["label"]
    first = int(labels.index[0])
    flipped = "non_metastatic" if labels.loc[first] == "metastatic" else "metastatic"
    app.switch_page("app_pages/agreement.py").run()
    assert {m.label: m.value for m in app.metric}["Waiting for adjudication"] == "0"
    with dbm.opened(db_path) as db:  # a second reader disagrees with the reference on one study
        criterion = "typical_pattern" if flipped == "metastatic" else "no_abnormal_uptake"
        rv.add_review(db, rv.Review(study_id=first, reviewer="bob", decision="include", label=flipped,
                                    criteria=(criterion,)))
    app.run()
    assert {m.label: m.value for m in app.metric}["Waiting for adjudication"] == "1"
    app.switch_page(PAGES[0]).run()
    assert app.dataframe[-1].value.set_index("study")["label"].loc[first] == ""  # no training label while they disagree
