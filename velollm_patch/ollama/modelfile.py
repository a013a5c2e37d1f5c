"""Writing Ollama Modelfiles: a :class:`ModelfileSpec` rendered through ``templates/Modelfile.j2``, with
quotes chosen so that each value reads back exactly, checked by the linter (:mod:`.parser`) before it is
returned; the base model's settings carried over from ``/api/show``; and the tuner's plan (PARAMETERs and a
DRAFT Ollama can load) turned into one; :func:`compose_modelfile` puts these together for ``ollama modelfile``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from velollm_patch.drafts import draft_compatibility
from velollm_patch.errors import VelollmError
from velollm_patch.model import inspect_model
from velollm_patch.model_ref import is_demo_model, resolve_local_model
from velollm_patch.ollama.api import OllamaClient, ShowResponse
from velollm_patch.ollama.gosyntax import go_unquote, parse_bool, parse_float32, parse_int, semver_is_valid
from velollm_patch.ollama.parser import (
    DEPRECATED_PARAMETERS,
    ERR_REQUIRES,
    NEWLINE,
    PARAMETER_EFFECTS,
    PARAMETERS,
    REMOVED_PARAMETERS,
    WHITESPACE,
    ParameterError,
    ParamSpec,
    ParamType,
    ParamValue,
    format_param,
    known_parameter,
    lint_modelfile,
)
from velollm_patch.ollama.server_swap import installed_server
from velollm_patch.ollama.templates import render_template
from velollm_patch.ollama.versions import (
    DRAFT_SINCE,
    LATEST_KNOWN,
    REQUIRES_SINCE,
    Era,
    OllamaVersion,
    parse_reported_version,
)
from velollm_patch.tune import Plan

# --- Generating ----------------------------------------------------------------------------------

_TRIPLE_UNSAFE = re.compile(r'"""[ \t\r\n]*[\r\n]')
_SINGLE_UNSAFE = re.compile(r'"[ \t\r\n]*[\r\n]')
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+")


def _check_representable(what: str, value: str) -> None:
    for ch in value:
        if ch not in WHITESPACE and not ch.isprintable():
            raise VelollmError(
                f"{what} contains U+{ord(ch):04X}, which Ollama drops while reading a Modelfile;"
                " remove it")


def quote_value(value: str, *, what: str, always: bool = False) -> str:
    """Write ``value`` so that Ollama's parser reads back exactly ``value``.

    Values that need it (empty, multi-line, edge whitespace, a leading quote) or all values when
    ``always`` are quoted: triple quotes unless an interior line would end with ``\"\"\"`` (which
    closes the value early); then plain quotes if no interior line ends with ``\"``; otherwise no
    quoting can represent the value and VelollmError says so. ``what`` names the value there.
    """
    _check_representable(what, value)
    multiline = any(ch in NEWLINE for ch in value)
    if not (always or multiline or value == "" or value.strip(WHITESPACE) != value
            or value.startswith('"')):
        return value
    if not multiline or not _TRIPLE_UNSAFE.search(value):
        return f'"""{value}"""'
    if not value.startswith('""') and not _SINGLE_UNSAFE.search(value):
        return f'"{value}"'
    raise VelollmError(
        f"{what} cannot be written to a Modelfile: one of its lines ends with \"\"\" and another"
        " with \", and Ollama's quoting has no escapes")


def _quote_stop(value: str) -> str:
    """Stop strings always quoted, in the ``"..."`` form ``ollama show`` prints where possible."""
    if value and not value.startswith('"') and not any(ch in NEWLINE for ch in value):
        _check_representable("a stop value", value)
        return f'"{value}"'
    return quote_value(value, what="a stop value", always=True)


def _comment_lines(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in re.split(r"\r\n|\r|\n", text)]


