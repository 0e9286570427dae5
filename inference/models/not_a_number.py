"""Values that are not numbers (NaN) in a network's outputs, caught before they become a label map.

nnU-Net's sliding window checks its summed logits for infinities only; a NaN goes on to the argmax, which makes
one label of it wherever it reaches: one NaN bias in the output layer labelled every voxel of a CT "liver", air
included. Weights holding a NaN are refused when they are imported or loaded
(:func:`inference.models.checkpoints.not_a_number_layer`); the checks here catch what slips past, each tile as it
is computed:

* in 32-bit floats (and BF16, whose range is FP32's), finite weights whose arithmetic gives NaN are damaged or
  unusable: the sentence names the weights;
* in the 16-bit floats of nnU-Net's mixed precision on a GPU, the tile is computed again in 32-bit floats: where
  that gives numbers, a value overflowed half precision inside the network, which is another sentence (the
  weights are sound; the series and that precision are not a match).

A NaN in the 16-bit sums of the tiles, with every tile a number, is those sums overflowing (an infinity of either
sign met its opposite): :data:`inference.models.HALF_PRECISION_OVERFLOW`, as for an infinity there.
"""

from __future__ import annotations

from typing import Any, Literal

from inference.models import HALF_PRECISION_OVERFLOW

Where = Literal["weights", "half precision", "sums"]


class NotANumber(ArithmeticError):
    """A network's logits held NaN: computed so by the weights, only in half precision, or in the tiles' 16-bit sums.

    Not a RuntimeError: nnU-Net runs a sliding window that raises one again with its sums on the CPU.
    """

    def __init__(self, where: Where) -> None:
        super().__init__(where)
        self.where = where

    def reason(self, weights: str) -> str:
        """The job's reason, naming the weights (``weights``: their dataset id and hash)."""
        if self.where == "sums":
            return HALF_PRECISION_OVERFLOW
        if self.where == "half precision":
            return (
                f"the weights {weights} computed values that are not numbers (NaN) for this series in 16-bit floats "
                "(nnU-Net's mixed precision on the GPU), and numbers in 32-bit floats: a value overflowed half "
                "precision inside the network, so there is no label map to trust; these weights cannot segment "
                "this series in half precision"
            )
        return (
            f"the weights {weights} computed values that are not numbers (NaN) for this series, so there is no label "
            "map to trust: the weights are damaged or unusable; import them again from a good copy"
        )


def holds_nan(values: Any) -> bool:
    """Whether a tensor holds a NaN. Its sum is NaN only then, or where it holds infinities of both signs (each
    value is looked at then), so a tensor is read once: 0.05 s for a ``total_fast`` tile's logits on 2 cores,
    against 0.44 s for looking at each value."""
    import torch

    return bool(torch.isnan(values.sum())) and bool(torch.isnan(values).any())


def guard_tiles(predictor: Any) -> None:
    """Check each tile of nnU-Net's own sliding window (the PyTorch backend) for NaN, and its summed logits.

    A NaN tile is noted, and the window refused with :class:`NotANumber` once its loop has ended: leaving
    nnU-Net's loop midway would leave its tile-feeding thread waiting for ever.
    """
    predict_tile = predictor._internal_maybe_mirror_and_predict
    sliding_window = predictor._internal_predict_sliding_window_return_logits
    found: list[NotANumber] = []

    def checked_tile(tile: Any) -> Any:
        prediction = predict_tile(tile)
        if not found and holds_nan(prediction):
            in_half = only_in_half_precision(predictor.network, tile, prediction)
            found.append(NotANumber("half precision" if in_half else "weights"))
        return prediction

    def checked_window(*args: Any, **kwargs: Any) -> Any:
        found.clear()
        logits = sliding_window(*args, **kwargs)
        if found:
            raise found[0]
        if holds_nan(logits):
            raise NotANumber("sums")
        return logits

    predictor._internal_maybe_mirror_and_predict = checked_tile
    predictor._internal_predict_sliding_window_return_logits = checked_window


def only_in_half_precision(network: Any, tile: Any, prediction: Any) -> bool:
    """Whether a tile whose logits (``prediction``) hold NaN was computed in 16-bit floats and gives numbers when
    computed again in 32-bit floats."""
    import torch

    if prediction.dtype not in (torch.float16, torch.bfloat16):
        return False
    with torch.autocast(tile.device.type, enabled=False):
        again = network(tile.float())
    return not holds_nan(again)
