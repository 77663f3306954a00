"""The pipeline schema: one pydantic model per section, defaults and a description beside each
field, cross-section checks in `PipelineConfig`. A strategy's section lives with its strategy
(finetune/strategies/) and joins the `strategy` union from their registry.
"""

from __future__ import annotations

import codecs
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Field, field_validator, model_validator

from finetune.config.base import MetricName, Section, UserPath, metric_mode, regex_problem, task_class
from finetune.strategies.auto import AutoConfig


# ---- training-time image augmentation (torchvision.transforms.v2), one entry per transform


def _share_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"{list(value)}: a range of shares of the image, [low, high] with 0 < low <= high <= 1")
    return value


def _ratio_range(value: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 < value[0] <= value[1]:
        raise ValueError(f"{list(value)}: a range of aspect ratios, [low, high] with 0 < low <= high")
    return value


ShareRange = Annotated[tuple[float, float], AfterValidator(_share_range)]


class RandomResizedCropAug(Section):
    name: Literal["random_resized_crop"] = Field(description="Crop a random area and aspect, resized to image_size.")
    scale: ShareRange = Field((0.08, 1.0), description="Range of the crop's area, as a share of the image.")
    ratio: Annotated[tuple[float, float], AfterValidator(_ratio_range)] = Field((3 / 4, 4 / 3), description="Range of the crop's aspect ratio.")


class HorizontalFlipAug(Section):
    name: Literal["horizontal_flip"] = Field(description="Mirror left-right.")
    p: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a flip.")


class RotationAug(Section):
    name: Literal["rotation"] = Field(description="Rotate by a random angle in [-degrees, degrees].")
    degrees: float = Field(15.0, ge=0.0, le=180.0, description="Largest rotation, in degrees.")


class ColorJitterAug(Section):
    name: Literal["color_jitter"] = Field(description="Random brightness, contrast, saturation and hue.")
    brightness: float = Field(0.2, ge=0.0)
    contrast: float = Field(0.2, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)
    hue: float = Field(0.0, ge=0.0, le=0.5)


class RandAugmentAug(Section):
    name: Literal["rand_augment"] = Field(description="RandAugment (Cubuk et al. 2020).")
    num_ops: int = Field(2, ge=1, description="Operations per image.")
    magnitude: int = Field(9, ge=0, le=30, description="Strength of every operation (0-30).")


class TrivialAugmentAug(Section):
    name: Literal["trivial_augment"] = Field(description="TrivialAugmentWide: one random operation, random strength.")


class RandomErasingAug(Section):
    name: Literal["random_erasing"] = Field(description="Erase a random rectangle (on the normalised image).")
    p: float = Field(0.25, ge=0.0, le=1.0, description="Probability of an erasure.")
    scale: ShareRange = Field((0.02, 0.33), description="Range of the erased area, as a share of the image.")


AugmentConfig = Annotated[
    RandomResizedCropAug | HorizontalFlipAug | RotationAug | ColorJitterAug | RandAugmentAug | TrivialAugmentAug
    | RandomErasingAug,
    Field(discriminator="name"),
]


class DataConfig(Section):
    source: UserPath = Field(
        description="A builtin dataset (rotten_tomatoes, fashion_mnist) or a path/URI to CSV, "
        "JSONL or Parquet file(s), or an image folder laid out as root/<class>/*.png|jpg."
    )
    format: Literal["auto", "csv", "jsonl", "parquet", "image_folder"] = Field(
        "auto", description="File format of `source`; auto infers it from the extension."
    )
    val_source: UserPath | None = Field(
        None, description="Explicit validation file(s); when unset, a seeded split of `source`."
    )
    test_source: UserPath | None = Field(
        None, description="Explicit test file(s); when unset, a seeded split of `source`."
    )
    delimiter: str | None = Field(
        None, min_length=1, max_length=1,
        description="What separates a CSV file's fields; unset = a tab in .tsv/.tab files, a comma otherwise "
        "(';' for spreadsheets saved where the comma is the decimal mark).",
    )  # fmt: skip
    encoding: str = Field(
        "utf-8",
        description="Text encoding of CSV and JSON lines files, e.g. utf-16 (Excel's 'Unicode text') or cp1252 "
        "(older Excel); a UTF-8 byte-order mark is skipped.",
    )
    text_column: str = Field("text", description="Column holding the input text (text tasks).")
    image_column: str = Field(
        "image",
        description="Column holding the images (image tasks): encoded bytes, a path (absolute, or relative to the "
        "folder of the table file that names it), or a Hugging Face-style struct of bytes and path.",
    )
    label_column: str = Field(
        "label",
        description="Column holding the target: the class (classification), the labels (multi_label: a list, or "
        "a string split on label_delimiter; an empty list or string = no label applies), or a number (regression).",
    )
    label_delimiter: str = Field(
        "|", min_length=1, description="multi_label: what separates labels in a string label column, e.g. 'drama|comedy'."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of `source` held out for validation.")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of `source` held out for test.")
    max_train_samples: int | None = Field(
        None, gt=0, description="Use at most this many training rows (after the split); unset = all."
    )
    max_eval_samples: int | None = Field(
        None, gt=0, description="Use at most this many validation and test rows each; unset = all."
    )
    max_length: int = Field(128, ge=8, le=8192, description="Tokens per text; what happens to longer ones: long_text.")
    long_text: Literal["truncate", "head_tail", "windows"] = Field(
        "truncate",
        description="A text longer than max_length tokens: truncate keeps its start; head_tail keeps its start and "
        "its end (head_share of the tokens from the start, the rest from the end; Sun et al. 2019 found it best on "
        "long reviews); windows reads all of it as overlapping windows of max_length tokens (window_stride apart, "
        "at most max_windows), each trained on with the text's label, their logits averaged per text when "
        "evaluating and predicting (metrics count texts). Training, evaluation, predict and serving alike.",
    )
    head_share: float = Field(
        0.25, gt=0.0, lt=1.0, description="head_tail: the share of max_length taken from the text's start "
        "(Sun et al. kept the first 128 and the last 382 of 510 tokens).",
    )
    window_stride: int | None = Field(
        None, ge=1, description="windows: tokens from one window's start to the next; unset = half a window "
        "(each token read twice). Smaller overlaps more and costs more windows.",
    )
    max_windows: int = Field(
        8, ge=1, le=256, description="windows: at most this many windows per text; a longer text gets this many "
        "spread from its start to its end. Training and evaluation cost grows with the windows read.",
    )
    image_size: int | None = Field(
        None, ge=16, le=1024, description="Square side images are resized to; unset = the model's own."
    )
    augment: list[AugmentConfig] = Field(
        default_factory=list,
        description="Image augmentation for training rows only (validation/test never augment), applied in list "
        "order, except that random_resized_crop replaces the resize and random_erasing acts last, on the "
        "normalised image. Names: random_resized_crop, horizontal_flip, rotation, color_jitter, rand_augment, "
        "trivial_augment, random_erasing.",
    )
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="Mixup (Zhang et al. 2018) on training batches with Beta(alpha, alpha); 0 = off."
    )
    cutmix_alpha: float = Field(
        0.0, ge=0.0, description="CutMix (Yun et al. 2019) on training batches; 0 = off. With mixup, one of the "
        "two is picked per batch.",
    )
    shuffle: Literal["full", "local", "none"] = Field(
        "local",
        description="Training order, new every epoch from train.seed: full = a global shuffle of the dataset "
        "(moves all rows through the object store), local = a buffer of shuffle_buffer rows per worker, none.",
    )
    shuffle_buffer: int = Field(2048, ge=2, description="Rows in the local shuffle buffer (shuffle=local).")
    group_by_length: bool = Field(
        False, description="Texts: each 16 training batches (in their shuffled order) re-cut into batches of "
        "similar-length texts, then shuffled, so a batch pads less (about half the tokens to compute on short, "
        "varied texts). Off by default: where length goes with the label (short texts of one class, long of "
        "another) the batches become single-class and training suffers. Evaluation always runs texts sorted "
        "by length; its results are the same either way."
    )
    prefetch_batches: int = Field(
        2, ge=0, description="Batches prepared ahead of the training step, so data work overlaps compute."
    )
    preprocess_cpus: float | None = Field(
        None, gt=0.0, description="Most CPUs reading and preprocessing may use at once; unset = what is free."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A row with an empty label or an unreadable image: error (named by file and row) or skip "
        "(the count of skipped rows is reported at the end of the run).",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}: e.g. utf-8, utf-16, cp1252, latin-1") from None
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction ({self.val_fraction}) + data.test_fraction ({self.test_fraction}) "
                "must be below 1 so that training data remains"
            )
        return self


