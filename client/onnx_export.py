"""A trained model as an ONNX file, for runtimes without PyTorch: ``fedrnn export``.

fedrnn's recurrent layers (``shared.nn``) are torch's equations behind a hand-written
autograd node, which no ONNX exporter can read. Their parameters, though, carry torch's
names, shapes and layouts (LSTM gates i, f, g, o; GRU gates r, z, n with ``b_hn`` inside
the reset product), so the state dict loads unchanged into ``torch.nn.LSTM``/``GRU``/``RNN``;
``portable`` builds that twin and torch's own exporter writes it, the recurrence as ONNX's
LSTM/GRU/RNN operators.

The file's inputs and outputs (batch and step axes dynamic)::

    tokens   int64 [batch, steps]              text: token ids, as fedrnn's tokenizer makes them
    series   float32 [batch, steps, 2F + 1]    numeric: z-values, observed flags, gap per step
    lengths  int64 [batch]                     classify only: each record's valid steps (>= 1)
    class_logits       [batch, classes]        classify: softmax gives the class probabilities
    next_token_logits  [batch, steps, vocab]   lm: step t scores the token at t + 1
    next_values        [batch, steps, F]       forecast: step t's standardised values at t + 1

The model card (``model.json``) travels inside the file as metadata (``CARD_KEY``), with a
plain description of the inputs and outputs (``IO_KEY``): a device reads both through
onnxruntime's ``get_modelmeta().custom_metadata_map``.

Needs the ``export`` extra (``onnx``, ``onnxruntime``); every file is checked with
onnxruntime against the PyTorch model before it is written.
"""

from __future__ import annotations

import importlib
import io
import json
import warnings
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from torch import nn

from fedrnn.shared.data.tensors import GAP_SCALE, Z_CLIP
from fedrnn.shared.data.tokenizers import BOS, EOS, N_SPECIAL, PAD, UNK
from fedrnn.shared.errors import FedrnnError
from fedrnn.shared.model_card import ModelCard
from fedrnn.shared.models import SequenceModel

OPSET = 17  # an opset of 2022, not the newest: older runtimes on devices read it too
CARD_KEY = "fedrnn.model_card"  # metadata: model.json, as fedrnn wrote it
IO_KEY = "fedrnn.io"  # metadata: what each input and output holds
TOLERANCE = 1e-4  # largest difference from PyTorch accepted for a written file
INSTALL = 'pip install "fedrnn[export]"'
_TORCH_LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


class PortableModel(nn.Module):
    """``SequenceModel``'s network out of torch's own layers, with the same parameter names
    (``embed.weight``, ``rnn.weight_ih_l0``, ``head.bias`` ...) and the same outputs; its
    ``forward`` takes ``lengths`` only when the output is one per sequence."""

    def __init__(self, *, embed: nn.Embedding | None, rnn: nn.RNNBase, head: nn.Linear,
                 per_step: bool) -> None:
        super().__init__()
        self.embed, self.rnn, self.head, self.per_step = embed, rnn, head, per_step

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> torch.Tensor:
        h = self.embed(inputs) if self.embed is not None else inputs  # [B, T, E]
        out, _ = self.rnn(h)  # [B, T, H]
        if self.per_step:
            return self.head(out)  # [B, T, n_outputs]
        if lengths is None:
            raise ValueError("a per-sequence model needs lengths")
        # gather, not fancy indexing: it exports with a dynamic batch axis
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
        return self.head(out.gather(1, last).squeeze(1))  # [B, n_outputs]


def portable(model: SequenceModel) -> PortableModel:
    """The torch.nn twin of ``model`` (eval mode), holding a copy of its weights."""
    rnn = model.rnn
    extra = {"nonlinearity": rnn.nonlinearity} if rnn.mode == "RNN" else {}
    twin = PortableModel(
        embed=(nn.Embedding(model.embed.num_embeddings, model.embed.embedding_dim)
               if model.embed is not None else None),
        rnn=_TORCH_LAYERS[rnn.mode](rnn.input_size, rnn.hidden_size, num_layers=rnn.num_layers,
                                    bias=rnn.bias, batch_first=True, dropout=rnn.dropout,
                                    bidirectional=rnn.bidirectional, **extra),
        head=nn.Linear(model.head.in_features, model.head.out_features),
        per_step=model.per_step)
    # the same names and layouts: the keys map one to one, and strict loading proves it
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def input_names(card: ModelCard) -> list[str]:
    """The file's input names, in the order ``PortableModel.forward`` takes them."""
    first = "tokens" if card.is_text else "series"
    return [first] if _per_step(card) else [first, "lengths"]


def output_name(card: ModelCard) -> str:
    return {"classify": "class_logits", "lm": "next_token_logits",
            "forecast": "next_values"}[card.task]


def random_inputs(card: ModelCard, model: SequenceModel, *, batch: int, steps: int,
                  generator: torch.Generator) -> dict[str, np.ndarray]:
    """Inputs of the file's names, types and shapes: random token ids or channels (the
    observed flags 0 or 1), and lengths between 1 and ``steps``."""
    if card.is_text:
        first = torch.randint(0, model.embed.num_embeddings, (batch, steps),
                              generator=generator)
    else:
        n = len(card.features)
        first = torch.randn(batch, steps, 2 * n + 1, generator=generator)
        first[..., n: 2 * n] = (first[..., n: 2 * n] > 0).float()
    inputs = {input_names(card)[0]: first.numpy()}
    if not _per_step(card):
        inputs["lengths"] = torch.randint(1, steps + 1, (batch,), generator=generator).numpy()
    return inputs


