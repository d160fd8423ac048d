"""The ``bonescan`` command: headless versions of what the pages do (contract: ``docs/cli.md``).

Exit status: 0 success; 1 the verb ran but some items failed (each reported); 2 usage
error or nothing could be done. Errors go to stderr, one line each, saying what to do:
:func:`main` maps the whole error family (:class:`errors.BonescanError`) to exit 2 in one
place, so verbs raise and never catch.
Light verbs start fast: the core modules that are quick to import are imported at the top;
the slow ones (``ingest``: pydicom; ``report``: plotly; ``jobs`` and ``explain``: the training
stack) are named at the top too, through :func:`bonescan_core.heavy.lazy_module`, and load only
when a verb uses them. TensorFlow, Keras and JAX load only through :mod:`bonescan_core.heavy`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bonescan_core import accounts, assessment, catalog, comparison, errors, imagecache, runs, splits
from bonescan_core import db as dbm
from bonescan_core.agreement import pairwise
from bonescan_core.errors import BonescanError, InputError
from bonescan_core.heavy import lazy_module
from bonescan_core.preprocess import VIEW_MODES
from bonescan_core.results import Progress
from bonescan_core.review import QUEUE_ORDERS, Review, add_review, export_reviews_csv, import_reviews_csv, set_adjudicator
from bonescan_core.runs import TrainConfig

# The one lazy place: slow to import, loaded on a verb's first use (see the module docstring).
ingest = lazy_module("bonescan_core.ingest")
phantom = lazy_module("bonescan_core.phantom")
report = lazy_module("bonescan_core.report")
jobs = lazy_module("bonescan_core.jobs")
explain = lazy_module("bonescan_core.explain")
prediction = lazy_module("bonescan_core.prediction")
external = lazy_module("bonescan_core.external")
assist = lazy_module("bonescan_core.assist")

if TYPE_CHECKING:  # annotations only
    from bonescan_core.ingest import ProgressStep

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
# assist.QUEUE_ORDERS without importing assist (it brings the prediction stack) to build the parser.
QUEUE_ORDER_NAMES = [*QUEUE_ORDERS, "label_errors"]


class CommandError(InputError):
    """A command line that cannot be carried out (a missing argument, an option out of range); exit 2."""


def _progress_printer(label: str):
    """A progress callback that redraws one stderr line (only on a terminal)."""
    if not sys.stderr.isatty():
        return None

    def show(step: ProgressStep) -> None:
        width = 30
        filled = int(width * step.done / max(step.total, 1))
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {step.text():<44} {step.name[:30]:<30}")
        if step.done == step.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cmd_init(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        print(f"{dbm.resolve_path(args.db)}: schema {dbm.schema_version(db)}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if args.studies < 1:
        raise CommandError("--studies must be at least 1")
    with dbm.opened(args.db) as db:
        outcomes = ingest.add_demo_studies(db, args.studies, args.seed, progress=_progress_printer("demo"), cohort=args.cohort,
                                           shift=phantom.OTHER_SCANNER if args.shift else None)
    added = sum(o.status == "imported" for o in outcomes)
    print(f"added {added} demo studies ({len(outcomes) - added} already present), seed {args.seed}, cohort {args.cohort}"
          + (", another scanner" if args.shift else ""))
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths]
    if not paths and not args.manifest:
        raise CommandError("name files or folders to import, or a --manifest CSV")
    if args.jobs is not None and args.jobs < 1:
        raise CommandError("--jobs must be at least 1")
    with dbm.opened(args.db) as db:
        outcomes = ingest.import_files(
            db,
            paths,
            label_from_folder=args.label_from_folder,
            manifest=Path(args.manifest) if args.manifest else None,
            reviewer=args.reviewer,
            progress=_progress_printer("import"),
            keep_file_names=args.keep_file_names,
            cohort=args.cohort,
            jobs=args.jobs,
        )
    if not outcomes:
        raise CommandError("no files found under the given paths")
    for outcome in outcomes:
        print(outcome.line())
    return EXIT_SOME_FAILED if any(o.status == "rejected" for o in outcomes) else EXIT_OK


def cmd_images(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        rows = catalog.list_images(db)
    _print_rows(rows, args.json, ["id", "study_id", "view", "source", "height", "width"])
    return EXIT_OK


def cmd_studies(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        rows = catalog.list_studies(db)
    _print_rows(rows, args.json, ["id", "patient_id", "n_images", "label", "included"])
    return EXIT_OK


def _split_ids(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").replace(";", ",").split(",") if part.strip())


def cmd_label(args: argparse.Namespace) -> int:
    if args.exclude or (args.not_screening and not (args.metastatic or args.no_metastasis)):
        decision, label = "exclude", None  # not screening and no decision: excluded as non_screening_indication
    elif args.metastatic or args.no_metastasis:
        decision, label = "include", "metastatic" if args.metastatic else "non_metastatic"
    else:
        raise CommandError("choose --metastatic, --no-metastasis or --exclude REASON")
    review = Review(
        study_id=args.study, reviewer=args.reviewer, decision=decision, label=label,
        criteria=_split_ids(args.criteria), exclusion_reason=args.exclude, artifacts=_split_ids(args.artifacts),
        confidence=args.confidence, note=args.note or "", adjudication=args.adjudication,
        screening=not args.not_screening,
    ).as_saved()
    with dbm.opened(args.db) as db:
        review_id = add_review(db, review)
    print(f"review {review_id}: study {args.study} {label or f'excluded ({review.exclusion_reason})'} by {args.reviewer}")
    return EXIT_OK


def cmd_labels(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        if args.action == "export":
            count = export_reviews_csv(db, Path(args.csv))
            print(f"exported {count} reviews to {args.csv}")
            return EXIT_OK
        result = import_reviews_csv(db, Path(args.csv))
    for error in result.errors:
        print(f"{args.csv} {error}", file=sys.stderr)
    print(f"added {result.added} reviews, {result.duplicates} duplicates skipped, {len(result.errors)} rows rejected")
    if result.errors and not result.added and not result.duplicates:
        return EXIT_USAGE
    return EXIT_SOME_FAILED if result.errors else EXIT_OK


def cmd_queue(args: argparse.Namespace) -> int:
    if args.order == "unread" and not args.reviewer:
        raise CommandError("order unread is per reader: name them with --reviewer NAME")
    with dbm.opened(args.db) as db:
        queue = assist.reading_queue(db, args.reviewer or "", args.order, run_id=args.run)
    rows = [{"study_id": study_id, "score": None if score is None else round(score, 4)} for study_id, score in queue]
    _print_rows(rows, args.json, ["study_id", "score"])
    return EXIT_OK


def cmd_agreement(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        pairs = pairwise(db)
    if args.json:
        _print_json([pair.as_json() for pair in pairs])
        return EXIT_OK
    if not pairs:
        print("no two readers have read the same study yet")
    for pair in pairs:
        kappa = "n/a" if pair.kappa is None else f"{pair.kappa:.3f}"
        ci = "" if pair.kappa_ci95 is None else f" (95% CI {pair.kappa_ci95[0]:.3f} to {pair.kappa_ci95[1]:.3f})"
        agree = "n/a" if pair.percent_agreement is None else f"{pair.percent_agreement:.1f}%"
        print(f"{pair.reviewers[0]} vs {pair.reviewers[1]}: n={pair.n}, agreement {agree}, kappa {kappa}{ci}, "
              f"{len(pair.disagreements)} disagreements")
    return EXIT_OK


def cmd_adjudicator(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        if accounts.sign_in_required(db):
            raise CommandError("sign-in is on, so adjudicators are the accounts with the adjudicator role: "
                               f"use `bonescan account roles {args.name} --role adjudicator` (with their other roles)")
        set_adjudicator(db, args.name, not args.remove)
    print(f"{args.name} {'is no longer' if args.remove else 'is now'} an adjudicator")
    return EXIT_OK


def cmd_split(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        split_id = splits.make_split(db, seed=args.seed, test=args.test, val=args.val, cohorts=args.cohort)
        result = splits.get_split(db, split_id)
        result["near_duplicates"] = splits.near_duplicates(db, split_id)
    if args.json:
        _print_json(result)
    else:
        sizes = ", ".join(f"{len(ids)} {name}" for name, ids in result["subsets"].items())
        print(f"split {split_id}: {sizes} studies (seed {args.seed}, cohorts {', '.join(result['cohorts'])}, "
              f"grouped by {result['grouping']})", file=sys.stderr)
        if result["near_duplicates"]:
            print(f"split {split_id}: {len(result['near_duplicates'])} near-duplicate image pair(s) across subsets "
                  "(`split --json` lists them); check them before training", file=sys.stderr)
        print(split_id)
    return EXIT_OK


def parse_size(text: str) -> tuple[int, int]:
    """``646x220`` -> (646, 220): height x width."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 646x220") from error
    return height, width


