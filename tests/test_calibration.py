"""``--calib`` readers (spa/calibration/): image folders, text files, .npz, the held-out split.

Images and tokenizers are made here (pillow, ``tokenizers``); expected values are worked out
from the presets' formulas on constant or striped images, so every number is exact.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from spa.calibration import (
    CalibrationOptions,
    embedding_rows,
    load,
    read,
    split,
)
from spa.calibration.text import ID_RANGE, default_tokenizer, random_tokens
from spa.errors import OptionError
from spa.ir.load import load_model

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
OPTS = CalibrationOptions()


@dataclass
class Spec:
    """A graph input as gs.Variable shows it."""

    name: str
    dtype: object
    shape: list | None


def image_input(*shape, dtype=np.float32, name: str = "x") -> list[Spec]:
    return [Spec(name, np.dtype(dtype), list(shape))]


def save(folder: Path, name: str, size: tuple[int, int], colour, mode: str = "RGB") -> Path:
    folder.mkdir(exist_ok=True)
    Image.new(mode, size, colour).save(folder / name)
    return folder


def images(folder: Path, inputs, **options) -> np.ndarray:
    kind, arrays = read(str(folder), inputs, replace(OPTS, **options))
    assert kind == "images" and list(arrays) == [inputs[0].name]
    return arrays[inputs[0].name]


# Images: presets ------------------------------------------------------------------------------

COLOUR = (10, 128, 250)


@pytest.mark.parametrize("preset, expected", [
    ("imagenet", (np.array(COLOUR, np.float32) / 255 - MEAN) / STD),
    ("unit", np.array(COLOUR, np.float32) / 255),
    ("raw", np.array(COLOUR, np.float32)),
])
def test_preset_values_on_a_constant_image(tmp_path, preset, expected):
    folder = save(tmp_path / "imgs", "a.png", (40, 30), COLOUR)
    x = images(folder, image_input(1, 3, 8, 8), preprocess=preset)
    assert x.shape == (1, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], np.broadcast_to(expected[:, None, None], (3, 8, 8)),
                               rtol=0, atol=1e-6)


def striped(folder: Path, width: int, height: int) -> Path:
    """An L image whose column j has value 10 * j."""
    folder.mkdir(exist_ok=True)
    row = (np.arange(width, dtype=np.uint8) * 10)[None, :]
    Image.fromarray(np.repeat(row, height, axis=0), "L").save(folder / "s.png")
    return folder


def test_unit_and_raw_crop_the_centre_without_resizing(tmp_path):
    # Shorter side 10 = the size: no resize; the crop keeps columns 5..14 of 20.
    folder = striped(tmp_path / "imgs", 20, 10)
    x = images(folder, image_input(1, 1, 10, 10), preprocess="raw")
    np.testing.assert_array_equal(x[0, 0], np.tile(np.arange(5, 15) * 10.0, (10, 1)))


def test_imagenet_resizes_to_size_over_0875_then_crops(tmp_path):
    # round(14 / 0.875) = 16 = the image: no resize; the 14×14 crop starts at column 1.
    folder = striped(tmp_path / "imgs", 16, 16)
    x = images(folder, image_input(1, 1, 14, 14))
    mean, std = MEAN.mean(), STD.mean()  # a grey model takes the average of RGB's statistics
    expected = (np.arange(1, 15) * 10 / np.float32(255) - mean) / std
    np.testing.assert_allclose(x[0, 0], np.tile(expected, (14, 1)), rtol=0, atol=1e-5)


def test_imagenet_resize_and_crop_geometry(tmp_path):
    # 64×32 → shorter side round(16 / 0.875) = 18, so 36×18 (bilinear), centre crop 16×16.
    noise = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(noise, "RGB").save(tmp_path / "imgs" / "n.png")
    x = images(tmp_path / "imgs", image_input(1, 16, 16, 3))
    resized = Image.fromarray(noise, "RGB").resize((36, 18), Image.Resampling.BILINEAR)
    expected = np.asarray(resized.crop((10, 1, 26, 17)), np.float32)
    np.testing.assert_allclose(x[0], (expected / 255 - MEAN) / STD, rtol=0, atol=1e-5)


# Images: layout, size, channels -------------------------------------------------------------


def test_nchw_and_nhwc_hold_the_same_pixels(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    save(folder, "b.png", (8, 8), (1, 2, 3))
    nchw = images(folder, image_input("n", 3, 8, 8))
    nhwc = images(folder, image_input("n", 8, 8, 3))
    assert nchw.shape == (2, 3, 8, 8) and nhwc.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)
    with pytest.raises(OptionError, match="has 8 channels"):  # --layout wins over the guess
        images(folder, image_input("n", 8, 8, 3), layout="nchw")


def test_layout_that_cannot_be_told_asks_for_layout(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    with pytest.raises(OptionError, match="--layout"):
        images(folder, image_input(1, 5, 8, 7))


def test_model_size_then_image_size_flag(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (30, 20), COLOUR)
    assert images(folder, image_input(1, 3, 8, 6)).shape == (1, 3, 8, 6)
    assert images(folder, image_input(1, 3, 8, 6), image_size=5).shape == (1, 3, 5, 5)


def test_symbolic_size_takes_the_images_common_size(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (12, 10), COLOUR)
    save(folder, "b.png", (12, 10), COLOUR)
    assert images(folder, image_input("n", 3, "h", "w")).shape == (2, 3, 10, 12)
    assert images(folder, image_input("n", 3, 7, "w")).shape == (2, 3, 7, 12)


def test_symbolic_size_and_mixed_sizes_need_image_size(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (12, 10), COLOUR)
    save(folder, "b.png", (9, 9), COLOUR)
    with pytest.raises(OptionError, match="mixed sizes.*--image-size"):
        images(folder, image_input("n", 3, "h", "w"))
    assert images(folder, image_input("n", 3, "h", "w"), image_size=6).shape == (2, 3, 6, 6)


def test_grey_and_rgb_files_for_an_rgb_and_a_grey_model(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), 77, mode="L")
    save(folder, "b.png", (8, 8), (77, 77, 77))
    rgb = images(folder, image_input(2, 3, 4, 4), preprocess="raw")
    grey = images(folder, image_input(2, 1, 4, 4), preprocess="raw")
    assert np.all(rgb == 77.0) and rgb.shape == (2, 3, 4, 4)
    assert np.all(grey == 77.0) and grey.shape == (2, 1, 4, 4)


def test_files_sorted_by_name_any_case_of_extension(tmp_path):
    folder = save(tmp_path / "imgs", "b.png", (8, 8), 200, mode="L")
    save(folder, "a.PNG", (8, 8), 10, mode="L")
    save(folder, "c.JPG", (8, 8), 100, mode="L")
    save(folder, "d.bmp", (8, 8), 50, mode="L")
    (folder / "notes.txt").write_text("not an image")
    x = images(folder, image_input("n", 1, 8, 8), preprocess="raw")
    np.testing.assert_allclose(x[:, 0, 0, 0], [10, 200, 100, 50], atol=2)  # JPEG is lossy


def test_class_subfolders_are_read_and_hidden_files_left_out(tmp_path):
    """An ImageFolder layout (one subfolder per class) is read whole, sorted by path; hidden
    files (macOS's ``._a.png``) and folders are not images."""
    folder = save(tmp_path / "imgs", "z.png", (8, 8), 30, mode="L")
    save(folder / "cat", "b.png", (8, 8), 20, mode="L")
    save(folder / "ant", "a.png", (8, 8), 10, mode="L")
    save(folder / "ant" / "deep", "c.png", (8, 8), 15, mode="L")
    (folder / "cat" / "._b.png").write_bytes(b"AppleDouble")
    save(folder / ".cache", "d.png", (8, 8), 99, mode="L")
    x = images(folder, image_input("n", 1, 8, 8), preprocess="raw")
    np.testing.assert_array_equal(x[:, 0, 0, 0], [10, 15, 20, 30])


@pytest.mark.parametrize("wanted", [2, 5, 9])
def test_calib_samples_reads_a_seeded_subset_of_the_files(tmp_path, wanted):
    """``--calib-samples N`` decodes a seeded N of the files (in order), the same N for the
    same seed, all of them when N is not smaller."""
    folder = tmp_path / "imgs"
    for k in range(6):
        save(folder, f"{k}.png", (4, 4), 10 * k, mode="L")
    inputs = image_input("n", 1, 4, 4)
    opts = replace(OPTS, preprocess="raw", calib_samples=wanted)
    picks = [read(str(folder), inputs, opts, seed=seed)[1]["x"][:, 0, 0, 0] // 10
             for seed in (0, 0, 1)]
    assert len(picks[0]) == min(wanted, 6) and np.all(np.diff(picks[0]) > 0)
    np.testing.assert_array_equal(picks[0], picks[1])
    if wanted < 6:
        assert not np.array_equal(picks[0], picks[2])  # (seeds 0 and 1 differ here)


def test_calib_samples_takes_lines_windows_and_rows(tmp_path):
    """The same seeded choice for text lines, --pack windows and .npz rows."""
    tok = str(tokenizer_file(tmp_path / "tok"))
    text = str(text_file(tmp_path, "".join(f"{'hello ' * (k + 1)}\n" for k in range(8))))
    opts = replace(OPTS, tokenizer=tok, max_length=10, calib_samples=3)
    _, lines = read(text, bert_inputs(10), opts, seed=0)
    lengths = lines["attention_mask"].sum(1)  # line k has k + 1 words
    assert len(lengths) == 3 and np.all(np.diff(lengths) > 0)
    _, windows = read(text, bert_inputs(4), replace(opts, max_length=4, pack=True), seed=0)
    assert windows["input_ids"].shape == (3, 4)  # 36 tokens: 9 windows, 3 of them
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.arange(10.0)[:, None], y=np.arange(10))
    _, rows = read(str(npz), [Spec("x", np.dtype(np.float64), ["n", 1])], opts, seed=0)
    assert rows["x"].shape == (3, 1)
    np.testing.assert_array_equal(rows["x"][:, 0], rows["y"])  # the same rows of each array


