"""Shared fixtures: tiny real models built from configs (nothing mocked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextchat_core.build import build_model
from nextchat_core.config import NextChatConfig, get_preset
from nextchat_core.tokenizer import train_bpe_tokenizer

TINY_CORPUS = [
    "the red circle",
    "a blue square",
    "the green triangle on the left",
    "all yellow shapes",
    "Is there a purple star?",
    "Yes, there is.",
    "No.",
    "a small white hexagon",
]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (``item.rep_call``): fixtures that keep
    artifacts (the browser test's screenshots) look at it to save the failing state."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session", autouse=True)
def _test_environment(tmp_path_factory):
    """In-process apps hand jobs to the broker named here: nothing listens on port 1, so
    those jobs stay "queued, not enqueued" (what a broker outage looks like). Tests of the
    real loop start their own backend and workers with their own broker and ``MODEL_DIR``
    (nextchat_cli.loop_demo). Nothing reads the environment at import, so setting it here,
    after the test modules were imported, is in time."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
        env.setenv("MODEL_DIR", str(tmp_path_factory.mktemp("model-dir")))
        yield


@pytest.fixture(scope="session")
def tiny_config() -> NextChatConfig:
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_config):
    return train_bpe_tokenizer(TINY_CORPUS * 4, config=tiny_config)


@pytest.fixture()
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config)


def make_scene(
    width: int = 96, height: int = 64, box=(20, 10, 60, 50)
) -> tuple[np.ndarray, np.ndarray]:
    """A gray image with one red disc inscribed in ``box`` (original pixels) and its mask."""
    img = np.full((height, width, 3), 90, dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    mask = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    img[mask] = (220, 30, 30)
    return img, mask


def readme_block(name: str) -> str:
    """The README's generated block between ``<!-- name -->`` and ``<!-- /name -->``."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = f"<!-- {name} -->\n", f"\n<!-- /{name} -->"
    return readme[readme.index(start) + len(start) : readme.index(end)]
