"""The contract between the shared Script and a host adapter (A1111, Forge).

No ``modules.*`` import here: this file and ``run.py`` are testable without any fake host.

Call sequence driven by the Script (``klora_ext/webui/script.py``), identical on every host:

1. ``process(p, *args)``          -> ``adapter.disarm(None)`` first (cleans whatever an aborted run left), then, when
                                     enabled: ``adapter.resolve()`` both names, scores through the core cache, builds a
                                     ``KLoraRun``, ``adapter.arm(p, run)``.
2. ``after_extra_networks_activate`` -> ``adapter.on_networks_activated(p)`` (A1111 rebuilds ``loaded_networks`` on
                                     every activation, first pass and hires pass alike).
3. ``process_before_every_sampling`` / ``before_hr`` -> ``adapter.before_sampling(p, hires=...)`` (must be idempotent:
                                     Forge calls it twice for hires).
4. every denoiser call (one ``on_cfg_denoiser`` callback registered at import) -> ``adapter.on_denoiser(params)``:
                                     the base class works out pass/step and calls ``apply_changes`` with only the
                                     layers whose role changes now.
5. ``postprocess(p, ...)``         -> ``adapter.disarm(p)``: exact restore; idempotent. Also on script unload.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from klora_ext.args import KLoraArgs
from klora_ext.log import logger
from klora_ext.runtime import Change, PassController, Session


@dataclass(frozen=True)
class LoraRef:
    """A LoRA as the host knows it."""

    name: str  # the name the user picked (file stem or alias)
    alias: str  # the host's display alias
    path: str  # file on disk
    shorthash: str = ""  # the host's short hash for infotext ("" when unknown)


@dataclass
class KLoraRun:
    """One armed generation."""

    args: KLoraArgs
    session: Session
    content: LoraRef
    style: LoraRef
    owner: Any = None  # the processing object `p` this run belongs to (compared by identity)
    from_cache: bool = False
    controller: PassController = field(init=False)
    pass_token: Any = None  # identity of the sampler/denoiser of the current pass
    passes: int = 0
    notes: list[str] = field(default_factory=list)  # user-facing notes collected during the run
    used_plans: list[tuple[str, Any]] = field(default_factory=list)  # (pass kind, plan) per sampling pass

    def __post_init__(self) -> None:
        self.controller = PassController(self.session)


@dataclass(frozen=True)
class StepInfo:
    """What the base class extracts from a denoiser callback."""

    pass_token: Any  # changes when a new sampling pass starts
    step: int  # 0-based step within this pass
    total_steps: int  # steps of this pass
    kind: str  # "first" | "img2img" | "hires"
    denoise: float | None = None


@dataclass(frozen=True)
class HostLayers:
    """A pair of LoRAs as the host itself patches them into the loaded model (issue 7).

    ``mapping``: the score-cache id of the host's layer mapping (cheap; computed on every run). ``load()``: called on
    a cache miss only; the two files (LoraFile) whose ``.layers`` are exactly what the host applies and K-LoRA may
    switch, keyed by canonical ``keys`` ids derived from the host's own targets (two files share a layer iff the host
    patches the same target), ``.static_layers`` what the host applies but K-LoRA never switches, and ``.warnings``
    the run notes (what the host leaves out); the notes are cached with the scores. ``raw_files()`` (optional): the
    files as stored, for the reference clocks' numbers (the authors' code reads the files in their own dtype, while
    a host may keep the factors in its compute dtype)."""

    mapping: str
    load: Callable[[], tuple[Any, Any]]
    raw_files: Callable[[], tuple[Any, Any]] | None = None


class HostAdapter(abc.ABC):
    """Subclasses implement the host-specific parts; the pass/step bookkeeping lives here."""

    name = "abstract"

    def __init__(self) -> None:
        self.run: KLoraRun | None = None
        self._noted: set[str] = set()  # notes of this run already logged

    # ---- host specific ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def list_loras(self) -> list[str]:
        """Names to offer in the pickers."""

    @abc.abstractmethod
    def resolve(self, name: str) -> LoraRef:
        """Name or alias -> LoraRef; KLoraError with close matches when unknown."""

    @abc.abstractmethod
    def arm(self, p: Any, run: KLoraRun) -> None:
        """Prepare the host for this run (load the two LoRAs through the host, remember what to restore)."""

    @abc.abstractmethod
    def apply_changes(self, changes: list[Change]) -> None:
        """Make the model use, for each (layer_id, role), that role's delta(s) from now on. Touch nothing else."""

    @abc.abstractmethod
    def restore(self) -> None:
        """Put every weight and host structure K-LoRA touched back exactly as it was. Idempotent."""

    @abc.abstractmethod
    def step_info(self, params: Any) -> StepInfo | None:
        """Extract pass/step from the host's denoiser-callback params; None when the call is not ours."""

    def on_networks_activated(self, p: Any) -> None:  # noqa: B027 - optional hook
        """The host (re)built its list of active LoRAs."""

    def before_sampling(self, p: Any, *, hires: bool) -> None:  # noqa: B027 - optional hook
        """A sampling pass is about to start."""

    def score_device(self) -> str:
        return "cpu"

    def host_files(self, p: Any, content: LoraRef, style: LoraRef) -> tuple[str, Any, Any] | None:
        """(layer mapping id, content LoraFile, style LoraFile) as the host itself patches the two files into the
        loaded model: the layer set K-LoRA scores and switches, keyed in the score cache by the mapping id. None:
        score the host-free reader's layers (the default). The eager form of :meth:`host_layers`."""
        return None

    def host_layers(self, p: Any, content: LoraRef, style: LoraRef) -> HostLayers | None:
        """The host's own layer set for the pair (see :class:`HostLayers`); default: :meth:`host_files`, else None
        (score the host-free reader's layers)."""
        files = self.host_files(p, content, style)
        if files is None:
            return None
        mapping, content_file, style_file = files
        return HostLayers(mapping, lambda: (content_file, style_file))

    def _clear_run_state(self) -> None:  # noqa: B027 - optional hook
        """Drop the subclass's per-run state (called when a run ends, also after a failed restore)."""

    # ---- shared -------------------------------------------------------------------------------------------------
    def note_once(self, note: str) -> None:
        """Log a note and add it to the run's notes (shown with the images), once per run."""
        if note in self._noted:
            return
        self._noted.add(note)
        logger.info(note)
        if self.run is not None:
            self.run.notes.append(note)

    def on_denoiser(self, params: Any) -> None:
        run = self.run
        if run is None:
            return
        info = self.step_info(params)
        if info is None:
            return
        if info.pass_token is not run.pass_token:
            run.pass_token = info.pass_token
            run.passes += 1
            changes = run.controller.begin_pass(info.total_steps, kind=info.kind, denoise=info.denoise)
            advance = run.controller.advance(info.step) if info.step else []
            self.apply_changes(_merge_changes(changes, advance))
            return
        changes = run.controller.advance(info.step)
        if changes:
            self.apply_changes(changes)

    def disarm(self, p: Any = None) -> None:
        """End the run (p=None: whatever run is armed, e.g. a stale one from an aborted generation)."""
        run = self.run
        if run is not None and p is not None and run.owner is not p:
            return  # another generation's run (XYZ copies of p postprocess separately): not ours to end
        try:
            self.restore()
        finally:
            if run is not None and p is None:
                logger.info("cleaned up the state of an earlier K-LoRA run")
            self.run = None
            self._noted.clear()
            self._clear_run_state()


def _merge_changes(first: list[Change], later: list[Change]) -> list[Change]:
    merged = dict(first)
    merged.update(later)
    return list(merged.items())