@dataclass(frozen=True)
class ModelfileSpec:
    """Everything a generated Modelfile says. ``parameters`` maps PARAMETER names to values
    (``str`` values are taken as written and must parse as the parameter's type); ``stop`` is
    the complete stop list (a derived model's list replaces its base's, so list every stop);
    ``reasons`` maps a parameter name or ``from``/``draft``/``requires``/``stop``/``template``/
    ``system`` to the comment written above it; ``comments`` open the file. ``ollama_version``
    is the release the file is for (default: the newest docs/ollama.md covers)."""

    from_model: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict, hash=False)
    draft: str | None = None
    template: str | None = None
    system: str | None = None
    stop: tuple[str, ...] = ()
    requires: str | None = None
    ollama_version: str | None = None
    comments: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Callers pass lists and dicts; freeze copies so a spec cannot change after it is made.
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "comments", tuple(self.comments))

    def with_parameters(self, parameters: Mapping[str, ParamValue],
                        reasons: Mapping[str, str] | None = None) -> ModelfileSpec:
        """This spec with ``parameters`` set over the existing ones (a tuner's plan)."""
        return replace(self, parameters={**self.parameters, **parameters},
                       reasons={**self.reasons, **(reasons or {})})

    def target(self) -> OllamaVersion:
        return OllamaVersion.parse(self.ollama_version) if self.ollama_version else LATEST_KNOWN


@dataclass(frozen=True)
class _Entry:
    comments: tuple[str, ...]
    line: str


def _param_text(name: str, value: ParamValue, target: OllamaVersion) -> str:
    spec = known_parameter(name, target)
    if spec is None:
        if name in DEPRECATED_PARAMETERS:
            raise VelollmError(f"PARAMETER {name} is deprecated: Ollama ignores it")
        hint = REMOVED_PARAMETERS.get(name) or f"Ollama {target} has no parameter {name!r}"
        raise VelollmError(f"cannot write PARAMETER {name}: {hint}")
    if isinstance(value, bool):
        if spec.type is not ParamType.BOOL:
            raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not a boolean")
        return "true" if value else "false"
    if isinstance(value, int):
        if spec.type not in (ParamType.INT, ParamType.FLOAT):
            raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not an integer")
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if spec.type is not ParamType.FLOAT:
            raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not {text}")
        if parse_float32(text) is None or value != value or value in (float("inf"), float("-inf")):
            raise VelollmError(f"PARAMETER {name}: {text} is not a finite float32")
        return text
    if isinstance(value, str):
        if spec.type is ParamType.STRINGS:
            raise VelollmError(f"pass {name} values in ModelfileSpec.stop")
        try:
            format_param(name, value, target)
        except ParameterError as exc:
            raise VelollmError(f"PARAMETER {name}: {exc}") from exc
        return value
    raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not a list")


def _stops(spec: ModelfileSpec) -> list[str]:
    extra = spec.parameters.get("stop", [])
    if isinstance(extra, str | int | float):
        raise VelollmError("PARAMETER stop takes a list of strings")
    stops: list[str] = []
    for value in (*spec.stop, *extra):
        if value not in stops:
            stops.append(value)
    return stops


def _default_reason(name: str, target: OllamaVersion) -> str:
    effect = PARAMETER_EFFECTS.get(name)
    if effect is None:
        return ""
    general, llama_server = effect
    return f"{name}: {general} ({llama_server})" if target.era is Era.C else f"{name}: {general}"