def test_output_takes_the_inputs_dtype(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    assert images(folder, image_input(1, 3, 8, 8, dtype=np.float16)).dtype == np.float16


def test_mean_and_std_override_the_preset(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    one = images(folder, image_input(1, 3, 4, 4), mean=(0.5,), std=(0.25,))
    np.testing.assert_allclose(one[0, :, 0, 0], (np.array(COLOUR) / 255 - 0.5) / 0.25, atol=1e-6)
    each = images(folder, image_input(1, 3, 4, 4), preprocess="raw", mean=(1, 2, 3),
                  std=(2, 2, 4))
    np.testing.assert_allclose(each[0, :, 0, 0], (np.array(COLOUR) - [1, 2, 3]) / [2, 2, 4])
    with pytest.raises(OptionError, match="--std has 2 values.*3 channel"):
        images(folder, image_input(1, 3, 4, 4), std=(1, 2))
    with pytest.raises(OptionError, match="--mean has 3 values.*1 channel"):
        images(folder, image_input(1, 1, 4, 4), mean=(1, 2, 3))


def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger="spa.calibration"):
        x = images(folder, image_input("n", 3, 8, 8))
    assert x.shape[0] == 1
    assert "broken.jpg" in caplog.text


def test_folder_without_a_readable_image(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OptionError, match="empty: no readable image.*tried 0 image file"):
        read(str(empty), image_input(1, 3, 8, 8), OPTS)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    (other / "b.png").write_bytes(b"garbage")
    with pytest.raises(OptionError, match="other: no readable image.*tried 1 image file.* of 2"):
        read(str(other), image_input(1, 3, 8, 8), OPTS)


def test_image_folder_needs_one_4d_float_input(tmp_path):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    two = image_input(1, 3, 8, 8) + image_input(1, 3, 8, 8, name="y")
    with pytest.raises(OptionError, match="'x'.*'y'"):
        read(str(folder), two, OPTS)
    with pytest.raises(OptionError, match="'x' \\[1, 3\\]"):
        read(str(folder), image_input(1, 3), OPTS)
    with pytest.raises(OptionError, match="also takes \\['ids'\\]"):
        read(str(folder), image_input(1, 3, 8, 8) + [Spec("ids", np.dtype(np.int64), [1])],
             OPTS)


def test_images_without_pillow(tmp_path, monkeypatch):
    folder = save(tmp_path / "imgs", "a.png", (8, 8), COLOUR)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(OptionError, match=r"needs pillow: pip install 'spa-prune\[images\]'"):
        read(str(folder), image_input(1, 3, 8, 8), OPTS)


# Text ---------------------------------------------------------------------------------------

VOCAB = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3, "a": 4, "b": 5}
LINES = "hello world\n\n  a b a b a b  \nzzz\n"