def train_config(args: argparse.Namespace):
    """The TrainConfig the train options describe (no Keras import)."""
    optional = {"augment": {}} if args.no_augment else {}  # default: the paper's augmentation
    return TrainConfig(
        backbone=args.backbone, weights=args.weights, mode=args.mode, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, image_size=args.image_size, seed=args.seed, split_id=args.split,
        view_mode=args.view_mode, max_train_images=args.max_train_images, class_weights=args.class_weights,
        calibration=args.calibration, deterministic=args.deterministic, threshold_rule=args.threshold_rule,
        threshold_target=args.threshold_target, study_aggregate=args.study_aggregate, lr_schedule=args.lr_schedule,
        **optional,
    )


def _terminal_progress(fields: dict) -> None:
    """Redraw the run's progress line on stderr (only on a terminal)."""
    if not sys.stderr.isatty():
        return
    sys.stderr.write(f"\r{Progress.from_record(fields).format():<80}")
    sys.stderr.flush()


def cmd_train(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise CommandError("--repeats must be at least 1")
    config = train_config(args)
    db_path = dbm.resolve_path(args.db)
    with dbm.opened(db_path) as db:  # the split is fixed now, so backbones queued later share it
        queued = jobs.enqueue_backbones(db, [config.backbone], config, repeats=args.repeats, resplit=args.resplit)
    new = [q for q in queued if q.run_id is not None]
    if not new:  # every run has an identical one waiting
        raise queued[0].duplicate
    for q in queued:
        if q.duplicate:
            print(f"seed {q.seed}: {q.duplicate}", file=sys.stderr)
    if args.queue:
        for q in new:
            print(f"queued run {q.run_id}" + (f" (seed {q.seed}, repeat group {q.repeat_group})" if q.repeat_group else "")
                  + "; `bonescan worker` trains it", file=sys.stderr)
            print(q.run_id)
        return EXIT_OK
    statuses = [_train_in_foreground(db_path, q.run_id, explain_maps=args.maps == "wait") for q in new]
    return EXIT_OK if all(status == "done" for status in statuses) else EXIT_SOME_FAILED


def _train_in_foreground(db_path: Path, run_id: int, explain_maps: bool) -> str:
    """Train one queued run here with a progress line; print its summary (stderr) and id (stdout).
    Without ``explain_maps`` it returns once the run is stored: the Grad-CAM maps follow."""
    with dbm.opened(db_path) as db:
        run = jobs.claim_next(db, run_id)
    status = jobs.execute_run(db_path, run, echo=_terminal_progress, explain_maps=explain_maps)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    with dbm.opened(db_path) as db:
        run = runs.get(db, run_id)
    summary = f"run {run_id}: {status}"
    if status == "done":
        summary += (f", threshold {run.results.threshold:.3f}, {run.results.images_per_second:.1f} training images/s "
                    f"on {run.results.device}")
    elif run.error:
        summary += f": {run.error}"
    print(summary, file=sys.stderr)
    if status == "done" and not explain_maps:
        print(f"run {run_id}: Grad-CAM maps follow: made on first view, or by a running `bonescan worker`",
              file=sys.stderr)
    print(run_id, flush=True)
    return status


def _study_id_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _split_ids(text)]
    except ValueError as error:
        raise CommandError(f"--studies takes study ids separated by commas, e.g. 12,13; got {text!r}") from error


