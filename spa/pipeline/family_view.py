"""What a folder pruned together (spa/pipeline/family.py) is planned and pruned from.

A :class:`View` (:func:`opened`) links every entry of the input folder into a temporary folder
but its merged decoders. A ``*_merged.onnx`` file, or any whose graph is a single ``If`` (the
two decoders as its branches; transformers.js folders hold ``*_merged_quantized.onnx``
variants too), is there as one file per branch (:func:`spa.pipeline.merged.split_into`),
``<stem>.then_branch.onnx`` and ``<stem>.else_branch.onnx`` (the names the reports and plans
use), pruned with the others and merged back once pruned
(:func:`spa.pipeline.merged.merged_back`). One SPA cannot split (not a single ``If`` over two
plain branches, weights in external data, or branches that do not answer as the file does) is
left out, and a runtime such as Optimum's loads the separate decoders instead.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from spa.errors import OptionError, OutputPathError
from spa.ir.save import check_output_folder, external_data_files
from spa.pipeline.merged import BRANCHES, is_merged, piece_name, split_into

if TYPE_CHECKING:
    from spa.pipeline import CheckOptions

MERGED = "_merged.onnx"


@dataclass
class View:
    """What a folder is planned and pruned from: ``path`` links every entry of the input
    folder ``src`` but its merged decoders; a merged decoder SPA splits is there as its two
    branches' files (spa/pipeline/merged.py), to be merged back once pruned."""

    src: Path
    path: Path
    onnx_files: list[str]  # the files pruned or copied, by name in ``path``
    headers: dict[str, onnx.ModelProto]  # their graphs, read once (external data not read)
    merged: dict[str, onnx.ModelProto]  # merged decoders split, by name: the original
    left_out: dict[str, str]  # merged decoders not split, and why
    data: set[str]  # the external data files of every ONNX file of ``src``
    scratch: Path  # a temporary folder beside, for what is made on the way

    def origins(self) -> dict[str, str]:
        """Each file's path in ``src``; a branch's, its merged file's and the branch."""
        branches = {piece_name(m, b): f"{self.src / m} ({b})" for m in self.merged
                    for b in BRANCHES}
        return {n: branches.get(n, str(self.src / n)) for n in self.onnx_files}


@contextmanager
def opened(folder: str | os.PathLike[str], checks: CheckOptions) -> Iterator[View]:
    """The :class:`View` of ``folder``, in a temporary folder removed on exit."""
    src = Path(folder)
    onnx_files = _onnx_files(src)
    headers = {n: onnx.load(str(src / n), load_external_data=False) for n in onnx_files}
    data = {d for h in headers.values() for d in external_data_files(h)}
    with tempfile.TemporaryDirectory(prefix="spa-folder-") as tmp, \
            tempfile.TemporaryDirectory(prefix="spa-scratch-") as scratch:
        path = Path(tmp)
        merged: dict[str, onnx.ModelProto] = {}
        left_out: dict[str, str] = {}
        # by name, or by its graph: transformers.js folders hold *_merged_quantized.onnx too
        for n in (n for n in onnx_files if n.endswith(MERGED) or is_merged(headers[n])):
            done = split_into(headers[n], n, path, checks)
            if not isinstance(done, str):
                merged[n] = done
            elif n.endswith(MERGED):
                left_out[n] = (f"a merged decoder SPA cannot split: {done}; left out of the "
                               "pruned folder (runtimes such as Optimum's load the separate "
                               "decoders instead)")
        for f in sorted(src.iterdir()):
            if f.name not in merged and f.name not in left_out:
                os.symlink(f.resolve(), path / f.name)
        names = sorted(f.name for f in path.iterdir() if f.suffix == ".onnx" and f.is_file())
        if not names:
            raise OptionError(f"{src}: every ONNX file in it is a merged decoder SPA cannot "
                              f"split ({'; '.join(f'{k}: {v}' for k, v in left_out.items())})")
        # each graph once: the input's as read above, a branch's from its file
        headers = {n: headers[n] if n in headers else
                   onnx.load(str(path / n), load_external_data=False) for n in names}
        yield View(src, path, names, headers, merged, left_out, data, Path(scratch))


def output_checked(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir``, checked before any work: ``folder`` holds ONNX files, and ``out_dir`` is a
    folder SPA may write (:func:`spa.ir.save.check_output_folder`) outside it."""
    src, out = Path(folder), Path(out_dir)
    _onnx_files(src)  # a folder with nothing to prune says so before the output is judged
    check_output_folder(out)
    if out.resolve().is_relative_to(src.resolve()):
        raise OutputPathError(f"{out}: the pruned folder cannot be in the input folder {src}")
    return out


def _onnx_files(src: Path) -> list[str]:
    """The ONNX files of ``src`` by name; an error when there are none."""
    onnx_files = sorted(f.name for f in src.iterdir() if f.suffix == ".onnx" and f.is_file())
    if not onnx_files:
        raise OptionError(f"{src}: is a directory with no ONNX file in it")
    return onnx_files


__all__ = ["MERGED", "View", "opened", "output_checked"]
