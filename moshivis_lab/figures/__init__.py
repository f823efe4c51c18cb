"""The paper's figures and ``REPORT.md``, rebuilt from a preset's artefacts.

```python
from moshivis_lab.figures import make_figures, write_report

result = make_figures(cfg, out_dir, run="main", progress=True)  # PNG + SVG + HTML, figures.json
path = write_report(cfg, out_dir, figures=result, timings=None)  # out_dir/REPORT.md
```

``paper`` holds the pure builders (``*_figure``) and ``FIGURES`` (name -> builder of the
artefacts), ``export`` the writer (kaleido 1.x + Chromium, HTML always), ``latency`` the vision
overhead measurement, ``report`` the markdown report with the paper's numbers beside ours.
"""

from moshivis_lab.figures.export import BROWSER_HINT, find_browser, write_figure
from moshivis_lab.figures.paper import FIGURES, MissingArtefact, Sources, make_figures
from moshivis_lab.figures.report import write_report

__all__ = [
    "BROWSER_HINT",
    "FIGURES",
    "MissingArtefact",
    "Sources",
    "find_browser",
    "make_figures",
    "write_figure",
    "write_report",
]
