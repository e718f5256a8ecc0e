"""GPU memory of the scorers and the GPU fractions that fit common cards (docs/deploy.md).

    python -m cluster.sizing     # builds each architecture on the meta device (no weights, no
                                 # memory, no network), counts parameters, prints the tables

Estimates, not measurements: weights = parameters x 2 bytes (fp16/bf16), plus an activation
allowance per replica at the production batch size (each scorer registry entry's activation_gb,
reasoned in docs/deploy.md), plus one CUDA context per replica process (each Serve replica is its own process). Ray's GPU
fractions are bookkeeping, not memory limits, so a fraction is chosen as memory need / card.
"""

from __future__ import annotations

import math
import sys

from scorers import registry
from scorers.sizes import AESTHETIC_HEAD_PARAMS, _count, count_open_clip, count_pickscore, count_qwen25_vl_3b  # noqa: F401

CARDS_GB = (24, 48, 80)
CUDA_CONTEXT_GB = 0.5


def sized() -> tuple[registry.ScorerEntry, ...]:
    """The registered scorers with an activation allowance: the ones that take a GPU of their own."""
    return tuple(entry for entry in registry.entries() if entry.activation_gb is not None)


def parameter_counts() -> dict[str, int]:
    """Each sized scorer's production parameter count, by the counter its registry entry names."""
    return {entry.name: entry.count_parameters() for entry in sized()}


def activation_gb(scorer: str) -> float:
    allowance = registry.get(scorer).activation_gb
    if allowance is None:
        raise ValueError(f"scorer {scorer!r} has no activation allowance in the scorer registry")
    return allowance


def need_gb(params: int, scorer: str) -> float:
    return params * 2 / 1e9 + activation_gb(scorer) + CUDA_CONTEXT_GB


def fractions_for(needs: dict[str, float], card_gb: float) -> tuple[dict[str, float], int]:
    """Each scorer's num_gpus (its need / the card, rounded up to 0.01) and how many full sets
    of them fit one card."""
    fractions = {name: math.ceil(need / card_gb * 100) / 100 for name, need in needs.items()}
    return fractions, int(1 // sum(fractions.values()))


def main() -> int:
    counts = parameter_counts()
    needs = {name: need_gb(n, name) for name, n in counts.items()}
    print("| scorer | parameters | weights fp16/bf16 | + activations | + CUDA context | need |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n in counts.items():
        print(f"| {name} | {n:,} | {n * 2 / 1e9:.2f} GB | {activation_gb(name)} GB | {CUDA_CONTEXT_GB} GB | {needs[name]:.2f} GB |")
    print(f"| one set | | {sum(n * 2 for n in counts.values()) / 1e9:.2f} GB | | | {sum(needs.values()):.2f} GB |\n")
    print("| card | " + " | ".join(counts) + " | sets per card |")
    print("|---|" + "---:|" * (len(counts) + 1))
    for card in CARDS_GB:
        fractions, sets = fractions_for(needs, card)
        print(f"| {card} GB | " + " | ".join(f"{fractions[n]:.2f}" for n in counts) + f" | {sets} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
