"""Fake builtin ``extra_networks_lora``: ``<lora:name:te[:unet]>`` -> networks.load_networks."""

import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list):
        names, te, unet, dyn = [], [], [], []
        for params in params_list:
            names.append(params.items[0])
            t = float(params.items[1]) if len(params.items) > 1 else 1.0
            te.append(t)
            unet.append(float(params.items[2]) if len(params.items) > 2 else t)
            dyn.append(int(params.items[3]) if len(params.items) > 3 else None)  # rank cut-off, usually none
        networks.load_networks(names, te, unet, dyn)
        hashes = []
        for net in networks.loaded_networks:
            entry = net.network_on_disk
            if net.mentioned_name is not None and entry.shorthash:
                hashes.append(f"{entry.get_alias()}: {entry.shorthash}")
        if hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(hashes)

    def deactivate(self, p):
        pass