def tokenizer_file(folder: Path, vocab=None, pad: dict | None = None) -> Path:
    tok = Tokenizer(models.WordLevel(vocab or VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if pad:
        tok.enable_padding(**pad)
    folder.mkdir(exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def text_file(tmp_path: Path, text: str = LINES) -> Path:
    path = tmp_path / "samples.txt"
    path.write_text(text, encoding="utf-8")
    return path


def bert_inputs(seq) -> list[Spec]:
    return [Spec("input_ids", np.dtype(np.int64), ["batch", seq]),
            Spec("attention_mask", np.dtype(np.int64), ["batch", seq]),
            Spec("token_type_ids", np.dtype(np.int32), ["batch", seq])]


def test_text_ids_mask_and_type_ids(tmp_path):
    tok = tokenizer_file(tmp_path / "tok")
    kind, arrays = read(str(text_file(tmp_path)), bert_inputs(4),
                        replace(OPTS, tokenizer=str(tok), max_length=99))
    assert kind == "text"
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, 0, 0], [4, 5, 4, 5], [1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["attention_mask"],
                                  [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["token_type_ids"], np.zeros((3, 4)))
    assert arrays["input_ids"].dtype == np.int64 and arrays["token_type_ids"].dtype == np.int32


def test_symbolic_sequence_takes_max_length_and_tokenizer_folder(tmp_path):
    tokenizer_file(tmp_path / "tok")
    _, arrays = read(str(text_file(tmp_path)), [Spec("ids", np.dtype(np.int32), ["b", "s"])],
                     replace(OPTS, tokenizer=str(tmp_path / "tok"), max_length=3))
    np.testing.assert_array_equal(arrays["ids"], [[2, 3, 0], [4, 5, 4], [1, 0, 0]])
    assert arrays["ids"].dtype == np.int32


@pytest.mark.parametrize("vocab, pad, pad_id", [
    ({"<pad>": 6, "[UNK]": 1, "hello": 2, "world": 3}, None, 6),
    ({"[UNK]": 1, "hello": 2, "world": 3}, None, 0),
    (VOCAB, {"pad_id": 9, "pad_token": "[P]"}, 9),
])
def test_pad_id(tmp_path, vocab, pad, pad_id):
    tok = tokenizer_file(tmp_path / "tok", vocab, pad)
    _, arrays = read(str(text_file(tmp_path, "hello world\n")), bert_inputs(4)[:2],
                     replace(OPTS, tokenizer=str(tok)))
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, pad_id, pad_id]])
    np.testing.assert_array_equal(arrays["attention_mask"], [[1, 1, 0, 0]])


