"""What reports show: redaction and excerpts (no matplotlib), plots, and self-contained pages."""
