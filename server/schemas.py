"""Request and response bodies of the HTTP API (Contract 2 in DESIGN.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quorum.runtime.faults import FaultPlan
from quorum.runtime.results import FailureKind

__all__ = [
    "ClassPrediction",
    "FailedModuleOut",
    "FaultPlanBody",
    "ModuleStatusOut",
    "ModulesResponse",
    "ModulesUsed",
    "PredictRequest",
    "PredictResponse",
    "RegressionResponse",
    "ReloadBody",
    "ReloadResult",
    "ServiceInfo",
    "ValuePrediction",
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(
        description="A batch of raw inputs in the manifest's input shape, e.g. N lists of 784 pixel values 0..255.",
        examples=[[[0] * 784]],
    )


class UncertaintyOut(BaseModel):
    """How far to trust one answer, from the modules it used."""

    entropy: float = Field(description="Of the (calibrated) probabilities, in nats.")
    mutual_information: float | None = Field(
        description="Nats: the modules' disagreement (0 when they agree); null when the members are not known."
    )
    vote_share: float | None = Field(
        description="Share of the modules used whose own most probable class is the label."
    )
    p_correct: float | None = Field(
        None,
        description="The chance the label is right, for this many modules and this top probability (fitted on the "
        "validation split); null when the bundle has no such fit.",
    )


class ClassPrediction(BaseModel):
    label: int
    class_name: str
    probabilities: list[float] = Field(
        description="Calibrated for the number of modules used, where the bundle has temperatures."
    )
    modules_used: int = Field(description="Modules this input's answer combines (budget=auto: its own; else all used).")
    uncertainty: UncertaintyOut


class FailedModuleOut(BaseModel):
    id: int
    reason: str
    kind: FailureKind = Field(description="What went wrong, for counting (shard_*: a gateway lost its shard).")


class FaultPlanBody(BaseModel):
    """A fault plan for rehearsals: these faults go through the real drop, timeout and breaker code."""

    model_config = ConfigDict(extra="forbid")

    fail: list[int] = Field(default_factory=list, description="Module ids whose runs raise.")
    nan: list[int] = Field(default_factory=list, description="Module ids whose logits become NaN.")
    delay_ms: float = Field(0.0, ge=0, description="Latency injected before every module run.")
    fail_probability: float = Field(0.0, ge=0, lt=1, description="Any module run raises with this probability.")
    nan_probability: float = Field(0.0, ge=0, lt=1, description="Any module run returns NaN with this probability.")
    hang_probability: float = Field(
        0.0, ge=0, lt=1, description="Any module run hangs until its timeout or deadline, with this probability."
    )
    drop_probability: float = Field(0.0, ge=0, lt=1, description="Any module is unavailable with this probability.")
    seed: int | None = Field(None, description="Seeds the random faults.")

    @classmethod
    def from_plan(cls, plan: FaultPlan | None) -> FaultPlanBody:
        if plan is None:
            return cls()
        return cls(
            fail=sorted(plan.fail),
            nan=sorted(plan.nan),
            delay_ms=plan.delay_ms,
            fail_probability=plan.fail_probability,
            nan_probability=plan.nan_probability,
            hang_probability=plan.hang_probability,
            drop_probability=plan.drop_probability,
            seed=plan.seed,
        )

    def to_plan(self) -> FaultPlan:
        return FaultPlan(
            fail=frozenset(self.fail),
            nan=frozenset(self.nan),
            delay_ms=self.delay_ms,
            fail_probability=self.fail_probability,
            nan_probability=self.nan_probability,
            hang_probability=self.hang_probability,
            drop_probability=self.drop_probability,
            seed=self.seed,
        )


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(
        None,
        max_length=4096,
        description="Bundle folder to serve from now on, under QUORUM_BUNDLE_ROOT (default: the configured one).",
    )
    force: bool = Field(
        False, description="Serve it even if some of its modules are quarantined or it has fewer healthy modules."
    )


class ReloadResult(BaseModel):
    bundle: str
    name: str
    healthy_modules: int
    executor: str


class ModulesUsed(BaseModel):
    requested: int = Field(description="Modules asked for: the budget, or every module of the bundle.")
    used: list[int] = Field(description="Ids whose logits were combined, in anytime order.")
    dropped: list[int] = Field(description="Ids made unavailable by fault injection (`drop`).")
    failed: list[FailedModuleOut] = Field(description="Ids that ran but gave no usable answer.")
    injected: list[FailedModuleOut] = Field(
        default_factory=list, description="Ids made to fail by fault injection (a rehearsal), apart from real failures."
    )
    unfinished: list[int] = Field(
        default_factory=list, description="Ids not done by the request's deadline (`deadline_ms`); not failures."
    )


class PredictResponse(BaseModel):
    predictions: list[ClassPrediction]
    modules: ModulesUsed
    degraded: bool = Field(description="True when fewer modules answered than were requested.")
    latency_ms: float


class ValuePrediction(BaseModel):
    values: dict[str, float] = Field(
        description="Per output name: the predicted value (regression) or expected count (count).",
        examples=[{"progression": 151.3}],
    )


class RegressionResponse(BaseModel):
    """The answer of a regression or count bundle: values in place of classes."""

    task: str = Field(description="The task without classes: regression (Gaussian targets) or count (Poisson targets).")
    targets: list[str] = Field(description="The names of the outputs, in the manifest's order.")
    predictions: list[ValuePrediction]
    modules: ModulesUsed
    degraded: bool = Field(description="True when fewer modules answered than were requested.")
    latency_ms: float


class SpecialistInfo(BaseModel):
    class_index: int
    class_name: str
    subset: list[int] = Field(description="The class's specialist modules, in selection order.")
    val_f1: float = Field(description="One-vs-all F1 of the subset on the validation split.")


class SpecialistAnswer(BaseModel):
    is_class: bool = Field(description="The subset's most probable class is the queried one.")
    probability: float = Field(description="The subset's probability of the queried class.")


class SpecialistResponse(BaseModel):
    specialist: SpecialistInfo
    predictions: list[SpecialistAnswer]
    modules: ModulesUsed
    degraded: bool = Field(description="True when fewer modules answered than were requested.")
    latency_ms: float


class ModuleStatusOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    file: str
    status: Literal["healthy", "quarantined", "elsewhere", "unreachable"] = Field(
        description="elsewhere: another shard serves it; unreachable: no shard that serves it answers (a gateway)."
    )
    reason: str | None
    calls: int
    failures: int
    failure_kinds: dict[str, int] = Field(description="Failures by kind: error, timeout, nonfinite.")
    last_error: str | None
    mean_ms: float | None
    breaker: Literal["closed", "open", "half_open"] = Field(description="open: out of rotation after failures.")
    open_for_s: float | None = Field(description="Seconds until an open breaker lets the module be tried again.")
    breaker_trips: int = Field(description="Times the breaker has opened.")
    shard: str | None = Field(None, description="A gateway's view: the shard that serves the module.")


class ModulesResponse(BaseModel):
    healthy: int
    total: int
    modules: list[ModuleStatusOut]


class ServiceInfo(BaseModel):
    name: str
    bundle: str
    num_modules: int
    healthy_modules: int
    classes: list[str] = Field(description="Class names; empty for regression and count bundles.")
    task: str = Field(description="classification, regression (Gaussian targets) or count (Poisson targets).")
    targets: list[str] = Field(description="Output names of a regression or count bundle; empty for classification.")
    input_shape: list[int]
    lam: float
    test_error: float
    specialists: bool = Field(description="The bundle answers `?specialist=` queries.")
    providers: list[str]
    executor: Literal["packed", "isolated", "gateway"] = Field(
        description="How modules run: one packed graph, one session each, or on shards behind a gateway."
    )
    executor_note: str | None = Field(description="Why the packed graph is not used, when it is not.")