class BatchNormConfig(Section):
    """What happens to a CNN's BatchNorm layers (none in text models: this section changes nothing there)."""

    recalibrate: bool | None = Field(
        None,
        description="Recompute the running mean/variance of every trained BatchNorm layer over training rows "
        "(no augmentation, no gradients, all workers together) before each validation that ranks checkpoints, "
        "so the tested and exported model normalises with statistics of its own weights on your data. "
        "Unset = on, unless freeze_statistics.",
    )
    recalibrate_batches: int = Field(
        16, ge=1, description="Batches of train.batch_size per worker that a recalibration reads (from the fixed "
        "training sample that train.train_eval_rows also draws on): its cost is about this many forward passes."
    )
    momentum: float | None = Field(
        None, gt=0.0, le=1.0, description="Every BatchNorm layer's momentum, in PyTorch's sense (the weight of the "
        "new batch; TensorFlow's 0.99 is 0.01 here). Unset = each layer's own."
    )
    sync: bool = Field(
        False, description="nn.SyncBatchNorm: batch statistics over all workers' batches, for small per-GPU "
        "batches. GPUs only (scaling.use_gpu)."
    )
    freeze_statistics: bool = Field(
        False, description="Every BatchNorm layer in eval mode for the whole run, its pretrained statistics kept "
        "(Keras' fine-tuning advice); the layers' scale and shift still train if the strategy trains them. "
        "For comparison; recalibration is off with it.",
    )

    @model_validator(mode="after")
    def _one_source_of_statistics(self) -> "BatchNormConfig":
        if self.freeze_statistics and self.recalibrate:
            raise ValueError("model.batchnorm: freeze_statistics keeps the pretrained statistics, recalibrate replaces "
                             "them; set one of them")  # fmt: skip
        if self.recalibrate is None:
            self.recalibrate = not self.freeze_statistics
        return self


