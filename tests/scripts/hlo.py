"""Cross-device communication in compiled HLO (shared by the sharding scripts)."""

import re

import numpy as np

COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
)


def collective_sizes(hlo):
    """(kind, element count) of every cross-device collective's result in compiled HLO."""
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            shapes = re.findall(r"\[([0-9,]*)\]", m.group(1))
            count = max(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)
            found.append((m.group(2), count))
    return found
