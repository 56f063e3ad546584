"""Stochastic twins for Monte-Carlo dropout (HN-UISeg): each fold's network with every nn.Dropout module replaced
by `HashDropout`, whose mask is integer arithmetic on two extra inputs (a seed per tile and the rate), so the
exported graph gives the same masks on every onnxruntime provider (hnseg_infer/inference/stochastic.py says why and how).

The twin is exported by tracing a wrapper that hands the seed and rate tensors to the HashDropout modules before
calling the network, so they enter the graph as inputs. It is proven against PyTorch (the same HashDropout masks
at the recipe's rate and a fixed seed) and, at rate 0, against the plain network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from hnseg_infer.errors import ExportError
from hnseg_infer.inference.agreement import MIN_AGREEMENT_FP32, TOLERANCE_FP32, compare_logits
from hnseg_infer.inference.stochastic import MODULUS, RATE_INPUT, ROUNDS, SEED_INPUT, SITE_STRIDE

from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, FirstOutput, proof_input, stamp

ELEMENTWISE = (torch.nn.Dropout,)
CHANNELWISE = (torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)
UNSUPPORTED = (torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
PROOF_SEED = 12345


class HashDropout(torch.nn.Module):
    """Dropout whose keep mask is a hash of (tile seed, site, element position): see hnseg_infer.inference.stochastic."""

    def __init__(self, site: int, *, channelwise: bool, trained_rate: float):
        super().__init__()
        self.site, self.channelwise, self.trained_rate = site, channelwise, trained_rate
        self.seed: torch.Tensor | None = None  # int64 [N], set by StochasticNetwork.forward
        self.rate: torch.Tensor | None = None  # float32 []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ExportError(f"dropout site {self.site} sees a {x.dim()}-D tensor; HashDropout handles the "
                              f"[N, C, z, y, x] feature maps of a 3-D network")
        t = torch.fmod(self.seed.reshape(-1, 1, 1, 1, 1) + self.site * SITE_STRIDE, MODULUS)
        for axis in range(1, 2 if self.channelwise else 5):
            n = x.shape[axis]
            index = torch.arange(n, dtype=torch.int64).reshape([-1 if a == axis else 1 for a in range(5)])
            t = torch.fmod(t * n + index, MODULUS)
        for a, b in ROUNDS:
            t = torch.fmod(t * a + b, MODULUS)
            t2 = torch.fmod(t * t, MODULUS)
            t = torch.fmod(torch.fmod(t2 * t2, MODULUS) * t, MODULUS)
        threshold = torch.floor(self.rate * MODULUS).to(torch.int64)
        keep = (t >= threshold).to(x.dtype)
        return x * keep / (1 - self.rate)


class StochasticNetwork(torch.nn.Module):
    """(input, dropout_seed, dropout_rate) → the network's full-resolution logits with HashDropout active."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = FirstOutput(copy.deepcopy(network)).eval()
        self.sites: list[HashDropout] = []
        for name, module in list(self.network.named_modules()):
            if isinstance(module, UNSUPPORTED):
                raise ExportError(f"{type(network).__name__}.{name} is {type(module).__name__}, which MC dropout "
                                  f"does not reproduce; use nn.Dropout or nn.Dropout3d")
            if isinstance(module, ELEMENTWISE + CHANNELWISE) and module.p > 0:
                site = HashDropout(len(self.sites), channelwise=isinstance(module, CHANNELWISE),
                                   trained_rate=float(module.p))
                _replace(self.network, name, site)
                self.sites.append(site)

    def forward(self, x, seed, rate):
        for site in self.sites:
            site.seed, site.rate = seed, rate
        return self.network(x)


def _replace(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def dropout_sites(network: torch.nn.Module) -> list[dict]:
    """The network's dropout modules (name, kind, trained rate) as the twin replaces them."""
    return [{"module": name, "channelwise": isinstance(m, CHANNELWISE), "trained_rate": float(m.p)}
            for name, m in network.named_modules() if isinstance(m, ELEMENTWISE + CHANNELWISE) and m.p > 0]


def export_stochastic(network: torch.nn.Module, path: Path, *, n_channels: int, patch_zyx, head: str,
                      rate: float, module: str) -> dict:
    """Export, prove and stamp one fold's twin; returns its proof and dropout sites (for the provenance)."""
    twin = StochasticNetwork(network)
    if not twin.sites:
        raise ExportError(f"{module} has no nn.Dropout module with p > 0, so Monte-Carlo dropout has nothing to "
                          f"switch on: export without --uncertainty, or set its dropout_rate to 0 for "
                          f"augmentation-only uncertainty")
    example = (torch.zeros(1, n_channels, *patch_zyx), torch.zeros(1, dtype=torch.int64),
               torch.tensor(rate, dtype=torch.float32))
    try:
        with torch.no_grad():
            torch.onnx.export(twin, example, str(path), input_names=[INPUT_NAME, SEED_INPUT, RATE_INPUT],
                              output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "N"}, SEED_INPUT: {0: "N"}, OUTPUT_NAME: {0: "N"}})
        onnx.checker.check_model(str(path))
    except ExportError:
        raise
    except Exception as error:  # torch raises many kinds; all mean the same to the user
        raise ExportError(f"cannot export the stochastic twin of {module} ({type(error).__name__}: {error})") from error
    proof = _prove(twin, network, path, n_channels=n_channels, patch_zyx=patch_zyx, head=head, rate=rate)
    sites = [{"site": s.site, "channelwise": s.channelwise, "trained_rate": s.trained_rate} for s in twin.sites]
    stamp(path, {"stochastic": {"sites": sites, "recipe_rate": rate}, "proof": proof})
    return {"proof": proof, "sites": sites}


