"""The paper's experiments on any scores table (sweeps, guarantee validation, top-k curves), the
high-stakes datasets, and the experts the replication builds (classifier heads, a zero-shot judge)."""
