"""``psedit``: PSEdit's method headless (one edit, or the paper's evaluation over a folder), on the node code."""
