"""Saving a matplotlib figure, one way: the research-use footer on every picture, written atomically.

Every stage draws with matplotlib's object API (no global pyplot state) and saves through :func:`save_figure`.
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from covid_cxr import DISCLAIMER
from covid_cxr.files import atomic_write


def save_figure(fig: Figure, path, synthetic: bool = False) -> None:
    """Save with the research-use footer (and a SYNTHETIC DATA mark) to a path (atomically, like every output) or a
    binary buffer."""
    footer = ("SYNTHETIC DATA - " if synthetic else "") + DISCLAIMER
    fig.text(0.01, 0.005, footer, fontsize=6, color="#b3261e" if synthetic else "0.4", ha="left", va="bottom")
    if isinstance(path, (str, Path)):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        atomic_write(path, buf.getbuffer())
    else:
        fig.savefig(path, dpi=110, format="png")