class ModelConfig(Section):
    name: UserPath = Field(
        description="Model to fine-tune: minilm-l6 or efficientnet-lite0 (packaged, offline), "
        "hf:<hub id or local path> or torchvision:<architecture>."
    )
    trust_remote_code: bool = Field(
        False,
        description="hf: models only: let the model run the Python code it ships (an architecture transformers does "
        "not have). That code runs on every node of the cluster: set it only for models whose code you trust.",
    )
    weights: str | None = Field(
        None,
        description="torchvision only: a weights enum name (e.g. IMAGENET1K_V1, needs internet), "
        "a local weights file, or `none` for random initialisation. Default: the model's default weights.",
    )
    head_init: Literal["default", "xavier", "kaiming", "normal", "zeros"] = Field(
        "default",
        description="Initialisation of the new classification head: the library's default, xavier (uniform), "
        "kaiming (normal, fan_in), normal (std 0.02), or zeros; biases start at zero.",
    )
    layer_groups: list[str] | None = Field(
        None,
        description="The model's layer groups, input -> output, as regexes over parameter names (a parameter "
        "joins the first group that matches; the new head is its own last group). Default: found from the "
        "architecture (BERT-family, ResNet, MobileNet, EfficientNet, ViT, EfficientNet-Lite).",
    )
    batchnorm: BatchNormConfig = Field(
        default_factory=BatchNormConfig,
        description="BatchNorm layers: frozen ones keep their statistics; trained ones are recalibrated.",
    )

    @model_validator(mode="after")
    def _groups_are_regexes(self) -> "ModelConfig":
        for pattern in self.layer_groups or []:
            if problem := regex_problem(pattern):
                raise ValueError(f"model.layer_groups: {pattern!r} is not a regex: {problem}")
        return self