def prediction_rows(db, job) -> list[dict]:
    """One dict per study of a finished prediction job: ``study_id, cohort, label`` (1, 0 or None),
    ``probability``, ``raw_probability`` (None: the run is not calibrated) and ``predicted``
    (1 when probability >= the run's study threshold)."""
    run = runs.get(db, job.run_id)
    threshold = external.run_thresholds(db, run)["study"]
    wanted = set(job.study_ids)
    cohort_of = dict(db.execute("SELECT id, cohort FROM studies").fetchall())
    data = runs.study_predictions(db, job.run_id, "external")
    calibrated = (run.results.facts.get("calibration") or {}).get("method", "none") != "none"
    rows = []
    for i, study_id in enumerate(data["study_id"].tolist()):
        if study_id not in wanted:
            continue
        label, probability = data["label"][i], float(data["probability"][i])
        rows.append({"study_id": study_id, "cohort": cohort_of[study_id], "label": None if np.isnan(label) else int(label),
                     "probability": round(probability, 6),
                     "raw_probability": round(float(data["raw_probability"][i]), 6) if calibrated else None,
                     "predicted": int(probability >= threshold)})
    return rows


def cmd_predict(args: argparse.Namespace) -> int:
    db_path = dbm.resolve_path(args.db)
    study_ids = _study_id_list(args.studies) if args.studies is not None else None
    with dbm.opened(db_path) as db:
        job_id = prediction.enqueue(db, args.run, cohort=args.cohort, study_ids=study_ids, unread=args.unread)
    if args.queue:
        print(f"queued prediction job {job_id}; `bonescan worker` runs it", file=sys.stderr)
        if args.json:
            _print_json({"job": job_id, "status": "queued"})
        else:
            print(job_id)
        return EXIT_OK
    with dbm.opened(db_path) as db:
        job = prediction.claim_next(db, job_id)
    if job is None:  # a worker that was already running took it between the two steps
        raise errors.Conflict(f"prediction job {job_id} was taken by a running worker; it runs there "
                              "(follow it on the Evaluate page's External cohort tab)")
    status = jobs.execute_prediction(db_path, job, echo=_terminal_progress)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    with dbm.opened(db_path) as db:
        job = prediction.get_job(db, job_id)
        rows = prediction_rows(db, job)
        thresholds = external.run_thresholds(db, runs.get(db, job.run_id))
    result = job.result or {}
    summary = f"prediction job {job_id}: {status}"
    if status == "done":
        summary += (f", {result['n_studies']} studies ({result['n_images']} images, {result['n_labelled']} labelled), "
                    f"{result['images_per_second']} images/s, {result['explained']} Grad-CAM maps")
    elif job.error:
        summary += f": {job.error}"
    print(summary, file=sys.stderr)
    if args.json:
        _print_json({"job": job_id, "run": job.run_id, "status": status, "selection": job.selection,
                     "thresholds": thresholds, **result, "studies": rows})
    else:
        _print_rows(rows, False, ["study_id", "cohort", "label", "probability", "predicted"])
    return EXIT_OK if status == "done" else EXIT_SOME_FAILED


