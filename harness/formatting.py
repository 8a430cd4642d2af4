"""How numbers read in every output (terminal, HTML, Markdown)."""
from __future__ import annotations

import math
import numbers


def fmt(value, digits: int = 2) -> str:
    """A number for people: None, NaN or a missing field is an em dash, never 0."""
    if not isinstance(value, numbers.Real) or math.isnan(value):
        return "—"
    return f"{value:.{digits}f}"
