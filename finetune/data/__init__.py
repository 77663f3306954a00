"""The data layer. This package face imports without Ray (a GPU box measuring the step code
has none): preprocessors, row errors, padding. The Ray Data pipeline is `finetune.data.datasets`
(`build_datasets`) and `finetune.data.sources` (`load_source`, `check_source`)."""

from finetune.data.preprocess import ImagePreprocessor, Preprocessor, TextPreprocessor, trim_padding
from finetune.data.rows import DataError

__all__ = ["DataError", "ImagePreprocessor", "Preprocessor", "TextPreprocessor", "trim_padding"]
