"""The sampling a request gets for what it leaves unset: the model's own ``generation_config.json``
where it says, else temperature 0.7, top-p 0.9, top-k 50 (greedy decoding loops on a sentence, and
a new user's first story should not).

Read as transformers reads it: ``do_sample: false`` there means greedy (the model's authors chose it),
and then only an explicit temperature samples; otherwise each of temperature, top_p, top_k and
repetition_penalty comes from the file when it has a usable value. The seed is the caller's (every
front end has a default), so a run with the same request reproduces.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dllmctl.generation")

FALLBACK_TEMPERATURE = 0.7
FALLBACK_TOP_P = 0.9
FALLBACK_TOP_K = 50


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = FALLBACK_TEMPERATURE  # 0: the model asks for greedy decoding
    top_p: float = FALLBACK_TOP_P
    top_k: int = FALLBACK_TOP_K
    repetition_penalty: float = 1.0


# Each field the file may set, with what makes its value usable (the same ranges the request checks).
_USABLE = {"temperature": lambda v: 0.0 <= v <= 100.0, "top_p": lambda v: 0.0 < v <= 1.0,
           "top_k": lambda v: isinstance(v, int) and 0 <= v <= 1_000_000,
           "repetition_penalty": lambda v: 0.01 <= v <= 100.0}


def model_defaults(model_dir: Path) -> SamplingDefaults:
    """The defaults ``model_dir/generation_config.json`` sets (fallbacks for what it does not)."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except FileNotFoundError:
        return SamplingDefaults()
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s/generation_config.json: %s", model_dir, exc)
        return SamplingDefaults()
    if not isinstance(config, dict):
        return SamplingDefaults()
    values = {}
    for name, usable in _USABLE.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and usable(value):
            values[name] = value
        else:
            log.warning("ignoring %s = %r in %s/generation_config.json", name, value, model_dir)
    if config.get("do_sample") is False:
        values["temperature"] = 0.0
    return SamplingDefaults(**values)