def _strategy_configs() -> dict[str, type[Section]]:
    from finetune.strategies.registry import strategy_configs

    return strategy_configs()


# Every registered strategy's section, told apart by `name` (finetune/strategies/).
STRATEGY_CONFIGS = _strategy_configs()
# `auto` is a section of its own: the driver races the others and never hands it to a worker.
StrategyConfig = Annotated[Union[(*STRATEGY_CONFIGS.values(), AutoConfig)], Field(discriminator="name")]


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd", "rmsprop", "adagrad"] = Field("adamw", description="Optimizer (torch.optim).")
    lr: float = Field(5e-5, gt=0.0, le=10.0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.01, ge=0.0, description="Decoupled (adamw) or L2 (the others) weight decay, for the parameters no_decay "
        "leaves. adam/rmsprop/adagrad scale an L2 term like any gradient: 0.01 there drags small weights to 0 "
        "within an epoch; use adamw, or about 1e-5."
    )
    no_decay: list[str] = Field(
        ["bias", "norm"],
        description="Parameters kept out of weight decay: 'bias' (every bias), 'norm' (normalisation layers' "
        "weights: LayerNorm, BatchNorm, GroupNorm, ...) or a regex on parameter names. [] = decay everything.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd / rmsprop momentum.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam / adamw betas.")
    eps: float = Field(1e-8, gt=0.0, description="adam / adamw / rmsprop / adagrad epsilon.")
    alpha: float = Field(0.99, gt=0.0, lt=1.0, description="rmsprop smoothing constant.")

    @field_validator("no_decay")
    @classmethod
    def _no_decay_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if pattern not in ("bias", "norm") and (problem := regex_problem(pattern)):
                raise ValueError(f"{pattern!r} is neither 'bias', 'norm' nor a regex ({problem})")
        return value

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError(f"optim.nesterov needs optim.name=sgd with optim.momentum > 0 (got {self.name}, "
                             f"momentum {self.momentum})")  # fmt: skip
        return self


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine", "cosine_restarts", "step", "one_cycle", "plateau"] = Field(
        "linear",
        description="Learning rate after warmup. constant; linear / cosine: decay to 0 at the last step; "
        "cosine_restarts: num_cycles cosine decays; step: times gamma every step_epochs; one_cycle: "
        "torch's OneCycleLR (warmup_ratio = its pct_start); plateau: times gamma when the plateau metric "
        "has not improved for patience epochs (ReduceLROnPlateau).",
    )
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of all steps spent in linear warmup from 0.")
    num_cycles: int = Field(2, ge=1, description="cosine_restarts: cosine decays (hard restarts).")
    step_epochs: int = Field(1, ge=1, description="step: epochs between decays.")
    gamma: float = Field(0.1, gt=0.0, lt=1.0, description="step / plateau: the factor each decay multiplies by.")
    patience: int = Field(1, ge=0, description="plateau: epochs without improvement before a decay.")
    metric: MetricName | None = Field(
        None, description="plateau: the validation metric watched; unset = checkpoint.metric."
    )


