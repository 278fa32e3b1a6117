"""Fake builtin LyCORIS module types (v1.10's network_hada / network_lokr / network_full / network_ia3 /
network_glora / network_norm in one file): which keys each accepts, what it keeps, and its calc_updown, written from
how the builtin behaves. Class names are the builtin's (the adapter tells static kinds by them)."""

import network
import torch


def _mat(t):
    return t.reshape(t.shape[0], -1)


def _cp(t, wa, wb):
    # Tucker form: t (R, R', kh, kw), wa (R, out), wb (R', in) -> (out, in, kh, kw)
    return torch.einsum("ijkl,io,jn->onkl", t, wa, wb)


class ModuleTypeHada:
    def create_module(self, net, weights):
        if all(x in weights.w for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            return NetworkModuleHada(net, weights)
        return None


class NetworkModuleHada(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.shape = self.sd_module.weight.shape
        w = weights.w
        self.w1a, self.w1b, self.w2a, self.w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        self.t1, self.t2 = w.get("hada_t1"), w.get("hada_t2")
        self.dim = self.w1b.shape[0]

    def calc_updown(self, orig_weight):
        dev = orig_weight.device
        w1a, w1b, w2a, w2b = (x.to(dev) for x in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is not None:
            output_shape = [w1a.size(1), w1b.size(1), *self.t1.shape[2:]]
            half1 = _cp(self.t1.to(dev), w1a, w1b)
        else:
            output_shape = [w1a.size(0), w1b.size(1), *w1b.shape[2:]]
            half1 = (_mat(w1a) @ _mat(w1b)).reshape(output_shape)
        half2 = _cp(self.t2.to(dev), w2a, w2b) if self.t2 is not None else (_mat(w2a) @ _mat(w2b))
        return self.finalize_updown(half1 * half2.reshape(half1.shape), orig_weight, output_shape)


class ModuleTypeLokr:
    def create_module(self, net, weights):
        w = weights.w
        one = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
        two = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
        return NetworkModuleLokr(net, weights) if one and two else None


class NetworkModuleLokr(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        w = weights.w
        self.w1, self.w1a, self.w1b = w.get("lokr_w1"), w.get("lokr_w1_a"), w.get("lokr_w1_b")
        self.w2, self.w2a, self.w2b, self.t2 = (
            w.get("lokr_w2"),
            w.get("lokr_w2_a"),
            w.get("lokr_w2_b"),
            w.get("lokr_t2"),
        )
        # the alpha divisor: the factored w2's rank, else the factored w1's, else none (alpha ignored)
        self.dim = self.w2b.shape[0] if self.w2b is not None else (self.w1b.shape[0] if self.w1b is not None else None)

    def calc_updown(self, orig_weight):
        dev = orig_weight.device
        w1 = self.w1.to(dev) if self.w1 is not None else self.w1a.to(dev) @ self.w1b.to(dev)
        if self.w2 is not None:
            w2 = self.w2.to(dev)
        elif self.t2 is not None:
            w2 = _cp(self.t2.to(dev), self.w2a.to(dev), self.w2b.to(dev))
        else:
            w2 = self.w2a.to(dev) @ self.w2b.to(dev)
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if orig_weight.dim() == 4:
            output_shape = list(orig_weight.shape)
        if w2.dim() == 4:
            w1 = w1.reshape(*w1.shape, 1, 1)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
        return self.finalize_updown(updown, orig_weight, output_shape)


class ModuleTypeFull:
    def create_module(self, net, weights):
        return NetworkModuleFull(net, weights) if "diff" in weights.w else None


class NetworkModuleFull(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.weight = weights.w["diff"]
        self.ex_bias = weights.w.get("diff_b")

    def calc_updown(self, orig_weight):
        ex_bias = self.ex_bias.to(orig_weight.device) if self.ex_bias is not None else None
        return self.finalize_updown(self.weight.to(orig_weight.device), orig_weight, self.weight.shape, ex_bias)


class ModuleTypeIa3:
    def create_module(self, net, weights):
        return NetworkModuleIa3(net, weights) if "weight" in weights.w else None


class NetworkModuleIa3(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w = weights.w["weight"]
        self.on_input = weights.w["on_input"].item()

    def calc_updown(self, orig_weight):
        w = self.w.to(orig_weight.device)
        output_shape = [w.size(0), orig_weight.size(1)]
        if self.on_input:
            output_shape.reverse()
        else:
            w = w.reshape(-1, 1)
        return self.finalize_updown(orig_weight * w, orig_weight, output_shape)


class ModuleTypeGLora:
    def create_module(self, net, weights):
        need = ("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight")
        return NetworkModuleGLora(net, weights) if all(x in weights.w for x in need) else None


class NetworkModuleGLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.shape = self.sd_module.weight.shape
        w = weights.w
        self.w1a, self.w1b, self.w2a, self.w2b = w["a1.weight"], w["b1.weight"], w["a2.weight"], w["b2.weight"]

    def calc_updown(self, orig_weight):
        dev = orig_weight.device
        w1a, w1b, w2a, w2b = (x.to(dev) for x in (self.w1a, self.w1b, self.w2a, self.w2b))
        updown = (w2b @ w1b) + ((orig_weight.to(dtype=w1a.dtype) @ w2a) @ w1a)
        return self.finalize_updown(updown, orig_weight, [w1a.size(0), w1b.size(1)])


class ModuleTypeNorm:
    def create_module(self, net, weights):
        return NetworkModuleNorm(net, weights) if all(x in weights.w for x in ("w_norm", "b_norm")) else None


class NetworkModuleNorm(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w_norm, self.b_norm = weights.w["w_norm"], weights.w["b_norm"]

    def calc_updown(self, orig_weight):
        return self.finalize_updown(
            self.w_norm.to(orig_weight.device), orig_weight, self.w_norm.shape, self.b_norm.to(orig_weight.device)
        )
