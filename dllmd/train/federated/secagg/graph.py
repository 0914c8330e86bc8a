"""Who shares masks and keys with whom (SecAgg+, Bell et al. 2020).

Small rounds use classic SecAgg: every client neighbours every other. Beyond ``complete_up_to`` clients
each has ``k = 2 * ceil(log2 n)`` neighbours: a Harary graph (a ring where each client links to the k/2
nearest on either side) over a random permutation of the clients, drawn from the coordinator's round
seed. Masks, keys and shares then cost O(k) per client instead of O(n), and with k = O(log n) a random
neighbourhood still holds enough honest survivors with overwhelming probability.
"""

from __future__ import annotations

import math

from dllmd.train.federated.secagg.masks import random_words


def degree(clients: int, neighbours: int, complete_up_to: int) -> int:
    """Neighbours per client: ``neighbours`` if given (even, or ``clients - 1``), else the default above."""
    if neighbours:
        if neighbours != clients - 1 and (neighbours % 2 or not 2 <= neighbours < clients - 1):
            raise ValueError(f"{neighbours} neighbours: an even number below {clients - 1}, or {clients - 1}")
        return neighbours
    if clients <= complete_up_to:
        return clients - 1
    return min(clients - 1, 2 * math.ceil(math.log2(clients)))


def threshold(k: int, wanted: int) -> int:
    """Shares that rebuild a secret: more than half of its ``k + 1`` holders (the ``k`` neighbours and the
    owner; ``wanted`` if given). Above half matters: it stops a coordinator from collecting both secrets of
    one client by telling half of its holders that it survived and the other half that it dropped (each
    answers one request a round)."""
    least = (k + 1) // 2 + 1
    if wanted and not least <= wanted <= k:
        raise ValueError(f"threshold {wanted} is not within {least}..{k} (more than half of {k + 1} holders)")
    return wanted or least


def neighbour_graph(clients: int, k: int, key: bytes) -> list[frozenset[int]]:
    """Each client's neighbours, the same for everyone who holds ``key`` (derived from the round seed)."""
    if k == clients - 1:
        return [frozenset(range(clients)) - {u} for u in range(clients)]
    words = random_words(key, clients)
    ring = sorted(range(clients), key=lambda u: (words[u], u))
    position = {u: p for p, u in enumerate(ring)}
    half = k // 2
    return [frozenset(ring[(position[u] + d) % clients] for d in range(-half, half + 1) if d)
            for u in range(clients)]
