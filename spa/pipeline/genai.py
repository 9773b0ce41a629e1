"""onnxruntime-genai model folders in and out: ``spa prune model_dir/ -o out_dir/``.

A folder written by ``python -m onnxruntime_genai.models.builder`` holds ``genai_config.json``
(``model.decoder``: the ONNX file's name, the head counts, head size, hidden size and layer
count the runtime sizes its KV cache by), the decoder (``model.onnx`` and its data file) and
the tokenizer files. The decoder is pruned as any model; then:

* the config must agree with the graph before anything is done (each attention node's
  ``num_heads`` and ``kv_num_heads``, their count against the layers, the caches' head size),
  else the folder is refused (exit 2) naming what disagrees;
* the runtime sizes its caches from one ``num_key_value_heads`` for every layer, so the pruned
  decoder's layers must keep equal head counts (a uniform heads ratio does), else the run stops
  and nothing is written;
* depth pruning may drop attention blocks, and their KV caches with them: the caches left are
  renumbered ``0 … L−1`` in layer order (the config's ``%d`` name patterns) and
  ``num_hidden_layers`` becomes their count ``L``, the number of caches the runtime feeds (an
  attention block dropped alone, its MLP kept, is such a layer too: the config's layer count
  is the attention nodes' count, checked so above);
* the config is rewritten with the counts the pruned graph has, every other file is copied;
* all of it is written into a temporary folder beside ``out_dir`` and renamed into place last,
  so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from spa.errors import InvalidModelError, OptionError
from spa.ir.save import check_output_folder, external_data_files, staged_folder

if TYPE_CHECKING:
    from spa.pipeline import CheckOptions, PruneOptions, PruneReport
    from spa.pipeline.stages import ModelLike
    from spa.plan import Plan

CONFIG = "genai_config.json"
_ATTENTION = ("GroupQueryAttention",)


def is_genai_folder(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


@dataclasses.dataclass(frozen=True)
class Heads:
    """What the decoder's graph says of the numbers ``genai_config.json`` repeats."""

    layers: int
    heads: tuple[int, ...]  # num_heads of each attention node, in graph order
    kv_heads: tuple[int, ...]
    head_size: int | None  # the past caches' last dim, when fixed

    @classmethod
    def of(cls, model: onnx.ModelProto, past_key: str) -> Heads:
        nodes = [n for n in model.graph.node if n.op_type in _ATTENTION]
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        past = next((i for i in model.graph.input if i.name == _first(past_key)), None)
        last = past.type.tensor_type.shape.dim[-1] if past is not None else None
        return cls(len(nodes), tuple(int(a.get("num_heads", 0)) for a in attrs),
                   tuple(int(a.get("kv_num_heads", 0)) for a in attrs),
                   int(last.dim_value) if last is not None and last.HasField("dim_value")
                   else None)


def decoder_of(model: ModelLike) -> ModelLike:
    """``model``, or the decoder file of an onnxruntime-genai folder (``spa analyze`` and
    ``spa prune --dry-run`` read the folder's decoder)."""
    if isinstance(model, (str, os.PathLike)) and is_genai_folder(model):
        return Path(model) / _decoder(read_config(Path(model)))["filename"]
    return model


def _first(pattern: str) -> str:
    """Layer 0's name in a config's ``past_key_values.%d.key`` pattern."""
    return pattern.replace("%d", "0")


def _decoder(config: dict) -> dict:
    return config["model"]["decoder"]


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG).read_text())
        _decoder(config)["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidModelError(f"{folder / CONFIG}: not an onnxruntime-genai config with "
                                f"model.decoder.filename ({exc})") from exc
    return config


def check_config(folder: Path, config: dict, heads: Heads) -> None:
    """Refuse a folder whose config disagrees with its decoder, naming what disagrees."""
    d = _decoder(config)
    wrong = []
    if heads.layers == 0:
        wrong.append(f"the decoder has no {' or '.join(_ATTENTION)} node to check heads by")
    if heads.layers and d.get("num_hidden_layers") != heads.layers:
        wrong.append(f"num_hidden_layers={d.get('num_hidden_layers')}, the graph has "
                     f"{heads.layers} attention nodes")
    for key, counts in (("num_attention_heads", heads.heads),
                        ("num_key_value_heads", heads.kv_heads)):
        if any(c != d.get(key) for c in counts):
            wrong.append(f"{key}={d.get(key)}, the attention nodes have {sorted(set(counts))}")
    if heads.head_size is not None and d.get("head_size") != heads.head_size:
        wrong.append(f"head_size={d.get('head_size')}, the KV caches' last dim is "
                     f"{heads.head_size}")
    if wrong:
        raise InvalidModelError(f"{folder / CONFIG} disagrees with {d['filename']}: "
                                + "; ".join(wrong))


