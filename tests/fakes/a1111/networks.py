"""Fake builtin Lora ``networks`` module: discovery, loading, and the per-layer merge state machine.

Merge semantics (research notes §1.5, §1.8): a layer is recomputed at its forward iff its ``network_current_names``
differs from ``wanted_names`` = (name, te, unet, dyn_dim) of every loaded network; recomputing restores the weight
from the CPU backup made at the first merge and adds every loaded network's ``calc_updown`` in list order.

``nn.MultiheadAttention`` (SDXL's OpenCLIP text encoder) as the v1.10 builtin handles it: LoRA keys
``..._attn_q_proj/_k_proj/_v_proj`` have no module of their own and are matched to the parent attention module
(``re_x_proj``), ``..._attn_out_proj`` to the child ``out_proj`` Linear (which the attention never calls); the merge
happens at the attention module's forward, only when a network has all four, into ``in_proj_weight`` (q/k/v row
chunks) and ``out_proj.weight``; its backup is the pair (in_proj_weight, out_proj.weight).
"""

import os
import re

import network
import network_lora
import network_lyco
import torch
import torch.nn.functional as F
from modules import devices, shared

# the builtin's order: the first type that accepts a module's keys wins
module_types = [
    network_lora.ModuleTypeLora(),
    network_lyco.ModuleTypeHada(),
    network_lyco.ModuleTypeIa3(),
    network_lyco.ModuleTypeLokr(),
    network_lyco.ModuleTypeFull(),
    network_lyco.ModuleTypeNorm(),
    network_lyco.ModuleTypeGLora(),
]

available_networks: dict = {}
available_network_aliases: dict = {}
forbidden_network_aliases: dict = {}
available_network_hash_lookup: dict = {}
loaded_networks: list = []
networks_in_memory: dict = {}
originals = None  # the real module holds the torch patches here; the fake calls the forwards directly
errors: dict = {}
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
merge_log: list[str] = []  # layer names, one per recompute


# ---- discovery ----------------------------------------------------------------------------------------------------
def process_network_files(names=None):
    folder = shared.cmd_opts.lora_dir
    if not folder or not os.path.isdir(folder):
        return
    for root, _dirs, files in os.walk(folder):
        for file in sorted(files):
            if os.path.splitext(file)[1].lower() not in (".safetensors", ".pt", ".ckpt"):
                continue
            name = os.path.splitext(file)[0]
            if names and name not in names:
                continue
            entry = network.NetworkOnDisk(name, os.path.join(root, file))
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry


def update_available_networks_by_names(names):
    process_network_files(names)


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    process_network_files()


# ---- names on the model -------------------------------------------------------------------------------------------
def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    if getattr(sd_model, "is_sdxl", False):
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            for name, module in embedder.wrapped.named_modules():
                key = f"{i}_{name.replace('.', '_')}"
                mapping[key] = module
                module.network_layer_name = key
    else:
        for name, module in sd_model.cond_stage_model.wrapped.named_modules():
            key = name.replace(".", "_")
            mapping[key] = module
            module.network_layer_name = key
    for name, module in sd_model.model.named_modules():
        key = name.replace(".", "_")
        mapping[key] = module
        module.network_layer_name = key
    sd_model.network_layer_mapping = mapping


def _convert(key):
    """kohya module key -> A1111 layer name (compvis-style UNet keys and SD1/SDXL text-encoder keys only)."""
    if key.startswith("lora_unet_"):
        return "diffusion_model_" + key[len("lora_unet_") :]
    if key.startswith("lora_te_text_model"):
        return "transformer_" + key[len("lora_te_") :]
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        tail = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{tail}"
    return key


# ---- loading ------------------------------------------------------------------------------------------------------
def load_network(name, network_on_disk):
    from safetensors.torch import load_file

    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = load_file(network_on_disk.filename)
    model = shared.sd_model
    if not hasattr(model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(model)
    matched = {}
    for key_network, weight in sd.items():
        module_key, _, part = key_network.partition(".")
        key = _convert(module_key)
        sd_module = model.network_layer_mapping.get(key)
        if sd_module is None:
            m = re_x_proj.match(key)
            if m:
                sd_module = model.network_layer_mapping.get(m[1])  # q/k/v of a MultiheadAttention: the parent
        if sd_module is None and module_key.startswith("lora_te1_text_model"):
            key = "0_transformer_" + module_key[len("lora_te1_") :]
            sd_module = model.network_layer_mapping.get(key)
            if sd_module is None:
                key = "transformer_" + module_key[len("lora_te1_") :]
                sd_module = model.network_layer_mapping.get(key)
        if sd_module is None:
            continue
        if key not in matched:
            matched[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
        matched[key].w[part] = weight
    for key, weights in matched.items():
        module = None
        for kind in module_types:
            module = kind.create_module(net, weights)
            if module is not None:
                break
        if module is None:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights.w)}")
        net.modules[key] = module
    return net