def test_text_input_names(tmp_path):
    tok = tokenizer_file(tmp_path / "tok")
    opts = replace(OPTS, tokenizer=str(tok))
    path = str(text_file(tmp_path))
    _, arrays = read(path, [Spec("input", np.dtype(np.int64), [1, 2]),
                            Spec("input_mask", np.dtype(np.float32), [1, 2]),
                            Spec("segment_ids", np.dtype(np.int64), [1, 2])], opts)
    np.testing.assert_array_equal(arrays["input_mask"], [[1, 1], [1, 1], [1, 0]])
    assert arrays["input_mask"].dtype == np.float32
    with pytest.raises(OptionError, match="'pixel_values' is none of these"):
        read(path, bert_inputs(4) + [Spec("pixel_values", np.dtype(np.int64), [1, 4])], opts)
    with pytest.raises(OptionError, match="one token-ids input"):
        read(path, bert_inputs(4)[1:], opts)


def decoder_inputs(cache_shape: list) -> list[Spec]:
    return [Spec("input_ids", np.dtype(np.int64), ["batch", "sequence"]),
            Spec("attention_mask", np.dtype(np.int64), ["batch", "total"]),
            Spec("position_ids", np.dtype(np.int64), ["batch", "sequence"]),
            Spec("past_key_values.0.key", np.dtype(np.float32), cache_shape),
            Spec("past_key_values.0.value", np.dtype(np.float16), cache_shape)]


def test_decoder_prompts_positions_and_empty_caches(tmp_path):
    tok = tokenizer_file(tmp_path / "tok")
    _, arrays = read(str(text_file(tmp_path)), decoder_inputs(["batch", 4, "past", 8]),
                     replace(OPTS, tokenizer=str(tok), max_length=4))
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, 0, 0], [4, 5, 4, 5], [1, 0, 0, 0]])
    # as transformers counts positions: attended tokens from 0, padding at 1
    np.testing.assert_array_equal(arrays["position_ids"],
                                  [[0, 1, 1, 1], [0, 1, 2, 3], [0, 1, 1, 1]])
    for kv, dtype in (("key", np.float32), ("value", np.float16)):
        cache = arrays[f"past_key_values.0.{kv}"]
        assert cache.shape == (3, 4, 0, 8) and cache.dtype == dtype  # one empty past a line
    left = tokenizer_file(tmp_path / "left", pad={"direction": "left", "pad_id": 0})
    _, arrays = read(str(text_file(tmp_path, "hello world\n")),
                     decoder_inputs(["batch", 4, "past", 8])[:3],
                     replace(OPTS, tokenizer=str(left), max_length=4))
    np.testing.assert_array_equal(arrays["attention_mask"], [[0, 0, 1, 1]])
    np.testing.assert_array_equal(arrays["position_ids"], [[1, 1, 0, 1]])


