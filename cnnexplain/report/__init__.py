"""The report: what the other commands wrote, as terminal tables, summary.csv and one HTML page."""
