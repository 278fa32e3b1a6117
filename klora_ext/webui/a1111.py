"""AUTOMATIC1111 WebUI v1.6-v1.10 host adapter: per-layer switching through the builtin Lora extension.

Mechanism (research notes ``a1111-internals.md`` §1.5, §1.8, §7):

* The content and style LoRAs are loaded with the builtin's own ``networks.load_network`` (kept in a small cache of
  our own; those ``Network`` objects are never modified).
* Two *side* ``network.Network`` entries are appended to ``networks.loaded_networks``: the content side (te/unet
  multipliers = content strength) and the style side (multipliers = style strength). Their ``modules`` dicts hold
  shallow copies of the loaded LoRAs' modules, re-pointed at the side entry, so the builtin's
  ``NetworkModule.multiplier()`` reads each side's strength. A layer's role is which side dicts hold its key:
  CONTENT -> content side, STYLE -> style side, BOTH -> both, NONE -> neither.
* A switch changes those dicts for the flipping layers only and marks exactly those layers stale
  (``network_current_names`` set to a value no ``wanted_names`` equals; ``()`` where the layer has no backup yet).
  The builtin then restores each of them from its CPU backup and re-merges every loaded LoRA (prompt LoRAs too) at
  the layer's next forward, in the same step: its dtype handling (fp16/fp8), --medvram/--lowvram placement, LyCORIS
  types, DoRA and ``lora_functional`` keep working. Entry names and multipliers never change during a run, so the
  builtin's global ``wanted_names`` never forces a re-merge of the other layers.
* Restore = remove both side entries from ``loaded_networks`` and mark every layer K-LoRA touched stale (kept as
  module objects, so a checkpoint swapped in the meantime is covered too). ``()`` would not do: with no LoRA loaded
  the builtin takes ``()`` for "unmodified" and would skip the layer. After a normal generation this is lazy: the
  builtin restores each layer from its backup before the layer's next use, so no forward sees a K-LoRA delta after
  the restore, and the next K-LoRA generation (which re-merges those layers anyway) pays no extra copy. Cleaning up
  an aborted generation or unloading the script restores the weights from the builtin's backups right away.

Steps/passes: ``params.denoiser`` (v1.8+: ``step`` counts denoiser calls of this pass, ``total_steps`` is x2 for
second-order samplers, ``steps`` is the pass's steps, ``p`` the owner); v1.6/1.7 fall back to
``p.sampler.model_wrap_cfg`` (same fields). Each sampler object is one pass (first pass, each batch-count iteration,
the hires pass).
"""

from __future__ import annotations

import copy
import difflib
import os
import sys
import weakref
from collections import OrderedDict
from typing import Any

import torch

from klora_ext.errors import KLoraError
from klora_ext.log import logger
from klora_ext.runtime import BOTH, CONTENT, NONE, STYLE, Change, static_role
from klora_ext.webui import a1111_layers
from klora_ext.webui.adapter_base import HostAdapter, HostLayers, KLoraRun, LoraRef, StepInfo

_NET_CACHE_SIZE = 4
# What a touched layer's ``network_current_names`` is set to. ``()`` alone is not enough: the builtin reads ``()`` as
# "unmodified" and skips the layer when no LoRA is loaded at all (the next generation without LoRAs would keep
# K-LoRA's delta). A tuple that equals no ``wanted_names`` always forces a restore from the backup; it is only used
# on layers that have a backup (the builtin raises if a layer without one claims to be modified).
STALE = (("k-lora: stale", None, None, None),)
_INCOMPATIBLE_SCRIPTS = {
    "regional prompter": "Regional Prompter (latent mode forces lora_functional and looks up every loaded LoRA by "
    "name; K-LoRA's two entries are not in its table)",
    "composable lora": "Composable LoRA (replaces the Linear/Conv2d forwards and computes every LoRA itself)",
}


def _shared():
    from modules import shared

    return shared


def networks_module() -> Any | None:
    """The builtin Lora extension's ``networks`` module if it is A1111's (not Forge's namesake)."""
    nets = sys.modules.get("networks")
    if nets is not None and hasattr(nets, "network_apply_weights") and hasattr(nets, "loaded_networks"):
        return nets
    return None


def is_available() -> bool:
    return networks_module() is not None


