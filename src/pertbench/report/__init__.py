"""Self-contained HTML reports and RO-Crate packaging of benchmark results."""
