"""What a plan was made with: the typed, versioned recipe stored in the plan (format 2).

:class:`Recipe` holds the options that decide the plan and that ``spa apply`` needs again: the
analysis options (``ignore``, whether the hidden size is prunable) and the compensation
recipes. :class:`CompensationRecipe` is OBSPA's weight update (where its layer statistics come
from, the damping), :class:`BiasRecipe` FLAP's bias shift. Both are written by the rewrite from
layer statistics recomputed by ``spa apply`` from these fields, so a saved plan reproduces the
pruned model byte for byte.

Format-1 plans held the same facts in an untyped ``meta`` dict; :meth:`Recipe.from_meta`
converts one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spa.choices import HessianSource, Target


@dataclass(frozen=True)
class CompensationRecipe:
    """OBSPA's update of the kept weights: the layer statistics' source and the damping."""

    hessian: HessianSource
    damping: float
    samples: int
    calib: str | None
    input_dims: tuple[tuple[str, int], ...]
    skip_padding: bool = False  # False (plans before it): statistics counted padding tokens

    def to_dict(self) -> dict[str, Any]:
        body = {"hessian": self.hessian.value, "damping": self.damping, "samples": self.samples,
                "calib": self.calib, "input_dims": dict(self.input_dims)}
        return body | ({"skip_padding": True} if self.skip_padding else {})

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> CompensationRecipe:
        dims = body.get("input_dims") or {}
        return cls(HessianSource(body["hessian"]), float(body["damping"]), int(body["samples"]),
                   body.get("calib"), tuple((str(k), int(v)) for k, v in dims.items()),
                   bool(body.get("skip_padding", False)))


@dataclass(frozen=True)
class BiasRecipe:
    """FLAP's bias compensation: the calibration inputs its layer means come from."""

    calib: str | None
    skip_padding: bool = False  # as CompensationRecipe's

    def to_dict(self) -> dict[str, Any]:
        return {"calib": self.calib} | ({"skip_padding": True} if self.skip_padding else {})

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> BiasRecipe:
        return cls(body.get("calib"), bool(body.get("skip_padding", False)))


@dataclass(frozen=True)
class CalibrationRecipe:
    """Where the calibration data came from and how it was read and split (spa/calibration/),
    so that ``spa apply`` reads the same samples."""

    path: str
    options: dict[str, Any]  # CalibrationOptions' fields
    seed: int
    input_dims: tuple[tuple[str, int], ...] = ()  # the sizes synthetic inputs were made at

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "options": dict(self.options), "seed": self.seed,
                "input_dims": dict(self.input_dims)}

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> CalibrationRecipe:
        options = {k: (tuple(v) if isinstance(v, list) else v)
                   for k, v in dict(body.get("options") or {}).items()}
        dims = body.get("input_dims") or {}
        return cls(str(body["path"]), options, int(body.get("seed", 0)),
                   tuple((str(k), int(v)) for k, v in dims.items()))


@dataclass(frozen=True)
class ReconstructionRecipe:
    """The layer-wise refit on the calibration data (passes/reconstruction.py)."""

    rows: int
    seed: int
    max_rows: int | None = None  # None (plans before it): ``rows`` in every layer
    row_macs: int | None = None
    cut_padding: bool = False  # False (plans before it): chunks in order, padded

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"rows": self.rows, "seed": self.seed}
        if self.max_rows is not None:
            body |= {"max_rows": self.max_rows, "row_macs": self.row_macs}
        return body | ({"cut_padding": True} if self.cut_padding else {})

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> ReconstructionRecipe:
        def number(key: str) -> int | None:
            return None if body.get(key) is None else int(body[key])
        return cls(int(body["rows"]), int(body.get("seed", 0)), number("max_rows"),
                   number("row_macs"), bool(body.get("cut_padding", False)))


@dataclass(frozen=True)
class Recipe:
    """The options a plan was made with (a record: every field is given by the pipeline)."""

    criterion: str
    ratio: float
    heads_ratio: float | None
    mlp_ratio: float | None
    hidden_ratio: float | None
    target: Target
    global_ranking: bool
    round_to: int
    seed: int
    ignore: tuple[str, ...]
    compensation: CompensationRecipe | None = None
    bias_compensation: BiasRecipe | None = None
    allocation: str = "uniform"
    calibration: CalibrationRecipe | None = None
    reconstruction: ReconstructionRecipe | None = None
    # --round-to auto: round_to is this CPU's kernel block (resolved here, so that the plan
    # says which block it was made for), applied only where the kernels need it
    # (passes/kernel_widths.py): (group id, its step) for every prunable group.
    kernel_steps: tuple[tuple[int, int], ...] | None = None

    @property
    def hidden(self) -> bool:
        """Whether the analysis made the hidden size (residual stream) prunable."""
        return self.hidden_ratio is not None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "criterion": self.criterion, "ratio": self.ratio, "heads_ratio": self.heads_ratio,
            "mlp_ratio": self.mlp_ratio, "hidden_ratio": self.hidden_ratio,
            "target": self.target.value, "global": self.global_ranking,
            "round_to": self.round_to, "seed": self.seed, "ignore": list(self.ignore)}
        if self.compensation is not None:
            body["compensation"] = self.compensation.to_dict()
        if self.bias_compensation is not None:
            body["bias_compensation"] = self.bias_compensation.to_dict()
        if self.allocation != "uniform":
            body["allocation"] = self.allocation
        if self.calibration is not None:
            body["calibration"] = self.calibration.to_dict()
        if self.reconstruction is not None:
            body["reconstruction"] = self.reconstruction.to_dict()
        if self.kernel_steps is not None:
            body["round_to_auto"] = True
            body["kernel_steps"] = {str(k): v for k, v in self.kernel_steps}
        return body

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Recipe:
        comp, bias = body.get("compensation"), body.get("bias_compensation")
        calib, rec = body.get("calibration"), body.get("reconstruction")
        return cls(str(body["criterion"]), float(body["ratio"]), _ratio(body, "heads_ratio"),
                   _ratio(body, "mlp_ratio"), _ratio(body, "hidden_ratio"),
                   Target(body["target"]), bool(body["global"]), int(body["round_to"]),
                   int(body["seed"]), tuple(str(g) for g in body["ignore"]),
                   CompensationRecipe.from_dict(comp) if comp else None,
                   BiasRecipe.from_dict(bias) if bias else None,
                   str(body.get("allocation", "uniform")),
                   CalibrationRecipe.from_dict(calib) if calib else None,
                   ReconstructionRecipe.from_dict(rec) if rec else None,
                   _steps(body.get("kernel_steps")))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Recipe | None:
        """A format-1 plan's ``meta`` (written with every key but possibly edited by hand:
        missing keys take the values format 1 was written with)."""
        if not meta:
            return None
        legacy = {"criterion": "?", "ratio": 0.0, "target": Target.CHANNELS.value,
                  "global": False, "round_to": 1, "seed": 0, "ignore": []}
        return cls.from_dict(legacy | meta)


def _ratio(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    return None if value is None else float(value)


def _steps(body: dict[str, Any] | None) -> tuple[tuple[int, int], ...] | None:
    return None if body is None else tuple((int(k), int(v)) for k, v in body.items())
