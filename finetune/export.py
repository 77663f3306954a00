"""`finetune export RUN_DIR --format onnx|pt2|hf`: the run's best model in a standard format, in a
folder of its own with what using it needs (labels, task, preprocessing, the tokenizer, the model
card, export.json), checked on the rows of the run's own test split against the model it came from.

  onnx   model.onnx, dynamic batch (and sequence) axes; `--quantize int8`: model.int8.onnx too
         (onnxruntime's dynamic quantisation), with its measured metric and latency change
  pt2    model.pt2, a torch.export ExportedProgram: `torch.export.load(path).module()(**inputs)`
         (TorchScript's successor: PyTorch deprecates torch.jit.trace/script)
  hf     a Hugging Face model folder (text models): transformers loads it without this package
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune import files
from finetune.inference import load_run, split_batches
from finetune.models import SavedModel
from finetune.training import steps

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2", "hf": "model.safetensors"}
QUANTIZED = "model.int8.onnx"
TOLERANCE = 1e-4  # max |logit difference| between the export and the model it came from, in fp32
CHECKED_ROWS = 2_000  # rows of the split the export is checked (and int8 measured) on
MANIFEST = "export.json"


class ExportOptionsError(ValueError):
    """Options that cannot go together (exit status 2)."""


class ExportCheckFailed(RuntimeError):
    """The exported model's outputs differ from the model it came from (exit status 1)."""


@dataclass
class Exported:
    folder: Path
    format: str
    file: Path
    split: str
    rows: int
    max_abs_diff: float
    int8: dict | None = None  # metrics, latency and size before and after
    manifest: dict = field(default_factory=dict)


def check_options(format: str, quantize: str | None) -> None:
    if format == "torchscript":
        raise ExportOptionsError("--format torchscript: PyTorch deprecates TorchScript (torch.jit.trace/script); use "
                                 "--format pt2 (torch.export, its successor) or --format onnx")  # fmt: skip
    if format not in FORMATS:
        raise ExportOptionsError(f"--format {format}: use one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ExportOptionsError(f"--quantize {quantize}: only int8 is supported")
    if quantize and format != "onnx":
        raise ExportOptionsError("--quantize int8 quantises an ONNX model (onnxruntime): add --format onnx")
    if format == "onnx":
        from importlib.util import find_spec

        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if find_spec(name) is None]
        if missing:
            raise ExportOptionsError(f"--format onnx needs {', '.join(missing)}: pip install 'finetune[export]'")


def export_run(run_dir: str | Path, format: str, out: str | Path | None = None, quantize: str | None = None) -> Exported:
    """Export RUN_DIR's best model to `out` (default RUN_DIR/export/FORMAT) and check it."""
    check_options(format, quantize)
    run_dir = Path(run_dir)
    cfg, saved = load_run(run_dir)
    if format == "hf" and saved.preprocessor.kind != "text":
        raise ExportOptionsError("--format hf is for text models (a Hugging Face sequence classifier); an image "
                                 "model exports as onnx or pt2")  # fmt: skip
    saved.model.float().eval()
    split = "test" if (run_dir / "summary.json").is_file() and _has_test_rows(run_dir) else "val"
    example = _first_batch(split_batches(cfg, saved, split))
    if example is None:
        raise ExportCheckFailed(f"the {split} split has no rows to check the export on")
    folder = Path(out) if out else run_dir / "export" / format

    def write(target: Path) -> None:
        _copy_side_files(run_dir / "best", target, keep_weights=format == "hf")
        if format == "onnx":
            _export_onnx(saved.model, example, target / FORMATS["onnx"])
            if quantize:
                _quantize_onnx(target / FORMATS["onnx"], target / QUANTIZED)
        elif format == "pt2":
            torch.export.save(_exported_program(saved.model, example), target / FORMATS["pt2"])

    files.replace_dir(folder, write)  # a failed export leaves no half-written folder behind
    exported = {"export": _load(format, folder, saved)}
    if quantize:
        exported["int8"] = _load("onnx", folder, saved, QUANTIZED)
    measured = _measure(saved, exported, split_batches(cfg, saved, split))
    result = Exported(folder, format, folder / FORMATS[format], split, measured["rows"], measured["max_abs_diff"])
    if quantize:
        result.int8 = _int8_figures(saved, measured, exported, example, folder, split)
    result.manifest = _manifest(result, saved, example, cfg.name)
    files.write_text(folder / MANIFEST, json.dumps(result.manifest, indent=2))
    if result.max_abs_diff > TOLERANCE:
        raise ExportCheckFailed(
            f"{result.file}: its outputs differ from the trained model's by up to {result.max_abs_diff:.2e} on "
            f"{result.rows} {split} rows (tolerance {TOLERANCE:g}); the folder is kept for inspection"
        )
    return result


