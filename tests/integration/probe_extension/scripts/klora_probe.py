"""Test-only WebUI extension: which layers does the HOST patch for a LoRA file? (A1111 v1.10 and Forge.)

    GET /klora-probe/v1/host-layers?name=<LoRA name>
    -> {"host": "a1111"|"forge", "name": ..., "unet": [...], "te": [...], "unmatched": [...]}
    (Forge also: "unet_slices": {fused parameter: [[dim, start, size], ...]} = its key map's slices of the weights
    the file patches)

The answer comes from the host's own loader, called the way its builtin Lora extension calls it: A1111's
``networks.load_network`` (the keys of ``Network.modules``, i.e. the host's module names, one per patched module,
except an ``nn.MultiheadAttention`` (SDXL's OpenCLIP text encoder): its ``…_q_proj/_k_proj/_v_proj/_out_proj`` keys
are four entries that the builtin merges into that one module), Forge's ``model_lora_keys_unet/clip`` +
``load_lora`` (the keys of the patch dicts, i.e. parameters or ``param[dim:start:size]`` slices). Nothing is applied
to the model. Link this folder into the WebUI's ``extensions/`` only on test servers (see ../README.md).
"""

from __future__ import annotations

from modules import script_callbacks, shared


def _a1111(name: str) -> dict:
    import networks  # the builtin Lora extension's module

    on_disk = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
    if on_disk is None:
        networks.list_available_networks()
        on_disk = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
    if on_disk is None:
        return {"error": f"no LoRA named {name!r}"}
    sd_model = shared.sd_model
    if not hasattr(sd_model, "network_layer_mapping"):
        networks.assign_network_names_to_compvis_modules(sd_model)
    net = networks.load_network(name, on_disk)
    keys = sorted(net.modules)
    return {
        "host": "a1111",
        "unet": [k for k in keys if k.startswith("diffusion_model_")],
        "te": [k for k in keys if not k.startswith("diffusion_model_")],
        "unmatched": [],  # A1111 only logs these at debug level
    }


def _forge(name: str) -> dict:
    import networks  # sd_forge_lora's module
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from modules import sd_models

    on_disk = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
    if on_disk is None:
        networks.list_available_networks()
        on_disk = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
    if on_disk is None:
        return {"error": f"no LoRA named {name!r}"}
    sd = sd_models.model_data.get_sd_model()
    lora = dict(networks.load_lora_state_dict(on_disk.filename))
    unet = sd.forge_objects_original.unet
    clip = sd.forge_objects_original.clip
    # same calls as sd_forge_lora/networks.py load_lora_for_models
    unet_keys = model_lora_keys_unet(unet.model)
    clip_keys = model_lora_keys_clip(clip.cond_stage_model)
    lora_unet, rest = load_lora(lora, unet_keys)
    lora_clip, rest = load_lora(rest, clip_keys)

    def text(key) -> str:
        if isinstance(key, tuple):
            return f"{key[0]}[{':'.join(str(x) for x in key[1])}]"
        return str(key)

    # the row slices Forge's key map knows for each fused parameter this file patches (Flux qkv / linear1), so a
    # test can tell the host's slices of a weight patched whole (kohya) from those patched slice by slice (diffusers)
    patched = {k[0] if isinstance(k, tuple) else k for k in lora_unet}
    slices: dict[str, set] = {}
    for target in unet_keys.values():
        if isinstance(target, tuple) and target[0] in patched:
            slices.setdefault(target[0], set()).add(tuple(target[1]))
    return {
        "host": "forge",
        "unet": sorted(text(k) for k in lora_unet),
        "te": sorted(text(k) for k in lora_clip),
        "unmatched": sorted(rest),
        "unet_slices": {k: sorted(list(x) for x in v) for k, v in sorted(slices.items())},
    }


def _on_app_started(_demo, app) -> None:
    def host_layers(name: str) -> dict:
        try:
            import backend  # noqa: F401  (only Forge has it)
        except ImportError:
            return {"name": name, **_a1111(name)}
        return {"name": name, **_forge(name)}

    app.add_api_route("/klora-probe/v1/host-layers", host_layers, methods=["GET"])


script_callbacks.on_app_started(_on_app_started)
