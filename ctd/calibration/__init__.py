"""Calibrating λ*: the estimator (:mod:`.calibrator`), the artifact it makes (:mod:`.artifact`), its
report (:mod:`.report`) and the calibration job (:mod:`.job`)."""
