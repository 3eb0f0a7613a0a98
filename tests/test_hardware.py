"""The hardware choices of train.py. Threads: a number is taken as given; "auto" keeps OMP_NUM_THREADS when the
user set it, else trains small images on one thread and larger ones on torch's default (one per core). Precision
"auto": bf16-mixed on one thread of a CPU with native bf16, else 32-true. Layout "auto": NCHW under bf16 on the
CPU, else NHWC. Every setting crossed with every other."""
from __future__ import annotations

import pytest
import torch

from ddpm.hardware import ONE_THREAD_MAX_SIZE, auto_channels_last, auto_precision, choose, cpu_threads
from ddpm.schema import precisions


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


# ---- precision and layout: `precision: auto`, `channels_last: auto` ---------------------------------------------


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_auto_precision_is_bf16_only_on_one_thread_of_a_native_bf16_cpu(threads: int, native: bool) -> None:
    precision, why = auto_precision("cpu", threads, native)
    assert precision == ("bf16-mixed" if native and threads == 1 else "32-true")
    assert why.startswith(f"precision=auto: {precision}")


def test_auto_precision_is_fp32_off_the_cpu() -> None:
    assert auto_precision("gpu", 1, True)[0] == "32-true"


@pytest.mark.parametrize("precision", precisions()[1:])
@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_auto_layout_is_nchw_only_under_bf16_on_the_cpu(accelerator: str, precision: str) -> None:
    assert auto_channels_last(accelerator, precision) == (not (accelerator == "cpu" and "bf16" in precision))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("channels_last", ["auto", True, False])
@pytest.mark.parametrize("precision", ["auto", "32-true", "bf16-mixed"])
@pytest.mark.parametrize("threads", ["auto", 1, 2])
def test_choose_settles_every_auto_setting_and_keeps_explicit_ones(monkeypatch: pytest.MonkeyPatch, threads, precision, channels_last, native) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    chosen = choose("cpu", threads, 8, precision, channels_last, native)
    assert chosen.threads == (1 if threads == "auto" else threads)  # 8x8 images: one thread
    expected = auto_precision("cpu", chosen.threads, native)[0] if precision == "auto" else precision
    assert chosen.precision == expected
    assert chosen.channels_last == (auto_channels_last("cpu", expected) if channels_last == "auto" else channels_last)
    assert chosen.line.startswith(f"hardware: cpu, {chosen.threads} thread") and "\n" not in chosen.line
    assert (f"precision=auto: {expected}" if precision == "auto" else f"precision={precision}") in chosen.line


def test_choose_leaves_threads_alone_off_the_cpu() -> None:
    chosen = choose("gpu", "auto", 32, "auto", "auto", True)
    assert chosen.threads is None and chosen.precision == "32-true" and chosen.channels_last is True
    assert chosen.line.startswith("hardware: gpu, precision=auto: 32-true")

