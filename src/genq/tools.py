"""Tool definitions: the ToolPool spec schema, built-in parameter schemas, the registry.

A tool is declared once, with the same schema, as a ``ToolPool`` resource (cluster) or an
entry under ``tools:`` in ``genq.yaml`` (embedded). This module parses and validates that
declaration and knows each built-in kind's parameter JSON Schema; it runs nothing (the
worker's ``genq.worker.tools`` package turns a spec into something runnable).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from genq import jsonlimits

ToolKind = Literal["imageEdit", "textToImage", "upscale", "python"]

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

SEED_SCHEMA = {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "description": "Random seed; drawn at random when missing and returned in result.seed."}

#: ``sampler`` names of the ``textToImage`` kind; the worker maps them to diffusers schedulers.
SAMPLER_NAMES = (
    "default", "euler", "euler_a", "heun", "lms", "ddim", "pndm",
    "dpm++", "dpm++_karras", "dpm++_sde", "dpm++_sde_karras", "unipc", "lcm",
)

OUTPUT_FORMAT_SCHEMA = {"type": "string", "enum": ["png", "webp", "jpeg"], "description": "Result file format; png (the default) carries the generation parameters as text chunks."}

#: Parameter schemas of the built-in kinds (SPEC §4). Unknown params are refused.
BUILTIN_PARAMS: dict[str, dict[str, Any]] = {
    "upscale": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "scale": {"type": "integer", "enum": [2, 3, 4], "default": 4, "description": "Output size as a multiple of the input's."},
        },
    },
    "imageEdit": {
        "type": "object",
        "additionalProperties": False,
        "required": ["instruction"],
        "properties": {
            "instruction": {"type": "string", "minLength": 1, "maxLength": 2000},
            "negative_prompt": {"type": "string", "maxLength": 2000},
            "seed": SEED_SCHEMA,
            "true_cfg_scale": {"type": "number", "minimum": 0, "maximum": 20},
            "steps": {"type": "integer", "minimum": 1, "maximum": 100},
            "output_format": OUTPUT_FORMAT_SCHEMA,
        },
    },
    "textToImage": {
        "type": "object",
        "additionalProperties": False,
        "required": ["prompt"],
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": 2000},
            "negative_prompt": {"type": "string", "maxLength": 2000},
            "width": {"type": "integer", "minimum": 64, "maximum": 4096, "multipleOf": 8},
            "height": {"type": "integer", "minimum": 64, "maximum": 4096, "multipleOf": 8},
            "steps": {"type": "integer", "minimum": 1, "maximum": 150},
            "cfg_scale": {"type": "number", "minimum": 0, "maximum": 30},
            "sampler": {"type": "string", "enum": list(SAMPLER_NAMES), "description": "Scheduler; `default` is the model's own. A model refuses samplers its scheduler is not compatible with."},
            "seed": SEED_SCHEMA,
            "num_images": {"type": "integer", "minimum": 1, "maximum": 4, "default": 1},
            "output_format": OUTPUT_FORMAT_SCHEMA,
        },
    },
}

#: How many input images each built-in kind takes.
BUILTIN_INPUTS: dict[str, tuple[int, int]] = {
    "upscale": (1, 1),
    "imageEdit": (1, 3),
    "textToImage": (0, 0),
}

DEFAULT_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "upscale": [{"name": "realesrgan"}, {"name": "lanczos"}],
    "imageEdit": [{"name": "4step"}, {"name": "8step"}, {"name": "40step"}],
    "textToImage": [{"name": "default"}],
    "python": [{"name": "default"}],
}


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class ToolRef(_Spec):
    """Which tool a pool runs: its kind and its public name."""

    kind: ToolKind
    name: str
    entrypoint: str | None = Field(default=None, description="python kind: `package.module:function`.")
    params: dict[str, Any] | None = Field(default=None, description="python kind: the params JSON Schema.")
    inputs: tuple[int, int] | None = Field(default=None, description="python kind: [min, max] input images.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("tool name must be a DNS label: lowercase letters, digits and '-'")
        return v

    @model_validator(mode="after")
    def _python(self) -> ToolRef:
        if self.kind == "python":
            if not self.entrypoint or ":" not in self.entrypoint:
                raise ValueError("a python tool needs entrypoint: 'package.module:function'")
        if self.params is not None:
            jsonschema.Draft202012Validator.check_schema(self.params)
        return self


class Variant(_Spec):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    name: str


class ToolSpec(_Spec):
    """The ``ToolPool`` spec (SPEC §5), also one entry of ``genq.yaml``."""

    tool: ToolRef
    label: str | None = None
    model: str | None = Field(default=None, description="Local folder, object-storage URI or Hugging Face id.")
    variants: list[Variant] = Field(default_factory=list)
    image: str | None = None
    resources: dict[str, Any] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    min_workers: int = Field(default=0, ge=0, alias="minWorkers")
    max_workers: int = Field(default=1, ge=1, alias="maxWorkers")
    concurrency_per_worker: int = Field(default=1, ge=1, alias="concurrencyPerWorker")
    max_queued: int = Field(default=100, ge=1, alias="maxQueued")
    scale_down_delay_seconds: int = Field(default=300, ge=0, alias="scaleDownDelaySeconds")
    active_deadline_seconds: float | None = Field(default=600, gt=0, alias="activeDeadlineSeconds")
    max_attempts: int = Field(default=3, ge=1, le=100, alias="maxAttempts")
    result_ttl_seconds: float = Field(default=3600, gt=0, alias="resultTTLSeconds")
    delete_on_download: bool = Field(default=False, alias="deleteOnDownload")
    options: dict[str, Any] = Field(default_factory=dict, description="Kind-specific settings (backend, device, tile size).")

    @model_validator(mode="after")
    def _check(self) -> ToolSpec:
        if self.min_workers > self.max_workers:
            raise ValueError("minWorkers must be <= maxWorkers")
        if not self.variants:
            self.variants = [Variant(**v) for v in DEFAULT_VARIANTS[self.tool.kind]]
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        return self

    @property
    def name(self) -> str:
        return self.tool.name

    @property
    def kind(self) -> str:
        return self.tool.kind

    @property
    def display_label(self) -> str:
        return self.label or self.tool.name

    @property
    def default_variant(self) -> str:
        return self.variants[0].name

    @property
    def capacity(self) -> int:
        """The tool's concurrency limit: jobs that may run at once."""
        return self.max_workers * self.concurrency_per_worker

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    @property
    def params_schema(self) -> dict[str, Any]:
        if self.tool.params is not None:
            return self.tool.params
        return BUILTIN_PARAMS.get(self.kind, {"type": "object"})

    @property
    def input_range(self) -> tuple[int, int]:
        if self.tool.inputs is not None:
            return self.tool.inputs
        return BUILTIN_INPUTS.get(self.kind, (0, 3))

    @property
    def takes_seed(self) -> bool:
        return "seed" in self.params_schema.get("properties", {})


