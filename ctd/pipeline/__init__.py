"""Ray Data stages shared by the train, calibrate and audit jobs: reading and validating the corpus,
stage 1 (tokenize, activations, probes, the gate), duplicate ids, and Ray set-up."""
