"""Fake builtin ``network_lora``: LoRA / LoCon / CP modules kept, like v1.10's, as small torch modules
(``up_model``/``down_model``/``mid_model``: Linear for Linear and attention targets, Conv2d for Conv2d targets, in
``devices.dtype``); ``lora_A``/``lora_B`` (PEFT names) are accepted as down/up."""

import network
import torch
from modules import devices

calc_log: list[tuple[str, str]] = []  # (network name, layer name) per calc_updown call: tests count re-merges


class ModuleTypeLora:
    def create_module(self, net, weights):
        if all(x in weights.w for x in ("lora_up.weight", "lora_down.weight")):
            return NetworkModuleLora(net, weights)
        if all(x in weights.w for x in ("lora_A.weight", "lora_B.weight")):
            w = dict(weights.w)
            weights.w.clear()
            weights.w.update({"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]})
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up_model = self._module(weights.w, "lora_up.weight")
        self.down_model = self._module(weights.w, "lora_down.weight")
        self.mid_model = self._module(weights.w, "lora_mid.weight", none_ok=True)
        self.dim = weights.w["lora_down.weight"].shape[0]

    def _module(self, w, key, none_ok=False):
        weight = w.get(key)
        if weight is None and none_ok:
            return None
        site = self.sd_module
        if isinstance(site, (torch.nn.Linear, torch.nn.MultiheadAttention)):
            weight = weight.reshape(weight.shape[0], -1)
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif isinstance(site, torch.nn.Conv2d):
            if weight.dim() == 2:
                weight = weight.reshape(*weight.shape, 1, 1)
            if key == "lora_up.weight" or tuple(weight.shape[2:]) == (1, 1):
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
            else:  # the k x k down (LoCon) or mid (CP) factor runs with the layer's own stride and padding
                module = torch.nn.Conv2d(
                    weight.shape[1], weight.shape[0], site.kernel_size, site.stride, site.padding, bias=False
                )
        else:
            raise AssertionError(f"Lora layer {self.network_key} matched a layer with unsupported type")
        with torch.no_grad():
            module.weight.copy_(weight.reshape(module.weight.shape))
        module.to(device=devices.cpu, dtype=devices.dtype)
        module.weight.requires_grad_(False)
        return module

    def calc_updown(self, orig_weight):
        calc_log.append((self.network.name, self.sd_key))
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if self.mid_model is not None:
            mid = self.mid_model.weight.to(orig_weight.device)
            updown = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1))
            output_shape += list(mid.shape[2:])
        else:
            if down.dim() == 4:
                output_shape += list(down.shape[2:])
            u, d = up.flatten(1), down.flatten(1)
            dyn = self.network.dyn_dim
            if dyn is not None:
                u, d = u[:, :dyn], d[:dyn]
            updown = (u @ d).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)

    def forward(self, x, y):
        h = self.down_model(x)
        if self.mid_model is not None:
            h = self.mid_model(h)
        return y + self.up_model(h) * self.multiplier() * self.calc_scale()
