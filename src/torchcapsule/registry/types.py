"""Plain data of the registry (no mlflow): model versions, promotion decisions, model URIs."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import RegistryError

# Files of the trained model directory (the contract between train, registry and serve).
WEIGHTS = "model.safetensors"
CODE = "model.py"
META = "meta.json"
MODEL_FILES = (WEIGHTS, CODE, META)
# Written by download() next to the model files: the checksums serve re-verifies at load.
CHECKSUMS = "checksums.sha256"

_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+|latest))$")


@dataclass(frozen=True)
class ModelRef:
    """models:/NAME@ALIAS or models:/NAME/VERSION, parsed."""

    name: str
    alias: str | None = None
    version: str | None = None  # a number, or "latest"

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str, *, flag: str = "model URI") -> ModelRef:
    """'models:/digits@champion' | 'models:/digits/3' | 'digits@champion' | 'digits/3'."""
    text = uri.strip()
    if not text.startswith("models:/"):
        text = "models:/" + text
    m = _URI.match(text)
    if not m:
        raise RegistryError(
            f"{flag}: '{uri}' is not a model URI; use models:/NAME@ALIAS or models:/NAME/VERSION "
            "(e.g. models:/digits@champion)"
        )
    return ModelRef(m["name"], m["alias"], m["version"])


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""
    run_id: str | None = None
    created_at: str | None = None  # ISO-8601 UTC

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def checksums(self) -> dict[str, str]:
        """file name -> sha256, as recorded at registration (tags capsule.sha256.<file>)."""
        prefix = "capsule.sha256."
        return {k[len(prefix):]: v for k, v in self.tags.items() if k.startswith(prefix)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "aliases": list(self.aliases),
            "metrics": self.metrics, "params": self.params, "tags": self.tags,
            "source": self.source, "run_id": self.run_id, "created_at": self.created_at,
            "uri": self.uri,
        }


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    alias: str | None = None
    version: str | None = None
