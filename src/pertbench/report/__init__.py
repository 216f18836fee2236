"""Self-contained HTML reports and RO-Crate packaging of benchmark results."""

from pertbench.report.crate import write_crate
from pertbench.report.html import write_report

__all__ = ["write_crate", "write_report"]