@dataclass(frozen=True)
class OnnxExport:
    data: bytes  # the .onnx file
    difference: float  # largest difference from the PyTorch model onnxruntime showed


def export_onnx(card: ModelCard, model: SequenceModel) -> OnnxExport:
    """The ONNX file of ``model`` with ``card`` in its metadata, checked with onnxruntime
    against ``model`` (a FedrnnError if it differs by more than ``TOLERANCE``)."""
    onnx = require("onnx")
    twin = portable(model)
    names, output = input_names(card), output_name(card)
    example = random_inputs(card, model, batch=2, steps=3,
                            generator=torch.Generator().manual_seed(0))
    axes = {names[0]: {0: "batch", 1: "steps"},
            output: {0: "batch"} if not _per_step(card) else {0: "batch", 1: "steps"}}
    if "lengths" in names:
        axes["lengths"] = {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (onnxscript-free, so the extra stays two packages) warns
        # that it is the legacy one, and that a GRU's implicit zero initial state could tie
        # the file to the example's batch size: ONNX's operators default it to zeros of the
        # input's batch, which the check below runs at other batch sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(twin, tuple(torch.from_numpy(example[n]) for n in names), buffer,
                          dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=[output], dynamic_axes=axes)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name, proto.producer_version = "fedrnn", _version()
    proto.doc_string = (f"fedrnn {card.task} model ({card.architecture.model}); trained with "
                        f"{card.describe_privacy()}")
    onnx.helper.set_model_props(proto, {CARD_KEY: json.dumps(card.to_json()),
                                        IO_KEY: json.dumps(describe_io(card))})
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    difference = max_difference(data, card, model)
    if not difference <= TOLERANCE:
        raise FedrnnError(f"the ONNX model differs from the PyTorch model by {difference:.3g} "
                          f"(more than {TOLERANCE:g}): not written")
    return OnnxExport(data, difference)


def max_difference(data: bytes, card: ModelCard, model: SequenceModel, *,
                   shapes: tuple[tuple[int, int], ...] = ((1, 1), (3, 7), (5, 2)),
                   seed: int = 0) -> float:
    """The largest absolute difference between onnxruntime running ``data`` and ``model``
    on random inputs of each (batch, steps) in ``shapes``."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    model.eval()
    for batch, steps in shapes:
        inputs = random_inputs(card, model, batch=batch, steps=steps, generator=generator)
        (got,) = session.run(None, inputs)
        lengths = inputs.get("lengths", np.full(batch, steps))
        with torch.no_grad():
            want = model(*(torch.from_numpy(inputs[n]) for n in input_names(card)[:1]),
                         torch.from_numpy(lengths)).numpy()
        if got.shape != want.shape:
            return float("inf")
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def describe_io(card: ModelCard) -> dict[str, dict[str, str]]:
    """What each input and output of the file holds, in words, for whoever feeds it."""
    inputs: dict[str, str] = {}
    if card.is_text:
        if card.tokenizer == "char":
            ids = (f"printable ASCII character c -> {N_SPECIAL} + ord(c) - 32, any other "
                   f"{UNK}; newlines and tabs read as spaces")
        else:
            ids = (f"lower-cased words and punctuation (regex \\w+|[^\\w\\s]) -> {N_SPECIAL} + "
                   f"crc32(utf-8 bytes) % {card.hash_buckets}")
        inputs["tokens"] = (f"int64 [batch, steps]: {BOS} (start), then the text's ids ({ids}), "
                            f"then {EOS} (end); at most {card.max_len + 1} ids; padding {PAD}")
    else:
        n = len(card.features)
        inputs["series"] = (
            f"float32 [batch, steps, {2 * n + 1}] per observation, the most recent "
            f"{card.max_len} kept: {n} standardised values of {', '.join(card.features)} "
            f"((x - mean) / std, clipped to +-{Z_CLIP:g}, 0 when missing), their {n} observed "
            f"flags (1 observed, 0 missing), and log1p(time since the previous observation) / "
            f"{GAP_SCALE:g}; mean and std from the card's normalisation")
    if not _per_step(card):
        inputs["lengths"] = "int64 [batch]: each record's valid steps (>= 1); padding after"
    outputs = {
        "classify": f"float32 [batch, {len(card.labels)}]: scores of the classes "
                    f"{', '.join(card.labels)}; softmax gives their probabilities",
        "lm": f"float32 [batch, steps, {card.vocab_size}]: at each step, scores of the next "
              "token id; softmax gives their probabilities",
        "forecast": f"float32 [batch, steps, {len(card.features)}]: at each step, the "
                    "standardised values predicted for the next observation; the last valid "
                    "step's forecasts the record's next; x = z * std + mean",
    }
    return {"inputs": inputs, "outputs": {output_name(card): outputs[card.task]}}


def require(name: str) -> ModuleType:
    """``import name``, or a FedrnnError saying how to install the ``export`` extra."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FedrnnError(f"exporting to ONNX needs the {name} package: {INSTALL}") from None


def _per_step(card: ModelCard) -> bool:
    from fedrnn.shared.tasks import get_task

    return get_task(card.task).per_step


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedrnn")
    except PackageNotFoundError:
        return ""
