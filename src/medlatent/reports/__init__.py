"""Reports: results.json (scores, intervals, provenance) and a self-contained report.html."""

from .html import format_flops, health_warnings, read_results, render_report, write_report, write_results
from .provenance import package_versions, provenance

__all__ = [
    "format_flops",
    "health_warnings",
    "package_versions",
    "provenance",
    "read_results",
    "render_report",
    "write_report",
    "write_results",
]