class LossConfig(Section):
    name: str | None = Field(
        None,
        description="Training loss; unset = the task's own: cross_entropy (classification), bce (multi_label: "
        "sigmoid + binary cross-entropy per label), mse (regression). focal (classification, multi_label): "
        "the loss times (1 - p_target) ** gamma (Lin et al.); huber (regression): smooth L1 with delta.",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Share of the target mass spread over all classes (multi_label: each 0/1 target moves "
        "this share toward 1/2). Not for regression.",
    )  # fmt: skip
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None,
        description="Per-class loss weights, in label order (as summary.json lists labels); 'balanced' = "
        "rows / (classes x rows of the class), counted on the training split. multi_label (bce): the weight "
        "of each label's positive rows (torch's pos_weight); 'balanced' = negative / positive rows per label.",
    )
    gamma: float = Field(2.0, ge=0.0, description="focal: focusing exponent; 0 = cross-entropy.")
    alpha: float | list[float] | None = Field(
        None,
        description="focal: classification, per-class alpha_t weights in label order (multiplies "
        "class_weights); multi_label, one number in (0, 1), the weight of positives (negatives: 1 - alpha).",
    )
    delta: float = Field(1.0, gt=0.0, description="huber: where the loss turns from quadratic to linear, in "
                         "standard deviations of the target when task.normalize_targets is on.")  # fmt: skip

    @field_validator("class_weights", "alpha")
    @classmethod
    def _positive_weights(cls, value):
        if isinstance(value, list) and (not value or any(w < 0 for w in value) or not any(w > 0 for w in value)):
            raise ValueError("per-class weights must be >= 0, at least one > 0")
        return value


class TaskConfig(Section):
    type: str = Field(
        "classification",
        description="classification: one class per row (softmax); multi_label: any number of labels per row "
        "(a sigmoid per label; the label column holds a list, or a string split on data.label_delimiter); "
        "regression: a numeric target (one output).",
    )
    threshold: float | list[float] = Field(
        0.5,
        description="multi_label: a label is predicted when its probability is at least this; one number for "
        "every label or one per label, in label order. F1 metrics and `finetune predict` use it.",
    )
    normalize_targets: bool = Field(
        True,
        description="regression: train on (target - mean) / std of the training split, so the loss and the "
        "learning rate do not depend on the target's units; metrics and predictions are in its own units.",
    )

    @field_validator("type")
    @classmethod
    def _registered(cls, value):
        task_class(value)  # an unknown type names the known ones
        return value

    @field_validator("threshold")
    @classmethod
    def _probabilities(cls, value):
        values = value if isinstance(value, list) else [value]
        if not values or any(not 0.0 < t < 1.0 for t in values):
            raise ValueError(f"thresholds are probabilities strictly between 0 and 1 (got {value})")
        return value


class EarlyStoppingConfig(Section):
    patience: int = Field(3, ge=1, description="Epochs without improvement of the metric before the run stops.")
    metric: MetricName | None = Field(
        None, description="The validation metric watched; unset = checkpoint.metric."
    )
    min_delta: float = Field(0.0, ge=0.0, description="The least change that counts as an improvement.")


class EmaConfig(Section):
    decay: float = Field(
        0.999, gt=0.0, lt=1.0, description="Per optimizer step: ema = decay * ema + (1 - decay) * weights."
    )


class TrainConfig(Section):
    epochs: int = Field(3, ge=1, le=10_000, description="Passes over the training split.")
    batch_size: int = Field(32, ge=1, description="Samples per optimizer micro-step on each worker.")
    eval_batch_size: int = Field(64, ge=1, description="Samples per evaluation step on each worker.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip gradients to this global norm; null = off.")
    max_grad_value: float | None = Field(
        None, gt=0.0, description="Clip each gradient element to [-value, value] (before the norm clip); null = off."
    )
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when the validation metric stops improving; null = run every epoch."
    )
    ema: EmaConfig | None = Field(
        None, description="Keep an exponential moving average of the weights; it is what is evaluated, "
        "checkpointed and exported. null = off."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype. auto: bf16 where the device supports it (recent CPUs, Ampere+ GPUs), "
        "else fp32. fp16 needs a GPU.",
    )
    seed: int = Field(
        0,
        description="Seeds the split, the head initialisation, shuffling and dropout. A one-worker run "
        "repeats exactly; with several workers Ray Data assigns blocks to workers as they ask, so batch "
        "order (not the split or the data) can differ between runs.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker; unset = the machine's cores / workers on it."
    )
    compile: bool = Field(
        False, description="torch.compile the model on each worker (dynamic shapes; the state_dict and the "
        "saved model stay the plain model's). Its first training and evaluation steps compile (about a minute "
        "each on a CPU). For long runs on GPUs; on a 2-core CPU it made MiniLM's steps slower "
        "(docs/BENCHMARKS.md). Needs a C++ compiler."
    )
    log_every_steps: int = Field(10, ge=1, description="Progress update interval in optimizer steps.")
    train_eval_rows: int = Field(
        500, ge=0, description="A fixed sample of training rows (no augmentation) evaluated in eval mode each "
        "epoch as train_eval/<metric>, so train and val compare on the same footing; 0 = off."
    )


class ScalingConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP processes).")
    use_gpu: bool = Field(False, description="One GPU per worker (nccl); CPU workers use gloo.")
    cpus_per_worker: float = Field(
        0.5,
        gt=0.0,
        description="Logical CPUs each worker reserves. Keep some CPUs unreserved: Ray Data needs "
        "them for preprocessing, and a run whose workers take every CPU hangs.",
    )
    gpus_per_worker: float = Field(1.0, gt=0.0, description="GPUs per worker when use_gpu is true.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed over the nodes (Ray placement group strategy): PACK fills a node "
        "first (least network traffic); SPREAD puts each worker on another node when it can, so one lost node "
        "costs one worker; STRICT_* refuse to start otherwise.",
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts after a worker or node dies; each resumes from the latest "
        "checkpoint (model, optimizer, schedule, strategy, epoch). -1 = without limit."
    )


class CheckpointConfig(Section):
    metric: MetricName | None = Field(
        None,
        description="Validation metric that ranks checkpoints and picks the best: one the task reports "
        "(classification: accuracy, macro_f1, loss; multi_label: micro_f1, macro_f1, map, loss; regression: "
        "mae, rmse, r2, loss). Unset = val/accuracy, val/micro_f1 or val/rmse by task.",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether a higher or lower metric is better; unset = min for loss, mae, rmse, else max."
    )
    num_to_keep: int = Field(2, ge=1, description="Best checkpoints kept in storage.")
    storage_path: UserPath | None = Field(
        None,
        description="Where Ray Train stores checkpoints; unset = <run dir>/ray. On a multi-node cluster: a URI "
        "(s3://, gs://, ...) or a shared file system every node mounts; a local disk is refused.",
    )
    storage_is_shared: bool = Field(
        False, description="Declare a local storage_path shared by every node (a mount finetune does not recognise)."
    )



class YardstickConfig(Section):
    enabled: bool = Field(
        True,
        description="Fit the cheapest model that could work on the same training split and score it on the same "
        "val and test rows, beside the fine-tuned model: TF-IDF (word and character n-grams) + a linear model for "
        "text, a linear probe on the pretrained model's frozen features (cached between runs) for images. The "
        "summary says when fine-tuning does not beat it by more than the noise; "
        "`finetune predict RUN --model yardstick` uses it.",
    )
    max_rows: int = Field(
        20_000, ge=100, description="Rows of each split the yardstick fits on or is scored on; larger splits are "
        "sampled with train.seed (the summary says so).",
    )


# ---- the `tracking` section: which experiment trackers a run logs to (finetune/tracking/)


class MlflowConfig(Section):
    tracking_uri: str | None = Field(
        None,
        description="An MLflow tracking server or database (http://host:5000, sqlite:///path/mlflow.db, databricks). "
        "Unset = MLFLOW_TRACKING_URI, else a local SQLite file beside the run folders (runs/mlflow.db; "
        "`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows it).",
    )
    experiment: str | None = Field(None, description="The MLflow experiment; unset = the pipeline's name.")
    run_name: str | None = Field(None, description="The MLflow run's name; unset = the run folder's name.")