class ParamsError(ValueError):
    """Params do not match the tool's schema; ``errors`` lists each problem."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


_VALIDATORS: dict[int, tuple[dict[str, Any], jsonschema.Draft202012Validator]] = {}


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """One compiled validator per schema object (building one per request is wasted work)."""
    hit = _VALIDATORS.get(id(schema))
    if hit is None or hit[0] is not schema:
        hit = (schema, jsonschema.Draft202012Validator(schema))
        _VALIDATORS[id(schema)] = hit
    return hit[1]


def validate_params(spec: ToolSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Validate ``params`` against the tool's schema and fill in schema defaults."""
    schema = spec.params_schema
    validator = _validator(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.path))
    if errors:
        raise ParamsError(
            [{"field": ".".join(str(p) for p in e.path) or None, "message": e.message[:300]} for e in errors[:20]]
        )
    out = dict(params)
    for name, prop in schema.get("properties", {}).items():
        if name not in out and isinstance(prop, dict) and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
    return out


def coerce_form_params(spec: ToolSpec, raw: dict[str, str]) -> dict[str, Any]:
    """Turn plain multipart form strings into the types the schema asks for.

    ``seed=42`` arrives as the string "42"; the schema says integer, so it becomes 42. A
    value that does not convert is left as the string and the schema check reports it.
    """
    props = spec.params_schema.get("properties", {})
    out: dict[str, Any] = {}
    for key, value in raw.items():
        types = props.get(key, {}).get("type") if isinstance(props.get(key), dict) else None
        types = [types] if isinstance(types, str) else (types or [])
        out[key] = _coerce(key, value, types)
    return out


def _coerce(key: str, value: str, types: list[str]) -> Any:
    for t in types:
        try:
            if t == "integer":
                integer = int(value)
                if jsonlimits.INT_MIN <= integer <= jsonlimits.INT_MAX:  # what every store can hold
                    return integer
                continue
            if t == "number":
                number = float(value)
                if math.isfinite(number):  # "nan" and "inf" parse, but are not JSON numbers
                    return number
                continue
            if t == "boolean" and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if t in ("object", "array"):
                parsed = jsonlimits.loads(value, field=key)
                if isinstance(parsed, dict if t == "object" else list):
                    return parsed
            if t == "null" and value in ("", "null"):
                return None
        except jsonlimits.JsonLimitExceeded:
            raise  # over a documented limit: a 400 naming it, not a string the schema refuses
        except (ValueError, TypeError):
            continue
    return value


class Registry:
    """The configured tools, by name."""

    def __init__(self, specs: list[ToolSpec]):
        self._tools: dict[str, ToolSpec] = {}
        for s in specs:
            if s.name in self._tools:
                raise ValueError(f"tool {s.name!r} is declared twice")
            self._tools[s.name] = s

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def replace(self, specs: list[ToolSpec]) -> list[ToolSpec]:
        """Swap in a new set of tools at once (the ToolPools of a namespace changed);
        returns the specs that are new or changed."""
        tools = {s.name: s for s in specs}
        changed = [s for s in specs if self._tools.get(s.name) != s]
        self._tools = tools
        return changed

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        return list(self._tools)


DEFAULT_CONFIG: dict[str, Any] = {
    "tools": [
        {
            "tool": {"kind": "upscale", "name": "upscale"},
            "label": "Upscale (Real-ESRGAN, Lanczos fallback)",
            "maxWorkers": 1,
            "variants": [{"name": "realesrgan"}, {"name": "lanczos"}],
        }
    ]
}


def load_registry(path: Path | None) -> Registry:
    """Read ``genq.yaml`` (``tools:`` a list of ToolPool specs); the default if None."""
    data = DEFAULT_CONFIG if path is None else (yaml.safe_load(Path(path).read_text()) or {})
    return registry_from_dict(data)


def registry_from_dict(data: dict[str, Any]) -> Registry:
    tools = data.get("tools") or []
    if not isinstance(tools, list):
        raise ValueError("genq.yaml: 'tools' must be a list of ToolPool specs")
    return Registry([ToolSpec.model_validate(t) for t in tools])