def test_pack_joins_the_lines_into_windows_without_padding(tmp_path):
    tok = str(tokenizer_file(tmp_path / "tok"))
    path = str(text_file(tmp_path))  # tokens: 2 3 | 4 5 4 5 4 5 | 1
    _, arrays = read(path, decoder_inputs(["batch", 4, "past", 8]),
                     replace(OPTS, tokenizer=tok, max_length=3, pack=True))
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, 4], [5, 4, 5], [4, 5, 1]])
    np.testing.assert_array_equal(arrays["attention_mask"], np.ones((3, 3)))
    np.testing.assert_array_equal(arrays["position_ids"], [[0, 1, 2]] * 3)
    assert arrays["past_key_values.0.key"].shape == (3, 4, 0, 8)
    _, arrays = read(path, bert_inputs("T"), replace(OPTS, tokenizer=tok, max_length=4,
                                                     pack=True))
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, 4, 5], [4, 5, 4, 5]])  # tail: 1
    with pytest.raises(OptionError, match="samples.txt: 9 tokens, fewer than one packed sample "
                                          "of 10 "):
        read(path, bert_inputs("T"), replace(OPTS, tokenizer=tok, max_length=10, pack=True))


def test_cache_without_one_symbolic_past_dim_is_refused(tmp_path):
    opts = replace(OPTS, tokenizer=str(tokenizer_file(tmp_path / "tok")))
    with pytest.raises(OptionError, match="KV-cache input 'past_key_values.0.key' has shape "
                                          r"\['batch', 'heads', 'past', 8\]: SPA fills an empty"):
        read(str(text_file(tmp_path)), decoder_inputs(["batch", "heads", "past", 8]), opts)


def test_random_tokens(tmp_path):
    graph = load_model(embedding_model(tmp_path, 5)).graph
    rng = np.random.default_rng(0)
    cache = Spec("past.0.key", np.dtype(np.float32), ["b", 1, "p", 2])
    arrays = random_tokens([*graph.inputs, cache], 64, {}, rng, graph=graph)
    assert arrays is not None and arrays["input_ids"].shape == (64, 4)
    assert set(np.unique(arrays["input_ids"])) == set(range(5))  # the embedding's rows
    np.testing.assert_array_equal(arrays["attention_mask"], np.ones((64, 4)))
    assert random_tokens(list(graph.inputs), 2, {}, rng, graph=graph) is None  # an encoder
    made = random_tokens(decoder_inputs(["batch", 2, "past", 3]), 2, {"sequence": 6}, rng)
    assert made is not None and made["input_ids"].shape == (2, 6)
    assert made["input_ids"].max() < ID_RANGE
    np.testing.assert_array_equal(made["position_ids"], [list(range(6))] * 2)
    assert made["past_key_values.0.key"].shape == (2, 2, 0, 3)
    assert random_tokens(image_input(1, 3, 8, 8), 2, {}, rng) is None  # not token inputs


def test_tokenizer_errors(tmp_path):
    path = str(text_file(tmp_path))
    with pytest.raises(OptionError, match="needs --tokenizer"):
        read(path, bert_inputs(4), OPTS)
    (tmp_path / "no_tok").mkdir()
    with pytest.raises(OptionError, match="no_tok: the folder holds no tokenizer.json"):
        read(path, bert_inputs(4), replace(OPTS, tokenizer=str(tmp_path / "no_tok")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OptionError, match="bad.json: not a readable tokenizer.json"):
        read(path, bert_inputs(4), replace(OPTS, tokenizer=str(bad)))


def test_the_tokenizer_beside_the_model(tmp_path):
    """A text file without ``--tokenizer`` takes the tokenizer saved beside the first model
    that has one: a tokenizer.json, or vocab files with their tokenizer_config.json."""
    text = str(text_file(tmp_path))
    bare, saved, vocab = (tmp_path / name for name in ("bare", "saved", "vocab"))
    for folder in (bare, saved, vocab):
        folder.mkdir()
    tokenizer_file(saved)
    (vocab / "vocab.txt").write_text("[PAD]\n")
    assert default_tokenizer(text, None, saved / "m.onnx") == str(saved)
    assert default_tokenizer(text, None, bare / "m.onnx", saved / "m.onnx") == str(saved)
    assert default_tokenizer(text, None, saved) == str(saved)  # a model folder (genai)
    assert default_tokenizer(text, "mine.json", saved / "m.onnx") == "mine.json"
    assert default_tokenizer(text, None, bare / "m.onnx") is None
    assert default_tokenizer(text, None, vocab / "m.onnx") is None  # vocab.txt alone: not one
    (vocab / "tokenizer_config.json").write_text("{}")
    assert default_tokenizer(text, None, vocab / "m.onnx") == str(vocab)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros(2))
    for calib in (str(npz), str(tmp_path), "synthetic", None):  # no text to tokenize
        assert default_tokenizer(calib, None, saved / "m.onnx") is None