class WandbConfig(Section):
    project: str | None = Field(None, description="The W&B project; unset = the pipeline's name.")
    entity: str | None = Field(None, description="The W&B team or user; unset = your default entity.")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: write the run under <run dir>/wandb only (no network); `wandb sync` uploads it later."
    )
    run_name: str | None = Field(None, description="The W&B run's name; unset = the run folder's name.")


class TrackingConfig(Section):
    tensorboard: bool = Field(
        True, description="TensorBoard event files in <run dir>/tensorboard: `tensorboard --logdir runs`."
    )
    mlflow: MlflowConfig | None = Field(None, description="Log to MLflow ({} = the defaults; needs finetune[mlflow]).")
    wandb: WandbConfig | None = Field(None, description="Log to Weights & Biases ({} = the defaults; needs finetune[wandb]).")


# ---- the `tune` section: a Ray Tune sweep over dotted config keys


class SearchDimension(Section):
    """One searched key: exactly one of the fields, e.g. {loguniform: [1e-5, 1e-3]} or {choice: [16, 32]}."""

    uniform: tuple[float, float] | None = Field(None, description="A float drawn uniformly from [low, high].")
    loguniform: tuple[float, float] | None = Field(
        None, description="A float drawn uniformly in log space from [low, high] (both > 0): learning rates."
    )
    randint: tuple[int, int] | None = Field(None, description="An integer from [low, high), like Python's range.")
    choice: list[Any] | None = Field(None, min_length=1, description="One of these values, drawn at random.")
    grid: list[Any] | None = Field(
        None, min_length=1, description="Every one of these values (each sample runs the whole grid)."
    )

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDimension":
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(type(self).model_fields)} (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: [low, high] with low < high (got [{low}, {high}])")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: both bounds must be > 0 (got [{low}, {high}])")
        return self


class AshaConfig(Section):
    name: Literal["asha"] = Field(
        "asha", description="Asynchronous successive halving (Li et al. 2020): stops trials that trail at each rung."
    )
    time_attr: Literal["epochs", "steps"] = Field(
        "epochs", description="What rungs count: training epochs or optimizer steps done."
    )
    grace_period: int = Field(1, ge=1, description="Epochs (or steps) every trial runs before it can be stopped.")
    reduction_factor: float = Field(3.0, gt=1.0, description="1/reduction_factor of the trials at a rung go on.")
    max_t: int | None = Field(
        None, ge=1, description="Epochs (or steps) at which a trial ends; unset = train.epochs (required for steps)."
    )


class FifoConfig(Section):
    name: Literal["fifo"] = Field(description="fifo: every trial runs to the end (no early stopping).")


SchedulerConfig = Annotated[AshaConfig | FifoConfig, Field(discriminator="name")]


class TuneConfig(Section):
    search_space: dict[str, SearchDimension] = Field(
        min_length=1,
        description="Dotted config keys to search, each with one of uniform, loguniform, randint, choice, grid, "
        "e.g. {optim.lr: {loguniform: [1e-5, 1e-3]}, strategy.name: {choice: [full, lora]}}. A strategy key "
        "that the trial's strategy does not have is left out of that trial.",
    )
    num_samples: int = Field(8, ge=1, description="Trials drawn (with grid keys: repeats of the whole grid).")
    metric: MetricName | None = Field(
        None, description="Validation metric to optimise; unset = checkpoint.metric. Trials keep their best epoch by it."
    )
    mode: Literal["max", "min"] | None = Field(None, description="unset = min for loss, mae, rmse, else max.")
    scheduler: SchedulerConfig = Field(default_factory=AshaConfig)
    search_alg: Literal["random", "optuna", "hyperopt"] = Field(
        "random", description="random (and grid keys), or optuna / hyperopt (pip install finetune[search]; no grid)."
    )
    max_concurrent_trials: int = Field(
        1, ge=1, description="Trials running at once; each takes the pipeline's scaling section (workers, CPUs, GPUs)."
    )
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting and running trials after this long.")
    seed: int = Field(0, description="Seeds the search algorithm's draws.")

    @model_validator(mode="after")
    def _consistent(self) -> "TuneConfig":
        grid = [key for key, dim in self.search_space.items() if dim.kind == "grid"]
        if grid and self.search_alg != "random":
            raise ValueError(f"tune.search_alg={self.search_alg} cannot run grid keys ({', '.join(grid)}); use choice")
        if isinstance(self.scheduler, AshaConfig) and self.scheduler.time_attr == "steps" and self.scheduler.max_t is None:
            raise ValueError("tune.scheduler.max_t: required when time_attr=steps (steps per epoch depend on the data)")
        if self.mode is not None and self.metric is not None and self.mode != metric_mode(self.metric):
            raise ValueError(f"tune.mode={self.mode} with tune.metric={self.metric}: use mode={metric_mode(self.metric)}")
        return self