class A1111Adapter(HostAdapter):
    name = "a1111"

    def __init__(self) -> None:
        super().__init__()
        self._net_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._content_side: Any = None
        self._style_side: Any = None
        self._content_mods: dict[str, Any] = {}
        self._style_mods: dict[str, Any] = {}
        self._switch: dict[str, str] = {}  # plan layer id -> A1111 layer name
        self._ids: dict[str, str] = {}  # A1111 layer name -> layer id (every module both files' networks merge)
        self._touched: dict[int, torch.nn.Module] = {}
        # layers left for the builtin's lazy restore after the last generation (restored eagerly if needed later)
        # weak: a checkpoint unloaded meanwhile must not be kept alive by this list
        self._lazy: weakref.WeakValueDictionary[int, torch.nn.Module] = weakref.WeakValueDictionary()
        self._dropped: set[str] = set()
        self._eager = False
        self.stats = {"switched_layers": 0, "apply_calls": 0}

    # ---- host access --------------------------------------------------------------------------------------------
    @property
    def networks(self) -> Any:
        nets = networks_module()
        if nets is None:
            msg = "[K-LoRA] the builtin Lora extension (extensions-builtin/Lora) is not loaded; enable it"
            raise KLoraError(msg)
        return nets

    @staticmethod
    def _network_class() -> Any:
        mod = sys.modules.get("network")
        if mod is None or not hasattr(mod, "Network"):
            import network as mod  # type: ignore[import-not-found,no-redef]  # builtin Lora's module
        return mod.Network

    @staticmethod
    def _mapping() -> dict[str, torch.nn.Module]:
        model = _shared().sd_model
        mapping = getattr(model, "network_layer_mapping", None)
        if mapping is None:
            nets = networks_module()
            if nets is not None and hasattr(nets, "assign_network_names_to_compvis_modules"):
                nets.assign_network_names_to_compvis_modules(model)
            mapping = getattr(model, "network_layer_mapping", None) or {}
        return mapping

    def score_device(self) -> str:
        try:
            from modules import devices

            return str(devices.device)
        except Exception:  # noqa: BLE001 - any host problem: score on the CPU
            return "cpu"

    # ---- names --------------------------------------------------------------------------------------------------
    def list_loras(self) -> list[str]:
        nets = networks_module()
        if nets is None:
            return []
        return sorted(nets.available_networks, key=str.casefold)

    def refresh(self) -> list[str]:
        nets = networks_module()
        if nets is not None and hasattr(nets, "list_available_networks"):
            nets.list_available_networks()
        return self.list_loras()

    def _lookup(self, name: str) -> Any | None:
        nets = self.networks
        if name.lower() in nets.forbidden_network_aliases:
            return nets.available_networks.get(name)
        entry = nets.available_network_aliases.get(name)
        if entry is None:
            entry = nets.available_networks.get(name)
        return entry

    def _on_disk(self, name: str) -> Any:
        entry = self._lookup(name)
        if entry is None:
            nets = self.networks
            # A file added after start-up: rescan once, like the builtin does for prompt LoRAs.
            if hasattr(nets, "update_available_networks_by_names"):
                nets.update_available_networks_by_names([name])
                entry = self._lookup(name)
            if entry is None and hasattr(nets, "list_available_networks"):
                nets.list_available_networks()
                entry = self._lookup(name)
        if entry is None:
            known = sorted(set(self.networks.available_network_aliases) | set(self.networks.available_networks))
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            msg = f"[K-LoRA] LoRA '{name}' not found in the WebUI's LoRA folder{hint}"
            raise KLoraError(msg)
        return entry

    def resolve(self, name: str) -> LoraRef:
        entry = self._on_disk(name)
        shorthash = getattr(entry, "shorthash", None) or ""
        if not shorthash and hasattr(entry, "read_hash"):
            try:
                entry.read_hash()
                shorthash = getattr(entry, "shorthash", None) or ""
            except Exception as exc:  # noqa: BLE001 - a hash is only for infotext
                logger.warning("could not hash '%s' (%s)", name, exc)
        alias = entry.get_alias() if hasattr(entry, "get_alias") else getattr(entry, "alias", name)
        return LoraRef(name=name, alias=alias or name, path=entry.filename, shorthash=shorthash)

    def name_for_hash(self, shorthash: str) -> str | None:
        nets = networks_module()
        if nets is None or not shorthash:
            return None
        entry = getattr(nets, "available_network_hash_lookup", {}).get(shorthash)
        return getattr(entry, "name", None) if entry is not None else None

    # ---- loading ------------------------------------------------------------------------------------------------
    def _load(self, ref: LoraRef) -> Any:
        entry = self._on_disk(ref.name)
        try:
            st = os.stat(entry.filename)
        except OSError as exc:
            msg = f"[K-LoRA] cannot read LoRA '{ref.name}' ({entry.filename}): {exc.strerror or exc}"
            raise KLoraError(msg) from exc
        # a same-size replacement with its mtime kept still changes the inode or ctime
        identity = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        key = (os.path.abspath(entry.filename), identity, id(_shared().sd_model))
        net = self._net_cache.get(key)
        if net is None:
            try:
                net = self.networks.load_network(entry.name, entry)
            except Exception as exc:
                msg = f"[K-LoRA] cannot load LoRA '{ref.name}' ({entry.filename}): {exc}"
                raise KLoraError(msg) from exc
            self._net_cache[key] = net
            while len(self._net_cache) > _NET_CACHE_SIZE:
                self._net_cache.popitem(last=False)
        self._net_cache.move_to_end(key)
        if not net.modules:
            msg = (
                f"[K-LoRA] LoRA '{ref.name}': A1111's Lora loader matches none of its keys to a layer of the loaded "
                "checkpoint, so A1111 would not apply it either: is it a LoRA for another base model (SD1.5 vs "
                "SDXL), or in a key format A1111 does not read (e.g. diffusers/PEFT 'unet.' or "
                "'base_model.model.' names)?"
            )
            raise KLoraError(msg)
        return net

    def drop_caches(self) -> None:
        """Forget loaded LoRAs (their modules point at the previous checkpoint's layers)."""
        self._net_cache.clear()

    # ---- the host's own layer set (issue 7) ---------------------------------------------------------------------
    def host_layers(self, p: Any, content: LoraRef, style: LoraRef) -> HostLayers:
        """The layers the builtin patches for both files (``Network.modules`` of its own loader, see
        ``a1111_layers``). The mapping id names the model's layer map, the compute dtype and, for DoRA files (their
        deltas depend on the base weights), the checkpoint."""
        content_net, style_net = self._load(content), self._load(style)
        model, mapping = _shared().sd_model, self._mapping()
        parts = [
            f"a1111:v{a1111_layers.MAPPING_VERSION}",
            a1111_layers.mapping_fingerprint(model, mapping),
            str(_compute_dtype()).removeprefix("torch."),
        ]
        if a1111_layers.needs_base(content_net) or a1111_layers.needs_base(style_net):
            parts.append("ckpt=" + _checkpoint_id(model))

        def load() -> tuple[Any, Any]:
            from klora_ext.webui.run import score_cache

            return tuple(  # type: ignore[return-value]
                a1111_layers.host_lora(
                    net,
                    name=ref.name,
                    path=ref.path,
                    sha256=score_cache().file_hash(ref.path),
                    model=model,
                    mapping=mapping,
                )
                for net, ref in ((content_net, content), (style_net, style))
            )

        def raw_files() -> tuple[Any, Any]:
            from klora_ext.lora_file import read_lora
            from klora_ext.webui.run import score_cache

            return tuple(  # type: ignore[return-value]
                read_lora(ref.path, name=ref.name, sha256=score_cache().file_hash(ref.path))
                for ref in (content, style)
            )

        return HostLayers(":".join(parts), load, raw_files)

    # ---- arming -------------------------------------------------------------------------------------------------
    def _side(self, label: str, ref: LoraRef, source: Any, weight: float) -> tuple[Any, dict[str, Any]]:
        side = self._network_class()(f"k-lora {label}: {ref.alias}", source.network_on_disk)
        side.te_multiplier = float(weight)
        side.unet_multiplier = float(weight)
        side.dyn_dim = None
        side.mentioned_name = None
        side.modules = {}
        mods = {}
        for key, module in source.modules.items():
            twin = copy.copy(module)  # shares the tensors; only `network` (-> multiplier) differs
            twin.network = side
            mods[key] = twin
        return side, mods

    def arm(self, p: Any, run: KLoraRun) -> None:
        self.restore()
        content_net = self._load(run.content)
        style_net = self._load(run.style)
        args = run.args
        self._content_side, self._content_mods = self._side("content", run.content, content_net, args.content_weight)
        self._style_side, self._style_mods = self._side("style", run.style, style_net, args.style_weight)

        missing = []
        self._switch = {}
        model, mapping = _shared().sd_model, self._mapping()
        content_names = a1111_layers.names_by_id(content_net, model, mapping)
        style_names = a1111_layers.names_by_id(style_net, model, mapping)
        self._ids = {name: i for i, name in (*content_names.items(), *style_names.items())}
        for layer_id in run.session.plan_layer_ids():
            name = content_names.get(layer_id)
            if name is not None and style_names.get(layer_id) == name:
                self._switch[layer_id] = name
            else:
                missing.append(layer_id)
        if not self._switch:
            msg = (
                f"[K-LoRA] none of the {len(missing)} layers '{run.content.name}' and '{run.style.name}' share was "
                "found in the loaded checkpoint: are both LoRAs for this base model?"
            )
            raise KLoraError(msg)
        if missing:
            note = f"{len(missing)} shared layers are not in the loaded checkpoint and are skipped (e.g. {missing[0]})"
            logger.warning(note)
            run.notes.append(note)

        # Layers the plan does not switch: one static role for the whole run.
        switched = set(self._switch.values())
        te_applied = False
        unet_paths = _unet_paths(model)
        for name in sorted((set(self._content_mods) | set(self._style_mods)) - switched):
            layer_id = self._ids.get(name) or unet_paths.get(name) or _pseudo_id(name)
            role = static_role(layer_id, name in self._content_mods, name in self._style_mods, args)
            self._set_role(name, role)
            if role != NONE:
                te_applied = te_applied or layer_id.startswith(("te1:", "te2:"))
            self._invalidate(merge_site(name, mapping))
        self.run = run
        self._dropped = set()
        if te_applied:
            _fresh_cond_caches(p)
        for note in self._compat_notes(p):
            logger.warning(note)
            run.notes.append(note)
            if hasattr(p, "comment"):
                p.comment(f"[K-LoRA] {note}")
        self._check_forward_patch()
        self._ensure_entries(p)

    def _check_forward_patch(self) -> None:
        """A heuristic, so only logged: the builtin merges from its torch.nn.Linear.forward patch; an extension that
        replaced it (Regional Prompter latent mode, composable-lora) bypasses K-LoRA's switching."""
        nets = networks_module()
        if nets is None or getattr(nets, "originals", None) is None:
            return
        patched = getattr(nets, "network_Linear_forward", None)
        if patched is not None and torch.nn.Linear.forward is not patched:
            logger.warning(
                "torch.nn.Linear.forward is not the builtin Lora's (another extension replaced it, e.g. Regional "
                "Prompter latent mode or composable-lora): K-LoRA's switching may have no effect"
            )

    def _compat_notes(self, p: Any) -> list[str]:
        notes = []
        shared = _shared()
        opts = getattr(shared, "opts", None)
        data = getattr(opts, "data", {}) or {}
        fp8 = str(data.get("fp8_storage", "Disable")) not in ("Disable", "False", "None", "")
        if fp8 and data.get("cache_fp16_weight", False):
            notes.append(
                "fp8 weights with 'Cache FP16 weight for LoRA' on: the builtin keeps only the last LoRA per layer "
                "in this mode (A1111 issue #15995), so K-LoRA and prompt LoRAs override each other"
            )
        runner = getattr(p, "scripts", None)
        for script in getattr(runner, "alwayson_scripts", []) or []:
            try:
                title = str(script.title()).lower()
            except Exception:  # noqa: BLE001 - a third-party script's title() is not our concern
                continue
            for needle, text in _INCOMPATIBLE_SCRIPTS.items():
                if needle in title and _script_active(p, script):
                    notes.append(f"{text} is active: not compatible with K-LoRA's switching")
        return notes

    # ---- entries in loaded_networks -----------------------------------------------------------------------------
    def _ensure_entries(self, p: Any) -> None:
        run = self.run
        if run is None or self._content_side is None:
            return
        loaded = self.networks.loaded_networks
        ours = (self._content_side, self._style_side)
        paths = {os.path.abspath(run.content.path): "content", os.path.abspath(run.style.path): "style"}
        for net in list(loaded):
            if any(net is x for x in ours):
                continue
            filename = getattr(getattr(net, "network_on_disk", None), "filename", None)
            role = paths.get(os.path.abspath(filename)) if filename else None
            if role is None:
                continue
            loaded.remove(net)
            if net.name not in self._dropped:
                self._dropped.add(net.name)
                weight = run.args.content_weight if role == "content" else run.args.style_weight
                line = (
                    f"'{net.name}' is in the prompt and is also K-LoRA's {role} LoRA: the prompt entry is ignored, "
                    f"K-LoRA applies it (strength {weight:g}) so it is not applied twice"
                )
                logger.info(line)
                run.notes.append(line)
        for side in ours:
            if not any(net is side for net in loaded):
                loaded.append(side)

    def on_networks_activated(self, p: Any) -> None:
        if self.run is not None and self.run.owner is p:
            self._ensure_entries(p)

    def before_sampling(self, p: Any, *, hires: bool) -> None:
        if self.run is not None and self.run.owner is p:
            self._ensure_entries(p)

    # ---- switching ----------------------------------------------------------------------------------------------
    def _set_role(self, name: str, role: int) -> None:
        content, style = self._content_side.modules, self._style_side.modules
        if role in (CONTENT, BOTH):
            content[name] = self._content_mods[name]
        else:
            content.pop(name, None)
        if role in (STYLE, BOTH):
            style[name] = self._style_mods[name]
        else:
            style.pop(name, None)

    def _invalidate(self, layer: torch.nn.Module | None) -> None:
        if layer is None:
            return
        mark_stale(layer)
        self._touched[id(layer)] = layer

    def apply_changes(self, changes: list[Change]) -> None:
        if self._content_side is None or not changes:
            return
        mapping = self._mapping()  # looked up per pass/step: refiner and hires checkpoints swap the model
        for layer_id, role in changes:
            name = self._switch.get(layer_id)
            if name is None:
                continue
            self._set_role(name, role)
            self._invalidate(merge_site(name, mapping))
        self.stats["apply_calls"] += 1
        self.stats["switched_layers"] += len(changes)

    def step_info(self, params: Any) -> StepInfo | None:
        run = self.run
        if run is None:
            return None
        p = run.owner
        den = getattr(params, "denoiser", None)
        if den is not None:
            owner = getattr(den, "p", None)
            if owner is not None and owner is not p:
                return None  # another generation's denoiser
        else:  # v1.6 / v1.7: no denoiser on the params
            den = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
            if den is None:
                return None
        steps = int(getattr(den, "steps", 0) or 0) or int(getattr(params, "total_sampling_steps", 0) or 0)
        if steps <= 0:
            return None
        total = int(getattr(den, "total_steps", 0) or 0) or steps
        calls = int(getattr(den, "step", 0) or 0)
        step = min(calls * steps // max(total, 1), steps - 1)
        if getattr(p, "is_hr_pass", False):
            kind = "hires"
        elif getattr(p, "init_images", None) is not None:
            kind = "img2img"
        else:
            kind = "first"
        denoise = getattr(p, "denoising_strength", None) if kind != "first" else None
        if den is not run.pass_token:
            self._ensure_entries(p)  # covers p.disable_extra_networks and hosts without the newer hooks
        return StepInfo(pass_token=den, step=step, total_steps=steps, kind=kind, denoise=denoise)

    # ---- restore ------------------------------------------------------------------------------------------------
    def disarm(self, p: Any = None) -> None:
        """``p=None`` (stale state of an aborted generation, script unload) also puts the weights back right away."""
        self._eager = p is None
        try:
            super().disarm(p)
        finally:
            self._eager = False

    def restore(self) -> None:
        nets = networks_module()
        if nets is not None:
            ours = [x for x in (self._content_side, self._style_side) if x is not None]
            nets.loaded_networks[:] = [n for n in nets.loaded_networks if not any(n is x for x in ours)]
        # lora_functional with no LoRA loaded never consults a layer's merge state: a lazily marked layer would keep
        # K-LoRA's delta there, so restore right away in that mode too.
        functional = _functional_mode()
        eager = (self._eager or functional) and nets is not None
        if eager and functional:
            # still-stale layers of the last generation, now that lora_functional was switched on
            pending = [x for x in self._lazy.values() if getattr(x, "network_current_names", ()) == STALE]
            self._touched.update((id(x), x) for x in pending)
        if eager:
            self._lazy.clear()
        for layer in self._touched.values():
            if eager and getattr(layer, "network_weights_backup", None) is not None:
                # The builtin's own restore from its CPU backup; () then means "no LoRA merged", which is now true.
                with torch.no_grad():
                    nets.network_restore_weights_from_backup(layer)
                layer.network_current_names = ()
            else:
                mark_stale(layer)  # lazy: restored from the backup (and re-merged) before the layer's next use
                self._lazy[id(layer)] = layer
        self._touched.clear()
        if self._content_side is not None:
            self._content_side.modules.clear()
        if self._style_side is not None:
            self._style_side.modules.clear()
        self._content_side = self._style_side = None
        self._content_mods, self._style_mods, self._switch = {}, {}, {}

    def touched_layers(self) -> list[torch.nn.Module]:
        return list(self._touched.values())


# ---- helpers --------------------------------------------------------------------------------------------------------
def _compute_dtype() -> Any:
    try:
        from modules import devices

        return devices.dtype
    except ImportError:
        return torch.float32


def _checkpoint_id(model: Any) -> str:
    """The loaded checkpoint's hash (file name and size when the host has none)."""
    info = getattr(model, "sd_checkpoint_info", None)
    for value in (getattr(info, "sha256", None), getattr(model, "sd_model_hash", None), getattr(info, "hash", None)):
        if value:
            return str(value)
    filename = getattr(info, "filename", None) or getattr(model, "sd_model_checkpoint", None)
    if filename and os.path.exists(filename):
        return f"{os.path.basename(filename)}:{os.path.getsize(filename)}"
    return f"id{id(model)}"  # unknown: never shared with another model


def _functional_mode() -> bool:
    try:
        return bool(getattr(_shared().opts, "lora_functional", False))
    except ImportError:
        return False


_MHA_PARTS = ("_q_proj", "_k_proj", "_v_proj", "_out_proj")


def merge_site(name: str, mapping: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The module whose forward merges the builtin's ``net.modules[name]`` into the weights.

    Usually the module of that name. ``nn.MultiheadAttention`` (SDXL's OpenCLIP TE2): the builtin keys its LoRA
    modules ``<attn>_q_proj/_k_proj/_v_proj`` (no module of that name: matched to the parent attention) and
    ``<attn>_out_proj`` (the child Linear, which the attention never calls); all four are merged at the parent's
    forward into ``in_proj_weight`` and ``out_proj.weight``. Invalidating the child would change nothing."""
    for suffix in _MHA_PARTS:
        if name.endswith(suffix):
            parent = mapping.get(name[: -len(suffix)])
            if isinstance(parent, torch.nn.MultiheadAttention):
                return parent
    return mapping.get(name)


def mark_stale(layer: torch.nn.Module) -> None:
    """Make the builtin restore ``layer`` from its backup and re-merge the loaded LoRAs at the layer's next forward."""
    has_backup = getattr(layer, "network_weights_backup", None) is not None
    layer.network_current_names = STALE if has_backup else ()  # no backup: the weight was never merged


def _unet_paths(model: Any) -> dict[str, str]:
    """A1111 layer name -> normalized id for the UNet (cached on the model object)."""
    cached = getattr(model, "_klora_unet_paths", None)
    if cached is not None:
        return cached
    out: dict[str, str] = {}
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if isinstance(unet, torch.nn.Module):
        for path, _ in unet.named_modules():
            if path:
                out["diffusion_model_" + path.replace(".", "_")] = "unet:" + path
    try:
        model._klora_unet_paths = out
    except AttributeError:
        pass
    return out


def _pseudo_id(name: str) -> str:
    """An id good enough for static roles: text-encoder names get a te prefix, the rest stay UNet."""
    if name.startswith("diffusion_model_"):
        return "unet:" + name[len("diffusion_model_") :]
    if name.startswith("1_"):
        return "te2:" + name
    return "te1:" + name


def _fresh_cond_caches(p: Any) -> None:
    """K-LoRA changes text-encoder weights but is not part of the host's cond-cache key: give this generation its own
    cache lists (rebinding the instance attributes keeps the shared class-level cache clean)."""
    for attr in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        if hasattr(p, attr) or attr in ("cached_c", "cached_uc"):
            setattr(p, attr, [None, None])


def _script_active(p: Any, script: Any) -> bool:
    args = getattr(p, "script_args", None) or ()
    start = getattr(script, "args_from", None)
    if start is None or start >= len(args):
        return False
    value = args[start]
    return value is True or (isinstance(value, str) and value.lower() == "true")
