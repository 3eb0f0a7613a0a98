"""The CPU thread choice of train.py (`threads`): a number is taken as given; "auto" keeps OMP_NUM_THREADS when the
user set it, else trains small images on one thread and larger ones on torch's default (one per core)."""
from __future__ import annotations

import pytest
import torch

from ddpm.hardware import ONE_THREAD_MAX_SIZE, cpu_threads


def test_a_number_is_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(3, 8) == (3, "threads=3")


def test_auto_keeps_the_users_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads("auto", 32) == (torch.get_num_threads(), "threads=auto, OMP_NUM_THREADS=1")


@pytest.mark.parametrize("image_size", [8, ONE_THREAD_MAX_SIZE, ONE_THREAD_MAX_SIZE * 2])
def test_auto_trains_small_images_on_one_thread(monkeypatch: pytest.MonkeyPatch, image_size: int) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads, why = cpu_threads("auto", image_size)
    if image_size <= ONE_THREAD_MAX_SIZE:
        assert threads == 1 and why == f"threads=auto: {image_size}x{image_size} images are too small to split over cores"
    else:
        assert threads == torch.get_num_threads() and why == "threads=auto: one per core"