def test_a_wordpiece_folder_is_converted_by_transformers(tmp_path, monkeypatch):
    """A BERT folder with a vocab.txt and no tokenizer.json: transformers' AutoTokenizer
    converts it (lower-cased WordPiece, [CLS] … [SEP], its [PAD] id); without transformers the
    message says what to install."""
    pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    folder.mkdir()
    words = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "play", "##ing", "[PAD]"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    path = str(text_file(tmp_path, "Hello PLAYING world\nworld\n"))
    _, arrays = read(path, bert_inputs(6), replace(OPTS, tokenizer=str(folder)))
    np.testing.assert_array_equal(arrays["input_ids"], [[1, 4, 6, 7, 5, 2], [1, 5, 2, 8, 8, 8]])
    np.testing.assert_array_equal(arrays["attention_mask"],
                                  [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(OptionError, match="converting its vocab.txt needs transformers"):
        read(path, bert_inputs(6), replace(OPTS, tokenizer=str(folder)))


def test_json_lines_take_the_text_field_and_pairs(tmp_path):
    """A .jsonl line is a JSON string or an object's "text" (with "text_pair": a second segment,
    token type 1); other fields are left alone, empty texts skipped, and a line that is not
    JSON, or has no text string, is refused naming its line number."""
    tok = str(tokenizer_file(tmp_path / "tok"))
    path = tmp_path / "data.jsonl"
    path.write_text('"hello world"\n\n{"text": "a b", "label": 3}\n'
                    '{"text": "hello", "text_pair": "b a"}\n{"text": "  "}\n')
    _, arrays = read(str(path), bert_inputs(4), replace(OPTS, tokenizer=tok))
    np.testing.assert_array_equal(arrays["input_ids"], [[2, 3, 0, 0], [4, 5, 0, 0], [2, 5, 4, 0]])
    np.testing.assert_array_equal(arrays["token_type_ids"],
                                  [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]])
    for bad, message in (('{"text": "a"}\n{"txt": "b"}\n', r"line 2: .*found keys \['txt'\]"),
                         ('"a"\n[1, 2]\n', "line 2: .*found list"),
                         ('"a"\n\n{"text": "b"\n', "line 3 is not JSON")):
        path.write_text(bad)
        with pytest.raises(OptionError, match=message):
            read(str(path), bert_inputs(4), replace(OPTS, tokenizer=tok))


def test_text_file_errors(tmp_path):
    tok = str(tokenizer_file(tmp_path / "tok"))
    binary = tmp_path / "model.onnx"
    binary.write_bytes(b"\x08\xff\xfe\x00")
    with pytest.raises(OptionError, match="not UTF-8 text.*folder of images"):
        read(str(binary), bert_inputs(4), replace(OPTS, tokenizer=tok))
    with pytest.raises(OptionError, match="no non-empty line"):
        read(str(text_file(tmp_path, "\n  \n")), bert_inputs(4), replace(OPTS, tokenizer=tok))


def test_text_without_tokenizers(tmp_path, monkeypatch):
    tok = str(tokenizer_file(tmp_path / "tok"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(OptionError, match=r"needs tokenizers: pip install 'spa-prune\[text\]'"):
        read(str(text_file(tmp_path)), bert_inputs(4), replace(OPTS, tokenizer=tok))


def embedding_model(tmp_path: Path, rows: int, *, constant_node: bool = False) -> Path:
    """input_ids → Cast → Unsqueeze → Gather(table of ``rows`` rows); attention_mask unused."""
    table = numpy_helper.from_array(np.ones((rows, 2), np.float32), "emb")
    nodes = [helper.make_node("Cast", ["input_ids"], ["i32"], to=TensorProto.INT32),
             helper.make_node("Unsqueeze", ["i32", "axes"], ["i3"]),
             helper.make_node("Gather", ["emb", "i3"], ["y"])]
    inits = [numpy_helper.from_array(np.array([2], np.int64), "axes")]
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["emb"], value=table))
    else:
        inits.append(table)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", 4]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / f"emb{rows}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_embedding_rows(tmp_path):
    graph = load_model(embedding_model(tmp_path, 5)).graph
    assert embedding_rows(graph, "input_ids") == 5
    assert embedding_rows(graph, "attention_mask") is None
    raw = gs.import_onnx(onnx.load(embedding_model(tmp_path, 7, constant_node=True)))
    assert embedding_rows(raw, "input_ids") == 7


def test_ids_beyond_the_embedding_are_refused(tmp_path):
    opts = replace(OPTS, tokenizer=str(tokenizer_file(tmp_path / "tok")), held_out=0.0)
    path = str(text_file(tmp_path))
    small = load_model(embedding_model(tmp_path, 5)).graph
    inputs = list(small.inputs)
    with pytest.raises(OptionError, match="ids up to 5 but the model's embedding has 5 rows: "
                                          "wrong tokenizer"):
        load(path, inputs, opts, graph=small)
    big = load_model(embedding_model(tmp_path, 6)).graph
    calib = load(path, list(big.inputs), opts, graph=big)
    assert calib.kind == "text" and calib.train["input_ids"].max() == 5
    assert load(path, inputs, opts).samples == 3  # without the graph: not checked


# .npz, other paths, the split ---------------------------------------------------------------


def test_npz_and_load(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.arange(20, dtype=np.float32).reshape(10, 2))
    calib = load(str(path), image_input(1, 2), OPTS, seed=3)
    assert (calib.kind, calib.path, calib.samples) == ("npz", str(path), 10)
    assert len(calib.held_out["x"]) == 1 and len(calib.train["x"]) == 9


def test_held_out_data_is_read_like_calib_and_calib_calibrates_whole(tmp_path):
    """An image folder as held-out data goes through the same preset as --calib's folder."""
    inputs = image_input(1, 3, 8, 8)
    calib = save(save(tmp_path / "calib", "a.png", (8, 8), COLOUR), "b.png", (8, 8), (0, 0, 0))
    held = save(tmp_path / "held", "c.png", (16, 12), (200, 100, 50))
    options = replace(OPTS, preprocess="unit", held_out_data=str(held))
    loaded = load(str(calib), inputs, options, seed=3)
    assert len(loaded.train["x"]) == 2 and loaded.held_out_path == str(held)
    np.testing.assert_array_equal(loaded.held_out["x"], images(held, inputs, preprocess="unit"))
    assert loaded.summary()["held_out_path"] == str(held)
    np.savez(tmp_path / "other.npz", y=np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(OptionError, match="--held-out-data: calibration data lacks arrays"):
        load(str(calib), inputs, replace(options, held_out_data=str(tmp_path / "other.npz")))


def test_held_out_arrays_of_different_sample_counts_are_refused(tmp_path):
    """A two-input model's held-out .npz must give each input as many samples."""
    inputs = [Spec("a", np.dtype(np.float32), ["n", 2]), Spec("b", np.dtype(np.float32), ["n", 3])]
    np.savez(tmp_path / "calib.npz", a=np.zeros((10, 2), np.float32),
             b=np.zeros((10, 3), np.float32))
    held = tmp_path / "held.npz"
    np.savez(held, a=np.zeros((4, 2), np.float32), b=np.zeros((5, 3), np.float32))
    with pytest.raises(OptionError, match=r"--held-out-data .*held.npz: arrays have different "
                                          r"sample counts \[4, 5\]"):
        load(str(tmp_path / "calib.npz"), inputs, replace(OPTS, held_out_data=str(held)))
    np.savez(held, a=np.zeros((4, 2), np.float32), b=np.ones((4, 3), np.float32))
    loaded = load(str(tmp_path / "calib.npz"), inputs, replace(OPTS, held_out_data=str(held)))
    assert (loaded.samples, len(loaded.held_out["b"])) == (14, 4)


def test_paths_that_are_not_calibration_data(tmp_path):
    with pytest.raises(OptionError, match="no such calibration file or folder"):
        read(str(tmp_path / "missing"), image_input(1, 3, 8, 8), OPTS)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OptionError, match="an .npz.*a folder of images.*a text file"):
        read(str(fifo), image_input(1, 3, 8, 8), OPTS)
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_text("not a zip")
    with pytest.raises(OptionError, match="not an .npz file"):
        read(str(bad_npz), image_input(1, 3, 8, 8), OPTS)


def samples(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n)[:, None] * np.ones((1, 3)), "m": np.arange(n)}


