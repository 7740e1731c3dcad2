"""The README's library example runs as written and its claim (influence ≈ PBRF) holds."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs_and_influence_tracks_the_pbrf():
    text = README.read_text()
    block = re.search(r"## The library in ten lines\s+```python\n(.*?)```", text, re.S)
    assert block, "README lost its library example"
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 - our own README
    scores, dm = scope["scores"].numpy(), scope["resp"].loss_change(scope["test"]).numpy()
    k = int(re.search(r"removals=range\((\d+)\)", block.group(1)).group(1))  # as the README says
    assert scores.shape == dm.shape == (20, k)
    assert np.corrcoef(scores.ravel(), dm.ravel())[0, 1] > 0.95
    d = scope["resp"].diagnostics[0]
    assert d["grad_norm"] < 1e-8 and not d["diverged"]
    assert all(scope["resp"].certified)