def cmd_predictions(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        text = report.predictions_csv(db, args.run, unit=args.unit)
    Path(args.csv).write_text(text)
    print(f"wrote {text.count(chr(10)) - 1} predictions to {args.csv}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.cohort is not None and args.threshold is not None:
        raise CommandError("--cohort always evaluates at the thresholds chosen on the run's validation set; leave out --threshold")
    with dbm.opened(args.db) as db:
        result = assessment.evaluate(db, args.run, threshold=args.threshold, unit=args.unit, cohort=args.cohort)
    if args.json:
        _print_json(result.as_json())
        return EXIT_OK
    print(result.format_text())
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        result = comparison.compare_runs(db, args.runs, n_resamples=args.resamples, seed=args.seed)
    if args.json:
        _print_json(result)
        return EXIT_OK
    print(comparison.format_text(result))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    if not args.out and not args.json:
        raise CommandError("choose --out FILE.png (the overlay), --json (probability and map peak), or both")
    db_path = dbm.resolve_path(args.db)
    with dbm.opened(db_path) as db:
        out = explain.explain_png(db, db_path, args.run, args.image, Path(args.out), opacity=args.opacity) if args.out else None
        summary = explain.explain_summary(db, db_path, args.run, args.image) if args.json else None
    if out is not None:
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    if summary is not None:
        _print_json(summary)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    db_path = dbm.resolve_path(args.db)
    with dbm.opened(db_path) as db:
        files = report.export_bundle(db, db_path, args.run, Path(args.out))
    for path in files:
        print(path)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # a run in progress is recorded as interrupted, not left "running"

    signal.signal(signal.SIGTERM, stop)
    db_path = dbm.resolve_path(args.db)
    dbm.connect(db_path).close()  # create/migrate before the loop
    done = jobs.run_worker(db_path, once=args.once, idle_exit_s=args.idle_exit, echo=lambda line: print(line, flush=True))
    print(f"worker: {done} run(s) processed", flush=True)
    return EXIT_OK


def cmd_runs(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        rows = [run.to_json() for run in runs.list_runs(db)]
    _print_rows(rows, args.json, ["id", "backbone", "status", "device", "images_per_second", "threshold", "error"])
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    cache = imagecache.ImageCache.beside(dbm.resolve_path(args.db))
    if args.clear:
        removed = cache.clear()
        if args.json:
            _print_json(removed)
        else:
            print(f"removed {removed['removed_entries']} entries ({removed['removed_bytes'] / 1e6:.1f} MB) from {removed['path']}")
        return EXIT_OK
    summary = cache.summary()
    if args.json:
        _print_json(summary)
    else:
        sizes = ", ".join(f"{s['size']} v{s['version']}: {s['entries']}" for s in summary["sizes"]) or "empty"
        print(f"{summary['path']}: {summary['entries']} entries, {summary['bytes'] / 1e6:.1f} MB ({sizes})")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        status = jobs.request_cancel(db, args.run)
    if status == "cancelled":
        print(f"run {args.run}: cancelled")
    elif status == "running":
        print(f"run {args.run}: cancel requested; it stops within a few batches")
    else:
        print(f"run {args.run}: already {status}")
    return EXIT_OK


def _read_new_password(args: argparse.Namespace) -> str:
    """The new password: one line of stdin with ``--password-stdin``, else typed twice at a prompt."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CommandError("--password-stdin read no password; pipe one line, e.g. `printf '%s\\n' \"$PW\" | ...`")
        return password
    if not sys.stdin.isatty():
        raise CommandError("no terminal to type a password on; pass --password-stdin and pipe the password")
    try:
        password = getpass.getpass(f"New password for {args.name}: ")
        again = getpass.getpass("Type it again: ")
    except (EOFError, KeyboardInterrupt) as error:
        raise CommandError("no password given; nothing changed") from error
    if password != again:
        raise CommandError("the two passwords differ; nothing changed, try again")
    return password


def cmd_account(args: argparse.Namespace) -> int:
    with dbm.opened(args.db) as db:
        if args.action == "add":
            account = accounts.add_account(db, args.name, _read_new_password(args), args.role)
            print(f"account {account.name} added ({', '.join(account.roles)})")
            if not accounts.sign_in_required(db):
                print("sign-in is off; turn it on with `bonescan account sign-in on`", file=sys.stderr)
        elif args.action == "passwd":
            if accounts.get_account(db, args.name) is None:  # before asking for a password
                raise accounts.AccountError(f"no account named {args.name!r}; list them with `bonescan account list`")
            accounts.set_password(db, args.name, _read_new_password(args))
            print(f"password of {args.name} changed")
        elif args.action == "roles":
            account = accounts.set_roles(db, args.name, args.role)
            print(f"{account.name}: {', '.join(account.roles)}")
        elif args.action in ("disable", "enable"):
            accounts.set_disabled(db, args.name, args.action == "disable")
            print(f"account {args.name} {args.action}d")
        elif args.action == "list":
            required = accounts.sign_in_required(db)
            rows = [a.as_json() for a in accounts.list_accounts(db)]
            if not args.json:
                rows = [{**row, "roles": ",".join(row["roles"])} for row in rows]
            _print_rows(rows, args.json, ["name", "roles", "disabled", "created_at"])
            print(f"sign-in is {'on' if required else 'off'}", file=sys.stderr)
        elif args.state is None:  # sign-in, no argument: say where it stands
            print("on" if accounts.sign_in_required(db) else "off")
        else:
            accounts.set_sign_in(db, args.state == "on")
            print(f"sign-in is {args.state}" + (": the app now asks every visitor to sign in" if args.state == "on" else ""))
    return EXIT_OK


def _print_json(value: object) -> None:
    """One JSON document on stdout, newline-terminated (what ``--json`` prints)."""
    json.dump(value, sys.stdout)
    sys.stdout.write("\n")


def _print_rows(rows: list[dict], as_json: bool, columns: list[str]) -> None:
    if as_json:
        _print_json(rows)
        return
    print("\t".join(columns))
    for row in rows:
        print("\t".join("" if row[c] is None else str(row[c]) for c in columns))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used by the docs test)."""
    parser = argparse.ArgumentParser(
        prog="bonescan",
        description="Label whole-body bone scans, train and evaluate backbones (headless).",
    )
    parser.add_argument("--db", help="database file (default $BONESCAN_DB, else ./labels.db)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    verb = verbs.add_parser("init", help="create or migrate the database")
    verb.set_defaults(func=cmd_init)

    verb = verbs.add_parser("demo", help="add synthetic studies with reference labels")
    verb.add_argument("--studies", type=int, default=100, help="number of studies (default 100)")
    verb.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    verb.add_argument("--cohort", default="default", metavar="NAME", help="cohort of the new studies (default default)")
    verb.add_argument("--shift", action="store_true",
                      help="draw them as another scanner would: 896x224, 0.6x counts, read-out noise, gain 1.25 and offset 20")
    verb.set_defaults(func=cmd_demo)

    verb = verbs.add_parser("import", help="import TIFF, PNG, JPEG and DICOM files and folders")
    verb.add_argument("paths", nargs="*", metavar="PATH")
    verb.add_argument("--label-from-folder", action="store_true", help="record the class folder as a review")
    verb.add_argument("--manifest", metavar="CSV",
                      help="path, patient_id, study_id, view, label[, sex, age, primary_cancer, cohort, lesions]")
    verb.add_argument("--reviewer", default="import", help="name on folder/manifest label reviews (default import)")
    verb.add_argument("--keep-file-names", action="store_true",
                      help="store each file's original name (no folders), shown in the viewers, instead of a neutral "
                           "<format>-<hash>-<view> name; a name holding a manifest id or DICOM identifier stays neutral, "
                           "but a name or birth date alone is kept")
    verb.add_argument("--cohort", default="default", metavar="NAME",
                      help="cohort of new studies (default default); a manifest's cohort column wins per row")
    verb.add_argument("--jobs", type=int, metavar="N",
                      help="processes that decode files (default: one per CPU); 1 decodes in this process. "
                           "Results do not depend on it")
    verb.set_defaults(func=cmd_import)

    verb = verbs.add_parser("images", help="list images")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_images)

    verb = verbs.add_parser("studies", help="list studies with their training label")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_studies)

    verb = verbs.add_parser("label", help="append one review of a study")
    verb.add_argument("study", type=int, metavar="STUDY")
    verb.add_argument("--reviewer", required=True)
    decision = verb.add_mutually_exclusive_group()  # one of them, or --not-screening alone
    decision.add_argument("--metastatic", action="store_true")
    decision.add_argument("--no-metastasis", action="store_true")
    decision.add_argument("--exclude", metavar="REASON", help="an exclusion reason id (see docs/cli.md)")
    verb.add_argument("--not-screening", action="store_true",
                      help="the indication is not metastasis screening: the study can only be excluded "
                           "(alone: excluded as non_screening_indication)")
    verb.add_argument("--criteria", metavar="C,...", help="criterion ids, comma-separated")
    verb.add_argument("--artifacts", metavar="A,...", help="injection_site, urine_contamination, other_artifact")
    verb.add_argument("--confidence", type=int, choices=range(1, 6), metavar="1-5")
    verb.add_argument("--note")
    verb.add_argument("--adjudication", action="store_true", help="record the consensus (adjudicators only)")
    verb.set_defaults(func=cmd_label)

    verb = verbs.add_parser("labels", help="export or bulk-import reviews as CSV")
    verb.add_argument("action", choices=["export", "import"])
    verb.add_argument("--csv", required=True, metavar="FILE")
    verb.set_defaults(func=cmd_labels)

    verb = verbs.add_parser("queue", help="the Review page's reading queue in one order, e.g. likely label errors first")
    verb.add_argument("--order", default="unread", choices=QUEUE_ORDER_NAMES,
                      help="unread (needs --reviewer; default), all, disagreements, flagged, uncertain or label_errors")
    verb.add_argument("--reviewer", default=None, metavar="NAME", help="the reader whose unread studies come first (order unread)")
    verb.add_argument("--run", type=int, default=None, metavar="RUN",
                      help="the run label_errors and uncertain rank by (default: the newest finished run)")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_queue)

    verb = verbs.add_parser("agreement", help="inter-reader agreement (Cohen's kappa) per reviewer pair")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_agreement)

    verb = verbs.add_parser("split", help="patient-grouped stratified split of the labelled studies")
    verb.add_argument("--seed", type=int, default=0)
    verb.add_argument("--test", type=float, default=0.30, help="fraction of studies for testing (default 0.30)")
    verb.add_argument("--val", type=float, default=0.15, help="fraction of the rest for validation (default 0.15)")
    verb.add_argument("--cohort", default=None, metavar="NAME,...", help="only these cohorts' studies (default every cohort)")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_split)

    verb = verbs.add_parser("train", help="train a backbone (foreground with progress, or --queue)")
    verb.add_argument("--backbone", required=True, choices=["resnet50", "vgg19", "densenet121", "scintinet"])
    # No default here: weights, mode and size default per backbone (imagenet, finetune, 646x220; scintinet: none, full, 1024x256).
    verb.add_argument("--weights", default=None, help="imagenet, none, or a weights file (default: the backbone's)")
    verb.add_argument("--mode", default=None, choices=["fast", "head", "finetune", "full"])
    verb.add_argument("--epochs", type=int, default=20)
    verb.add_argument("--batch-size", type=int, default=16)
    verb.add_argument("--lr", type=float, default=1e-3)
    verb.add_argument("--lr-schedule", default="none", choices=["none", "cosine", "plateau"])
    verb.add_argument("--image-size", type=parse_size, default=None, metavar="HxW")
    verb.add_argument("--seed", type=int, default=0)
    verb.add_argument("--split", type=int, default=None, metavar="ID", help="default: the latest split of the current labels")
    verb.add_argument("--view-mode", default=None, choices=list(VIEW_MODES),
                      help="per_image, composite or fusion (default: the backbone's: fusion for scintinet, else per_image)")
    verb.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    verb.add_argument("--max-train-images", type=int, default=None, metavar="N")
    verb.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency (default off)")
    verb.add_argument("--calibration", default="temperature", choices=["temperature", "platt", "none"],
                      help="recalibration fitted on validation (default temperature)")
    verb.add_argument("--deterministic", action="store_true", help="deterministic TensorFlow ops (slower on a GPU)")
    verb.add_argument("--threshold-rule", default="youden", choices=["youden", "sensitivity", "npv", "fixed"],
                      help="how the image and study thresholds are chosen on validation (default youden)")
    verb.add_argument("--threshold-target", type=float, default=None, metavar="X",
                      help="target of rule sensitivity or npv, e.g. 0.90")
    verb.add_argument("--study-aggregate", default="max", choices=["max", "mean"],
                      help="a study's probability from its views' (default max)")
    verb.add_argument("--queue", action="store_true", help="only enqueue for the worker")
    verb.add_argument("--maps", choices=["later", "wait"], default="later",
                      help="later: return once trained (maps on first view or from the worker); wait: make every map first")
    verb.add_argument("--repeats", type=int, default=1, metavar="K",
                      help="train K runs as one repeat group, with seeds S, S+1, ... (default 1)")
    verb.add_argument("--resplit", action="store_true",
                      help="with --repeats: each repeat on its own patient-grouped split, made with its seed")
    verb.set_defaults(func=cmd_train)

    verb = verbs.add_parser("predictions", help="a run's predictions as CSV")
    verb.add_argument("run", type=int, metavar="RUN")
    verb.add_argument("--csv", required=True, metavar="FILE")
    verb.add_argument("--unit", default="image", choices=["image", "study"], help="one row per image (default) or per study")
    verb.set_defaults(func=cmd_predictions)

    verb = verbs.add_parser("evaluate", help="metrics with 95%% CIs on a run's test subset")
    verb.add_argument("run", type=int, metavar="RUN")
    verb.add_argument("--threshold", type=float, default=None, help="default: the run's validation-chosen threshold")
    verb.add_argument("--cohort", default=None, metavar="NAME",
                      help="that cohort's external predictions (from `predict`), at the run's validation thresholds")
    verb.add_argument("--unit", default="study", choices=["study", "image"], help="the unit of analysis (default study)")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_evaluate)

    verb = verbs.add_parser("compare", help="paired comparison of runs on the same test studies (clustered by patient)")
    verb.add_argument("runs", type=int, nargs="+", metavar="RUN")
    verb.add_argument("--resamples", type=int, default=comparison.DEFAULT_RESAMPLES, metavar="B",
                      help=f"bootstrap resamples (default {comparison.DEFAULT_RESAMPLES}, at least {comparison.MIN_RESAMPLES})")
    verb.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_compare)

    verb = verbs.add_parser("predict", help="a finished run's model over studies outside its split (subset external)")
    verb.add_argument("run", type=int, metavar="RUN")
    which = verb.add_mutually_exclusive_group(required=True)
    which.add_argument("--cohort", metavar="NAME", help="every study of this cohort")
    which.add_argument("--studies", metavar="ID,...", help="these studies (comma-separated ids)")
    which.add_argument("--unread", action="store_true", help="every study no reader has read yet, outside the run's split")
    verb.add_argument("--queue", action="store_true", help="only enqueue for the worker")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_predict)

    verb = verbs.add_parser("explain", help="Grad-CAM of one image for one run: overlay PNG and/or probability and map peak")
    verb.add_argument("run", type=int, metavar="RUN")
    verb.add_argument("image", type=int, metavar="IMAGE")
    verb.add_argument("--out", metavar="FILE.png", help="write the overlay (the map on the shared scale) here")
    verb.add_argument("--opacity", type=float, default=0.4)
    verb.add_argument("--json", action="store_true",
                      help='print {"image_id", "probability", "peak": [row, col]} (peak in the stored image\'s pixels)')
    verb.set_defaults(func=cmd_explain)

    verb = verbs.add_parser("export", help="model.keras, config.json, metrics.json, predictions.csv, report.html")
    verb.add_argument("run", type=int, metavar="RUN")
    verb.add_argument("--out", required=True, metavar="DIR")
    verb.set_defaults(func=cmd_export)

    verb = verbs.add_parser("worker", help="run queued training runs one at a time")
    verb.add_argument("--once", action="store_true", help="stop when the queue is empty")
    verb.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                      help="stop after this long with an empty queue (the app's workers use 600)")
    verb.set_defaults(func=cmd_worker)

    verb = verbs.add_parser("runs", help="list training runs")
    verb.add_argument("--json", action="store_true")
    verb.set_defaults(func=cmd_runs)

    verb = verbs.add_parser("cancel", help="ask a queued or running run to stop")
    verb.add_argument("run", type=int, metavar="RUN")
    verb.set_defaults(func=cmd_cancel)

    verb = verbs.add_parser("cache", help="the decoded-image cache beside the runs: size and entries, or --clear")
    verb.add_argument("--json", action="store_true", help='print {"path", "version", "entries", "bytes", "unfinished", "sizes"}')
    verb.add_argument("--clear", action="store_true", help="remove every entry (training rebuilds what it needs)")
    verb.set_defaults(func=cmd_cache)

    verb = verbs.add_parser("adjudicator", help="mark a reviewer as adjudicator (may record the consensus)")
    verb.add_argument("name")
    verb.add_argument("--remove", action="store_true")
    verb.set_defaults(func=cmd_adjudicator)

    verb = verbs.add_parser("account", help="reader accounts and the app's optional sign-in",
                            description="Accounts for the app's optional sign-in. Roles: reader (labels), adjudicator "
                                        "(labels and records the consensus), trainer (enqueues and cancels training), importer "
                                        "(imports and uploads scans, loads the demo dataset). Changing a password or "
                                        "disabling an account signs its open app sessions out.")
    actions = verb.add_subparsers(dest="action", metavar="ACTION", required=True)
    roles_help = "reader, adjudicator, trainer or importer; repeat for several"
    action = actions.add_parser("add", help="create an account (the password is asked twice)")
    action.add_argument("name", metavar="NAME")
    action.add_argument("--role", action="append", required=True, help=roles_help)
    action.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    action = actions.add_parser("passwd", help="set a new password")
    action.add_argument("name", metavar="NAME")
    action.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    action = actions.add_parser("roles", help="replace an account's roles")
    action.add_argument("name", metavar="NAME")
    action.add_argument("--role", action="append", required=True, help=roles_help)
    for name, words in (("disable", "refuse an account's sign-in (accounts are never deleted)"),
                        ("enable", "allow a disabled account to sign in again")):
        action = actions.add_parser(name, help=words)
        action.add_argument("name", metavar="NAME")
    action = actions.add_parser("list", help="list accounts: name, roles, disabled, created_at")
    action.add_argument("--json", action="store_true")
    action = actions.add_parser("sign-in", help="require sign-in in the app (on), or not (off); no argument: show it")
    action.add_argument("state", nargs="?", choices=["on", "off"])
    verb.set_defaults(func=cmd_account)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bonescan`` and ``python -m bonescan_core``; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter is not for users
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors, 0 on --help
        return int(exit_.code or 0)
    try:
        return args.func(args)
    except (BonescanError, FileNotFoundError) as error:  # FileNotFoundError: a path given on the command line
        print(f"bonescan {args.verb}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return EXIT_OK
