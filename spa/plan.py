"""The plan: every pruning decision, as a plain JSON-serialisable object.

Everything before the plan only reads the model; everything after only applies it. A plan names
the model it belongs to (a structural fingerprint) and, per group, the channels to keep
(indices into the group's channels, which follow the order of its first producer's output axis).
``spa apply`` re-runs the (deterministic) analysis and refuses a plan that does not match.
What the plan was made with is its typed :class:`~spa.recipe.Recipe` (format 2); a format-1
plan's untyped ``meta`` is converted when it is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spa.errors import PlanMismatchError
from spa.recipe import Recipe

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.coupling.types import SpaceKey

PLAN_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: the recipe as an untyped meta dict


@dataclass(frozen=True)
class GroupPlan:
    id: int
    name: str
    size: int
    keep: tuple[int, ...]

    @property
    def removed(self) -> int:
        return self.size - len(self.keep)


@dataclass(frozen=True)
class FrozenGroup:
    id: int
    name: str
    size: int
    reasons: tuple[str, ...]


# the nodes a dropped block ends in (passes/blocks.py): a residual Add or a fused residual norm
RESIDUAL_OPS = frozenset({"Add", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


@dataclass(frozen=True)
class DroppedBlock:
    """A residual block depth pruning removes (passes/blocks.py): its ``Add`` node is rewritten
    into the stream input ``stream``; the masked original zeroes the constants ``zero`` (the
    branch's last layer) so that the branch output ``branch`` is exactly 0. ``score``: the
    importance the block was chosen by (lowest first)."""

    add: str
    stream: str
    branch: str
    zero: tuple[str, ...]
    score: float
    # KV-cache pairs (past input, present output) the branch reads and writes: both leave the
    # graph's signature with it.
    caches: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Prediction:
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    groups: tuple[GroupPlan, ...]
    frozen: tuple[FrozenGroup, ...] = ()
    prediction: Prediction | None = None
    recipe: Recipe | None = None
    dropped: tuple[DroppedBlock, ...] = ()  # depth pruning: whole residual blocks removed

    def to_dict(self) -> dict:
        body = {k: v for k, v in asdict(self).items() if k not in ("recipe", "dropped")}
        if self.dropped:  # absent without depth pruning: such plans read as before
            body["dropped"] = [asdict(b) for b in self.dropped]
        body["recipe"] = self.recipe.to_dict() if self.recipe is not None else None
        body["format"] = PLAN_FORMAT
        return body

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def options(self) -> dict:
        """The recipe as plain values, for reports (empty for a plan without one)."""
        return self.recipe.to_dict() if self.recipe is not None else {}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str, source: str = "<plan>") -> Plan:
        with _valid(source, "plan"):
            body = json.loads(text)
        if isinstance(body, dict) and FOLDER_KEY in body:
            raise PlanMismatchError(f"{source}: the plan of a folder of ONNX files (spa prune "
                                    "folder/ --plan): apply it to that folder")
        return cls.from_dict(body, source)

    @classmethod
    def from_dict(cls, body: dict, source: str = "<plan>") -> Plan:
        with _valid(source, "plan"):
            if body.get("format") not in READABLE_FORMATS:
                raise PlanMismatchError(f"{source}: not a plan of format "
                                        f"{' or '.join(map(str, READABLE_FORMATS))}")
            groups = tuple(GroupPlan(_integer(g["id"], "id"), str(g["name"]),
                                     _integer(g["size"], "size"),
                                     tuple(_integer(i, f"keep index of group {g['id']}")
                                           for i in g["keep"])) for g in body["groups"])
            frozen = tuple(FrozenGroup(_integer(g["id"], "id"), str(g["name"]),
                                       _integer(g["size"], "size"), tuple(g["reasons"]))
                           for g in body.get("frozen", ()))
            pred = Prediction(**body["prediction"]) if body.get("prediction") else None
            recipe = (Recipe.from_meta(body.get("meta") or {}) if body["format"] == 1
                      else Recipe.from_dict(body["recipe"]) if body.get("recipe") else None)
            dropped = tuple(DroppedBlock(str(b["add"]), str(b["stream"]), str(b["branch"]),
                                         tuple(str(z) for z in b["zero"]), float(b["score"]),
                                         tuple((str(p), str(q)) for p, q in b.get("caches", ())))
                            for b in body.get("dropped", ()))
            return cls(str(body["fingerprint"]), groups, frozen, pred, recipe, dropped)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        return cls.from_json(*_read(path))

    def check_against(self, analysis: Analysis) -> None:
        """Raise :class:`PlanMismatchError` unless this plan can be applied to ``analysis``."""
        if self.fingerprint != analysis.fingerprint:
            raise PlanMismatchError(
                f"plan was made for model {self.fingerprint}, this model is "
                f"{analysis.fingerprint} (a different graph)")
        by_id = {g.id: g for g in analysis.groups}
        nodes = {n.name: n for n in analysis.model.graph.nodes} if self.dropped else {}
        for b in self.dropped:
            add = nodes.get(b.add)
            if add is None or add.op not in RESIDUAL_OPS or \
                    sorted(t.name for t in add.inputs[:2]) != sorted((b.stream, b.branch)):
                raise PlanMismatchError(f"plan drops block '{b.add}' = Add({b.stream}, "
                                        f"{b.branch}), which is not in the model")
        for gp in self.groups:
            g = by_id.get(gp.id)
            if g is None or g.size != gp.size or g.name != gp.name:
                raise PlanMismatchError(f"plan group {gp.id} ({gp.name}) does not exist in model")
            if gp.removed and not g.prunable:
                why = "; ".join(g.frozen) or "it has no producer"
                raise PlanMismatchError(f"plan prunes group {gp.id} ({gp.name}) but {why}")
            keep = np.asarray(gp.keep)
            if keep.size == 0 or keep.min() < 0 or keep.max() >= g.size \
                    or np.any(np.diff(keep) <= 0):
                raise PlanMismatchError(f"plan group {gp.id} ({gp.name}): keep indices must be "
                                        f"sorted, unique, non-empty and below {g.size}")


@contextmanager
def _valid(source: str, what: str) -> Iterator[None]:
    """Malformed JSON content read inside it becomes a :class:`PlanMismatchError`."""
    try:
        yield
    except PlanMismatchError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PlanMismatchError(f"{source}: not a valid SPA {what} ({exc})") from exc


def _read(path: str | os.PathLike[str]) -> tuple[str, str]:
    p = Path(path)
    if not p.is_file():
        raise PlanMismatchError(f"{p}: no such plan file")
    return p.read_text(), str(p)


FOLDER_KEY = "folder_format"  # the key that marks a folder's plan, and its format
FOLDER_FORMAT = 1


@dataclass(frozen=True)
class FolderPlan:
    """The plans of a folder's ONNX files pruned together (spa/pipeline/family.py): each pruned
    file's plan by name, and the files with nothing to prune, copied as they are. A merged
    decoder is there as its two branches (``<stem>.then_branch.onnx``, ``.else_branch``); one
    SPA cannot split is in neither, left out of the pruned folder."""

    files: dict[str, Plan]
    copied: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps({FOLDER_KEY: FOLDER_FORMAT, "copied": sorted(self.copied),
                           "files": {n: p.to_dict() for n, p in self.files.items()}},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "<plan>") -> FolderPlan:
        with _valid(source, "folder plan"):
            body = json.loads(text)
            if not isinstance(body, dict):
                raise TypeError("not a JSON object")
            if FOLDER_KEY not in body:
                if "format" in body:
                    raise PlanMismatchError(f"{source}: the plan of one ONNX file: apply it to "
                                            "that file, not to a folder")
                raise KeyError(FOLDER_KEY)
            if body[FOLDER_KEY] != FOLDER_FORMAT:
                raise PlanMismatchError(f"{source}: not a folder plan of format {FOLDER_FORMAT}")
            files = {str(n): Plan.from_dict(p, f"{source}, file {n}")
                     for n, p in body["files"].items()}
            return cls(files, tuple(str(n) for n in body["copied"]))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FolderPlan:
        return cls.from_json(*_read(path))


def _integer(value: object, what: str) -> int:
    """A JSON integer, as is: 2.0, 0.5, "3" and true are refused, not truncated or coerced."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {json.dumps(value)}")
    return value


def removed_indices(analysis: Analysis, plan: Plan) -> dict[SpaceKey, np.ndarray]:
    """Per channel space, the indices the plan removes (spaces it does not touch are absent)."""
    by_id = {g.id: g for g in analysis.groups}
    out: dict[SpaceKey, list[np.ndarray]] = {}
    for gp in plan.groups:
        if not gp.removed:
            continue
        group = by_id[gp.id]
        gone = np.ones(group.size, dtype=bool)
        gone[list(gp.keep)] = False
        for m in group.members:
            idx = m.indices[gone[m.channels]]
            if idx.size:
                out.setdefault(m.space, []).append(idx)
    return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


def kept_indices(analysis: Analysis, plan: Plan) -> dict[SpaceKey, np.ndarray]:
    """Per changed channel space, the sorted indices that survive."""
    kept = {}
    for key, gone in removed_indices(analysis, plan).items():
        mask = np.ones(analysis.lengths[key], dtype=bool)
        mask[gone] = False
        kept[key] = np.flatnonzero(mask)
    return kept
