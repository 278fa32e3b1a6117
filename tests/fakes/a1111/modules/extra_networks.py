"""Fake ``modules.extra_networks``: prompt parsing and activation (then the scripts' after_extra_networks_activate)."""

import re

from modules import errors

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry: dict = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = list(self.items)
        self.named = {}

    def __repr__(self):  # part of the cond-cache key, like the real one's
        return f"ExtraNetworkParams({self.items!r})"

    def __eq__(self, other):
        return isinstance(other, ExtraNetworkParams) and other.items == self.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        pass


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = {}

    def found(m):
        res.setdefault(m.group(1), []).append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, out = {}, []
    for prompt in prompts:
        text, data = parse_prompt(prompt)
        if not res:
            res = data
        out.append(text)
    return out, res


def activate(p, extra_network_data):
    for name, network in extra_network_registry.items():
        try:
            network.activate(p, extra_network_data.get(name, []))
        except Exception as e:
            errors.display(e, f"activating extra network {name}")
    if p.scripts is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):
    for network in extra_network_registry.values():
        network.deactivate(p)