def render_modelfile(spec: ModelfileSpec) -> str:
    """The Modelfile text for ``spec``, checked by :func:`lint_modelfile` before it is returned.

    Only parameters and commands the target release knows are written; a DRAFT, or a parameter
    that needs a newer Ollama than the target, is an error. When a feature needs a minimum Ollama
    version, a REQUIRES line says so (Ollama 0.14.0+ reads it).
    """
    target = spec.target()
    if not spec.from_model.strip():
        raise VelollmError("a Modelfile needs a FROM model")

    def reason(key: str, default: str = "") -> tuple[str, ...]:
        text = spec.reasons.get(key, default)
        return tuple(_comment_lines(text)) if text else ()

    minimum: list[tuple[OllamaVersion, str]] = []
    parameters: list[_Entry] = []
    for name in sorted(spec.parameters, key=lambda n: (list(PARAMETERS).index(n) if n in PARAMETERS else 99, n)):
        if name == "stop":
            continue
        if not _PARAM_NAME.fullmatch(name):
            raise VelollmError(f"not a parameter name: {name!r}")
        text = _param_text(name, spec.parameters[name], target)
        since = PARAMETERS[name].since
        if since is not None:
            minimum.append((since, f"PARAMETER {name}"))
        parameters.append(_Entry(reason(name, _default_reason(name, target)), f"PARAMETER {name} {text}"))

    draft = None
    if spec.draft is not None:
        if target < DRAFT_SINCE:
            raise VelollmError(f"DRAFT needs Ollama {DRAFT_SINCE} or newer; the target is {target}")
        minimum.append((DRAFT_SINCE, "DRAFT"))
        draft = _Entry(reason("draft"), f"DRAFT {quote_value(spec.draft, what='the DRAFT path')}")

    requires = _requires_entry(spec, target, minimum)
    stops = _stops(spec)
    stop_entries = [
        _Entry(reason("stop", "a derived model's stop list replaces its base's: every stop is listed")
               if i == 0 else (), f"PARAMETER stop {_quote_stop(value)}")
        for i, value in enumerate(stops)
    ]
    text = render_template(
        "Modelfile.j2",
        header=[line for comment in spec.comments for line in _comment_lines(comment)],
        from_=_Entry(reason("from"), f"FROM {quote_value(spec.from_model, what='the FROM model')}"),
        draft=draft,
        requires=requires,
        parameters=parameters,
        stops=stop_entries,
        template=None if spec.template is None else _Entry(
            reason("template"), f"TEMPLATE {quote_value(spec.template, what='TEMPLATE', always=True)}"),
        system=None if spec.system is None else _Entry(
            reason("system"), f"SYSTEM {quote_value(spec.system, what='SYSTEM', always=True)}"),
    )
    result = lint_modelfile(text, ollama_version=target)
    if not result.ok:
        raise VelollmError(f"the generated Modelfile would not pass `ollama create`: {result.errors[0]}")
    return text


def _requires_entry(spec: ModelfileSpec, target: OllamaVersion,
                    minimum: list[tuple[OllamaVersion, str]]) -> _Entry | None:
    if spec.requires is not None:
        explicit = spec.requires if spec.requires.startswith("v") else f"v{spec.requires}"
        if not semver_is_valid(explicit):
            raise VelollmError(ERR_REQUIRES)
        minimum.append((OllamaVersion.parse(explicit), "the spec's REQUIRES"))
    if not minimum:
        return None
    needed, because = max(minimum, key=lambda item: item[0])
    if needed > target:
        raise VelollmError(f"{because} needs Ollama {needed} or newer; the target is {target}")
    if target < REQUIRES_SINCE:
        # Features this old need no REQUIRES; an explicit one cannot be written for this target.
        if spec.requires is not None:
            raise VelollmError(f"REQUIRES needs Ollama {REQUIRES_SINCE} or newer; the target is {target}")
        return None
    version = str(needed)
    default = f"{because} needs Ollama {version} or newer; older servers refuse to run this model"
    return _Entry(tuple(_comment_lines(spec.reasons.get("requires", default))), f"REQUIRES {version}")


def parse_show_parameters(text: str) -> list[tuple[str, str]]:
    """Read ``/api/show``'s ``parameters`` text: ``name<spaces>value`` lines where string values
    are Go-quoted (``%#v``) and repeat once per list element (every ``stop``)."""
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if not name:
            continue
        rest = rest.strip()
        if rest.startswith('"'):
            unquoted = go_unquote(rest)
            if unquoted is None:
                raise VelollmError(f"cannot read the model's parameter line {line.strip()!r}")
            rest = unquoted
        pairs.append((name, rest))
    return pairs


def _typed_show_value(spec: ParamSpec, text: str) -> ParamValue | None:
    """A parameter value as /api/show prints it. Numbers come from JSON, so Go prints an int
    parameter stored as float64 1000000 as ``1e+06``; such integral floats count as ints."""
    if spec.type is ParamType.INT:
        number = parse_int(text)
        if number is None:
            real = parse_float32(text)
            number = int(real) if real is not None and real.is_integer() else None
        return number
    if spec.type is ParamType.FLOAT:
        real = parse_float32(text)
        return text if real is not None else None
    if spec.type is ParamType.BOOL:
        return text if parse_bool(text) is not None else None
    return None


