"""Pure helpers of the quality pipeline's data (benchmarks/quality/real.py): the fortune sentence
splitter, the disjoint photo and text splits, the ImageNet-way view reader."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
real = pytest.importorskip("benchmarks.quality.real")


def test_split_fortunes_drops_separators_and_attributions():
    text = "First line\nsecond line.\n%\nOnly one.\n\t-- Someone Famous\n%\n\n%\n"
    assert real.split_fortunes(text) == ["First line second line.", "Only one."]


def test_sentences_split_filter_and_dedupe():
    fortunes = ["One two three four five. Too short! Is this a question with six words? "
                "\"Quoted words make a sentence too.\" Then more words follow here",
                "one two three  four five.", " ".join(["w"] * 61) + "."]
    assert real.sentences(fortunes) == [
        "One two three four five.", "Is this a question with six words?",
        "\"Quoted words make a sentence too.\"", "Then more words follow here"]


def test_sentences_keep_abbreviation_free_lowercase_joins():
    # a full stop followed by a lower-case word is not a sentence end
    assert real.sentences(["It cost 3.5 dollars, e.g. not much at all today."]) == [
        "It cost 3.5 dollars, e.g. not much at all today."]


def test_photo_split_is_disjoint():
    assert not set(real.CALIB_PHOTOS) & set(real.EVAL_PHOTOS)
    assert sum(real.CALIB_PHOTOS.values()) >= 256
    assert len(real.EVAL_PHOTOS) >= 5 and sum(real.EVAL_PHOTOS.values()) >= 100
    calib = {*real.CALIB_PHOTOS, *real.WIDE_CALIB_PHOTOS}
    evaluation = {*real.EVAL_PHOTOS, *real.WIDE_EVAL_PHOTOS}
    assert not calib & evaluation
    assert len(real.CALIB_PHOTOS) + len(real.WIDE_CALIB_PHOTOS) == len(calib)


def test_wide_photos_come_from_pinned_wheels_and_split_the_imagenet_samples():
    from benchmarks.quality.wheel_photos import IMAGENET, SOURCES

    assert set(real.WIDE_CALIB_PHOTOS) | set(real.WIDE_EVAL_PHOTOS) <= set(SOURCES)
    imagenet = {f"imagenet_{k:02d}" for k, _ in IMAGENET}
    assert imagenet == {n for n in {*real.WIDE_CALIB_PHOTOS, *real.WIDE_EVAL_PHOTOS}
                        if n.startswith("imagenet_")}
    assert len(imagenet & set(real.WIDE_EVAL_PHOTOS)) == len(IMAGENET) // 2
    assert all("==" in s.requirement for s in SOURCES.values() if s.requirement != "matplotlib")


def test_fortune_split_is_disjoint(tmp_path):
    for name in ("literature", "humorists", "science", "art", "people", "people.dat"):
        (tmp_path / name).write_text("x\n%\n")
    calib, evaluation = real.fortune_split(tmp_path)
    assert calib == ["people", "science"]
    assert evaluation == ["humorists", "literature"]


def test_fortune_sets_drop_evaluation_sentences_from_calibration(tmp_path):
    shared = "This very sentence is in both files."
    (tmp_path / "literature").write_text(f"{shared}\n%\nOnly the evaluation has this one.\n%\n")
    (tmp_path / "science").write_text(f"{shared.upper()}\n%\nOnly calibration has this one.\n")
    calib, evaluation = real.fortune_sets(tmp_path)
    assert calib == ["Only calibration has this one."]
    assert evaluation == [shared, "Only the evaluation has this one."]


def test_mean_cosine():
    import numpy as np

    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert real.mean_cosine(a, a) == pytest.approx(1.0)
    assert real.mean_cosine(a, np.array([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(0.5)


def test_imagenet_view_resizes_and_centre_crops(tmp_path):
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, 200:] = 255  # right half white
    image.fromarray(pixels).save(tmp_path / "v.png")
    x = real.imagenet_view(tmp_path / "v.png", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 256, 224)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    # 400x300 -> 341x256, crop columns 58..282: the black/white edge sits at column 112
    assert x[0, 100, 100] == pytest.approx(-1.0) and x[0, 100, 125] == pytest.approx(1.0)
