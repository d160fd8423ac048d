"""What can train here: ImageNet weights cached or downloadable, and what the Train page offers instead.

Clinical machines are often offline. Before anyone presses Train, the page asks
:func:`training_offer` which backbones can start from ImageNet weights (the file is in
Keras's cache, or its host answers), and gets the defaults to show: when no ImageNet
weights can be had, ``scintinet`` (a network trained from scratch, when the registry has
it) or the ImageNet architectures from scratch (``weights none``, mode ``full``) or from
a weights file, and a message that says why. :meth:`TrainingOffer.refusal` then refuses
a choice that would only enqueue runs failing with ``WeightsUnavailable``.

The network probe (``models._reachable``, at most ``models.PROBE_TIMEOUT_S`` seconds) runs
at most once per :data:`PROBE_TTL_S` per host and process, and never when every file is
cached, so a page rerun does not wait on the network. Importing this module does not
import Keras.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bonescan_core import models

PROBE_TTL_S = 600.0  # a probe's answer is reused this long (a cable plugged in shows within 10 minutes)
FROM_SCRATCH = "scintinet"  # the registry name of the network designed to train from scratch (when present)

_probes: dict[str, tuple[float, bool]] = {}  # host -> (monotonic time probed, reachable)
_probe_lock = threading.Lock()


def has_imagenet(backbone: str | models.Backbone) -> bool:
    """Whether ImageNet weights exist for the backbone at all (a from-scratch network has none)."""
    return bool(getattr(models.get_backbone(backbone), "imagenet_file", ""))


def host_reachable(url: str, now: Callable[[], float] = time.monotonic) -> bool:
    """Whether the URL's host answered a probe; the answer is cached per host for :data:`PROBE_TTL_S` seconds."""
    host = urllib.parse.urlsplit(url).hostname or url
    with _probe_lock:  # one probe at a time: concurrent page sessions wait for the first one's answer
        cached = _probes.get(host)
        if cached is not None and now() - cached[0] < PROBE_TTL_S:
            return cached[1]
        reachable = models._reachable(url, models.PROBE_TIMEOUT_S)
        _probes[host] = (now(), reachable)
        return reachable


def forget_probes() -> None:
    """Drop every cached probe answer (the next question probes again)."""
    with _probe_lock:
        _probes.clear()


def imagenet_available() -> dict[str, bool]:
    """{backbone: ImageNet weights usable now} for each registry backbone that has ImageNet weights.

    Usable: the file is in Keras's cache (``models.imagenet_cached``), or its host is
    reachable (probed only when some file is missing; cached, see :func:`host_reachable`).
    """
    found = {}
    for name in models.BACKBONES:
        if not has_imagenet(name):
            continue
        found[name] = models.imagenet_cached(name) is not None or host_reachable(models.get_backbone(name).imagenet_url)
    return found


@dataclass(frozen=True)
class TrainingOffer:
    """What the Train page shows before anyone presses Train.

    Attributes:
        imagenet: {backbone: ImageNet weights usable} for the backbones that have them.
        backbones: the backbones pre-selected.
        weights: the weights choices offered, in order (``imagenet`` only when some backbone
            can use it; ``none`` and ``file`` always).
        default_weights: the weights pre-selected.
        default_mode: the mode pre-selected (``full`` when training from scratch).
        message: why the usual ImageNet default is not offered, and what is instead; None
            when every ImageNet backbone can use its weights.
    """

    imagenet: dict[str, bool]
    backbones: tuple[str, ...]
    weights: tuple[str, ...]
    default_weights: str
    default_mode: str
    message: str | None

    @property
    def unavailable(self) -> tuple[str, ...]:
        """The backbones whose ImageNet weights cannot be had here."""
        return tuple(name for name, usable in self.imagenet.items() if not usable)

    def refusal(self, chosen: Sequence[str], weights: str) -> str | None:
        """A one-sentence reason not to enqueue ``chosen`` with ``weights``, or None when the runs can start.

        Refuses ImageNet weights for a backbone that has none (``scintinet``) or whose file
        cannot be had here: such runs would only fail with ``WeightsUnavailable``.
        """
        if weights != "imagenet":
            return None
        without = [name for name in chosen if not has_imagenet(name)]
        if without:
            return (f"{', '.join(without)} has no ImageNet weights: choose weights 'none' (it trains from scratch) "
                    "or leave it out of the ImageNet runs")
        missing = [name for name in chosen if not self.imagenet.get(name, False)]
        if missing:
            return (f"ImageNet weights for {', '.join(missing)} are not available here (not in {models.keras_models_dir()} "
                    "and no internet connection): choose weights 'none' or a weights file, or place the files there")
        return None


def training_offer(available: dict[str, bool] | None = None) -> TrainingOffer:
    """The Train page's choices and defaults for what is available here.

    Args:
        available: {backbone: ImageNet weights usable}; default :func:`imagenet_available`
            (which may probe the network once per :data:`PROBE_TTL_S`).

    Returns:
        All usable: the ImageNet backbones, weights ``imagenet``, mode ``finetune``, no
        message. Some usable (some files cached, offline): those backbones pre-selected with
        ImageNet weights, and a message naming the others. None usable: ``scintinet`` when
        the registry has it (else the ImageNet backbones) with weights ``none`` and mode
        ``full``, weights ``imagenet`` not offered, and a message saying so and what to
        place where to get them back.
    """
    available = imagenet_available() if available is None else dict(available)
    usable = tuple(name for name, ok in available.items() if ok)
    if len(usable) == len(available):
        return TrainingOffer(available, usable, ("imagenet", "none", "file"), "imagenet", "finetune", None)
    folder = models.keras_models_dir()
    missing = [name for name, ok in available.items() if not ok]
    if usable:
        return TrainingOffer(
            available, usable, ("imagenet", "none", "file"), "imagenet", "finetune",
            f"ImageNet weights for {', '.join(missing)} are not available here (not in {folder} and no internet "
            f"connection); {', '.join(usable)} can use theirs. Train the others with weights 'none' (from scratch) "
            "or a weights file.")
    scratch = FROM_SCRATCH in models.BACKBONES
    offered = (FROM_SCRATCH,) if scratch else tuple(available)
    instead = (f"{FROM_SCRATCH}, a small network that trains from scratch, is selected instead; the ImageNet "
               "backbones can train from scratch (weights 'none', mode 'full') or from a weights file"
               if scratch else "the backbones can train from scratch (weights 'none', mode 'full') or from a weights file")
    return TrainingOffer(
        available, offered, ("none", "file"), "none", "full",
        f"ImageNet weights are not available here (none of their files is in {folder} and there is no internet "
        f"connection): {instead}. To use ImageNet weights, download "
        f"{', '.join(models.get_backbone(name).imagenet_file for name in missing)} from Keras's site "
        f"({models.get_backbone(missing[0]).imagenet_url.rsplit('/', 2)[0]}/) on a machine with internet and copy them into {folder}.")
