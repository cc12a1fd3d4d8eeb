"""The model spec: the model a user *writes* (the ``model`` settings section).

One :class:`ModelSpec` says which record fields are inputs and which is the
target, how each column is transformed into model space, and the BNN's shape.
Warm start, daemon, replay, experiment and query all read the same spec; the
warm start stores what it needs of it in the state it writes
(:class:`~fogline.models.config.ModelConfig` for the inference shape,
:class:`~fogline.models.schema.DataSchema` for the named, fitted columns), so a
snapshot is self-describing.  :func:`contradictions` lists where a spec and a
stored state disagree; the daemon refuses to start on any of them.

Columns and transforms
----------------------
Every feature and the target has a transform (``transform`` for all, with
per-column overrides in ``transforms``):

* ``standardise`` (default): z = (v - mean) / sd, mean and sd fitted on the
  warm start's training rows;
* ``log1p``: z = (log(1 + v) - mean) / sd, for positive heavy-tailed columns
  (the column must be > -1);
* ``none``: z = v.

The functional prior (:mod:`fogline.models.fprior`) works in model space on
the features it names (``functional_prior.features``; all by default).

>>> spec = ModelSpec(features=("cpu", "mem"), target="throughput")
>>> spec.to_config().in_features, spec.transform_of("throughput")
(2, 'standardise')
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fogline.models.config import (
    Activation,
    GuideName,
    LikelihoodName,
    ModelConfig,
    NoiseHead,
    PriorName,
)

Transform = Literal["standardise", "log1p", "none"]
#: Model inputs: ``tabular`` (the named features of each record) or
#: ``autoregressive`` (a key's last ``lags`` values of the target, plus calendar features).
Mode = Literal["tabular", "autoregressive"]

#: Autoregressive mode's seasonal inputs: ``"auto"`` (the warm start detects a period
#: P on the history), ``"none"`` (no seasonal inputs) or a fixed period P >= 2 (records).
Season = Literal["auto", "none"] | int

#: The default feature names of a model nobody described: ``x0 .. x7``.
DEFAULT_FEATURES: tuple[str, ...] = tuple(f"x{i}" for i in range(8))


class FunctionalPriorSpec(BaseModel):
    """The functional prior of the warm start and the stream (:mod:`fogline.models.fprior`).

    ``weight`` is gamma (0 turns the term off like ``enabled = false``);
    ``scale`` is sigma_0 in target model units (``None``: 2 sd of the
    training target in model space); ``features`` names the features whose
    out-of-data region is probed (``None``: all); ``margin`` how far beyond
    that region probes fall (model units).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    weight: float = Field(default=0.05, ge=0)
    scale: float | None = Field(default=None, gt=0)
    features: tuple[str, ...] | None = None
    margin: float = Field(default=3.0, gt=0)

    @property
    def active(self) -> bool:
        """Whether the term is applied (enabled with a positive weight)."""
        return self.enabled and self.weight > 0