def test_split_is_seeded_disjoint_and_complete():
    train, held = split(samples(20), 0.1, seed=1)
    again_train, again_held = split(samples(20), 0.1, seed=1)
    np.testing.assert_array_equal(held["m"], again_held["m"])
    np.testing.assert_array_equal(train["x"], again_train["x"])
    assert len(held["m"]) == 2 and not set(held["m"]) & set(train["m"])
    assert sorted([*held["m"], *train["m"]]) == list(range(20))
    np.testing.assert_array_equal(held["x"][:, 0], held["m"])  # inputs stay paired
    assert not np.array_equal(split(samples(20), 0.1, seed=2)[1]["m"], held["m"])


def test_split_holds_at_least_one_and_refuses_too_few():
    assert len(split(samples(3), 0.1)[1]["m"]) == 1
    with pytest.raises(OptionError, match="1 sample.*--held-out 0"):
        split(samples(1), 0.1)
    train, held = split(samples(1), 0.0)
    assert len(train["m"]) == 1 and held == {}
    with pytest.raises(OptionError, match="different sample counts"):
        split({"a": np.zeros(3), "b": np.zeros(4)}, 0.1)


def test_chunks_of_similar_length_are_cut_after_their_last_attended_column():
    from spa.calibration import attended_lengths, chunked

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 12, 50)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 99, (50, 12)) * mask
    index, chunks = chunked({"ids": ids, "mask": mask}, 8, "mask")
    assert sorted(np.concatenate(index).tolist()) == list(range(50))  # every sample once
    assert [len(i) for i in index] == [8] * 6 + [2]
    for idx, chunk in zip(index, chunks):
        width = max(int(lengths[idx].max()), 1)
        assert chunk["ids"].shape == chunk["mask"].shape == (len(idx), width)
        np.testing.assert_array_equal(chunk["ids"], ids[idx, :width])
        assert (mask[idx, width:] == 0).all()  # only padding was cut
    widths = [c["ids"].shape[1] for c in chunks]
    assert widths == sorted(widths) and sum(widths) * 8 < 0.7 * 50 * 12
    np.testing.assert_array_equal(attended_lengths(mask), lengths)
    # Without a mask: chunks in order, as they were.
    index, chunks = chunked({"ids": ids}, 8)
    assert np.concatenate(index).tolist() == list(range(50))
    np.testing.assert_array_equal(np.concatenate([c["ids"] for c in chunks]), ids)


