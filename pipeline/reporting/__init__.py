"""Reporting: report.md, the HTML report, TensorBoard event files and the PNG figures."""