def _prove(twin: StochasticNetwork, network: torch.nn.Module, path: Path, *, n_channels: int, patch_zyx, head: str,
           rate: float) -> dict:
    """The twin in onnxruntime against the twin in PyTorch at the recipe's rate (the same masks), and at rate 0
    against the plain network in PyTorch (no dropout)."""
    x = proof_input(n_channels, patch_zyx)
    seeds = np.array([PROOF_SEED, PROOF_SEED + 1], np.int64)[:len(x)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(r: float) -> np.ndarray:
        return session.run(None, {INPUT_NAME: x, SEED_INPUT: seeds, RATE_INPUT: np.array(r, np.float32)})[0]

    with torch.no_grad():
        reference = twin(torch.from_numpy(x), torch.from_numpy(seeds), torch.tensor(rate)).float().numpy()
        plain = FirstOutput(network).eval()(torch.from_numpy(x)).float().numpy()
    results = {}
    for name, expected, got in (("torch_at_rate", reference, run(rate)),
                                ("torch_without_dropout_at_rate_0", plain, run(0.0))):
        result = compare_logits(expected, got, head=head, tolerance=TOLERANCE_FP32, min_agreement=MIN_AGREEMENT_FP32)
        if not result["passed"]:
            raise ExportError(f"{path.name}: the stochastic twin disagrees ({name}: max |Δlogit| "
                              f"{result['max_abs_logit_diff']:.3g}, agreement {result['agreement']:.4f}); nothing "
                              f"was written")
        results[name] = result
    if rate > 0 and np.array_equal(run(rate), run(0.0)):
        raise ExportError(f"{path.name}: dropout at rate {rate} changes nothing in the stochastic twin (the dropout "
                          f"modules are not on the path to the output?); nothing was written")
    return {**results, "seed": PROOF_SEED, "rate": rate, "input_shape": list(x.shape)}


def export_stochastic_folds(networks: dict[str, torch.nn.Module], folder: Path, *,
                            n_channels: int, patch_zyx, head: str, rate: float, module: str
                            ) -> tuple[list[str], dict]:
    """`<fold>.stochastic.onnx` beside each plain file (fp32 always); the files and their provenance."""
    names, provenance = [], {}
    for fold, network in networks.items():
        name = f"{fold}.stochastic.onnx"
        provenance[name] = export_stochastic(network, Path(folder) / name, n_channels=n_channels,
                                             patch_zyx=patch_zyx, head=head, rate=rate, module=module)
        names.append(name)
    return names, provenance


def uncertainty_block(text: str | None, model) -> dict | None:
    """--uncertainty JSON: the recipe's uncertainty block, validated by the runtime's own parser before the slow
    export (None when the option is not given). `model` is the validated model entry."""
    if text is None:
        return None
    from hnseg_infer.errors import RecipeError
    from hnseg_infer.uncertainty.config import parse_uncertainty

    from .onnx_export import json_object

    block = json_object(text, "--uncertainty")
    try:
        parse_uncertainty(block, "--uncertainty")
    except RecipeError as error:
        raise ExportError(f"{error}: fix the --uncertainty JSON") from error
    if model.head.type != "softmax":
        raise ExportError(f"--uncertainty: uncertainty maps need a softmax head (the entropy is over background, "
                          f"GTVp, GTVn), the spec's head is {model.head.type}")
    return block


def add_stochastic_twins(block: dict | None, networks: dict[str, torch.nn.Module], staging: Path, *, model,
                         module: str) -> dict:
    """The model entry's extra keys: with a dropout rate > 0, `stochastic_files` (one twin per fold, exported and
    proven here) and their provenance under `stochastic_provenance` (the caller moves it into the provenance)."""
    if block is None or block["dropout_rate"] == 0:
        return {}
    files, provenance = export_stochastic_folds(networks, staging, n_channels=len(model.channels),
                                                patch_zyx=model.tiling.patch_size_zyx, head=model.head.type,
                                                rate=float(block["dropout_rate"]), module=module)
    return {"stochastic_files": files, "stochastic_provenance": provenance}