class ModelSpec(BaseModel):
    """What the model reads, predicts and is: the ``model`` section of the settings.

    Data fields: ``features`` (ordered input names), ``target``, optional
    ``key`` (record field naming the source) and ``timestamp`` (record field
    holding the event time; ``None``: the wire format's ``ts``, else the Kafka
    timestamp).  Transforms: see the module docstring.  The rest is the BNN
    (:class:`~fogline.models.config.ModelConfig`, same names and meanings).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "tabular"
    features: tuple[str, ...] = DEFAULT_FEATURES
    target: str = Field(default="y", min_length=1)
    key: str | None = None
    timestamp: str | None = None
    transform: Transform = "standardise"
    transforms: dict[str, Transform] = Field(default_factory=dict)
    #: Autoregressive mode: how many past values of the key's target are inputs.
    lags: int = Field(default=8, ge=1)
    #: Autoregressive mode: add hour-of-day and day-of-week as sin/cos inputs.
    calendar: bool = True
    #: Autoregressive mode: the values one season ago (lags P - 1, P, P + 1) and the
    #: seasonal naive forecast as inputs (:data:`Season`; see
    #: :func:`fogline.models.autoregressive.resolve_season`).  The warm start stores
    #: the resolved value (a period or ``"none"``), never ``"auto"``.
    season: Season = "auto"
    hidden: tuple[int, ...] = (32, 32)
    activation: Activation = "relu"
    likelihood: LikelihoodName = "gaussian"
    df: float | None = Field(default=None, gt=0)
    guide: GuideName = "meanfield"
    rank: int = Field(default=10, ge=1)
    prior: PriorName = "fan_in"
    prior_scale: float = Field(default=1.0, gt=0)
    init_scale: float = Field(default=1e-3, gt=0)
    noise_head: NoiseHead = "bounded"
    noise_min: float = Field(default=1e-3, ge=0)
    #: Upper bound of the bounded noise head in target *model* units; ``None``:
    #: 3 sd of the training target in model space (3.0 when standardised).
    noise_max: float | None = Field(default=None, gt=0)
    functional_prior: FunctionalPriorSpec = Field(default_factory=FunctionalPriorSpec)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if isinstance(self.season, int) and (isinstance(self.season, bool) or self.season < 2):
            raise ValueError(
                f'season: a period must be an integer >= 2 records, or "auto"/"none"; '
                f"got {self.season!r}"
            )
        if self.mode == "autoregressive":
            self._autoregressive_inputs()
        if not self.features:
            raise ValueError("features: a model needs at least one feature")
        dup = sorted({f for f in self.features if self.features.count(f) > 1})
        if dup:
            raise ValueError(f"features: duplicate names {dup}")
        if any(not f for f in self.features):
            raise ValueError("features: names must be non-empty")
        if self.target in self.features:
            raise ValueError(f"target: {self.target!r} is also listed in features")
        for name in (self.key, self.timestamp):
            if name is not None and (name in self.features or name == self.target):
                raise ValueError(f"key/timestamp: {name!r} is also a feature or the target")
        unknown = sorted(set(self.transforms) - set(self.features) - {self.target})
        if unknown:
            raise ValueError(
                f"transforms: {unknown} are neither features nor the target "
                f"(features {list(self.features)}, target {self.target!r})"
            )
        if self.likelihood == "bernoulli" and self.transform_of(self.target) != "none":
            raise ValueError(
                f"transforms.{self.target}: a bernoulli target is 0/1 and takes transform 'none'"
            )
        if self.functional_prior.features is not None:
            bad = sorted(set(self.functional_prior.features) - set(self.features))
            if bad:
                raise ValueError(f"functional_prior.features: {bad} are not features")
        if any(h < 1 for h in self.hidden):
            raise ValueError("hidden: every width must be >= 1")
        return self

    def _autoregressive_inputs(self) -> None:
        """Autoregressive mode: the inputs are derived, not written (``features`` is set here).

        ``features`` becomes ``lag_1 .. lag_L`` (+ the calendar terms,
        :func:`fogline.models.autoregressive.spec_feature_names`); the lags take
        the target's transform and the calendar terms ``none`` (they lie in
        [-1, 1]) unless ``transforms`` names them.  With a period P
        (``season`` an integer) the seasonal lags and ``season_naive`` are
        inputs too (same transform as the lags; ``standardise`` where the lags
        take ``log1p``, as the naive forecast can be negative).  A ``timestamp`` field is
        required (the calendar terms and the series order come from it).
        """
        from fogline.models.autoregressive import (
            CALENDAR_FEATURES,
            SEASON_NAIVE,
            spec_feature_names,
        )

        names = spec_feature_names(self)
        if "features" in self.model_fields_set and tuple(self.features) != names:
            raise ValueError(
                "features: autoregressive mode builds its inputs from the target's last "
                f"{self.lags} values{' and the calendar' if self.calendar else ''} "
                f"({list(names)}); leave features out"
            )
        if self.timestamp is None:
            raise ValueError(
                "timestamp: autoregressive mode needs the record field holding the time "
                '(e.g. timestamp = "ts")'
            )
        lag_kind = self.transform_of(self.target)
        naive_kind = "standardise" if lag_kind == "log1p" else lag_kind
        transforms = {
            n: ("none" if n in CALENDAR_FEATURES else naive_kind if n == SEASON_NAIVE else lag_kind)
            for n in names
        }
        transforms.update(self.transforms)
        # frozen model: the derived values are set once, here, during validation
        object.__setattr__(self, "features", names)
        object.__setattr__(self, "transforms", transforms)

    @model_validator(mode="before")
    @classmethod
    def _bernoulli_target_default(cls, data: object) -> object:
        """A bernoulli target defaults to transform ``none`` (it is 0/1)."""
        if isinstance(data, dict) and data.get("likelihood") == "bernoulli":
            target = data.get("target", "y")
            transforms = dict(data.get("transforms") or {})
            transforms.setdefault(target, "none")
            data = {**data, "transforms": transforms}
        return data

    def transform_of(self, column: str) -> Transform:
        """The transform of a feature or the target (override, else ``transform``)."""
        return self.transforms.get(column, self.transform)

    def fprior_feature_indices(self) -> tuple[int, ...]:
        """Indices of the features the functional prior probes (all when unnamed)."""
        names = self.functional_prior.features
        if names is None:
            return tuple(range(len(self.features)))
        return tuple(self.features.index(n) for n in names)

    def to_config(self, noise_max: float | None = None) -> ModelConfig:
        """The :class:`ModelConfig` of this spec (``noise_max`` overrides the spec's)."""
        nm = noise_max if noise_max is not None else self.noise_max
        return ModelConfig(
            in_features=len(self.features),
            hidden=self.hidden,
            activation=self.activation,
            likelihood=self.likelihood,
            guide=self.guide,
            rank=self.rank,
            prior=self.prior,
            prior_scale=self.prior_scale,
            init_scale=self.init_scale,
            noise_head=self.noise_head,
            noise_min=self.noise_min,
            noise_max=nm if nm is not None else 3.0,
            df=self.df,
            feature_names=self.features,
        )


#: ModelConfig fields a spec and a stored state must agree on, by spec field.
_CONFIG_FIELDS: tuple[str, ...] = (
    "hidden",
    "activation",
    "likelihood",
    "guide",
    "rank",
    "noise_head",
)


def contradictions(
    spec: ModelSpec,
    config: ModelConfig,
    target: str | None = None,
    transforms: dict[str, str] | None = None,
) -> list[str]:
    """Where ``spec`` disagrees with a stored state, one ``"model.<field>: ..."`` line each.

    ``config`` is the state's :class:`ModelConfig`; ``target`` and
    ``transforms`` (column -> transform kind) come from its
    :class:`~fogline.models.schema.DataSchema` when it has one.
    """
    problems: list[str] = []
    stored = config.features()
    if tuple(spec.features) != stored:
        problems.append(
            f"model.features: settings say {list(spec.features)}, the state has {list(stored)}"
        )
    for name in _CONFIG_FIELDS:
        if name == "rank" and spec.guide != "lowrank":
            continue
        mine, theirs = getattr(spec, name), getattr(config, name)
        if mine != theirs:
            problems.append(f"model.{name}: settings say {mine!r}, the state has {theirs!r}")
    if spec.likelihood == "student-t" and spec.df is not None and spec.df != config.df:
        problems.append(f"model.df: settings say {spec.df!r}, the state has {config.df!r}")
    if target is not None and spec.target != target:
        problems.append(f"model.target: settings say {spec.target!r}, the state has {target!r}")
    if transforms is not None:
        for column, kind in transforms.items():
            if column in spec.features or column == spec.target:
                mine = spec.transform_of(column)
                if mine != kind:
                    problems.append(
                        f"model.transforms.{column}: settings say {mine!r}, the state has {kind!r}"
                    )
    return problems


__all__ = [
    "DEFAULT_FEATURES",
    "FunctionalPriorSpec",
    "Mode",
    "ModelSpec",
    "Season",
    "Transform",
    "contradictions",
]