def spec_from_base(show: ShowResponse, from_model: str, *,
                   ollama_version: str | None = None) -> ModelfileSpec:
    """A spec that derives from ``from_model`` and carries over what ``/api/show`` reports:
    TEMPLATE, SYSTEM, every stop value, the parameters the target release accepts, and the
    base's REQUIRES (a derived model needs at least what its base needs).

    Parameters the target does not know are left out and named in the header comments.
    """
    target = OllamaVersion.parse(ollama_version) if ollama_version else LATEST_KNOWN
    params: dict[str, ParamValue] = {}
    stops: list[str] = []
    dropped: list[str] = []
    for name, text in parse_show_parameters(show.parameters):
        if name == "stop":
            stops.append(text)
            continue
        spec = known_parameter(name, target)
        value = _typed_show_value(spec, text) if spec is not None else None
        if value is None:
            dropped.append(f"{name} {text}")
            continue
        params[name] = value
    carried = [part for part, present in (("TEMPLATE", show.template), ("SYSTEM", show.system),
                                          (f"{len(stops)} stop values", stops),
                                          ("parameters " + ", ".join(params), params)) if present]
    comments = [f"Derived from {from_model}; carried over from its /api/show: "
                + ("; ".join(carried) if carried else "nothing")]
    if dropped:
        comments.append(f"Left out (unknown to Ollama {target}): " + "; ".join(dropped))
    return ModelfileSpec(
        from_model=from_model,
        parameters=params,
        template=show.template or None,
        system=show.system or None,
        stop=tuple(stops),
        requires=show.requires or None,
        ollama_version=ollama_version,
        comments=tuple(comments),
    )


# Our patch that runs a draft model without MTP layers, passed as --spec-type draft-mtp, as a classic draft.
CLASSIC_DRAFT_PATCH = "spec-mtp-fallback"


def draft_problem(draft: Path, target: OllamaVersion, *, classic_drafts: bool = False) -> str | None:
    """Why Ollama ``target`` would fail to load a model with ``DRAFT draft``; None when it would not.

    Ollama 0.30+ passes every DRAFT to llama-server as ``--spec-type draft-mtp --spec-draft-model X``
    (``draft-dflash`` for a dflash model; llm/llama_server.go ``appendDraftArgs``), and a stock server exits at
    load when X has no MTP layers: a classic small draft model of the same vocabulary makes the whole model fail
    to load. ``classic_drafts``: Ollama runs our server with :data:`CLASSIC_DRAFT_PATCH`, which runs it."""
    if classic_drafts or target.era is not Era.C or not draft.is_file():  # a directory is converted by Ollama
        return None
    info = inspect_model(draft)
    if info.architecture == "dflash" or info.n_mtp_layers > 0:
        return None
    return (
        f"Ollama {target} runs a DRAFT as an MTP draft (--spec-type draft-mtp) and {draft.name} "
        f"({info.architecture}) has no MTP layers, so with Ollama's own llama-server the model would fail to load"
    )


def draft_vocabulary_problem(from_model: str, draft: Path) -> str | None:
    """Why ``draft`` cannot draft for ``from_model`` (llama.cpp's vocabulary check, which makes the server run
    without speculation); None when they match or ``from_model`` is neither a local GGUF nor in the local
    Ollama store, so there is nothing to compare."""
    if not draft.is_file():
        return None
    try:
        target = resolve_local_model(from_model)
    except VelollmError:
        return None
    compat = draft_compatibility(target, draft)
    return None if compat.ok else f"DRAFT {draft.name} cannot draft for {from_model}: {compat.reason}"


def loadable_draft(
    parameters: Mapping[str, ParamValue], draft: str | None, target: OllamaVersion, *, classic_drafts: bool = False,
) -> tuple[dict[str, ParamValue], str | None, str | None]:
    """The tuner's DRAFT and draft_num_predict, or neither with a comment saying why, when Ollama ``target``
    would fail to load the model with that draft (see :func:`draft_problem`)."""
    problem = draft_problem(Path(draft), target, classic_drafts=classic_drafts) if draft else None
    if problem is None:
        return dict(parameters), draft, None
    kept = {name: value for name, value in parameters.items() if name != "draft_num_predict"}
    return kept, None, f"no DRAFT: {problem} (`velollm-patch ollama install-server` puts in one that runs it)"


