"""pytest plugin loaded by the nbval run (``-p nbval_ignore_stderr``): stderr
streams (progress bars, warnings) are never compared, only stdout and results."""

from __future__ import annotations

import nbval.plugin

_transform = nbval.plugin.transform_streams_for_comparison


def _without_stderr(outputs):
    return _transform([o for o in outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")])


nbval.plugin.transform_streams_for_comparison = _without_stderr
