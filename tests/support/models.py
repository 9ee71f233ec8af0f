"""The local test models, built (once, cached outside the repo) by scripts/prepare_models.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_models.py"


def prepare_models() -> ModuleType:
    name = "docqueue_prepare_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_model() -> str:
    return str(prepare_models().ensure_tiny_model())


def tiny_bert_model() -> str:
    """A tiny randomly initialised ``BertForSequenceClassification`` (labels billing, outage,
    other): the encoder classifier of the transformers engine's tests."""
    return str(prepare_models().ensure_tiny_bert_classifier())


def tiny_model_alias(tag: str) -> str:
    """The tiny model under another path (a symlink next to it): another model name, so another
    queue. A module that runs its own worker of the tiny model uses one, so the session's shared
    tiny worker (tests/e2e/conftest.py) never takes its chunks."""
    real = Path(tiny_model())
    alias = real.with_name(f"{real.name}-{tag}")
    if not alias.exists():
        alias.symlink_to(real, target_is_directory=True)
    return str(alias)


def smollm2_model() -> str:
    return str(prepare_models().ensure_smollm2())


#: A JSON schema the structured-output tests constrain the tiny model with: an enum and a
#: boolean, both required, nothing else (what a yes/no verdict looks like).
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "sure": {"type": "boolean"},
    },
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
