"""What the Train page offers when ImageNet weights can or cannot be had (issue 12, point 5)."""

from __future__ import annotations

import pytest

from bonescan_core import availability, models

IMAGENET = [name for name in models.BACKBONES if availability.has_imagenet(name)]


class Probe:
    """A scripted network probe that counts what it was asked."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.reachable = False

    def __call__(self, url: str, timeout_s: float) -> bool:
        self.urls.append(url)
        return self.reachable


@pytest.fixture
def probes(monkeypatch, tmp_path):
    """An empty Keras cache and a scripted network probe."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    availability.forget_probes()
    probe = Probe()
    monkeypatch.setattr(models, "_reachable", probe)
    yield probe
    availability.forget_probes()


def test_offline_without_cached_files_offers_training_from_scratch(probes):
    offer = availability.training_offer()
    assert offer.imagenet == dict.fromkeys(IMAGENET, False)
    assert "imagenet" not in offer.weights and offer.default_weights == "none" and offer.default_mode == "full"
    expected = ("scintinet",) if "scintinet" in models.BACKBONES else tuple(IMAGENET)
    assert offer.backbones == expected
    assert "not available" in offer.message and str(models.keras_models_dir()) in offer.message
    assert models.get_backbone("resnet50").imagenet_file in offer.message  # says what to place where
    assert offer.refusal(["resnet50"], "imagenet") is not None
    assert offer.refusal(["resnet50", "densenet121"], "none") is None


def test_the_probe_runs_once_and_is_reused(probes):
    availability.training_offer()
    availability.training_offer()
    availability.imagenet_available()
    assert len(probes.urls) == 1, probes.urls  # the three files share one host, and the answer is cached


def test_the_cached_answer_expires(probes):
    clock = iter([0.0, 1.0, availability.PROBE_TTL_S + 5, availability.PROBE_TTL_S + 6])
    url = models.get_backbone("vgg19").imagenet_url
    assert availability.host_reachable(url, now=lambda: next(clock)) is False  # probed at 0 s
    probes.reachable = True
    assert availability.host_reachable(url, now=lambda: next(clock)) is False  # 1 s later: the cached answer
    assert availability.host_reachable(url, now=lambda: next(clock)) is True  # after the TTL: probed again
    assert len(probes.urls) == 2


def test_online_offers_imagenet_as_before(probes):
    probes.reachable = True
    offer = availability.training_offer()
    assert offer.message is None and offer.default_weights == "imagenet" and offer.default_mode == "finetune"
    assert offer.backbones == tuple(IMAGENET) and offer.weights == ("imagenet", "none", "file")
    assert offer.refusal(IMAGENET, "imagenet") is None


def test_cached_files_need_no_probe_and_are_offered_offline(probes):
    folder = models.keras_models_dir()
    folder.mkdir(parents=True)
    (folder / models.get_backbone("vgg19").imagenet_file).write_bytes(b"weights")
    offer = availability.training_offer()
    assert offer.imagenet["vgg19"] is True and offer.backbones == ("vgg19",)
    assert offer.default_weights == "imagenet" and "imagenet" in offer.weights
    assert "resnet50" in offer.message and offer.unavailable == tuple(n for n in IMAGENET if n != "vgg19")
    assert offer.refusal(["vgg19"], "imagenet") is None
    assert "resnet50" in offer.refusal(["vgg19", "resnet50"], "imagenet")
    for name in IMAGENET:
        (folder / models.get_backbone(name).imagenet_file).write_bytes(b"weights")
    availability.forget_probes()
    probes.urls.clear()
    assert availability.training_offer().message is None
    assert probes.urls == [], "every file cached: the network is not probed"
