"""Online monitoring of unfolding outputs with step-wise verifier scores (arXiv 2607.02510): the alarm
rules and their calibration (:mod:`.rules`) and the nightly monitor job (:mod:`.job`)."""