def test_padding_is_cut_only_when_every_input_is_a_token_axis_int():
    from onnx import TensorProto, helper

    from spa.calibration import padding_cut

    def model(*inputs):
        graph = helper.make_graph([], "g", [helper.make_tensor_value_info(n, t, s)
                                            for n, t, s in inputs], [])
        return helper.make_model(graph)

    ids = ("input_ids", TensorProto.INT64, ["N", "T"])
    mask = ("attention_mask", TensorProto.INT64, ["N", "T"])
    assert padding_cut(model(ids, mask)) == "attention_mask"
    assert padding_cut(model(ids)) is None  # no mask
    assert padding_cut(model(("input_ids", TensorProto.INT64, ["N", 128]), mask)) is None
    decoder = model(ids, mask, ("past", TensorProto.FLOAT, ["N", 2, "P", 8]))
    assert padding_cut(decoder) is None
    # a prompt's empty cache: the mask spans the prompt alone, which cuts like an encoder's
    assert padding_cut(decoder, {"past": np.zeros((3, 2, 0, 8))}) == "attention_mask"
    assert padding_cut(decoder, {"past": np.zeros((3, 2, 1, 8))}) is None


def test_real_rows_line_up_with_the_mask_three_d_or_flattened():
    from spa.calibration import real_rows

    real = np.array([[True, True, False], [True, False, False]])
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(real_rows(x, real), x[[0, 0, 1], [0, 1, 0]])
    # GPT-2's Conv1D input: [samples × tokens, channels]
    np.testing.assert_array_equal(real_rows(x.reshape(6, 4), real), x[[0, 0, 1], [0, 1, 0]])
    assert real_rows(x.reshape(6, 4), None).shape == (6, 4)
    assert real_rows(x[:, 0], real).shape == (2, 4)  # pooled: one row a sample, kept