def pruned_config(config: dict, heads: Heads) -> dict:
    """``config`` with the pruned decoder's head counts; one count for all layers or none."""
    if len(set(heads.heads)) > 1 or len(set(heads.kv_heads)) > 1:
        raise OptionError(f"the pruned layers keep different head counts (query {heads.heads}, "
                          f"KV {heads.kv_heads}), which genai_config.json cannot express: "
                          f"prune heads by the same ratio in every layer (uniform allocation, "
                          f"not --global or sensitivity)")
    out = json.loads(json.dumps(config))
    d = _decoder(out)
    d["num_attention_heads"], d["num_key_value_heads"] = heads.heads[0], heads.kv_heads[0]
    d["num_hidden_layers"] = heads.layers
    return out


def prune_folder(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 options: PruneOptions, checks: CheckOptions, *,
                 plan_path: str | os.PathLike[str] | None = None) -> tuple[PruneReport, Plan]:
    """Prune the decoder of an onnxruntime-genai folder into ``out_dir`` (see the module)."""
    from spa.pipeline import prune

    src, out = Path(folder), Path(out_dir)
    check_output_folder(out)
    if options.hidden_ratio is not None:
        raise OptionError("hidden-size pruning of an onnxruntime-genai folder is not supported "
                          "(its config and embedding would change with it)")
    config = read_config(src)
    name = _decoder(config)["filename"]
    header = onnx.load(str(src / name), load_external_data=False)
    past_key = cache_patterns(config)[0]
    check_config(src, config, Heads.of(header, past_key))
    skip = {CONFIG, name, *external_data_files(header)}
    with staged_folder(out) as tmp:
        report, the_plan = prune(src / name, tmp / name, options, checks, plan_path=plan_path)
        pruned = onnx.load(str(tmp / name), load_external_data=False)
        renamed = renumber_caches(pruned, config)
        if renamed:
            onnx.save_model(pruned, str(tmp / name))  # the graph only: the data file stays
            report.signature_changes.extend(
                f"graph {'input' if old in inputs else 'output'} '{old}' renamed '{new}'"
                for inputs in [{i.name for i in header.graph.input}]
                for old, new in renamed.items())
        new_config = pruned_config(config, Heads.of(pruned, past_key))
        (tmp / CONFIG).write_text(json.dumps(new_config, indent=4) + "\n")
        copy_rest(src, tmp, skip)
    report.output = str(out)
    return report, the_plan


def decoder_file(folder: str | os.PathLike[str]) -> tuple[Path, set[str]]:
    """The folder's decoder file, and the names of the files that hold it (its external data
    too)."""
    path = Path(folder) / _decoder(read_config(Path(folder)))["filename"]
    header = onnx.load(str(path), load_external_data=False)
    return path, {path.name, *external_data_files(header)}


def copy_rest(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the files of the folder ``src`` (its config, tokenizer, …) into ``dst``, but those
    named in ``skip``."""
    for f in sorted(src.iterdir()):
        if f.name not in skip:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, dst / f.name)


def renumber_caches(model: onnx.ModelProto, config: dict) -> dict[str, str]:
    """Rename the KV caches of ``model`` left after depth pruning dropped attention blocks
    so that their layer numbers run 0, 1, … again, in order (onnxruntime-genai feeds
    ``num_hidden_layers`` caches by the config's ``%d`` name patterns); old name → new name,
    the ones that change."""
    patterns = cache_patterns(config)
    names = [*(i.name for i in model.graph.input), *(o.name for o in model.graph.output)]
    renamed: dict[str, str] = {}
    for pattern in (p for p in patterns if "%d" in p):  # one layer's caches: a plain name
        regex = re.compile(re.escape(pattern).replace("%d", r"(\d+)") + "$")
        found = sorted((int(m.group(1)), n) for n in names if (m := regex.match(n)))
        renamed |= {n: pattern.replace("%d", str(new)) for new, (old, n) in enumerate(found)
                    if new != old}
    if renamed:
        for values in (model.graph.input, model.graph.output, model.graph.value_info):
            for v in values:
                v.name = renamed.get(v.name, v.name)
        for node in model.graph.node:
            for field in (node.input, node.output):
                field[:] = [renamed.get(n, n) for n in field]
    return renamed


_CACHE_NAMES = (("inputs", "past_key_names", "past_key_values.%d.key"),
                ("inputs", "past_value_names", "past_key_values.%d.value"),
                ("outputs", "present_key_names", "present.%d.key"),
                ("outputs", "present_value_names", "present.%d.value"))


def cache_patterns(config: dict) -> list[str]:
    """The config's KV-cache name patterns (past key, past value, present key, present value)."""
    d = _decoder(config)
    return [d.get(side, {}).get(key, default) for side, key, default in _CACHE_NAMES]