def _on_disk(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name)
    return available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()
    if any(_on_disk(n) is None for n in names):
        list_available_networks()
    for i, name in enumerate(names):
        entry = _on_disk(name)
        if entry is None:
            continue
        net = already_loaded.get(name) or networks_in_memory.get(name)
        if net is None or os.path.getmtime(entry.filename) > net.mtime:
            net = load_network(name, entry)
            networks_in_memory[name] = net
        net.mentioned_name = name
        entry.read_hash()
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)


# ---- the merge state machine --------------------------------------------------------------------------------------
def network_restore_weights_from_backup(self):
    backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if backup is None and bias_backup is None:
        return
    mha = isinstance(self, torch.nn.MultiheadAttention)
    if backup is not None:
        if mha:
            self.in_proj_weight.copy_(backup[0])
            self.out_proj.weight.copy_(backup[1])
        else:
            self.weight.copy_(backup)
    if bias_backup is not None:
        (self.out_proj.bias if mha else self.bias).copy_(bias_backup)


def _backup(self):
    if isinstance(self, torch.nn.MultiheadAttention):
        return self.in_proj_weight.to(devices.cpu, copy=True), self.out_proj.weight.to(devices.cpu, copy=True)
    return self.weight.to(devices.cpu, copy=True)


def _bias_backup(self):
    bias = self.out_proj.bias if isinstance(self, torch.nn.MultiheadAttention) else self.bias
    return bias.to(devices.cpu, copy=True) if bias is not None else None


def _merge_mha(self, net, name):
    """The builtin's parent-attention merge: all four of q/k/v/out from one network, or nothing."""
    parts = [net.modules.get(f"{name}_{x}") for x in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if not all(parts):
        return
    with torch.no_grad():
        chunks = self.in_proj_weight.chunk(3, 0)
        qkv = torch.vstack([m.calc_updown(w)[0] for m, w in zip(parts[:3], chunks)])
        out, _ = parts[3].calc_updown(self.out_proj.weight)
        self.in_proj_weight += qkv
        self.out_proj.weight += out


def network_apply_weights(self):
    name = getattr(self, "network_layer_name", None)
    if name is None:
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    if getattr(self, "network_weights_backup", None) is None and wanted != ():
        if current != ():
            raise RuntimeError(f"{name} - no backup weights found and current weights are not unchanged")
        self.network_weights_backup = _backup(self)
    if getattr(self, "network_bias_backup", None) is None and wanted != ():
        self.network_bias_backup = _bias_backup(self)
    if current != wanted:
        merge_log.append(name)
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(name)
            if module is None:
                if isinstance(self, torch.nn.MultiheadAttention):
                    _merge_mha(self, net, name)
                continue
            try:
                with torch.no_grad():
                    weight = self.weight
                    updown, ex_bias = module.calc_updown(weight)
                    self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                    if ex_bias is not None and self.bias is not None:
                        self.bias.copy_((self.bias + ex_bias).to(dtype=self.bias.dtype))
            except RuntimeError:
                errors[net.name] = errors.get(net.name, 0) + 1
        self.network_current_names = wanted


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def network_forward(org_module, input, original_forward):
    if len(loaded_networks) == 0:
        return original_forward(org_module, input)
    network_restore_weights_from_backup(org_module)
    network_reset_cached_weight(org_module)
    y = original_forward(org_module, input)
    name = getattr(org_module, "network_layer_name", None)
    for net in loaded_networks:
        module = net.modules.get(name)
        if module is not None:
            y = module.forward(input, y)
    return y


def _linear(self, x):
    return F.linear(x, self.weight, self.bias)


def _conv(self, x):
    return self._conv_forward(x, self.weight, self.bias)


def network_Linear_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, _linear)
    network_apply_weights(self)
    return _linear(self, input)


def network_Conv2d_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, _conv)
    network_apply_weights(self)
    return _conv(self, input)


def network_MultiheadAttention_forward(self, *args, **kwargs):
    network_apply_weights(self)  # the builtin merges here in lora_functional mode too
    return torch.nn.MultiheadAttention.forward(self, *args, **kwargs)


def network_Linear_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
