"""Render rayjob-audit.yaml and raycronjob-nightly.yaml from raycluster.yaml, so the three manifests
share one cluster spec. Run `python cluster/render.py` after editing raycluster.yaml; a test checks
that the committed files are up to date."""

import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
# The config's path inside the image (cluster/Dockerfile: WORKDIR /app, COPY configs): absolute, so it
# does not depend on the job driver's working directory.
ENTRYPOINT = "python -m jobs.audit --config /app/configs/production.yaml"

JOB_HEADER = """\
# One audit run as a RayJob (KubeRay v1.7.0): KubeRay creates the cluster (same spec as raycluster.yaml:
# the head mounts /models too, since the driver fingerprints the model and loads the judge's tokenizer),
# submits
#   python -m jobs.audit --config /app/configs/production.yaml [--date YYYY-MM-DD]
# and deletes the cluster when the job ends. Exit codes (jobs/audit.py): 0 published, with any drift
# alarm in the report and the manifest's summary (not a failure: nothing is rerun); 2 bad input;
# 4 another driver holds the run id's lease (nothing written); 1 a crash: the retry (backoffLimit)
# resumes the run id from its staging, never duplicating rows, while the last good run stays published.
# Rendered from raycluster.yaml by cluster/render.py: edit that file, then re-render.
"""
CRON_HEADER = """\
# The nightly audit as a RayCronJob, for KubeRay v1.7.0: RayCronJob exists from v1.6.0 and is alpha, off
# unless the operator runs with the `RayCronJob` feature gate (cluster/kuberay-operator-values.yaml);
# `timeZone` needs v1.7.0. Every day at 02:30 UTC a RayJob audits yesterday's logs
# (audit.corpus and audit.run_id use {date}: the audited day, by default yesterday in audit.timezone).
# Retries (backoffLimit 1, activeDeadlineSeconds 8 h each) end before the next midnight UTC, so they
# audit the same day; a manual rerun of an older night passes --date. Overlapping runs of one night
# are refused by the job itself (the run id's lease: exit 4); no RayCronJob field does it (there is no
# concurrencyPolicy in any KubeRay release). An exit 4 is still a failed RayJob to KubeRay, so its one
# retry (backoffLimit 1) starts a cluster that exits 4 again: a cost, never a second writer. A drift alarm exits 0: it is in the report.
# The budget is fixed by the calibration artifact; the hard cap (audit.budget_cap) bounds the expert
# bill even under shift.
# Rendered from raycluster.yaml by cluster/render.py: edit that file, then re-render.
"""


def render() -> dict[str, str]:
    spec = yaml.safe_load(open(os.path.join(HERE, "raycluster.yaml")))["spec"]
    job = {"entrypoint": ENTRYPOINT, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
           "activeDeadlineSeconds": 28800, "backoffLimit": 1, "submissionMode": "K8sJobMode", "rayClusterSpec": spec}
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "ctd-audit"}, "spec": job}
    cron = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "ctd-nightly-audit"},
            "spec": {"schedule": "30 2 * * *", "timeZone": "Etc/UTC", "suspend": False,
                     "jobTemplate": job}}
    dump = lambda d: yaml.safe_dump(d, sort_keys=False, width=120)  # noqa: E731
    return {"rayjob-audit.yaml": JOB_HEADER + dump(rayjob), "raycronjob-nightly.yaml": CRON_HEADER + dump(cron)}


if __name__ == "__main__":
    for name, text in render().items():
        with open(os.path.join(HERE, name), "w") as f:
            f.write(text)
        print(f"wrote cluster/{name}")
    sys.exit(0)
