"""The run record's reproducibility facts (issue 11, point 8): version, commit, the weights file loaded, seeds, determinism."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess

import pytest
from conftest import REPO

from bonescan_core import models, reproducibility, runs


def test_version_and_commit_of_this_checkout():
    assert reproducibility.package_version() == importlib.metadata.version("bonescan")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert reproducibility.git_commit(REPO / "bonescan_core") == head


def test_no_commit_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert reproducibility.git_commit(tmp_path) is None  # not a checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert reproducibility.git_commit(REPO) is None


def test_weights_hash_is_of_the_file_actually_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cached = tmp_path / "keras" / "models" / models.get_backbone("densenet121").imagenet_file
    assert reproducibility.weights_sha256("densenet121", "imagenet") is None  # not downloaded (yet)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"imagenet weights stand-in")
    assert reproducibility.weights_sha256("densenet121", "imagenet") == hashlib.sha256(b"imagenet weights stand-in").hexdigest()
    own = tmp_path / "mine.weights.h5"
    own.write_bytes(b"my weights")
    assert reproducibility.weights_sha256("densenet121", str(own)) == hashlib.sha256(b"my weights").hexdigest()
    assert reproducibility.weights_sha256("densenet121", "none") is None

    config = runs.TrainConfig(backbone="densenet121", seed=7, deterministic=True)
    record = reproducibility.record(config, split_id=3, labels_hash="abc", split_seed=7, feature_seed=None)
    assert record == {
        "package_version": reproducibility.package_version(), "git_commit": reproducibility.git_commit(),
        "weights": "imagenet", "weights_file": cached.name,
        "weights_sha256": hashlib.sha256(b"imagenet weights stand-in").hexdigest(),
        "split_id": 3, "labels_hash": "abc", "seeds": {"run": 7, "split": 7, "feature_init": None}, "deterministic": True,
    }


def test_deterministic_ops_are_on_for_the_run_only():
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()
    with reproducibility.deterministic_ops(True, seed=3):
        assert tf_config.is_op_determinism_enabled()
    assert not tf_config.is_op_determinism_enabled()  # the worker's next run is not affected
    with reproducibility.deterministic_ops(False, seed=3):
        assert not tf_config.is_op_determinism_enabled()


@pytest.mark.parametrize("flag", [True, False])
def test_the_setting_round_trips_through_the_stored_config(flag):
    config = runs.TrainConfig(backbone="vgg19", deterministic=flag)
    assert runs.TrainConfig.from_json(config.to_json()).deterministic is flag
