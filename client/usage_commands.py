"""A data owner's commands for a trained model: ``fedrnn predict``, ``evaluate``, ``generate``,
and ``export`` (the model as an ONNX file).

They run where the records are and send nothing anywhere; the logic is
``client.inference``'s and ``client.onnx_export``'s, the model and its card
``shared.model_card``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedrnn.shared.cli import Command, write_output
from fedrnn.shared.errors import ConfigError
from fedrnn.shared.run_records import json_value

MODEL_HELP = ("a run directory, or any directory holding the run's model.json and model.pt "
              "(the model's card and weights)")

EPILOG_PREDICT = """examples:
  fedrnn predict runs/nafld-gru --data patients.csv
  fedrnn predict runs/nafld-gru --data patients.csv --out risks.csv
  fedrnn predict models/tweets-lm --data messages.jsonl --out scores.jsonl

Rows: one per record, first its ids (client when the file has that column; sequence_id for
numeric sequences; a text's id, else its line), then
  classify: p_<class> for every class (summing to 1) and label, the likeliest class;
  forecast: next_<feature>, each feature's predicted value at the next step, in the file's
            own units;
  lm:       loss (cross-entropy per token) and perplexity.
Records are encoded as in training: the model's tokenizer, max length and normalisation.
A model whose sites standardised their own numeric records standardises the file with its
own statistics, per client when it has a client column.
"""

EPILOG_EVALUATE = """examples:
  fedrnn evaluate runs/nafld-gru --data held-out.csv
  fedrnn evaluate runs/tweets-lm --data held-out.jsonl --json

The metrics are the task's, computed as a run's evaluation computes them: classify loss,
accuracy, auroc (two classes); lm loss, accuracy, perplexity; forecast loss (on
standardised values) and mae. classify needs a label on every record.
"""

EPILOG_GENERATE = """examples:
  fedrnn generate runs/tweets-lm --prompt "The economy"
  fedrnn generate runs/tweets-lm --prompt "The" --length 200 --temperature 0.8 --top-k 20 \\
                  --seed 7

Needs a language model (task lm) with the char tokenizer: hashed words cannot be turned
back into text. The same --seed gives the same text; --temperature 0 always takes the
likeliest character.
"""

EPILOG_EXPORT = """examples:
  fedrnn export runs/nafld-gru --onnx nafld-gru.onnx
  fedrnn export models/tweets-lm --onnx ~/app/assets/tweets-lm.onnx

The file holds the network as ONNX's own LSTM/GRU/RNN operators, with dynamic batch and
step axes, and the model's card (model.json) in its metadata ("fedrnn.model_card"), beside
a description of its inputs and outputs ("fedrnn.io"). Inputs: tokens (text) or series
(numeric), plus lengths for classify; output: class_logits, next_token_logits or
next_values. Before it is written, the file is run with onnxruntime against the PyTorch
model on random inputs. Needs the export extra: pip install "fedrnn[export]".
"""


def _configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN", help=MODEL_HELP)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="records to predict for (.jsonl/.csv, the formats of training)")
    parser.add_argument("--out", metavar="FILE.csv|FILE.jsonl",
                        help="write the rows here (by its suffix) instead of CSV on stdout")


def _run_predict(args: argparse.Namespace) -> int:
    from fedrnn.client.inference import predict
    from fedrnn.shared.model_card import load_model

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"--out {out}: name a .csv or a .jsonl file")
    card, model = load_model(args.model)
    predictions = predict(card, model, args.data)
    if out is None:
        sys.stdout.write(predictions.to_csv())
        return 0
    text = predictions.to_jsonl() if out.suffix.lower() == ".jsonl" else predictions.to_csv()
    write_output(out.expanduser().resolve(), text.encode())
    print(f"{len(predictions.rows)} rows: {out}")
    return 0


def _configure_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN", help=MODEL_HELP)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="held-out records (.jsonl/.csv, the formats of training)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")


def _run_evaluate(args: argparse.Namespace) -> int:
    from fedrnn.client.inference import evaluate
    from fedrnn.shared.model_card import load_model

    card, model = load_model(args.model)
    metrics = evaluate(card, model, args.data)
    if args.json:
        print(json.dumps({k: json_value(v) for k, v in metrics.items()}, indent=2))
        return 0
    print(f"{args.data}: {card.task}, {card.architecture.model}, "
          f"trained with {card.describe_privacy()}")
    for name, value in metrics.items():
        print(f"  {name:<13} {value:g}" if isinstance(value, float) else f"  {name:<13} {value}")
    return 0


def _configure_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN", help=MODEL_HELP)
    parser.add_argument("--prompt", required=True, metavar="TEXT",
                        help="the text to continue")
    parser.add_argument("--length", type=int, default=100, metavar="N",
                        help="characters to generate at most (default: 100)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sharpness of sampling; 0 takes the likeliest (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample among the K likeliest only; 0: all (default: 0)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="the same seed gives the same text (default: 0)")


def _run_generate(args: argparse.Namespace) -> int:
    from fedrnn.client.inference import generate
    from fedrnn.shared.model_card import load_model

    card, model = load_model(args.model)
    print(args.prompt + generate(card, model, args.prompt, length=args.length,
                                 temperature=args.temperature, top_k=args.top_k,
                                 seed=args.seed))
    return 0


def _configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="RUN", help=MODEL_HELP)
    parser.add_argument("--onnx", required=True, metavar="FILE.onnx",
                        help="write the ONNX model here (replaced whole if it exists)")


def _run_export(args: argparse.Namespace) -> int:
    from fedrnn.client.onnx_export import export_onnx, require
    from fedrnn.shared.model_card import load_model

    out = Path(args.onnx).expanduser().resolve()
    if out.suffix.lower() != ".onnx" or out.is_dir():
        raise ConfigError(f"--onnx {args.onnx}: name a .onnx file")
    if not out.parent.is_dir():
        raise ConfigError(f"--onnx {args.onnx}: directory {out.parent} does not exist")
    for package in ("onnx", "onnxruntime"):  # before the model is read: say it first
        require(package)
    card, model = load_model(args.model)
    exported = export_onnx(card, model)
    write_output(out, exported.data)
    print(f"{out}: {card.task}, {card.architecture.model}, {len(exported.data) / 1e3:.0f} kB; "
          f"onnxruntime's outputs within {exported.difference:.1g} of PyTorch's")
    return 0


COMMANDS = [
    Command("predict", "predict for every record of a file with a trained model",
            _configure_predict, _run_predict, epilog=EPILOG_PREDICT, order=81),
    Command("evaluate", "a trained model's metrics on a held-out file",
            _configure_evaluate, _run_evaluate, epilog=EPILOG_EVALUATE, order=82),
    Command("generate", "continue a prompt with a trained language model",
            _configure_generate, _run_generate, epilog=EPILOG_GENERATE, order=83),
    Command("export", "write a trained model as an ONNX file, its card inside",
            _configure_export, _run_export, epilog=EPILOG_EXPORT, order=84),
]
