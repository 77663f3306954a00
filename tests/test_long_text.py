"""Long texts: data.long_text=head_tail keeps a long text's start and end (Sun et al. 2019), in
training, evaluation, predict and a saved model alike."""

from __future__ import annotations

import numpy as np
import torch

from helpers import FILLER, NEGATIVE, POSITIVE, pipeline_config
from finetune import models
from finetune.data.preprocess import TextPreprocessor, load_tokenizer
from finetune.models import load_model, save_model
from finetune.tasks import build_task

WORDS = FILLER + POSITIVE + NEGATIVE  # each one token of the tiny BERT's vocabulary


def test_head_tail_keeps_the_start_and_the_end_of_a_long_text(tiny_bert_dir):
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    short_text = "a great film"
    cut = TextPreprocessor(str(tiny_bert_dir), max_length=10, long_text="head_tail", head_share=0.25)
    out = cut({"text": np.array([long_text, short_text], dtype=object)})
    words = long_text.split()
    # [CLS], round(8 * 0.25) = 2 words from the start, the last 6, [SEP]
    assert tokenizer.decode(out["input_ids"][0], skip_special_tokens=True).split() == words[:2] + words[-6:]
    assert out["input_ids"][0][0] == tokenizer.cls_token_id and out["input_ids"][0][-1] == tokenizer.sep_token_id
    assert out["attention_mask"][0].all()
    plain = TextPreprocessor(str(tiny_bert_dir), max_length=10)({"text": np.array([long_text, short_text], dtype=object)})
    np.testing.assert_array_equal(out["input_ids"][1], plain["input_ids"][1])  # a short text is not touched
    np.testing.assert_array_equal(out["attention_mask"][1], plain["attention_mask"][1])
    assert tokenizer.decode(plain["input_ids"][0], skip_special_tokens=True).split() == words[:8]


def test_a_saved_model_cuts_long_texts_as_its_run_did(tiny_bert_dir, tmp_path):
    cfg = pipeline_config(data={"source": "x", "max_length": 10, "long_text": "head_tail", "head_share": 0.5},
                          model={"name": f"hf:{tiny_bert_dir}"})  # fmt: skip
    preprocessor = models.build_preprocessor(cfg.model, cfg.data)
    assert (preprocessor.long_text, preprocessor.head_share) == ("head_tail", 0.5)
    model = models.build_model(cfg.model, 2)
    save_model(model, tmp_path / "best", cfg.model, preprocessor, build_task(cfg.task, ["neg", "pos"]))
    saved = load_model(tmp_path / "best")
    assert (saved.preprocessor.long_text, saved.preprocessor.head_share, saved.preprocessor.max_length) == ("head_tail", 0.5, 10)
    text = " ".join(WORDS[i % len(WORDS)] for i in range(30))
    torch.testing.assert_close(saved.preprocessor.encode([text])["input_ids"],
                               torch.from_numpy(preprocessor({"text": np.array([text], dtype=object)})["input_ids"]))