class PipelineConfig(Section):
    name: str = Field("finetune", description="Names the run folder and the Ray Train run.")
    data: DataConfig
    model: ModelConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    strategy: StrategyConfig = Field(default_factory=STRATEGY_CONFIGS["full"])
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    yardstick: YardstickConfig = Field(default_factory=YardstickConfig)
    tune: TuneConfig | None = Field(None, description="A hyperparameter sweep (`finetune tune`); train ignores it.")

    @model_validator(mode="after")
    def _settings_fit_device(self) -> "PipelineConfig":
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "train.precision=fp16 with scaling.use_gpu=false: fp16 autocast needs a GPU; use bf16 or fp32 on CPU"
            )
        if self.model.batchnorm.sync and not self.scaling.use_gpu:
            raise ValueError("model.batchnorm.sync=true with scaling.use_gpu=false: nn.SyncBatchNorm runs on GPUs only")
        return self

    @model_validator(mode="after")
    def _settings_fit_task(self) -> "PipelineConfig":
        """Fill the task's defaults (loss, checkpoint metric and mode), then check that every loss and
        metric setting is one the task has."""
        task = task_class(self.task.type)
        if self.loss.name is None:
            self.loss.name = task.loss_names[0]
        if self.checkpoint.metric is None:
            self.checkpoint.metric = task.default_metric
        if self.checkpoint.mode is None:
            self.checkpoint.mode = metric_mode(self.checkpoint.metric)
        # every other metric setting left unset follows checkpoint.metric: resolved here, once
        if self.schedule.metric is None:
            self.schedule.metric = self.checkpoint.metric
        if self.train.early_stopping and self.train.early_stopping.metric is None:
            self.train.early_stopping.metric = self.checkpoint.metric
        if self.tune and self.tune.metric is None:
            self.tune.metric = self.checkpoint.metric
        if self.tune and self.tune.mode is None:
            self.tune.mode = metric_mode(self.tune.metric)
        problems = []
        if self.loss.name not in task.loss_names:
            problems.append(f"loss.name={self.loss.name} is not a {task.type} loss; use one of {', '.join(task.loss_names)}")
        metrics = {"checkpoint.metric": self.checkpoint.metric, "schedule.metric": self.schedule.metric,
                   "tune.metric": self.tune and self.tune.metric,
                   "train.early_stopping.metric": self.train.early_stopping and self.train.early_stopping.metric}  # fmt: skip
        for key, metric in metrics.items():
            if metric and metric.split("/", 1)[1] not in task.metric_names:
                allowed = ", ".join(f"val/{name}" for name in task.metric_names)
                problems.append(f"{key}={metric}: a {task.type} task reports {allowed}")
        if self.checkpoint.mode != metric_mode(self.checkpoint.metric):
            problems.append(f"checkpoint.mode={self.checkpoint.mode} with checkpoint.metric={self.checkpoint.metric}: "
                            f"use mode={metric_mode(self.checkpoint.metric)}")  # fmt: skip
        problems += task.config_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self
