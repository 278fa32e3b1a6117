"""Adapter for the ``ldm_patched`` WebUIs: reForge (``main``), Forge Classic, and Forge before August 2024.

These hosts keep ComfyUI's ModelPatcher: ``patcher.patches`` maps a parameter key to a list of entries
(``(strength_patch, value, strength_model[, offset, function])``), ``patch_model`` backs the weight up into
``patcher.backup`` (Classic: the tensor; reForge: a ``(weight, inplace_update)`` tuple, shared by clones) and installs
``calculate_weight(patches[key], weight)`` as a new Parameter; ``unpatch_model`` puts the backups back. The builtin
Lora extension adds prompt LoRAs through ``ldm_patched.modules.sd.load_lora_for_models`` (clones of
``forge_objects``) and the sampler loads the UNet patcher (``load_models_gpu`` -> ``patch_model``) before the first
denoiser call.

How K-LoRA switches here (no state of its own beyond references):

* The two LoRAs are parsed by the host itself (``load_lora_for_models`` on scratch clones of the base patchers): the
  entries it would add at each key are what K-LoRA applies, so every LoRA kind the host reads is merged with the
  host's own math (``calculate_weight``).
* Prompt copies of the content/style LoRA are stripped from a clone of the UNet patcher (recognised by tensor
  identity with the host's cached state dict); without prompt copies the host's own patcher is used as is.
* At the first denoiser call of a pass (the host has patched by then) each layer's weight is set to
  ``calculate_weight(host entries + the role's entries, original)``, the original being ``backup[key]`` when the
  host patched that key, else the untouched weight; per step only the flipping layers are recomputed. A new
  Parameter is installed (as the host does); the host's own Parameter is kept by reference and put back on restore
  (exact, no copy): at the start of every pass, at the end of the run, after an error or interrupt. A Parameter
  the host itself has since replaced (an unload) is left alone.
* Text encoders: a clone of the CLIP patcher with the wanted sides' entries goes into
  ``forge_objects_after_applying_lora`` after the LoRA activation (before conds); the host patches and unpatches it.

Not supported (a message says so): UNet modules the host loads partially in low-VRAM mode (reForge's
``weight_function`` patches) and weights with host-specific setters (``set_weight``/``convert_weight``).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from klora_ext import keys
from klora_ext.errors import KLoraError
from klora_ext.log import logger
from klora_ext.lora_file import LoraFile, read_lora
from klora_ext.plan import BOTH, CONTENT, STYLE
from klora_ext.runtime import Change
from klora_ext.webui.adapter_base import HostAdapter, KLoraRun, LoraRef, StepInfo

HOST_NAME = "reForge / Forge Classic (ldm_patched)"
LOWVRAM_MESSAGE = (
    "[K-LoRA] the UNet is loaded partially (low-VRAM mode: the host patches layer '{key}' on the fly); K-LoRA on "
    "reForge/Forge Classic needs the UNet fully loaded (normal or high VRAM mode)"
)
_HASH_SUFFIX = re.compile(r"^(.*?)\s*\([0-9a-fA-F]{6,}\)$")
_MAX_FILES = 4


def detect() -> bool:
    """True on an ``ldm_patched`` host whose patcher has the per-key ``patches``/``backup`` model (feature test);
    False where the ``backend/`` Forge patcher is present (the Forge adapter's host, Neo included)."""
    from klora_ext.webui.forge import host_kind

    if host_kind() == "forge2":
        return False
    try:
        from ldm_patched.modules import model_patcher, sd  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not this host, or a broken one: not ours
        return False
    patcher = getattr(model_patcher, "ModelPatcher", None)
    needed = ("add_patches", "patch_model", "unpatch_model", "clone")
    if patcher is None or not all(callable(getattr(patcher, n, None)) for n in needed):
        return False
    if not callable(getattr(sd, "load_lora_for_models", None)):
        return False
    return _calculate_weight_fn() is not None


def _calculate_weight_fn() -> Any:
    """reForge: ``ldm_patched.modules.lora.calculate_weight``; Classic / old Forge: the patcher's method."""
    try:
        from ldm_patched.modules import lora  # type: ignore[import-not-found]

        fn = getattr(lora, "calculate_weight", None)
        if callable(fn):
            return fn
    except Exception:  # noqa: BLE001
        pass
    try:
        from ldm_patched.modules import model_patcher  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    method = getattr(model_patcher.ModelPatcher, "calculate_weight", None)
    return method if callable(method) else None


# ---------------------------------------------------------------------------------------------------------------
# Live state (module-level: whichever adapter instance restores, everything is undone)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Installed:
    module: torch.nn.Module
    attr: str
    host_param: torch.Tensor  # what the host had installed (kept by reference, put back on restore)
    mine: torch.Tensor  # what K-LoRA installed


@dataclass
class _Swap:
    container: Any
    attr: str
    original: Any
    mine: Any


@dataclass
class _Live:
    installed: dict[str, _Installed] = field(default_factory=dict)  # param key -> installed
    swaps: list[_Swap] = field(default_factory=list)
    cond_caches: list[list] = field(default_factory=list)
    clones: list[Any] = field(default_factory=list)  # our patcher clones: unpatched at the end if still loaded

    def restore_weights(self) -> int:
        touched = 0
        for item in self.installed.values():
            params = item.module._parameters
            if params.get(item.attr) is not item.mine:
                continue  # the host replaced it since (an unload restored its backup): the host's state stands
            host = item.host_param
            if host.device != item.mine.device:
                host.data = host.data.to(item.mine.device)  # the model moved meanwhile; so would the host's own
            params[item.attr] = host
            touched += 1
        self.installed.clear()
        return touched

    def restore_all(self) -> int:
        touched = self.restore_weights()
        for swap in reversed(self.swaps):
            if getattr(swap.container, swap.attr, None) is swap.mine:
                setattr(swap.container, swap.attr, swap.original)
                touched += 1
        self.swaps.clear()
        for patcher in self.clones:
            touched += _unpatch_if_loaded(patcher)
        self.clones.clear()
        for cache in self.cond_caches:
            if cache:
                cache[0] = None
        self.cond_caches.clear()
        return touched


_LIVE = _Live()


def _unpatch_if_loaded(patcher: Any) -> int:
    """Put the host's backups back if this clone's patches are what the model holds now (the host would only do it
    at the next load): after K-LoRA the model holds the host's originals, not a LoRA mix of K-LoRA's making."""
    model = getattr(patcher, "model", None)
    if hasattr(patcher, "patches_uuid") and hasattr(model, "current_weight_patches_uuid"):
        loaded = model.current_weight_patches_uuid == patcher.patches_uuid  # reForge: backups shared by clones
    else:
        loaded = bool(getattr(patcher, "backup", None))  # Classic: a backup per patcher, emptied by unpatch
    if not loaded:
        return 0
    patcher.unpatch_model()
    return 1


# ---------------------------------------------------------------------------------------------------------------
# Per-run data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    layer_id: str
    key: str
    module_path: str
    attr: str
    content: tuple | None  # the host's entry for this key from the content file (strength 1)
    style: tuple | None
    host_param: torch.Tensor | None = None  # set per pass
    original: torch.Tensor | None = None
    mode: str = "A"  # always a recomputed weight here (the Forge adapter's name for it)


def _with_strength(entry: tuple, strength: float) -> tuple:
    return (strength, *entry[1:])


def _tensor_ids(value: Any, out: set[int], depth: int = 0) -> set[int]:
    """ids of the tensors inside a patch value (tuples/lists; reForge weight adapters keep theirs in ``weights``)."""
    if depth > 6:
        return out
    if isinstance(value, torch.Tensor):
        out.add(id(value))
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensor_ids(v, out, depth + 1)
    elif hasattr(value, "weights"):
        _tensor_ids(value.weights, out, depth + 1)
    return out


def _strip(patches: dict[str, list], file_ids: set[int]) -> int:
    """Remove (in place) the entries whose tensors come from a file; returns how many were removed."""
    removed = 0
    for key in list(patches):
        kept = [e for e in patches[key] if not (_tensor_ids(e[1], set()) & file_ids)]
        removed += len(patches[key]) - len(kept)
        if kept:
            patches[key] = kept
        else:
            del patches[key]
    return removed


def _new_patch_version(patcher: Any) -> None:
    """reForge compares ``patches_uuid`` to tell whether the loaded weights are current: the patches changed."""
    if hasattr(patcher, "patches_uuid"):
        patcher.patches_uuid = uuid.uuid4()


def _original(patcher: Any, key: str, current: torch.Tensor) -> torch.Tensor:
    backup = getattr(patcher, "backup", {}) or {}
    if key not in backup:
        return current
    entry = backup[key]
    return entry.weight if not isinstance(entry, torch.Tensor) and hasattr(entry, "weight") else entry


class LdmPatchedAdapter(HostAdapter):
    name = "ldm_patched"

    def __init__(self) -> None:
        super().__init__()
        self._files: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()
        self._calc = _calculate_weight_fn()
        self._calc_is_method = _is_method(self._calc)
        self._clear_run_state()

    def _clear_run_state(self) -> None:
        self._content: LoraFile | None = None
        self._style: LoraFile | None = None
        self._roles: dict[str, int] = {}
        self._te_roles: dict[str, int] = {}
        self._targets: dict[str, _Target] = {}
        self._te_entries: dict[str, dict[str, tuple]] = {}
        self._unet_entries: dict[str, dict[str, tuple]] = {}
        self._model: Any = None
        self._host_unet: Any = None  # the host's UNet patcher of this pass
        self._unet: Any = None  # the patcher sampled with (the host's, or our clone without prompt copies)
        self._te_clone: Any = None
        self._applied: dict[str, int] = {}
        self._prepared_pass = -1

    # ---- detection ----------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls) -> bool:
        return detect()

    # ---- names (the builtin Lora extension's ``networks`` module, A1111-style tables) ---------------------------
    def list_loras(self) -> list[str]:
        networks = _networks()
        if not networks.available_networks:
            networks.list_available_networks()
        return sorted(networks.available_networks, key=str.lower)

    def resolve(self, name: str) -> LoraRef:
        networks = _networks()
        wanted = (name or "").strip()
        if not wanted:
            raise KLoraError("[K-LoRA] no LoRA name given")
        entry = _lookup(networks, wanted)
        if entry is None:
            networks.list_available_networks()
            entry = _lookup(networks, wanted)
        if entry is None:
            names = sorted(set(networks.available_networks) | set(networks.available_network_aliases), key=str.lower)
            close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            msg = f"[K-LoRA] LoRA '{wanted}' not found in the WebUI's LoRA list ({len(names)} known){hint}"
            raise KLoraError(msg)
        alias = entry.get_alias() if callable(getattr(entry, "get_alias", None)) else getattr(entry, "alias", "")
        shorthash = getattr(entry, "shorthash", None) or ""
        if not shorthash and callable(getattr(entry, "read_hash", None)):
            try:
                entry.read_hash()
                shorthash = entry.shorthash or ""
            except (OSError, AttributeError):
                shorthash = ""
        return LoraRef(name=entry.name, alias=alias or entry.name, path=entry.filename, shorthash=shorthash)

    def refresh(self) -> list[str]:
        _networks().list_available_networks()
        return self.list_loras()

    def score_device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---- arming -------------------------------------------------------------------------------------------------
    def arm(self, p: Any, run: KLoraRun) -> None:
        self.restore()
        self._clear_run_state()
        self._content = self._read(run.content)
        self._style = self._read(run.style)
        static = run.session.static_roles(self._content.layers, self._style.layers)
        self._te_roles = {i: r for i, r in static.items() if keys.is_text_encoder(i)}
        self._roles = {i: r for i, r in static.items() if i not in self._te_roles}
        sd_model = getattr(p, "sd_model", None)
        original = getattr(sd_model, "forge_objects_original", None)
        if getattr(original, "unet", None) is None:
            raise KLoraError("[K-LoRA] no model is loaded (forge_objects is missing); load a checkpoint first")
        self._build_targets(original.unet, original.clip, run)
        self.run = run
        logger.info(
            "armed on %s: %d layers switched, %d static; content '%s' x%g, style '%s' x%g",
            HOST_NAME,
            len(run.session.plan_layer_ids()),
            len(self._roles),
            run.content.name,
            run.args.content_weight,
            run.style.name,
            run.args.style_weight,
        )

    def _read(self, ref: LoraRef) -> LoraFile:
        try:
            st = os.stat(ref.path)
        except OSError as exc:
            raise KLoraError(f"[K-LoRA] LoRA file not found: '{ref.path}'") from exc
        key = (os.path.abspath(ref.path), st.st_size, st.st_mtime_ns)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        from klora_ext.webui.run import score_cache

        lora = read_lora(ref.path, name=ref.name, sha256=score_cache().file_hash(ref.path))
        self._files[key] = lora
        while len(self._files) > _MAX_FILES:
            self._files.popitem(last=False)
        return lora

    def _host_entries(self, unet: Any, clip: Any, path: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """The entries the host itself adds for a file (strength 1): (UNet key -> entry, CLIP key -> entry)."""
        from ldm_patched.modules.sd import load_lora_for_models  # type: ignore[import-not-found]

        state_dict = _networks().load_lora_state_dict(path)
        kwargs = {}
        if "filename" in inspect.signature(load_lora_for_models).parameters:
            kwargs["filename"] = path
        new_unet, new_clip = load_lora_for_models(unet, clip, state_dict, 1.0, 1.0, **kwargs)
        out: list[dict[str, tuple]] = []
        for base, new in ((unet, new_unet), (getattr(clip, "patcher", None), getattr(new_clip, "patcher", None))):
            added: dict[str, tuple] = {}
            if new is not None and new is not base:
                for key, entries in new.patches.items():
                    before = len(base.patches.get(key, ())) if base is not None else 0
                    if len(entries) > before:
                        added[key] = entries[-1]
            out.append(added)
        return out[0], out[1]

    def _build_targets(self, unet: Any, clip: Any, run: KLoraRun) -> None:
        c_unet, c_te = self._host_entries(unet, clip, run.content.path)
        s_unet, s_te = self._host_entries(unet, clip, run.style.path)
        self._te_entries = {"content": c_te, "style": s_te}
        self._unet_entries = {"content": c_unet, "style": s_unet}
        model = unet.model
        params = dict(model.named_parameters())
        targets: dict[str, _Target] = {}
        unmatched: list[str] = []
        for layer_id in self._roles.keys() | set(run.session.plan_layer_ids()):
            key = keys.forge_key(layer_id)
            if keys.split_slice(layer_id)[1] is not None or key is None or key not in params:
                unmatched.append(layer_id)
                continue
            lc = c_unet.get(key) if layer_id in self._content.layers else None
            ls = s_unet.get(key) if layer_id in self._style.layers else None
            if lc is None and ls is None:
                unmatched.append(layer_id)
                continue
            module_path, attr = key.rsplit(".", 1)
            targets[layer_id] = _Target(layer_id, key, module_path, attr, lc, ls)
        for side, lora, hosted in (("content", self._content, c_unet), ("style", self._style, s_unet)):
            if any(not keys.is_text_encoder(i) for i in lora.layers) and not hosted:
                msg = (
                    f"[K-LoRA] the {side} LoRA '{lora.name}' ({lora.arch}) matches no layer of the loaded model "
                    "(the WebUI's LoRA loader applies none of it); is it made for this checkpoint's architecture?"
                )
                raise KLoraError(msg)
        if unmatched:
            note = f"{len(unmatched)} layers are not applied by this WebUI's LoRA loader and are left as they are"
            logger.warning("%s (e.g. %s)", note, sorted(unmatched)[0])
            run.notes.append(note)
        self._model = model
        self._targets = targets

    # ---- prompt copies ------------------------------------------------------------------------------------------
    def _file_ids(self, path: str) -> set[int]:
        return {id(t) for t in _networks().load_lora_state_dict(path).values() if isinstance(t, torch.Tensor)}

    def _strip_prompt_copies(self, patches: dict[str, list], p: Any, hosted: dict[str, dict[str, tuple]]) -> bool:
        """Remove prompt copies of the two files from one patcher's ``patches``. ``hosted``: the entries the host adds
        for each file to this patcher (UNet or CLIP); a file with none here has nothing to strip, in the prompt or not
        (reForge's ``load_lora_for_models`` returns a CLIP clone even for a UNet-only LoRA)."""
        run = self.run
        changed = False
        for side, ref in (("content", run.content), ("style", run.style)):
            removed = _strip(patches, self._file_ids(ref.path))
            in_prompt = _in_prompt(ref.path)
            if removed:
                changed = True
                self.note_once(f"the {side} LoRA '{ref.name}' is also in the prompt; K-LoRA applies it instead")
            elif in_prompt and hosted.get(side):
                msg = (
                    f"[K-LoRA] the {side} LoRA '{ref.name}' is also in the prompt and K-LoRA cannot tell its "
                    "patches apart; remove it from the prompt (K-LoRA applies both LoRAs itself)"
                )
                raise KLoraError(msg)
        return changed

    # ---- text encoders ------------------------------------------------------------------------------------------
    def on_networks_activated(self, p: Any) -> None:
        run = self.run
        if run is None or (run.owner is not None and p is not run.owner):
            return
        sd_model = p.sd_model
        after = getattr(sd_model, "forge_objects_after_applying_lora", None)
        clip = getattr(after, "clip", None)
        if clip is None or clip is self._te_clone:
            return
        want = {
            "content": any(r in (CONTENT, BOTH) for i, r in self._te_roles.items() if i in self._content.layers),
            "style": any(r in (STYLE, BOTH) for i, r in self._te_roles.items() if i in self._style.layers),
        }
        new = clip.clone()
        patches = new.patcher.patches
        changed = self._strip_prompt_copies(patches, p, self._te_entries)
        for side, weight in (("content", run.args.content_weight), ("style", run.args.style_weight)):
            if not want[side] or weight == 0:
                continue
            for key, entry in self._te_entries[side].items():
                patches.setdefault(key, []).append(_with_strength(entry, weight))
                changed = True
        if not changed:
            return
        _new_patch_version(new.patcher)
        self._te_clone = new
        _LIVE.clones.append(new.patcher)
        _LIVE.swaps.append(_Swap(after, "clip", clip, new))
        current = getattr(sd_model, "forge_objects", None)
        if current is not None and current is not after and getattr(current, "clip", None) is clip:
            _LIVE.swaps.append(_Swap(current, "clip", clip, new))
            current.clip = new
        after.clip = new
        caches = _cond_caches(p)
        for cache in caches:
            if cache:
                cache[0] = None
        _LIVE.cond_caches.extend(c for c in caches if not any(c is o for o in _LIVE.cond_caches))

    # ---- sampling passes ----------------------------------------------------------------------------------------
    def before_sampling(self, p: Any, *, hires: bool) -> None:
        """Right before each sampling pass (twice for the hires pass on some hosts): undo the weights of the last
        pass before the host may (re)load the patcher, and sample with a patcher free of prompt copies."""
        run = self.run
        if run is None or (run.owner is not None and p is not run.owner):
            return
        _LIVE.restore_weights()
        self._applied.clear()
        self._prepared_pass = -1
        forge_objects = p.sd_model.forge_objects
        unet = forge_objects.unet
        if unet is self._unet:
            return
        if unet.model is not self._model:
            reason = "the model changed between passes (refiner or hires checkpoint); K-LoRA is off for the rest"
            logger.warning(reason)
            if isinstance(getattr(p, "extra_generation_params", None), dict):
                p.extra_generation_params["K-LoRA skipped"] = reason
            self.disarm(None)
            return
        if unet is self._host_unet and self._unet is not None:
            chosen = self._unet  # the same host patcher again (hires): our clone again, so nothing is re-patched
        else:
            clone = unet.clone()
            chosen = clone if self._strip_prompt_copies(clone.patches, p, self._unet_entries) else unet
            if chosen is clone:
                _new_patch_version(clone)
                _LIVE.clones.append(clone)
            self._host_unet = unet
            self._unet = chosen
        if chosen is not unet:
            _LIVE.swaps.append(_Swap(forge_objects, "unet", unet, chosen))
            forge_objects.unet = chosen

    def step_info(self, params: Any) -> StepInfo | None:
        denoiser = getattr(params, "denoiser", None)
        run = self.run
        if denoiser is None or run is None:
            return None
        p = getattr(denoiser, "p", None)
        if run.owner is not None and p is not run.owner:
            return None
        calls = int(getattr(denoiser, "total_steps", 0) or 0)
        steps = int(getattr(denoiser, "steps", 0) or 0) or calls
        if calls <= 0 or steps <= 0:
            return None
        step = min(int(denoiser.step) * steps // calls, steps - 1)  # second-order samplers: ~2 calls per step
        if getattr(p, "is_hr_pass", False):
            kind = "hires"
        elif getattr(p, "init_images", None):
            kind = "img2img"
        else:
            kind = "first"
        denoise = getattr(p, "denoising_strength", None) if kind != "first" else None
        return StepInfo(pass_token=denoiser, step=step, total_steps=steps, kind=kind, denoise=denoise)

    def on_denoiser(self, params: Any) -> None:
        run = self.run
        if run is None:
            return
        p = getattr(getattr(params, "denoiser", None), "p", None)
        if p is None or (run.owner is not None and p is not run.owner):
            return
        if p.sd_model.forge_objects.unet.model is not self._model:
            logger.warning("the model changed during sampling (refiner?); K-LoRA stops for the rest of this image")
            self.disarm(None)
            return
        try:
            super().on_denoiser(params)
        except Exception:
            self.disarm(None)  # never leave a half-applied step behind
            raise

    def apply_changes(self, changes: list[Change]) -> None:
        for layer_id, role in changes:
            self._roles[layer_id] = role
        run = self.run
        if run is not None and run.passes != self._prepared_pass:
            self._prepare_pass(run)
            return
        for layer_id, _ in changes:
            self._apply(layer_id)

    def _prepare_pass(self, run: KLoraRun) -> None:
        """First denoiser call of a pass: the host has patched the UNet; note what it installed, then set every
        layer to its role."""
        unet = run.owner.sd_model.forge_objects.unet if run.owner is not None else self._unet
        if self._unet is not None and unet is not self._unet:
            raise KLoraError("[K-LoRA] another extension replaced the UNet patcher after K-LoRA prepared it")
        _LIVE.restore_weights()
        self._applied.clear()
        for t in self._targets.values():
            module = self._model.get_submodule(t.module_path)
            if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
                raise KLoraError(LOWVRAM_MESSAGE.format(key=t.key))
            if hasattr(module, f"set_{t.attr}") or hasattr(module, f"convert_{t.attr}"):
                raise KLoraError(
                    f"[K-LoRA] layer '{t.key}' stores its weight in a host-specific format; K-LoRA supports float "
                    "and fp8 weights on reForge/Forge Classic"
                )
            current = module._parameters[t.attr]
            t.host_param = current
            t.original = _original(unet, t.key, current)
        self._prepared_pass = run.passes
        for layer_id in self._roles:
            self._apply(layer_id)

    # ---- applying one layer -------------------------------------------------------------------------------------
    def _entries(self, t: _Target, role: int) -> list:
        args = self.run.args
        mine = []
        if role in (CONTENT, BOTH) and t.content is not None and args.content_weight != 0:
            mine.append(_with_strength(t.content, args.content_weight))
        if role in (STYLE, BOTH) and t.style is not None and args.style_weight != 0:
            mine.append(_with_strength(t.style, args.style_weight))
        return mine

    def _apply(self, layer_id: str) -> None:
        t = self._targets.get(layer_id)
        role = self._roles.get(layer_id)
        if t is None or role is None or self._applied.get(layer_id) == role:
            return
        mine = self._entries(t, role)
        module = self._model.get_submodule(t.module_path)
        installed = _LIVE.installed.get(t.key)
        if not mine:
            if installed is not None and module._parameters.get(t.attr) is installed.mine:
                module._parameters[t.attr] = installed.host_param
                del _LIVE.installed[t.key]
            self._applied[layer_id] = role
            return
        patches = list(self._unet.patches.get(t.key, ())) + mine
        host = t.host_param
        with torch.no_grad():
            weight = t.original.to(device=host.device, dtype=torch.float32, copy=True)
            if self._calc_is_method:
                out = self._calc(self._unet, patches, weight, t.key)
            else:
                out = self._calc(patches, weight, t.key)
            out = _to_dtype(out, host.dtype, t.key)
            mine_param = torch.nn.Parameter(out, requires_grad=False)
        module._parameters[t.attr] = mine_param
        if installed is None:
            _LIVE.installed[t.key] = _Installed(module, t.attr, host, mine_param)
        else:
            installed.mine = mine_param
        self._applied[layer_id] = role

    # ---- ending -------------------------------------------------------------------------------------------------
    def restore(self) -> None:
        touched = _LIVE.restore_all()
        self._applied.clear()
        self._prepared_pass = -1
        self._te_clone = None
        self._unet = None
        self._host_unet = None
        if touched:
            logger.debug("restored %d weights/objects", touched)


# ---------------------------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------------------------


def _is_method(fn: Any) -> bool:
    """Classic's ``ModelPatcher.calculate_weight(self, patches, weight, key)`` (taken from the class, unbound)."""
    try:
        return next(iter(inspect.signature(fn).parameters)) == "self"
    except (StopIteration, TypeError, ValueError):
        return False


def _to_dtype(out: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """Back to the stored dtype the way the host does it (reForge: stochastic rounding for fp8, plain cast else)."""
    try:
        from ldm_patched import float as host_float  # type: ignore[import-not-found]
        from ldm_patched.modules.model_patcher import string_to_seed  # type: ignore[import-not-found]

        return host_float.stochastic_rounding(out, dtype, seed=string_to_seed(key))
    except (ImportError, AttributeError):
        return out.to(dtype)


def _networks() -> Any:
    try:
        import networks  # type: ignore[import-not-found]
    except ImportError as exc:
        msg = "[K-LoRA] the WebUI's built-in Lora extension is not loaded; enable it in Extensions"
        raise KLoraError(msg) from exc
    return networks


def _lookup(networks: Any, name: str) -> Any:
    for candidate in (name, _HASH_SUFFIX.sub(r"\1", name)):
        for table in (networks.available_network_aliases, networks.available_networks):
            entry = table.get(candidate)
            if entry is not None:
                return entry
    lowered = name.lower()
    for table in (networks.available_networks, networks.available_network_aliases):
        for key, entry in table.items():
            if key.lower() == lowered:
                return entry
    return None


def _in_prompt(path: str) -> bool:
    try:
        import networks  # type: ignore[import-not-found]
    except ImportError:
        return False
    wanted = os.path.normcase(os.path.abspath(path))
    for net in getattr(networks, "loaded_networks", ()):
        on_disk = getattr(net, "network_on_disk", None)
        filename = getattr(on_disk, "filename", None)
        if isinstance(filename, str) and os.path.normcase(os.path.abspath(filename)) == wanted:
            return True
    return False


def _cond_caches(p: Any) -> list[list]:
    """The WebUI's cond caches (instance and class level), cleared so conds are recomputed with/without our TE."""
    found: list[list] = []
    owners: list[Any] = [p]
    try:
        from modules import processing  # type: ignore[import-not-found]

        owners += [getattr(processing, "StableDiffusionProcessing", None)]
        owners += [getattr(processing, "StableDiffusionProcessingTxt2Img", None)]
    except ImportError:
        pass
    for owner in owners:
        for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
            cache = getattr(owner, name, None) if owner is not None else None
            if isinstance(cache, list) and not any(cache is c for c in found):
                found.append(cache)
    return found


__all__ = ["HOST_NAME", "LOWVRAM_MESSAGE", "LdmPatchedAdapter", "detect"]
