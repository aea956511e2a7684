"""The nightly audit, step by step: specs → stage 1 → selection → judging → results → facts →
summary and review → publish. :func:`ctd.audit.run.run_audit` reads like the pipeline."""