def _first_batch(batches) -> dict[str, torch.Tensor] | None:
    """The model inputs of the first batch (its padding trimmed); the rest drained, so the data
    iterator ends its epoch cleanly."""
    first = None
    for batch in batches:
        if first is None:
            # copies, not views of the padded batch: torch.export would guard on the view's base,
            # which a caller's own tensors do not have
            first = {name: values.clone() for name, values in steps.split_batch(batch, torch.device("cpu"))[0].items()}
    return first


def _has_test_rows(run_dir: Path) -> bool:
    return bool(json.loads((run_dir / "summary.json").read_text()).get("test_samples"))


def _copy_side_files(best: Path, target: Path, keep_weights: bool) -> None:
    """What using the model needs besides its weights: labels, task, preprocessing, tokenizer, card."""
    skipped = () if keep_weights else ("model.safetensors", "model.json")
    shutil.copytree(best, target, ignore=shutil.ignore_patterns(*skipped), dirs_exist_ok=True)


def _dynamic_shapes(example: dict[str, torch.Tensor]) -> dict:
    dynamic = torch.export.Dim.DYNAMIC
    # text: batch and sequence vary; images: the batch (the size is fixed by preprocessing)
    return {name: ({0: dynamic, 1: dynamic} if name != "pixel_values" else {0: dynamic}) for name in example}


def _exported_program(model: nn.Module, example: dict[str, torch.Tensor]):
    return torch.export.export(model, (), kwargs=example, dynamic_shapes=_dynamic_shapes(example))