def tuned_parameters(plan: Plan) -> tuple[dict[str, ParamValue], dict[str, str], str | None]:
    """The PARAMETERs (with their reasons) and the DRAFT path that carry a tuner plan into a Modelfile.

    Ollama passes ``num_batch`` as both ``-b`` and ``-ub`` (appendBatchArgs), so it gets the plan's ubatch:
    the plan's larger logical batch would also grow the compute buffer. Slots, KV types and flash
    attention are server-wide in Ollama (``ollama config``), not Modelfile parameters."""
    s = plan.settings
    params: dict[str, ParamValue] = {"num_ctx": s.ctx_per_slot, "num_batch": s.ubatch, "num_thread": s.threads}
    reasons = {
        "num_ctx": plan.reason("ctx_per_slot"),
        "num_batch": "Ollama sets -b and -ub from num_batch: the tuner's ubatch",
        "num_thread": plan.reason("threads"),
    }
    if s.gpu_layers is not None:
        params["num_gpu"] = s.gpu_layers
        reasons["num_gpu"] = plan.reason("gpu_layers")
    if s.load_mode_none:
        params["use_mmap"] = "false"
        reasons["use_mmap"] = plan.reason("load_mode")
    spec = s.speculation
    draft = None
    if spec is not None and spec.draft is not None and spec.draft_n_max is not None:
        draft = str(spec.draft.path)
        params["draft_num_predict"] = spec.draft_n_max
        reasons["draft"] = plan.reason("spec_draft")
        reasons["draft_num_predict"] = "the draft length the tuner expects to pay off"
    return params, reasons, draft


@dataclass(frozen=True)
class ModelfileRequest:
    """What a Modelfile is asked for: derive from ``model``, with ``parameters`` and ``draft`` set over what the
    base and the tuner give; ``ollama_version`` is the target (default: the server's, else the newest known);
    the llama-server of the Ollama under ``ollama_prefix`` (default: the ollama on PATH) decides whether a
    classic DRAFT loads; ``comments`` open the file."""

    model: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict, hash=False)
    draft: Path | None = None
    ollama_version: str | None = None
    ollama_prefix: Path | None = None
    comments: tuple[str, ...] = ()


def compose_modelfile(
    request: ModelfileRequest, *, server: OllamaClient | None = None, tuned: Callable[[], Plan] | None = None,
) -> ModelfileSpec:
    """The spec ``ollama modelfile`` writes: ``request.model`` as ``server`` shows it (TEMPLATE, SYSTEM, stops
    and parameters carried over), then the tuner's plan (``tuned``, called once the server and the installed
    llama-server have been read, so that their errors come before the plan's work), then the request's own
    parameters and DRAFT, checked to load under the target."""
    version = request.ollama_version
    if server is not None:
        show = server.show(request.model)
        if version is None:
            reported = parse_reported_version(server.version())
            version = str(reported) if reported else None
        spec = spec_from_base(show, request.model, ollama_version=version)
    else:
        spec = ModelfileSpec(request.model, ollama_version=version)
    # Ollama 0.30+ launches a DRAFT as an MTP draft; only our patched server runs a classic one then.
    runs = installed_server(request.ollama_prefix)
    classic_drafts = runs is not None and CLASSIC_DRAFT_PATCH in runs.patches
    comments = request.comments
    tuned_draft = None
    if tuned is not None:
        plan = tuned()
        parameters, reasons, tuned_draft = tuned_parameters(plan)
        parameters, tuned_draft, dropped = loadable_draft(
            parameters, tuned_draft, spec.target(), classic_drafts=classic_drafts)
        if dropped:
            comments = (*comments, dropped)
        spec = spec.with_parameters(parameters, reasons)
        if is_demo_model(request.model):
            # Ollama does not know our demo-model names: derive from the file the plan was made for.
            spec = replace(spec, from_model=str(plan.model.path))
        comments = (*comments, f"tuned by velollm-patch for this machine: {plan.profile} profile,"
                    f" {plan.workload} workload")
    draft = request.draft
    vocabulary = draft_vocabulary_problem(spec.from_model, draft) if draft else None
    if vocabulary:
        raise VelollmError(f"{vocabulary} (llama-server would run without speculation): pass a draft model of the"
                           " same vocabulary")
    problem = draft_problem(draft, spec.target(), classic_drafts=classic_drafts) if draft else None
    if problem:
        raise VelollmError(f"{problem}: leave --draft out, run `velollm-patch ollama install-server` first,"
                           " or target an Ollama before 0.30 with --ollama-version")
    return replace(
        spec.with_parameters(request.parameters),
        draft=str(draft.resolve()) if draft else tuned_draft,
        comments=(*comments, *spec.comments),
    )
