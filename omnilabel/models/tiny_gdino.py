"""A tiny random Grounding DINO with a local BERT tokenizer, saved in the Hugging Face format.

Tests and the demo build it instead of downloading ``IDEA-Research/grounding-dino-tiny``, then load the
directory through ``GroundingDinoForObjectDetection.from_pretrained`` and ``AutoProcessor.from_pretrained``
with ``local_files_only=True`` — the path a user's real checkpoint takes.

The vocabulary keeps BERT's ids for the tokens Grounding DINO hardcodes as phrase delimiters
(``transformers``' ``SPECIAL_TOKENS``: ``[CLS]`` 101, ``[SEP]`` 102, ``.`` 1012, ``?`` 1029) and ``[PAD]`` 0;
other slots hold a few hundred words (the synthetic classes, COCO class words), letters and ``##`` word
pieces, so any lower-case ASCII name tokenizes without ``[UNK]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import GroundingDinoConfig

#: Token ids Grounding DINO treats as delimiters, as in ``bert-base-uncased``.
BERT_IDS: dict[str, int] = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103,
                            ".": 1012, "?": 1029}
#: Vocabulary size: just past the largest fixed id.
VOCAB_SIZE = 1100

#: Std of the box heads' hidden and output layers. ``transformers`` initialises them with std 0.02 and a zero
#: last layer, which leaves every box on its anchor; with these, sizes range over the image and some boxes
#: overlap.
TINY_BOX_HIDDEN_STD = 0.25
TINY_BOX_OUT_STD = 0.3

_WORDS = """
circle square triangle ring traffic light fire hydrant stop sign parking meter person bicycle car motorcycle
airplane bus train truck boat bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack
umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard
tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot
pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone
microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush the a an of
and with on in red green blue yellow black white small large big little old new left right top bottom front
back shape object thing box disc star hexagon
"""
_PUNCT = list("!\"#$%&'()*+,-/:;<=>@[\\]^_`{|}~")
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_DIGITS = [str(d) for d in range(10)]
_SUFFIXES = ["##s", "##es", "##ed", "##ing", "##er", "##ly", "##le", "##ion"]


def tiny_vocab() -> list[str]:
    """The local WordPiece vocabulary, index = token id.

    Returns:
        ``VOCAB_SIZE`` unique tokens: BERT's special and delimiter ids at their BERT positions, words,
        punctuation, letters, digits and ``##`` pieces elsewhere, ``[unusedN]`` filling the gaps.
    """
    fixed = {i: tok for tok, i in BERT_IDS.items()}
    words = list(dict.fromkeys(_WORDS.split()))
    pieces = _LETTERS + _DIGITS + [f"##{c}" for c in _LETTERS + _DIGITS] + _SUFFIXES
    free_tokens = iter(dict.fromkeys(words + _PUNCT + pieces))
    vocab: list[str] = []
    unused = 0
    for i in range(VOCAB_SIZE):
        if i in fixed:
            vocab.append(fixed[i])
            continue
        # Ids 1..99 are BERT's "[unused]" block; keep the words above id 103 as BERT does.
        tok = next(free_tokens, None) if i > BERT_IDS["[MASK]"] else None
        if tok is None:
            tok = f"[unused{unused}]"
            unused += 1
        vocab.append(tok)
    return vocab


def _tiny_config(vocab_size: int) -> GroundingDinoConfig:
    from transformers import BertConfig, GroundingDinoConfig, ResNetConfig

    backbone = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256)
    # d_model must be a multiple of 32 (GroupNorm(32, d_model) in the input projections); two decoder
    # layers because the box heads are tied from layer 0 onto the others.
    return GroundingDinoConfig(backbone_config=backbone, text_config=text, use_timm_backbone=False,
                               use_pretrained_backbone=False, num_queries=30, d_model=32, encoder_layers=1,
                               decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=4,
                               encoder_n_points=2, decoder_n_points=2, max_text_len=256)


def build_tiny_gdino(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny random Grounding DINO, its tokenizer and its image processor.

    The box heads get wider random weights (``TINY_BOX_HIDDEN_STD``, ``TINY_BOX_OUT_STD``) so boxes vary in
    size and overlap, and NMS has work to do. The global torch RNG is left untouched.

    Args:
        out_dir: directory to write (created if missing): ``config.json``, ``model.safetensors``,
            ``tokenizer.json``, ``tokenizer_config.json``, ``processor_config.json``.
        seed: seeds the random weights; the same seed gives the same weights.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    from transformers import (
        BertTokenizer,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 256})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(_tiny_config(len(vocab))).eval()
        with torch.no_grad():
            for head in (model.bbox_embed[0], model.model.encoder_output_bbox_embed):
                for layer in head.layers[:-1]:
                    layer.weight.normal_(0.0, TINY_BOX_HIDDEN_STD)
                head.layers[-1].weight.normal_(0.0, TINY_BOX_OUT_STD)
                head.layers[-1].bias.normal_(0.0, TINY_BOX_OUT_STD)
    model.save_pretrained(out)
    return out