def _export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    import onnx

    torch.onnx.export(model, (), str(path), kwargs=example, dynamo=True, input_names=list(example),
                      output_names=["logits"], dynamic_shapes=_dynamic_shapes(example), verbose=False)  # fmt: skip
    # the exporter names the free axes s0, s1, ...: name them for whoever reads the graph (the
    # weights stay in the external data file the exporter wrote beside it)
    graph = onnx.load(str(path), load_external_data=False)
    for value in [*graph.graph.input, *graph.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for index, name in ((0, "batch"), (1, "sequence")):
            if index < len(dims) and dims[index].dim_param and not (name == "sequence" and value.name == "logits"):
                dims[index].dim_param = name
    onnx.save(graph, str(path))


def _quantize_onnx(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantisation, after the shape inference and graph optimisation
    its documentation asks for first."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # the symbolic pass cannot follow the exporter's dynamic axes (Min(512, sequence)); onnx's own can
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True, save_as_external_data=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)


class OnnxModel(nn.Module):
    """An onnxruntime session called like the torch model: forward(**inputs) -> logits."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: inputs[name].cpu().numpy() for name in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _load(format: str, folder: Path, saved: SavedModel, file: str | None = None) -> nn.Module:
    """The exported model as its users load it."""
    if format == "onnx":
        return OnnxModel(folder / (file or FORMATS["onnx"]))
    if format == "pt2":
        return torch.export.load(folder / FORMATS["pt2"]).module()
    from finetune.models.text import load_text_model

    return load_text_model(folder).eval()


@torch.no_grad()
def _measure(saved: SavedModel, exported: dict[str, nn.Module], batches) -> dict:
    """One pass over the split: the largest logit difference between the export and the model it
    came from, and each model's per-row results (the task's metrics come from them)."""
    models = {"torch": saved.model, **exported}
    parts: dict[str, dict[str, list]] = {name: {} for name in models}
    rows, max_diff = 0, 0.0
    for batch in batches:
        if rows >= CHECKED_ROWS:
            continue  # drained: the data iterator ends its epoch cleanly
        inputs, labels = steps.split_batch(batch, torch.device("cpu"))
        outputs = {name: model(**inputs).float() for name, model in models.items()}
        max_diff = max(max_diff, float((outputs["export"] - outputs["torch"]).abs().max()))
        for name, output in outputs.items():
            for key, values in steps.batch_rows(saved.task, output, labels, batch).items():
                parts[name].setdefault(key, []).append(values)
        rows += len(labels)
    # data.long_text=windows: each text's windows pooled, as evaluation does
    evaluated = {name: steps.pooled_rows({key: torch.cat(values) for key, values in part.items()}, saved.task)
                 for name, part in parts.items()}  # fmt: skip
    return {"rows": rows, "max_abs_diff": max_diff, "rows_of": evaluated}


def _int8_figures(saved: SavedModel, measured: dict, exported: dict, example: dict, folder: Path, split: str) -> dict:
    """The int8 model's metrics, latency and size beside the fp32 ONNX model's."""
    metrics = {name: saved.task.metrics(measured["rows_of"][name], split) for name in ("export", "int8")}
    latency = {name: _latency_ms(exported[name], example) for name in ("export", "int8")}
    size = {"export": model_bytes(folder / FORMATS["onnx"]), "int8": model_bytes(folder / QUANTIZED)}
    return {side: {"metrics": metrics[key], "latency_ms": latency[key], "bytes": size[key]}
            for side, key in (("fp32", "export"), ("int8", "int8"))}  # fmt: skip


def model_bytes(path: Path) -> int:
    """A model file's size with its weights: an ONNX model keeps them in `<name>.data` beside it."""
    external = path.with_name(path.name + ".data")
    return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)


def _latency_ms(model: nn.Module, example: dict[str, torch.Tensor], repeats: int = 20) -> dict[str, float]:
    """Median milliseconds per call on one row and on the example batch (onnxruntime on this machine)."""
    figures = {}
    for label, rows in (("batch_1", 1), (f"batch_{len(next(iter(example.values())))}", None)):
        inputs = {name: values[:rows] for name, values in example.items()}
        model(**inputs)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - started) * 1000)
        figures[label] = statistics.median(times)
    return figures


def _manifest(result: Exported, saved: SavedModel, example: dict[str, torch.Tensor], name: str) -> dict:
    """export.json: what the folder holds and how to feed it."""
    def axes(input_name: str, tensor: torch.Tensor) -> list:
        if input_name == "pixel_values":
            return ["batch", *tensor.shape[1:]]
        return ["batch", "sequence"]

    return {
        "name": name,
        "format": result.format,
        "file": result.file.name,  # an ONNX model's weights are in <file>.data beside it
        "bytes": model_bytes(result.file),
        "inputs": {key: {"shape": axes(key, value), "dtype": str(value.dtype).removeprefix("torch.")}
                   for key, value in example.items()},  # fmt: skip
        "outputs": {"logits": {"shape": ["batch", saved.task.num_outputs], "dtype": "float32"}},
        "labels": saved.label_names,
        "task": saved.task.to_json(),
        "preprocessing": "preprocessing.json (text: the tokenizer files beside it)",
        **({"long_text": "windows: split each text's tokens into windows of max_length (its special tokens in each, "
                         "window_stride apart, at most max_windows spread from start to end: preprocessing.json), "
                         "run the model on every window and average the logits per text"}
           if getattr(saved.preprocessor, "long_text", None) == "windows" else {}),  # fmt: skip
        "check": {"split": result.split, "rows": result.rows, "max_abs_diff": result.max_abs_diff,
                  "tolerance": TOLERANCE},  # fmt: skip
        **({"int8": {"file": QUANTIZED, **result.int8}} if result.int8 else {}),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
