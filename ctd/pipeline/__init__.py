"""The distributed batch job on Ray Data: corpus reading and validation, stages, the job graph
shared by the train, calibrate and audit jobs, run publishing and reports."""
