"""Monte-Carlo dropout that is exact and deterministic for a given seed, on any onnxruntime provider.

Why not the Dropout operator: onnxruntime's Dropout (training_mode true) draws its mask from a generator that lives
inside each kernel (seeded by a graph attribute, advanced by every run), differs between the CPU and CUDA
providers, and is not run by TensorRT at all; reproducing a pass would need a fresh session, and changing the seed
a rewritten graph. Feeding the masks as inputs instead would move feature-map-sized tensors (GBs for a full-size
160×224×224 tile) from the host for every tile.

So each fold has a *stochastic twin* (export/to_onnx.py torch --uncertainty, hnseg_export/stochastic.py): the same
network with every nn.Dropout replaced by a mask computed inside the graph by integer arithmetic from two extra
inputs, `dropout_seed` (int64 [N], one seed per tile) and `dropout_rate` (float32 scalar, the recipe's rate):

    t = (seed + site · SITE_STRIDE) mod M                      M = 2³¹ − 1 (prime)
    t = (t · size_a + index_a) mod M   for each axis a           (C, then z, y, x; channel-wise dropout stops at C)
    twice:  t = (t · A + B) mod M;  t = t⁵ mod M                 (x ↦ x⁵ is a permutation of Z_M: 5 ∤ M − 1)
    keep = t ≥ floor(rate · M);  out = x · keep / (1 − rate)     (as torch's Dropout in training mode)

Every product is below 2⁶², so the int64 operations are exact on every provider and thread count: a tile's mask
depends only on its seed, the dropout site and the element's position. The tile seeds come from the run's seed
through numpy's SeedSequence (tile_seed). `keep_mask_reference` is the numpy twin of the graph's arithmetic.
"""

from __future__ import annotations

import numpy as np

from hnseg_infer.errors import ModelError
from hnseg_infer.inference.onnx_engine import OnnxModel

MODULUS = 2**31 - 1
SITE_STRIDE = 104_729  # the 10 000th prime: separates the dropout sites' streams
ROUNDS = ((48_271, 12_345), (69_621, 54_321))  # (A, B) of the two mixing rounds
SEED_INPUT, RATE_INPUT = "dropout_seed", "dropout_rate"


def keep_mask_reference(seed: int, site: int, shape_czyx, rate: float, *, channelwise: bool = False) -> np.ndarray:
    """The stochastic graph's keep mask for one tile (bool, [C, z, y, x], or [C, 1, 1, 1] channel-wise), in
    numpy with the same integer arithmetic."""
    t = np.array((int(seed) + site * SITE_STRIDE) % MODULUS, dtype=np.int64).reshape(1, 1, 1, 1)
    for axis in range(1 if channelwise else 4):
        n = int(shape_czyx[axis])
        index = np.arange(n, dtype=np.int64).reshape([-1 if a == axis else 1 for a in range(4)])
        t = (t * n + index) % MODULUS
    for a, b in ROUNDS:
        t = (t * a + b) % MODULUS
        t2 = (t * t) % MODULUS
        t = ((t2 * t2) % MODULUS * t) % MODULUS
    threshold = np.int64(np.floor(np.float32(rate) * np.float32(MODULUS)))
    return t >= threshold


def tile_seed(*key: int) -> int:
    """A seed in [0, M) for one tile, from the run seed and the tile's place (pass, model, fold, tile number):
    counter-based, so it does not depend on how tiles are batched."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] % MODULUS)


class StochasticModel(OnnxModel):
    """A fold's stochastic twin: inputs `input` [N, C, z, y, x], `dropout_seed` int64 [N], `dropout_rate` float32
    []; output logits [N, K, z, y, x]. `bind` gives the callable the sliding window runs."""

    def _read_signature(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        if set(inputs) != {"input", SEED_INPUT, RATE_INPUT}:
            raise ModelError(f"{self.path}: a stochastic model takes the inputs 'input', {SEED_INPUT!r} and "
                             f"{RATE_INPUT!r}, this one {sorted(inputs)}: re-export it with export/to_onnx.py "
                             f"torch --uncertainty")
        if inputs[SEED_INPUT].type != "tensor(int64)" or inputs[RATE_INPUT].type != "tensor(float)":
            raise ModelError(f"{self.path}: {SEED_INPUT!r} must be int64 and {RATE_INPUT!r} float32, got "
                             f"{inputs[SEED_INPUT].type} and {inputs[RATE_INPUT].type}: re-export it")
        shape_in = list(inputs["input"].shape)
        shape_out = list(self._session.get_outputs()[0].shape)
        if len(shape_in) != 5 or inputs["input"].type != "tensor(float)":
            raise ModelError(f"{self.path}: input {shape_in} ({inputs['input'].type}) must be a float32 5-D "
                             f"[N, C, z, y, x] tensor: re-export it")
        static = [d if isinstance(d, int) and d > 0 else None for d in shape_in]
        self._input_name, self._output_name = "input", self._session.get_outputs()[0].name
        self._input_dtype = np.float32
        self.fixed_batch = None
        self.n_input_channels = static[1]
        self.patch_zyx = tuple(static[2:]) if None not in static[2:] else None
        k = shape_out[1] if len(shape_out) == 5 else None
        self.n_outputs = k if isinstance(k, int) and k > 0 else None

    def __call__(self, batch_nczyx: np.ndarray) -> np.ndarray:
        raise ModelError(f"{self.path} is a stochastic twin: it runs with a seed per tile and a rate "
                         f"(StochasticModel.bind or .run), not as a plain model")

    def bind(self, rate: float, seeds) -> "StochasticRun":
        """The callable `batch -> logits` whose n-th tile is run with the seed `seeds(n)`."""
        return StochasticRun(self, float(rate), seeds)

    def run(self, batch_nczyx: np.ndarray, seeds: np.ndarray, rate: float) -> np.ndarray:
        batch = np.ascontiguousarray(batch_nczyx, dtype=np.float32)
        self._check_batch(batch.shape)
        feed = {"input": batch, SEED_INPUT: np.asarray(seeds, np.int64).reshape(len(batch)),
                RATE_INPUT: np.array(rate, np.float32)}
        return self._session_run(feed, batch.shape)


class StochasticRun:
    """One fold in one pass: tiles numbered in the order they come, each run with its own seed."""

    def __init__(self, model: StochasticModel, rate: float, seeds):
        self.model, self.rate, self.seeds, self.tiles = model, rate, seeds, 0

    def __call__(self, batch_nczyx: np.ndarray) -> np.ndarray:
        n = len(batch_nczyx)
        seeds = np.array([self.seeds(self.tiles + i) for i in range(n)], np.int64)
        self.tiles += n
        return self.model.run(batch_nczyx, seeds, self.rate)
